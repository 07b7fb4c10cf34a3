"""Replica processes of the real server behind the real HAProxy, all on 127.0.0.1 (for test_replicas.py).

The HAProxy configuration is deploy/haproxy/haproxy.cfg, the file the compose `scale` profile
uses, with its `server-template` line (DNS discovery of compose replicas) swapped for one
`server` line per local replica.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"

logger = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> float:  # noqa: ANN001
    """Poll `predicate` until it is true; return the seconds it took, or raise TimeoutError."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if predicate():
                return time.monotonic() - t0
        except httpx.HTTPError:  # not listening yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")


@dataclass
class Replica:
    """One `python -m app` process on 127.0.0.1:port."""

    name: str
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    exit_codes: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**self.env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float = 120) -> None:
        def ok() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            return self.healthy()

        wait_until(ok, timeout, 0.2, f"{self.name} healthy")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit; returns the exit code (recorded in exit_codes)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.exit_codes.append(code)
        return code

    def requests_served(self) -> int:
        """Generation and classification requests this process answered (its own /metrics)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        for m in re.finditer(r'^gpt2_requests_total\{route="([^"]+)",status="(\d+)"\} ([0-9.e+]+)$', text, re.M):
            if m[1] in ("/generate", "/generate_stream", "/classify", "/v1/completions"):
                total += float(m[3])
        return int(total)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def haproxy_config(servers: dict[str, int], template: Path = HAPROXY_CFG) -> str:
    """deploy/haproxy/haproxy.cfg with one `server NAME 127.0.0.1:PORT` line per replica."""
    text = template.read_text()
    lines = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in servers.items())
    text, n = re.subn(r"^\s*server-template .*$", lines, text, flags=re.M)
    assert n == 1, "deploy/haproxy/haproxy.cfg has no server-template line"
    # the DNS resolvers section serves only the compose template line
    text, n = re.subn(r"^resolvers docker\n(?:[ \t]+.*\n)+", "", text, flags=re.M)
    assert n == 1
    return text


@dataclass
class Balancer:
    """`haproxy -db` in the foreground, on 127.0.0.1: LB_PORT (traffic) and STATS_PORT (/stats)."""

    cfg: Path
    port: int
    stats_port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "LB_ADDR": "127.0.0.1", "LB_PORT": str(self.port), "STATS_PORT": str(self.stats_port)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.cfg)], env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    def servers(self) -> dict[str, dict[str, str]]:
        """The stats page's CSV rows for the backend's servers, by server name."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["svname"] not in ("BACKEND",
                                                                                                 "FRONTEND")}

    def status(self, name: str) -> str:
        return self.servers()[name]["status"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def run_load(url: str, out: Path, duration: float, concurrency: int, endpoint: str = "generate",
             stream: bool = False, max_new_tokens: int = 16) -> subprocess.Popen:
    """Start `python -m loadtest.run` against `url` for `duration` seconds; it writes its summary to `out`."""
    cmd = [sys.executable, "-m", "loadtest.run", "--url", url, "--endpoint", endpoint, "--duration", str(duration),
           "--concurrency", str(concurrency), "--max-new-tokens", str(max_new_tokens), "--timeout", "60",
           "--json", str(out), "--quiet", "--max-error-rate", "1"]
    if stream:
        cmd.append("--stream")
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
