"""Big requests do not stall the event loop (issue 20, item 4), against the real server: while
1.9 MB bodies arrive at /tokenize, /generate, /v1/completions and /classify, streams keep getting
their tokens. Texts that cannot fit the token limit are refused from their length before
tokenizing; tokenizing, offsets and the JSON of a big /tokenize answer run off the loop; /tokenize
counts against MAX_CONCURRENT_REQUESTS."""

from __future__ import annotations

import json
import logging
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.app.conftest import REPO, Server, base_env, metric, scrape, start_server, stop_server

pytestmark = pytest.mark.serial

logger = logging.getLogger(__name__)

MAX_CONCURRENT = 8
# What a stream may wait between two tokens while the big requests arrive, and how late the loop may
# run its 100 ms timer. Without the fixes the 1.9 MB /tokenize alone froze every stream for 5 s here;
# with them the longest gap was 0.36 s and the loop's worst lag under 0.25 s, on 2 cores shared with
# other jobs (load average 10). The bounds leave room for that noise, not for a stall. Beside
# `make test`'s 3 xdist workers on those 2 cores they did not hold (a 1.4 s gap, ticks 0.5-1 s
# late): this module is `serial`, run after the workers, alone.
MAX_GAP_S = 1.0
MAX_LAG_S = "0.5"  # a bucket of gpt2_event_loop_lag_seconds


def big_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["hello", "world", "the", "computer", "é", "日本", "🙂", "\n", "  ", "sat", "on", "mat"]
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


@pytest.fixture(scope="module")
def big_server(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    env = base_env(tiny_lm_dir, tiny_classifier_dir, onnx_cache, MAX_BODY_BYTES=str(3 * 2**20),
                   MAX_CONCURRENT_REQUESTS=str(MAX_CONCURRENT))
    srv = start_server(tmp_path_factory.mktemp("big"), env)
    yield srv
    stop_server(srv)


def late_ticks(server: Server) -> float:
    """How many of the loop's timer ticks ran later than MAX_LAG_S, from one scrape (two scrapes
    would count a tick that lands between them)."""
    text = scrape(server)
    return (metric(text, "gpt2_event_loop_lag_seconds_count")
            - metric(text, "gpt2_event_loop_lag_seconds_bucket", le=MAX_LAG_S))


class Streams:
    """`tests.app.stream_gaps` in its own process: 2 clients streaming back to back; `gaps` are the
    waits between consecutive tokens of a stream (the first token's wait is not one)."""

    def __init__(self, server: Server) -> None:
        self.cmd = [sys.executable, "-m", "tests.app.stream_gaps", server.url, "2"]
        self.gaps: list[float] = []
        self.tokens = 0

    def __enter__(self) -> Streams:
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "started"
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.proc.communicate("stop\n", timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        self.gaps, self.tokens = result["gaps"], result["tokens"]


def test_streams_keep_flowing_while_big_bodies_arrive(big_server) -> None:
    url = big_server.url
    text = big_text(1_900_000)
    lag_before = late_ticks(big_server)
    with Streams(big_server) as streams:
        time.sleep(1.0)
        t0 = time.monotonic()
        with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(8) as pool:
            tokenized = pool.submit(c.post, "/tokenize", json={"inputs": text})
            classified = pool.submit(c.post, "/classify", json={"inputs": text, "truncate": True})
            refused = [pool.submit(c.post, "/generate", json={"inputs": text}) for _ in range(4)]
            refused.append(pool.submit(c.post, "/v1/completions", json={"prompt": text, "max_tokens": 4}))
            refused.append(pool.submit(c.post, "/classify", json={"inputs": text}))
            answers = [f.result() for f in refused]
            t_refused = time.monotonic() - t0
            tok, cls = tokenized.result(), classified.result()
        busy = time.monotonic() - t0
        time.sleep(0.5)
    assert streams.tokens > 100
    gaps = sorted(streams.gaps)
    logger.info("inter-token gaps over %.1f s of big requests: p50 %.1f ms, p99 %.1f ms, max %.1f ms (%d gaps); "
                "refusals answered in %.2f s", busy, 1000 * statistics.median(gaps),
                1000 * gaps[int(0.99 * (len(gaps) - 1))], 1000 * gaps[-1], len(gaps),
                t_refused)
    assert gaps[-1] < MAX_GAP_S, f"a stream waited {gaps[-1]:.2f} s for a token"

    # The refusals came from the length alone (a token holds at most 128 characters), fast.
    for r in answers[:4]:
        assert r.status_code == 422 and "characters cannot fit in MAX_INPUT_TOKENS" in r.json()["error"], r.text
    err = answers[4].json()["error"]
    assert answers[4].status_code == 400 and err["param"] == "prompt" and "characters" in err["message"], err
    assert answers[5].status_code == 422 and "characters cannot fit" in answers[5].json()["error"]
    assert t_refused < 5, t_refused

    # The big ones were served in full.
    assert tok.status_code == 200, tok.text[:300]
    spans = json.loads(tok.content)
    assert spans[0]["start"] == 0 and spans[-1]["stop"] == len(text) and len(spans) > 500_000
    assert all(a["stop"] == b["start"] for a, b in zip(spans, spans[1:], strict=False))
    assert cls.status_code == 200 and len(cls.json()) == 3, cls.text[:300]

    # The loop itself never ran late by more than MAX_LAG_S (gpt2_event_loop_lag_seconds).
    lag_after = late_ticks(big_server)
    assert lag_after == lag_before


def test_tokenize_counts_against_max_concurrent_requests(big_server) -> None:
    text = big_text(600_000, seed=1)
    with httpx.Client(base_url=big_server.url, timeout=120) as c, ThreadPoolExecutor(MAX_CONCURRENT + 2) as pool:
        futures = [pool.submit(c.post, "/tokenize", json={"inputs": text}) for _ in range(MAX_CONCURRENT + 2)]
        codes = [f.result().status_code for f in futures]
    assert codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    r = httpx.post(big_server.url + "/tokenize", json={"inputs": "Hello world"}, timeout=30)
    assert r.status_code == 200 and [t["text"] for t in r.json()] == ["Hello", " world"]
