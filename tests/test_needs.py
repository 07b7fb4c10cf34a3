"""A test that needs a missing system component is skipped, naming the Debian packages, except under
CI=true, where it fails (issue 20: CI must run the real components, not quietly test less)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SAMPLE = '''
from tests.conftest import needs, require

@needs("no-such-command-gpt2", packages="no-such-package")
def test_marked():
    pass

def test_inline():
    require("no-such-command-gpt2", packages="no-such-package")

@needs("sh", packages="dash")
def test_present():
    pass
'''


def run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(REPO)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "tests.conftest", "-c", os.devnull,
                           "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("ci", [None])
def test_missing_components_skip_outside_ci(tmp_path: Path, ci: str | None) -> None:
    r = run(tmp_path, ci)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "1 passed, 2 skipped" in r.stdout and "apt-get install no-such-package" in r.stdout, r.stdout[-2000:]


def test_missing_components_fail_under_ci(tmp_path: Path) -> None:
    r = run(tmp_path, "true")
    # the marked test fails in its setup (pytest counts it as an error), the inline one in its body
    assert r.returncode == 1, r.stdout[-2000:]
    assert "1 failed, 1 passed" in r.stdout and "1 error" in r.stdout, r.stdout[-2000:]
    assert r.stdout.count("CI=true and needs no-such-command-gpt2: apt-get install no-such-package") >= 2, r.stdout
