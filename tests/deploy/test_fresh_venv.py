"""Build the image's environment outside Docker: a fresh virtualenv made with the Dockerfile's own
RUN lines (CPU builder stage), then the runtime stage's prepare step, CMD and HEALTHCHECK."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import free_port
from tests.deploy.dockerfile import parse

REPO = Path(__file__).resolve().parents[2]


def _adapt(cmd: str, venv: Path) -> str:
    # This machine reaches PyPI only: the CPU torch wheel comes from the local wheel folder (pip's
    # find-links here) instead of the PyTorch index that TORCH_PIP_ARGS names by default, as
    # deploy/podman/build.sh does with a build arg. Everything else runs as written, in the venv.
    cmd = cmd.replace("${TORCH_PIP_ARGS}", "").replace("${PIP_EXTRA_ARGS}", "")
    return cmd.replace("/opt/venv", str(venv))


@pytest.mark.slow
def test_dockerfile_commands_build_and_serve(tmp_path) -> None:
    _, stages = parse(REPO / "Dockerfile")
    builder, runtime = stages["builder-cpu"], stages["cpu"]
    venv, src = tmp_path / "venv", tmp_path / "src"
    src.mkdir()
    # The builder's COPY lines: the package sources and metadata.
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, src / name)
    for name in ("model", "export", "app"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PIP_NO_CACHE_DIR": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    assert builder.run[0] == "python -m venv /opt/venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for cmd in builder.run[1:]:
        r = subprocess.run(_adapt(cmd, venv), shell=True, cwd=src, env=env, capture_output=True, text=True,
                           timeout=1200)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"

    # The runtime stage: its ENV (paths mapped into tmp), the bake step, then CMD and HEALTHCHECK.
    app_dir = tmp_path / "app"
    shutil.copytree(REPO / "model" / "demo", app_dir / "model" / "demo")
    run_env = dict(env)
    for k, v in runtime.env.items():
        if k != "PATH":
            run_env[k] = v.replace("/app/", f"{app_dir}/").replace("/cache", str(tmp_path / "cache"))
    port = free_port()
    run_env.update(PORT=str(port), HOST="127.0.0.1")
    assert "python -m app.prepare" in runtime.run
    r = subprocess.run(["python", "-m", "app.prepare"], cwd=app_dir, env=run_env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    t0 = time.monotonic()
    proc = subprocess.Popen(runtime.cmd, cwd=app_dir, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        healthy = False
        while time.monotonic() - t0 < 60 and not healthy:
            time.sleep(0.3)
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            healthy = subprocess.run(runtime.healthcheck, env=run_env, capture_output=True).returncode == 0
        assert healthy, "HEALTHCHECK never passed"
        assert time.monotonic() - t0 < 30  # baked exports: healthy in seconds
        out = httpx.post(f"http://127.0.0.1:{port}/generate", json={"inputs": "The computer"}, timeout=60)
        assert out.status_code == 200 and out.json()["generated_text"]
        info = httpx.get(f"http://127.0.0.1:{port}/info").json()
        assert info["generation"]["backend"] == "onnxruntime" and info["generation"]["export_cache_hit"] is True
    finally:
        proc.terminate()
        proc.wait(30)
