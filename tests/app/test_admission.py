"""Admission counts what a request will run (issue 27, item 4): its candidates (prompts x best_of)
count against MAX_CONCURRENT_REQUESTS, one request holds at most MAX_REQUEST_CANDIDATES, and a
request of many candidates does not hold back another request's first token. Real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.app.conftest import Server, base_env, start_server, stop_server


@pytest.fixture(scope="module")
def admission_server(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    env = base_env(tiny_lm_dir, tiny_classifier_dir, onnx_cache, MAX_CONCURRENT_REQUESTS="12",
                   MAX_REQUEST_CANDIDATES="8", MAX_BATCH_SIZE="8", MAX_BEST_OF="8")
    srv = start_server(tmp_path_factory.mktemp("admission"), env)
    yield srv
    stop_server(srv)


def long_completion(n: int, prompts: int = 1, max_tokens: int = 100) -> dict:
    return {"prompt": [f"Long request {i}" for i in range(prompts)], "max_tokens": max_tokens, "n": n,
            "temperature": 1.0, "seed": 0, "ignore_eos": True}


def test_a_request_past_max_request_candidates_is_a_400_naming_the_field(admission_server) -> None:
    with httpx.Client(base_url=admission_server.url, timeout=60) as c:
        many = c.post("/v1/completions", json=long_completion(n=4, prompts=3, max_tokens=2))  # 12 candidates
        err = many.json()["error"]
        assert many.status_code == 400 and err["param"] == "prompt", many.text
        assert "12 candidates" in err["message"] and "MAX_REQUEST_CANDIDATES" in err["message"], err
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 9})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "n", chat.text
        tgi = c.post("/generate", json={"inputs": "hi", "parameters": {"best_of": 9, "do_sample": True}})
        assert tgi.status_code == 422 and "parameters.best_of" in tgi.json()["error"], tgi.text
        ok = c.post("/v1/completions", json=long_completion(n=4, prompts=2, max_tokens=2))  # 8: at the limit
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 8, ok.text


def test_candidates_count_against_max_concurrent_requests(admission_server) -> None:
    """12 candidates may be in flight: a running request of 8 leaves room for 4, not for 5."""
    url = admission_server.url
    with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(1) as pool:
        big = pool.submit(c.post, "/v1/completions", json=long_completion(n=4, prompts=2))
        deadline = time.monotonic() + 30
        while httpx.get(url + "/metrics").text.count("gpt2_requests_in_flight 8.0") == 0:
            assert time.monotonic() < deadline, "the big request never started"
            time.sleep(0.02)
        five = c.post("/v1/completions", json=long_completion(n=5, max_tokens=2))
        four = c.post("/v1/completions", json=long_completion(n=4, max_tokens=2))
        assert big.result().status_code == 200
    assert five.status_code == 429 and "MAX_CONCURRENT_REQUESTS (12) candidates" in five.json()["error"]["message"]
    assert four.status_code == 200 and len(four.json()["choices"]) == 4, four.text


def test_a_stream_starts_while_a_request_of_many_candidates_runs(admission_server) -> None:
    """8 candidates of 100 tokens would fill the 8-row batch until they all finish; as one request
    they leave a row free, and the stream's first token comes in a few steps."""
    url = admission_server.url
    with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        big = pool.submit(c.post, "/v1/completions", json=long_completion(n=4, prompts=2))
        time.sleep(0.3)
        t_start = time.monotonic()
        first = None
        with c.stream("POST", "/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and first is None:
                    first = time.monotonic() - t_start
        assert big.result().status_code == 200
        big_s = time.monotonic() - t0
    assert first is not None and first < 0.25 * big_s, (first, big_s)
