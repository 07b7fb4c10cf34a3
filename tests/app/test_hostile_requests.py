"""Requests that cost the server far more than their size (issue 27, items 1-4), against the real
server while other clients stream: a chat template that runs for minutes or renders gigabytes,
template errors, and one request of 64 candidates with log-probabilities. Each is refused or served
without stalling the event loop, and the streams keep getting their tokens.

`serial`: the stall bounds (MAX_GAP_S, MAX_LAG_S, from test_event_loop.py) are for a machine that
runs only this module, as `make test` runs its serial tests."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.app.conftest import Server, base_env, start_server, stop_server
from tests.app.test_event_loop import MAX_GAP_S, Streams, late_ticks
from tests.conftest import make_hf_checkpoint

pytestmark = pytest.mark.serial

# Behaves like a plain template, unless a system message asks for one of the attacks of issue 27.
TEMPLATE = """{%- macro down(n) %}{{ down(n + 1) }}{% endmacro -%}
{%- for m in messages %}
{%- if m.role == 'system' and m.content == 'quadratic' %}
{%- for a in messages %}{% for b in messages %}{% if a.content != b.content %}{% endif %}{% endfor %}{% endfor %}
{%- elif m.role == 'system' and m.content.startswith('repeat ') %}{{ 'a' * (m.content[7:] | int) }}
{%- elif m.role == 'system' and m.content == 'list' %}{% set x = [1] * 10**8 %}{{ x | length }}
{%- elif m.role == 'system' and m.content == 'range' %}{% for i in range(10**9) %}{% endfor %}
{%- elif m.role == 'system' and m.content == 'recurse' %}{{ down(0) }}
{%- else %}{{ m.role }}: {{ m.content }}
{% endif %}
{%- endfor %}assistant:"""


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "template.jinja").write_text(TEMPLATE)
    env = base_env(tiny_lm_dir, tiny_classifier_dir, onnx_cache, CHAT_TEMPLATE=str(tmp / "template.jinja"),
                   CHAT_TEMPLATE_TIMEOUT_SECONDS="1", CHAT_TEMPLATE_MAX_CHARS="1000000",
                   MAX_BODY_BYTES=str(2 * 2**20), MAX_CONCURRENT_REQUESTS="80", MAX_REQUEST_CANDIDATES="64",
                   MAX_BATCH_SIZE="32")
    srv = start_server(tmp, env)
    yield srv
    stop_server(srv)


def rss_mb(pid: int) -> float:
    """Resident memory of the server process alone (the template workers are other processes)."""
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def chat(client: httpx.Client, system: str, n_messages: int = 1) -> httpx.Response:
    messages = [{"role": "system", "content": system}] + [{"role": "user", "content": "x"}] * n_messages
    return client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})


def test_chat_template_attacks_are_400s_and_the_streams_keep_flowing(hostile_server) -> None:
    lag_before = late_ticks(hostile_server)
    rss_before = rss_mb(hostile_server.proc.pid)
    with Streams(hostile_server) as streams, httpx.Client(base_url=hostile_server.url, timeout=60) as c:
        time.sleep(0.5)
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:  # /health answers while a template runs for its whole second
            slow = pool.submit(chat, c, "quadratic", 3000)
            time.sleep(0.3)
            t_health = time.monotonic()
            health = c.get("/health")
            t_health = time.monotonic() - t_health
            r = slow.result()
        took = time.monotonic() - t0
        answers = {a: chat(c, a) for a in ("repeat 50000000", "list", "range", "recurse")}
        ok = chat(c, "You are terse.")
        time.sleep(0.3)
    # a 60 KB body that would have held the loop for 17 s: a 400 after the 1 s limit
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages", r.text
    assert "CHAT_TEMPLATE_TIMEOUT_SECONDS (1 s)" in err["message"], err
    assert took < 5, took
    assert health.status_code == 200 and t_health < 0.5, t_health
    # output size, the worker's memory cap, the sandbox's range limit, recursion: each one 400
    for attack, words in (("repeat 50000000", "CHAT_TEMPLATE_MAX_CHARS (1000000)"), ("list", "MiB"),
                          ("range", "OverflowError"), ("recurse", "recursed too deep")):
        a = answers[attack]
        assert a.status_code == 400 and a.json()["error"]["param"] == "messages", (attack, a.text)
        assert words in a.json()["error"]["message"], (attack, a.text)
    assert ok.status_code == 200, ok.text  # the pool still renders
    assert streams.tokens > 50
    assert max(streams.gaps) < MAX_GAP_S, f"a stream waited {max(streams.gaps):.2f} s for a token"
    assert late_ticks(hostile_server) == lag_before
    # the 50 MB string and the 800 MB list were built in a worker, not in the server
    assert rss_mb(hostile_server.proc.pid) - rss_before < 100
    log = hostile_server.log_text()
    assert "Traceback" not in log and "RecursionError" not in log.replace("(RecursionError)", ""), log[-3000:]


@pytest.fixture(scope="module")
def long_server(tmp_path_factory, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    """A tiny LM with 1,024 positions, so that 64 candidates can echo 450-token prompts."""
    tmp = tmp_path_factory.mktemp("long")
    lm = make_hf_checkpoint(tmp / "lm", "generate", seed=3, n_positions=1024)
    env = base_env(lm, tiny_classifier_dir, onnx_cache, MAX_INPUT_TOKENS="512", MAX_TOTAL_TOKENS="600",
                   MAX_BODY_BYTES=str(2**20), MAX_CONCURRENT_REQUESTS="80", MAX_REQUEST_CANDIDATES="64",
                   MAX_BATCH_SIZE="32")
    srv = start_server(tmp, env)
    yield srv
    stop_server(srv)


def test_an_answer_of_64_candidates_with_logprobs_does_not_stall_the_streams(long_server) -> None:
    """16 prompts of 450 tokens x n 4, echo, 20 log-probabilities a token: 30 MB of JSON, built and
    written in the JSON thread (42 MB held the loop 2 s in issue 27)."""
    body = {"prompt": [f"Prompt number {i} " + "word " * 450 for i in range(16)], "max_tokens": 40, "n": 4,
            "logprobs": 20, "echo": True, "temperature": 1.0, "seed": 1, "ignore_eos": True}
    lag_before = late_ticks(long_server)
    with Streams(long_server) as streams, httpx.Client(base_url=long_server.url, timeout=300) as c:
        time.sleep(0.5)
        r = c.post("/v1/completions", json=body)
        time.sleep(0.5)
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    assert len(out["choices"]) == 64 and len(r.content) > 20_000_000, len(r.content)
    assert [ch["index"] for ch in out["choices"]] == list(range(64))
    assert len(out["choices"][0]["logprobs"]["top_logprobs"][-1]) >= 20  # 21 when the chosen token is not in them
    assert out["usage"]["completion_tokens"] == 64 * 40
    assert max(streams.gaps) < MAX_GAP_S, f"a stream waited {max(streams.gaps):.2f} s for a token"
    assert late_ticks(long_server) == lag_before
