"""A real server: `python -m app` as a subprocess on a free loopback port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from model.tokenizer import GPT2Tokenizer

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(tmp: Path, env: dict[str, str], wait: bool = True, timeout: float = 240) -> Server:
    port = free_port()
    log = tmp / f"server-{port}.log"
    full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1", **env}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=full_env, stdout=f,
                                stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    if wait:
        wait_healthy(server, timeout)
    return server


def wait_healthy(server: Server, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{server.log_text()[-4000:]}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


def scrape(server: Server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def metric(server: Server | str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include `labels`; `server` may be the
    text of one scrape, for values that must be read together."""
    text = server if isinstance(server, str) else scrape(server)
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def base_env(lm: Path, cls: Path, cache: Path, **extra: str) -> dict[str, str]:
    return {"MODEL_PATH": str(lm), "CLASSIFIER_PATH": str(cls), "ONNX_CACHE_DIR": str(cache),
            "MAX_INPUT_TOKENS": "64", "MAX_TOTAL_TOKENS": "120", "MAX_CONCURRENT_REQUESTS": "4",
            "MAX_BATCH_SIZE": "8", "MAX_BODY_BYTES": "65536", "NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("srv"), base_env(tiny_lm_dir, tiny_classifier_dir, onnx_cache))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def nan_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose final LayerNorm bias holds a NaN: every logit is NaN on both sides, so
    the export's parity check fails on each logits comparison, through the real export child."""
    from safetensors.torch import load_file, save_file

    from tests.conftest import make_hf_checkpoint

    folder = make_hf_checkpoint(tmp_path_factory.mktemp("nan_lm"), "generate", seed=5)
    weights = load_file(folder / "model.safetensors")
    weights["transformer.ln_f.bias"][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


API_KEY = "s3cret-key"


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    """One real server with `API_KEY` set, shared by the official-client and browser tests."""
    srv = start_server(tmp_path_factory.mktemp("keyed"),
                       base_env(tiny_lm_dir, tiny_classifier_dir, onnx_cache, API_KEY=API_KEY))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def scoring_server(tmp_path_factory, tiny_lm_dir, onnx_cache) -> Iterator[Server]:
    """A real server whose limits are the tiny model's whole context (the default settings, capped
    by its 128 positions), so a prompt can fill it; the demo's example chat template; no
    classifier. Shared by the log-probability tests (test_logprobs.py) and lm-evaluation-harness
    (test_lm_eval.py)."""
    srv = start_server(tmp_path_factory.mktemp("scoring"), base_env(
        tiny_lm_dir, tiny_lm_dir, onnx_cache, CLASSIFIER_PATH="", MAX_INPUT_TOKENS="512", MAX_TOTAL_TOKENS="1024",
        MAX_CONCURRENT_REQUESTS="32", CHAT_TEMPLATE=str(REPO / "model" / "demo" / "chat_template.jinja")))
    yield srv
    stop_server(srv)


# The tiny LM's tokenizer and its transformers model (the reference), for the modules that compare with it.
@pytest.fixture(scope="module")
def tok(tiny_lm_dir: Path) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_dir(tiny_lm_dir)


@pytest.fixture(scope="module")
def hf(tiny_lm_dir: Path):  # noqa: ANN201 - transformers is imported only by the modules that use it
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(tiny_lm_dir).eval()
