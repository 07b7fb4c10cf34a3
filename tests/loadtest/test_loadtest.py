"""`loadtest.run` against the real server (tiny models), plus unit tests with a mock transport."""

from __future__ import annotations

import asyncio
import io
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from loadtest.run import (
    DEFAULT_PROMPTS,
    HARD_CAP_REQUESTS,
    LoadConfig,
    Progress,
    ProgressLine,
    main,
    percentile,
    report,
    run_load,
)
from tests.app.conftest import REPO, Server, base_env, free_port, start_server, stop_server

API_KEY = "sekrit-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("lt"), base_env(tiny_lm_dir, tiny_classifier_dir, onnx_cache))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    env = base_env(tiny_lm_dir, tiny_classifier_dir, onnx_cache, API_KEY=API_KEY)
    srv = start_server(tmp_path_factory.mktemp("lt_key"), env)
    yield srv
    stop_server(srv)


def load(**kw) -> dict:
    return asyncio.run(run_load(LoadConfig(**kw)))


def expected_tokens(url: str, endpoint: str, n: int, max_new_tokens: int, seed: int = 0) -> int:
    """Tokens the first `n` seeded prompt draws generate, each measured alone (greedy)."""
    rng = random.Random(seed)
    draws = [rng.choice(DEFAULT_PROMPTS) for _ in range(n)]
    per_prompt = {}
    for p in set(draws):
        if endpoint == "completions":
            r = httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": max_new_tokens, "temperature": 0})
            per_prompt[p] = r.json()["usage"]["completion_tokens"]
        else:
            r = httpx.post(url + "/generate", json={"inputs": p, "parameters": {"max_new_tokens": max_new_tokens,
                                                                              "details": True}})
            per_prompt[p] = r.json()["details"]["generated_tokens"]
        assert r.status_code == 200, r.text
    return sum(per_prompt[p] for p in draws)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the CLI; stdout/stderr decoded without newline translation (the progress line uses \\r)."""
    r = subprocess.run([sys.executable, "-m", "loadtest.run", *args], cwd=REPO, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


# --- percentile -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 101, 1000])
def test_percentile_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    for data in (rng.normal(size=n), rng.exponential(size=n), rng.integers(0, 5, size=n).astype(float)):
        values = data.tolist()
        for q in (0, 1, 10, 25, 33.3, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(data, q)), rel=1e-12, abs=1e-12)


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None
    assert percentile([3.5], 0) == 3.5 and percentile([3.5], 50) == 3.5 and percentile([3.5], 100) == 3.5
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted input is fine and left as it was
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert values == [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile([1, 2], 50) == 1.5
    assert percentile((7, 7, 7), 90) == 7
    for q in (-1, 100.5):
        with pytest.raises(ValueError):
            percentile([1.0], q)


# --- against the real server -----------------------------------------------------------------


def test_generate_counts(server: Server) -> None:
    s = load(url=server.url, requests=20, concurrency=3, max_new_tokens=5)
    assert (s["requests"], s["ok"], s["errors"], s["error_rate"]) == (20, 20, {}, 0.0)
    assert s["generated_tokens"] == expected_tokens(server.url, "generate", 20, 5)
    assert 0 < s["generated_tokens"] <= 20 * 5
    lat = s["latency_s"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert s["ttft_s"] is None
    assert s["requests_per_s"] == pytest.approx(20 / s["wall_s"])
    assert s["tokens_per_s"] == pytest.approx(s["generated_tokens"] / s["wall_s"])
    assert s["settings"]["path"] == "/generate" and s["settings"]["stream"] is False


@pytest.mark.parametrize("endpoint", ["generate", "generate_stream"])
def test_generate_stream_reports_ttft(server: Server, endpoint: str) -> None:
    s = load(url=server.url, endpoint=endpoint, stream=endpoint == "generate", requests=12, concurrency=3,
             max_new_tokens=6)
    assert (s["requests"], s["ok"], s["errors"]) == (12, 12, {})
    assert s["settings"]["path"] == "/generate_stream" and s["settings"]["stream"] is True
    assert s["generated_tokens"] == expected_tokens(server.url, "generate", 12, 6)  # one event per token
    ttft, lat = s["ttft_s"], s["latency_s"]
    assert 0 < ttft["p50"] <= ttft["p99"] <= lat["max"]


def test_classify(server: Server) -> None:
    s = load(url=server.url, endpoint="classify", requests=15, concurrency=3)
    assert (s["requests"], s["ok"], s["errors"], s["generated_tokens"]) == (15, 15, {}, 0)
    assert s["settings"]["path"] == "/classify" and s["ttft_s"] is None


@pytest.mark.parametrize("stream", [False, True])
def test_completions(server: Server, stream: bool) -> None:
    s = load(url=server.url, endpoint="completions", stream=stream, requests=12, concurrency=3, max_new_tokens=7)
    assert (s["requests"], s["ok"], s["errors"]) == (12, 12, {})
    assert s["settings"]["path"] == "/v1/completions"
    assert s["generated_tokens"] == expected_tokens(server.url, "completions", 12, 7)
    assert (s["ttft_s"] is not None) == stream
    if stream:
        assert 0 < s["ttft_s"]["p50"] <= s["latency_s"]["max"]


def test_duration_is_bounded(server: Server) -> None:
    t0 = time.monotonic()
    s = load(url=server.url, duration=2, concurrency=2, max_new_tokens=8)
    elapsed = time.monotonic() - t0
    assert 2.0 <= s["wall_s"] < 3.0 and elapsed < 4.0
    assert s["requests"] > 0 and s["ok"] == s["requests"]
    assert s["settings"]["requests"] is None and s["settings"]["duration_s"] == 2


def test_overload_429s_are_counted(server: Server) -> None:
    # 12 workers against MAX_CONCURRENT_REQUESTS=4: the excess is refused at once with 429
    s = load(url=server.url, requests=40, concurrency=12, max_new_tokens=32)
    assert s["requests"] == 40
    assert set(s["errors"]) == {"429"} and s["errors"]["429"] > 0
    assert s["ok"] >= 4 and s["ok"] + s["errors"]["429"] == 40
    assert "MAX_CONCURRENT_REQUESTS" in s["error_examples"]["429"]
    assert 0 < s["generated_tokens"] <= 32 * s["ok"]


def test_wrong_path_404s(server: Server) -> None:
    s = load(url=server.url + "/nope", requests=6, concurrency=2)
    assert (s["requests"], s["ok"], s["errors"], s["error_rate"]) == (6, 0, {"404": 6}, 1.0)
    assert s["latency_s"]["p50"] is None  # latency is over ok requests only


def test_transport_errors_counted() -> None:
    s = load(url=f"http://127.0.0.1:{free_port()}", requests=5, concurrency=2, timeout=5)
    assert (s["requests"], s["ok"], s["errors"]) == (5, 0, {"transport": 5})
    assert "ConnectError" in s["error_examples"]["transport"]


def test_api_key_is_sent(keyed_server: Server) -> None:
    without = load(url=keyed_server.url, requests=4, concurrency=2, max_new_tokens=2)
    assert without["errors"] == {"401": 4}
    wrong = load(url=keyed_server.url, requests=4, concurrency=2, max_new_tokens=2, api_key="wrong")
    assert wrong["errors"] == {"401": 4}
    right = load(url=keyed_server.url, requests=4, concurrency=2, max_new_tokens=2, api_key=API_KEY)
    assert (right["ok"], right["errors"]) == (4, {})
    assert right["settings"]["api_key"] is True and API_KEY not in json.dumps(right)


# --- the CLI as a subprocess ----------------------------------------------------------------


def test_cli_json_table_and_progress(server: Server, tmp_path) -> None:
    out = tmp_path / "summary.json"
    r = cli("--url", server.url, "--requests", "10", "--concurrency", "2", "--max-new-tokens", "4", "--stream",
            "--json", str(out))
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    assert (s["requests"], s["ok"], s["errors"]) == (10, 10, {})
    assert s["settings"] == {
        "url": server.url, "endpoint": "generate", "path": "/generate_stream", "stream": True, "concurrency": 2,
        "requests": 10, "duration_s": None, "max_new_tokens": 4, "prompts": "built-in", "prompt_count": 10,
        "api_key": False, "timeout_s": 120.0, "seed": 0, "hard_cap_requests": HARD_CAP_REQUESTS}
    for key in ("wall_s", "requests_per_s", "tokens_per_s", "generated_tokens", "error_rate"):
        assert isinstance(s[key], (int, float))
    assert set(s["latency_s"]) >= {"p50", "p90", "p99"} and set(s["ttft_s"]) >= {"p50", "p99"}
    table = r.stdout
    for row in ("requests ", "ok ", "errors ", "requests/s", "tokens/s", "latency p50", "latency p99", "ttft p50",
                "wall time"):
        assert row in table
    assert r.stderr.startswith("\r[loadtest] ") and r.stderr.endswith("\n")
    assert "\r[loadtest] 10/10 done, 0 errors" in r.stderr and r.stderr.count("\n") == 1


def test_cli_errors_exit_1_and_max_error_rate(server: Server, tmp_path) -> None:
    # max_new_tokens 500 > MAX_TOTAL_TOKENS (120): every request is a 422
    r = cli("--url", server.url, "--requests", "6", "--max-new-tokens", "500", "--quiet")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "422" in r.stdout and "MAX_TOTAL_TOKENS" in r.stdout
    out = tmp_path / "s.json"
    r = cli("--url", server.url, "--requests", "6", "--max-new-tokens", "500", "--quiet", "--max-error-rate", "1.0",
            "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(out.read_text())
    assert (s["requests"], s["ok"], s["errors"], s["error_rate"]) == (6, 0, {"422": 6}, 1.0)


def test_cli_prompts_file(server: Server, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\n   \nThe sky is\n")
    out = tmp_path / "s.json"
    r = cli("--url", server.url, "--requests", "4", "--endpoint", "classify", "--prompts", str(prompts), "--quiet",
            "--json", str(out))
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    assert s["ok"] == 4 and s["settings"]["prompt_count"] == 2 and s["settings"]["prompts"] == str(prompts)


@pytest.mark.parametrize("args", [
    ["--requests", "5", "--duration", "1"],  # mutually exclusive
    ["--requests", "0"],
    ["--concurrency", "0"],
    ["--duration", "-1"],
    ["--duration", "inf"],
    ["--max-error-rate", "1.5"],
    ["--endpoint", "nope"],
    ["--endpoint", "classify", "--stream"],
    ["--url", "ftp://x"],
    ["--requests", str(HARD_CAP_REQUESTS + 1)],
    ["--prompts", "/no/such/file"],
    ["--json", "/no/such/folder/out.json"],
])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    argv = args if "--url" in args else ["--url", "http://127.0.0.1:9", *args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_cli_missing_url_exit_2() -> None:
    r = cli("--requests", "1")
    assert r.returncode == 2 and "--url" in r.stderr


# --- unit tests with a mock transport ---------------------------------------------------------


def mock_run(handler, **kw) -> dict:
    config = LoadConfig(url="http://loadtest.invalid", **kw)
    return asyncio.run(run_load(config, transport=httpx.MockTransport(handler)))


def test_bearer_header_and_bodies() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"generated_text": "x", "details": {"generated_tokens": 3}})

    s = mock_run(handler, requests=5, concurrency=2, api_key="abc", max_new_tokens=3, prompts=("p1", "p2"))
    assert s["ok"] == 5 and s["generated_tokens"] == 15
    assert all(r.headers["authorization"] == "Bearer abc" for r in seen)
    assert all(r.url.path == "/generate" for r in seen)
    assert {json.loads(r.content)["inputs"] for r in seen} <= {"p1", "p2"}
    assert json.loads(seen[0].content)["parameters"] == {"max_new_tokens": 3, "details": True}
    seen.clear()
    mock_run(handler, requests=2, concurrency=1)
    assert all("authorization" not in r.headers for r in seen)


def test_stream_outcomes() -> None:
    token = 'data: {"index": 1, "token": {"id": 1, "text": "a", "logprob": 0.0}, "generated_text": null}\n\n'
    final = 'data: {"index": 2, "token": {"id": 2, "text": "b", "logprob": 0.0}, "generated_text": "ab", ' \
            '"details": {"finish_reason": "length", "generated_tokens": 2, "seed": null}}\n\n'
    bodies = {
        "ok": token + final,
        "cut": token,  # no final event
        "err": token + 'data: {"error": "boom", "error_type": "generation"}\n\n',
        "junk": "data: {not json\n\n",
    }
    for kind, body in bodies.items():
        sse = {"content-type": "text/event-stream"}
        s = mock_run(lambda _r, body=body, sse=sse: httpx.Response(200, text=body, headers=sse),
                     endpoint="generate_stream", requests=3, concurrency=1)
        if kind == "ok":
            assert (s["ok"], s["generated_tokens"]) == (3, 6) and s["ttft_s"]["p50"] is not None
        else:
            want = {"cut": "incomplete_stream", "err": "stream_error", "junk": "bad_response"}[kind]
            assert s["errors"] == {want: 3}, kind
    assert mock_run(lambda _r: httpx.Response(200, text="nope"), requests=2)["errors"] == {"bad_response": 2}
    bad_usage = 'data: {"choices": [], "usage": {"completion_tokens": "many"}}\n\ndata: [DONE]\n\n'
    s = mock_run(lambda _r: httpx.Response(200, text=bad_usage), endpoint="completions", stream=True, requests=2)
    assert s["errors"] == {"bad_response": 2}


def test_completions_stream_uses_usage() -> None:
    def chunk(text: str) -> str:
        return "data: " + json.dumps({"choices": [{"text": text, "index": 0, "finish_reason": None}]}) + "\n\n"

    usage = 'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11}}\n\n'
    body = chunk("a") + chunk("bc") + usage + "data: [DONE]\n\n"
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, text=body)

    s = mock_run(handler, endpoint="completions", stream=True, requests=2, max_new_tokens=9)
    assert (s["ok"], s["generated_tokens"]) == (2, 18)
    assert seen[0] == {"prompt": seen[0]["prompt"], "max_tokens": 9, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}
    no_done = mock_run(lambda _r: httpx.Response(200, text=chunk("a") + usage), endpoint="completions", stream=True,
                       requests=1)
    assert no_done["errors"] == {"incomplete_stream": 1}


def test_timeout_and_duration_bound_with_slow_server() -> None:
    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        return httpx.Response(200, json={"details": {"generated_tokens": 1}})

    s = mock_run(slow, requests=3, concurrency=3, timeout=0.05)
    assert s["errors"] == {"timeout": 3} and s["wall_s"] < 0.3
    t0 = time.monotonic()
    s = mock_run(slow, duration=0.5, concurrency=2)
    assert time.monotonic() - t0 < 0.5 + 0.3 + 0.5  # no request starts after the deadline
    assert 2 <= s["requests"] <= 4 and s["ok"] == s["requests"]  # 2 workers x 2 rounds of 0.3 s (if on time)


def test_config_is_bounded() -> None:
    with pytest.raises(ValueError):
        LoadConfig(url="http://x", requests=HARD_CAP_REQUESTS + 1)
    assert LoadConfig(url="http://x").requests == 100
    with pytest.raises(ValueError):
        LoadConfig(url="http://x", requests=5, duration=1)
    with pytest.raises(ValueError):
        LoadConfig(url="http://x", endpoint="classify", stream=True)


def test_report_and_progress_write_to_the_given_stream(capsys) -> None:
    s = mock_run(lambda _r: httpx.Response(429, json={"error": "busy", "error_type": "overloaded"}), requests=3)
    buf = io.StringIO()
    report(s, buf)
    text = buf.getvalue()
    assert "errors            3 (100.0%)" in text and "\n  429             3  e.g. busy\n" in text
    assert "latency p50       -" in text
    line = io.StringIO()
    progress = ProgressLine(line)
    progress(Progress(done=3, errors=1, elapsed=1.5, total=10))
    progress(Progress(done=10, errors=1, elapsed=2.0, total=10, final=True))
    assert line.getvalue() == ("\r[loadtest] 3/10 done, 1 errors, 2.0 req/s"
                               "\r[loadtest] 10/10 done, 1 errors, 5.0 req/s\n")
    assert capsys.readouterr() == ("", "")
