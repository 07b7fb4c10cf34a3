"""Issue 27, item 8: an export that failed for a reason that may not recur (the child killed by a
signal, a full cache disk, the export lock taken over) is not remembered; the next start retries.

The faults are injected into the real export child with a `sitecustomize.py` on its PYTHONPATH
(the child inherits the server's environment): the server's code path runs unchanged.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from app.loading import export_lock, loader

# Runs at the start of every Python process that has it on PYTHONPATH; acts only in the export
# child (the one with `--out`), as EXPORT_FAULT says, and counts the child's runs.
HOOK = r'''
import builtins, errno, json, os, signal, sys, uuid
if "--out" in sys.argv and os.environ.get("EXPORT_FAULT_RUNS"):
    with open(os.environ["EXPORT_FAULT_RUNS"], "a") as f:
        f.write("run\n")
    out = os.path.realpath(sys.argv[sys.argv.index("--out") + 1])
    fault = os.environ.get("EXPORT_FAULT")
    if fault == "sigkill":  # what the out-of-memory killer does, after a library's warning
        sys.stderr.write("/venv/torchvision/io/image.py:13: UserWarning: Failed to load image Python extension: "
                         "''If you don't plan on using image functionality from torchvision.io, you can ignore "
                         "this warning.\n  warn(\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "enospc":  # the cache filesystem is full: any write under the export's folder fails
        real_open = builtins.open
        def full_open(file, mode="r", *a, **k):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") \
                    and os.path.realpath(file).startswith(out):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return real_open(file, mode, *a, **k)
        builtins.open = full_open
    elif fault == "takeover":  # another process breaks the lock, takes it and removes this folder
        cache, name = os.path.split(out)
        entry = name.removeprefix(".tmp-").rsplit("-", 1)[0]
        lock = os.path.join(cache, ".lock-" + entry)
        os.unlink(lock)
        with open(lock, "x") as f:
            f.write(json.dumps({"token": uuid.uuid4().hex, "pid": 1, "host": "other"}))
        sys.exit(f"FileNotFoundError: [Errno 2] No such file or directory: {out!r}")
'''


@pytest.fixture
def child_fault(tmp_path, monkeypatch):
    """`child_fault(kind)` makes the next export children fail that way; returns the file whose
    line count is how many children ran."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    runs = tmp_path / "runs"
    runs.write_text("")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("EXPORT_FAULT_RUNS", str(runs))

    def set_fault(kind: str | None) -> Path:
        if kind is None:
            monkeypatch.delenv("EXPORT_FAULT", raising=False)
        else:
            monkeypatch.setenv("EXPORT_FAULT", kind)
        return runs

    return set_fault


def _runs(runs: Path) -> int:
    return len(runs.read_text().splitlines())


def _reports(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*.failed.json"))


def test_a_child_killed_by_a_signal_is_not_remembered_and_the_next_start_retries(
        tiny_lm_dir, tmp_path, child_fault) -> None:
    runs = child_fault("sigkill")
    cache = tmp_path / "cache"
    lo = loader.load("generate", tiny_lm_dir, cache_dir=cache)
    assert lo.backend == "torch"
    reason = lo.fallback_reason
    assert reason == ("TransientExportError: export did not finish: the export child was killed by SIGKILL "
                      "(out of memory?); not remembered, retried at the next start"), reason
    assert "Warning" not in reason and "exit -9" not in reason
    assert _reports(cache) == [] and _runs(runs) == 1
    # The next start runs the export again (a remembered failure would not).
    with pytest.raises(loader.TransientExportError, match="killed by SIGKILL"):
        loader.ensure_export(tiny_lm_dir, "generate", "fp32", cache)
    assert _runs(runs) == 2 and _reports(cache) == []
    assert not [p for p in cache.iterdir() if p.name.startswith((".tmp-", ".lock-"))]


def test_a_full_cache_disk_is_not_remembered_and_a_start_after_it_has_room_exports(
        tiny_lm_dir, tmp_path, child_fault) -> None:
    runs = child_fault("enospc")
    cache = tmp_path / "cache"
    with pytest.raises(loader.TransientExportError) as err:
        loader.ensure_export(tiny_lm_dir, "generate", "fp32", cache)
    line = loader.one_line(err.value)
    assert line == (f"TransientExportError: export did not finish: no space left on the cache filesystem {cache} "
                    f"(ENOSPC); not remembered, retried at the next start"), line
    assert "No space left on device" in err.value.output  # the child's traceback, kept for the log
    assert _reports(cache) == [] and _runs(runs) == 1
    child_fault(None)  # the disk has room again
    path, hit = loader.ensure_export(tiny_lm_dir, "generate", "fp32", cache)
    assert not hit and path.is_file() and _runs(runs) == 2 and _reports(cache) == []


def test_a_full_cache_disk_seen_by_the_server_itself_is_one_clean_line(tiny_lm_dir, tmp_path, monkeypatch) -> None:
    def full(self, cancel=None, poll=0.5):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(export_lock.ExportLock, "acquire", full)
    with pytest.raises(loader.TransientExportError, match=rf"no space left on the cache filesystem {tmp_path} "
                                                           r"\(ENOSPC\); not remembered"):
        loader.ensure_export(tiny_lm_dir, "generate", "fp32", tmp_path)
    assert _reports(tmp_path) == []


def test_an_export_whose_lock_was_taken_over_is_not_remembered(tiny_lm_dir, tmp_path, child_fault) -> None:
    runs = child_fault("takeover")
    cache = tmp_path / "cache"
    with pytest.raises(loader.TransientExportError, match=r"another process took the export lock \.lock-generate-"):
        loader.ensure_export(tiny_lm_dir, "generate", "fp32", cache, lock_stale_s=0.5)
    assert _reports(cache) == [] and _runs(runs) == 1
    # The other holder's lock was left alone; once it is stale, the next start takes it and retries.
    assert json.loads(next(cache.glob(".lock-*")).read_text())["host"] == "other"
    with pytest.raises(loader.TransientExportError):
        loader.ensure_export(tiny_lm_dir, "generate", "fp32", cache, lock_stale_s=0.5)
    assert _runs(runs) == 2


def test_a_deterministic_failure_is_still_remembered_and_named_by_its_error_not_a_warning(
        tiny_lm_dir, tmp_path, child_fault) -> None:
    runs = child_fault(None)  # counts runs, injects nothing
    with pytest.raises(loader.ExportFailedError) as err:
        loader.ensure_export(tiny_lm_dir, "classify", "fp32", tmp_path)  # an LM is no classifier: exit 2
    assert not isinstance(err.value, loader.TransientExportError)
    assert err.value.report is not None and err.value.report.is_file()
    with pytest.raises(loader.ExportFailedError, match="remembered from"):
        loader.ensure_export(tiny_lm_dir, "classify", "fp32", tmp_path)
    assert _runs(runs) == 1
    # The one line is the child's error, not a library's warning printed after it.
    out = ("[export] loading checkpoint\n[export] /ckpt holds a language model, not a model for task 'classify'\n"
           "/venv/torchvision/io/image.py:13: UserWarning: Failed to load image Python extension\n  warn(\n")
    assert loader._summarize(2, out, None) == (
        "export failed (exit 2): [export] /ckpt holds a language model, not a model for task 'classify'")
