"""The CPU image, built and run with podman: `make image-test` (GPT2_IMAGE_TEST=1).

Builds the Dockerfile's `cpu` target with deploy/podman/build.sh (build args and read-only build
mounts only), then runs it on the host network on a free 127.0.0.1 port and checks: healthy within
30 s, /generate and /classify, a non-root uid, the image's own HEALTHCHECK passing
(`podman healthcheck run`), SIGTERM during streamed requests (they finish, exit code 0), and a
second container on the same ONNX cache volume reporting a cache hit in /info.

Skipped unless GPT2_IMAGE_TEST=1 (the build takes minutes) and podman is installed (Debian
packages `podman` and `runc`; the base image also needs `debootstrap`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import free_port
from tests.conftest import needs
from tests.deploy.cluster import REPO, wait_until

logger = logging.getLogger(__name__)

PODMAN = str(REPO / "deploy" / "podman" / "podman.sh")
TAG = os.environ.get("GPT2_IMAGE_TAG", "localhost/gpt2-serve:cpu-test")
RUN_FLAGS = ["--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.environ.get("GPT2_IMAGE_TEST") != "1",
                       reason="image build + run takes minutes: run `make image-test` (GPT2_IMAGE_TEST=1)"),
    needs("podman", "runc", "debootstrap", packages="podman runc debootstrap"),
]


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def image() -> str:
    t0 = time.monotonic()
    r = subprocess.run([str(REPO / "deploy" / "podman" / "build.sh"), TAG], capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    logger.info("image %s built in %.0f s", TAG, time.monotonic() - t0)
    return TAG


@pytest.fixture(scope="module")
def volume(image: str) -> Iterator[str]:
    name = f"gpt2-test-cache-{os.getpid()}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)


class Container:
    def __init__(self, image: str, volume: str, name: str) -> None:
        self.port = free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        podman("rm", "-f", name, check=False)
        self.t0 = time.monotonic()
        podman("run", "-d", "--name", name, *RUN_FLAGS, "-e", f"PORT={self.port}", "-e", "HOST=127.0.0.1",
               "-v", f"{volume}:/cache", image)

    def healthy(self) -> bool:
        state = podman("inspect", "-f", "{{.State.Status}}", self.name).stdout.strip()
        assert state == "running", f"container {state}: {self.logs()}"
        return httpx.get(f"{self.url}/health", timeout=2).status_code == 200

    def logs(self) -> str:
        r = podman("logs", self.name, check=False)
        return r.stdout[-3000:] + r.stderr[-3000:]

    def pid(self) -> int:
        return int(podman("inspect", "-f", "{{.State.Pid}}", self.name).stdout.strip())

    def exit_code(self, timeout: float = 60) -> int:
        return int(podman("wait", self.name, timeout=timeout).stdout.strip())

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


def _stream(url: str, out: dict, key: int, started: threading.Event) -> None:
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 200, "do_sample": True, "seed": key,
                                                         "temperature": 1.5}}
    events = []
    try:
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as resp:
            out[key] = {"status": resp.status_code}
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    events.append((time.monotonic(), json.loads(line[5:])))
                    started.set()
        out[key]["events"] = events
    except httpx.HTTPError as e:
        out[key] = {"error": repr(e), "events": events}


def test_cpu_image(image: str, volume: str) -> None:
    c = Container(image, volume, f"gpt2-image-test-{os.getpid()}")
    try:
        took = wait_until(c.healthy, 30, 0.25, "container healthy")
        logger.info("healthy %.1f s after `podman run`", took)

        r = httpx.post(f"{c.url}/generate", json={"inputs": "The computer", "parameters": {"max_new_tokens": 8}},
                       timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"], r.text
        r = httpx.post(f"{c.url}/classify", json={"inputs": "The judge read the verdict."}, timeout=60)
        assert r.status_code == 200 and r.json()[0]["label"], r.text
        info = httpx.get(f"{c.url}/info", timeout=10).json()
        assert info["generation"]["backend"] == "onnxruntime", info
        assert info["generation"]["export_cache_hit"] is True  # the exports baked into the image

        assert podman("exec", c.name, "id", "-u").stdout.strip() == "10001"
        status = podman("exec", c.name, "cat", "/proc/1/status").stdout
        uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
        assert uid_line.split()[1:] == ["10001"] * 4, uid_line  # the server process itself is not root
        hc = podman("healthcheck", "run", c.name, check=False)
        assert hc.returncode == 0, hc.stdout + hc.stderr

        # SIGTERM while streams are running: they finish, then the server exits 0.
        results: dict = {}
        started = [threading.Event() for _ in range(4)]
        threads = [threading.Thread(target=_stream, args=(c.url, results, i, ev)) for i, ev in enumerate(started)]
        for t in threads:
            t.start()
        for ev in started:  # every stream has its first token: all are in flight when the signal comes
            assert ev.wait(30)
        t_term = time.monotonic()
        os.kill(c.pid(), signal.SIGTERM)  # the container's PID 1 (python -m app), as `podman stop` does
        for t in threads:
            t.join(120)
        code = c.exit_code()
        assert code == 0, c.logs()
        after = 0
        for res in results.values():
            assert res.get("status") == 200 and "error" not in res, res
            final = res["events"][-1][1]
            assert final["generated_text"] is not None, final  # each stream got its final event
            after += sum(1 for t, _ in res["events"] if t > t_term)
        assert after > 0, "no token arrived after SIGTERM: the streams finished before the signal"
        logger.info("SIGTERM: %d streams finished, %d tokens after the signal, exit code %d", len(results),
                    after, code)
    finally:
        c.remove()

    # A new container on the same volume: the exports there are used (cache hit), healthy fast again.
    c2 = Container(image, volume, f"gpt2-image-test2-{os.getpid()}")
    try:
        wait_until(c2.healthy, 30, 0.25, "second container healthy")
        info = httpx.get(f"{c2.url}/info", timeout=10).json()
        assert info["generation"]["export_cache_hit"] is True, info
        assert info["classification"]["export_cache_hit"] is True, info
        mount = podman("volume", "inspect", "-f", "{{.Mountpoint}}", volume).stdout.strip()
        assert any(p.name.startswith("generate-") for p in Path(mount).iterdir()), list(Path(mount).iterdir())
    finally:
        c2.remove()
