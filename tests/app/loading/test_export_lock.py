"""The export cache under kills and races (issue 20, items 6 and 7): the export child dies with its
server, a dead export's leftovers are removed at the next start without touching a live one's, and
replicas starting together on one cache export once, one of them taking over when the exporter is
killed. With real locks, real processes and real servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from app.loading.export_lock import ExportLock, remove_leftovers
from tests.app.conftest import REPO, Server, start_server, stop_server, wait_healthy

ENTRY = "generate-fp32-gqa-opset18-0123456789abcdef0123"


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def export_child_of(pid: int) -> int | None:
    for c in children(pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
            if b"\0app.loading.export_child\0" in cmd or b"\0-m\0export\0" in cmd:
                return c
        except OSError:
            pass
    return None


def wait_for(pred, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tmp_folders(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob(".tmp-*")) if cache.exists() else []


# ---- the lock itself, between real processes --------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from app.loading.export_lock import ExportLock
    lock = ExportLock(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
    assert lock.acquire()
    lock.tmp.mkdir()
    (lock.tmp / "model.onnx").write_bytes(b"half an export")
    print(lock.tmp.name, flush=True)
    time.sleep(600)
""")


def hold_in_a_process(cache: Path, stale_after: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache), ENTRY, str(stale_after)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_a_second_process_waits_for_the_holder_then_takes_the_lock(tmp_path: Path) -> None:
    holder, tmp = hold_in_a_process(tmp_path, 30)
    try:
        lock = ExportLock(tmp_path, ENTRY, 30)
        got = threading.Event()
        t = threading.Thread(target=lambda: lock.acquire() and got.set(), daemon=True)
        t.start()
        assert not got.wait(2.0), "took a lock a live process holds"
        assert (tmp_path / tmp).is_dir()  # the live holder's work is left alone
    finally:
        holder.kill()
        holder.wait()
    # killed: no more heartbeat; with stale_after 30 s the waiter would wait 30 s, so release by hand
    (tmp_path / f".lock-{ENTRY}").unlink()
    assert got.wait(5.0)
    lock.release()
    assert not (tmp_path / f".lock-{ENTRY}").exists()


def test_a_live_holder_keeps_its_lock_past_stale_after(tmp_path: Path) -> None:
    holder, tmp = hold_in_a_process(tmp_path, 1.0)  # it touches the lock every 0.2 s
    try:
        cancel = threading.Event()
        threading.Timer(3.0, cancel.set).start()
        assert ExportLock(tmp_path, ENTRY, 1.0).acquire(cancel, poll=0.1) is False  # waited 3 s, then cancelled
        assert (tmp_path / tmp / "model.onnx").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holders_lock_is_taken_over_and_its_folder_removed(tmp_path: Path) -> None:
    holder, tmp = hold_in_a_process(tmp_path, 1.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = ExportLock(tmp_path, ENTRY, 1.0)
    t0 = time.monotonic()
    assert lock.acquire(threading.Event(), poll=0.1)
    assert 0.5 < time.monotonic() - t0 < 10
    assert not (tmp_path / tmp).exists()  # the dead holder's half export is gone
    assert json.loads((tmp_path / f".lock-{ENTRY}").read_text())["token"] == lock.token
    lock.release()


def test_leftovers_of_dead_exports_are_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    holder, live = hold_in_a_process(tmp_path, 30)
    try:
        dead = [tmp_path / f".tmp-{ENTRY}-{uuid.uuid4().hex}", tmp_path / f".tmp-classify-fp32-x-{uuid.uuid4().hex}",
                tmp_path / ".trash-0123"]
        for d in dead:
            (d / "sub").mkdir(parents=True)
            (d / "sub" / "model.onnx").write_bytes(b"x" * 1000)
        removed = remove_leftovers(tmp_path)
        assert sorted(removed) == sorted(dead[:2])
        assert not any(d.exists() for d in dead)
        assert (tmp_path / live / "model.onnx").is_file()
    finally:
        holder.kill()
        holder.wait()


# ---- real servers ------------------------------------------------------------------------------

def lm_env(lm: Path, cache: Path, **extra: str) -> dict[str, str]:
    return {"MODEL_PATH": str(lm), "CLASSIFIER_PATH": "", "ONNX_CACHE_DIR": str(cache), "NUM_THREADS": "1",
            "MAX_BATCH_SIZE": "4", **extra}


@pytest.mark.slow
def test_kill_9_during_the_first_export_kills_the_export_and_the_next_start_cleans_up(tmp_path, tiny_lm_dir) -> None:
    cache = tmp_path / "cache"
    env = lm_env(tiny_lm_dir, cache, EXPORT_LOCK_STALE_SECONDS="3")  # the killed server's lock: dead after 3 s
    srv = start_server(tmp_path, env, wait=False)
    try:
        child = wait_for(lambda: export_child_of(srv.proc.pid), 120, "the export child")
        wait_for(lambda: tmp_folders(cache), 60, "the export's temporary folder")
    finally:
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
    # The kernel kills the orphaned export at once (PR_SET_PDEATHSIG), not when it is done.
    wait_for(lambda: not alive(child), 5, f"the export child {child} to die with its server")
    left = tmp_folders(cache)
    assert len(left) == 1, left
    again = start_server(tmp_path, env)
    try:
        assert left[0] not in tmp_folders(cache)
        assert "left by an export that did not finish" in again.log_text()
        info = httpx.get(again.url + "/info", timeout=10).json()["generation"]
        assert info["backend"] == "onnxruntime" and info["export_cache_hit"] is False
    finally:
        stop_server(again)
    assert tmp_folders(cache) == []


def exports_started(servers: list[Server], task: str = "generate") -> int:
    """Exports of `task`'s graph begun by these servers (each server exports the generation graph,
    then the embedding graph of the same checkpoint, each under its own lock)."""
    return sum(s.log_text().count(f"({task}, fp32) to the cache; first start only") for s in servers)


@pytest.mark.slow
def test_three_replicas_on_one_empty_cache_export_once(tmp_path, tiny_lm_dir) -> None:
    cache = tmp_path / "cache"
    servers = [start_server(tmp_path, lm_env(tiny_lm_dir, cache), wait=False) for _ in range(3)]
    try:
        for s in servers:
            wait_healthy(s, 300)
        assert exports_started(servers) == 1, [s.log_text()[-2000:] for s in servers]
        assert exports_started(servers, "embed") == 1, [s.log_text()[-2000:] for s in servers]
        hits = sorted(httpx.get(s.url + "/info", timeout=10).json()["generation"]["export_cache_hit"] for s in servers)
        assert hits == [False, True, True]  # the other two used its export
        assert tmp_folders(cache) == []
    finally:
        for s in servers:
            stop_server(s)


@pytest.mark.slow
def test_when_the_exporting_replica_is_killed_another_takes_over(tmp_path, tiny_lm_dir) -> None:
    cache = tmp_path / "cache"
    env = lm_env(tiny_lm_dir, cache, EXPORT_LOCK_STALE_SECONDS="3")
    servers = [start_server(tmp_path, env, wait=False) for _ in range(3)]
    try:
        holder = wait_for(lambda: next((s for s in servers if export_child_of(s.proc.pid)), None), 120,
                          "one replica's export child")
        child = export_child_of(holder.proc.pid)
        wait_for(lambda: tmp_folders(cache), 60, "the export's temporary folder")
        time.sleep(1.0)
        assert sum(export_child_of(s.proc.pid) is not None for s in servers) == 1  # the others wait
        holder.proc.send_signal(signal.SIGKILL)
        holder.proc.wait()
        wait_for(lambda: not alive(child), 5, "the killed replica's export child to die")
        rest = [s for s in servers if s is not holder]
        for s in rest:
            wait_healthy(s, 300)
        logs = "\n".join(s.log_text() for s in rest)
        assert exports_started(rest) == 1 and "taking it over" in logs, logs[-3000:]
        assert sorted(httpx.get(s.url + "/info", timeout=10).json()["generation"]["export_cache_hit"]
                      for s in rest) == [False, True]
        assert tmp_folders(cache) == []  # the killed replica's folder went with its lock
    finally:
        for s in servers:
            if s.proc.poll() is None:
                stop_server(s)
