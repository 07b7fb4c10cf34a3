"""Automatic prefix caching (issue 28) end to end: a real server with the cache (the default) and
one with `PREFIX_CACHING=false`, over loopback. Multiple-choice scoring as lm-evaluation-harness
sends it (one request per ending, `echo` + `logprobs`, `max_tokens: 0`), sequential and
concurrent, and streams sharing a system prompt: the same tokens and log-probabilities with the
cache as without it (1e-5) and as transformers (1e-4); the hits in /metrics and /info."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from app.engine.prefix_cache import BLOCK_TOKENS
from tests.app.conftest import Server, base_env, metric, start_server, stop_server, wait_healthy

BLOCK = BLOCK_TOKENS


def _env(tiny_lm_dir, onnx_cache, **extra: str) -> dict[str, str]:
    # small prefill chunks: a prompt after its cached head is prefilled between other rows' steps
    return base_env(tiny_lm_dir, tiny_lm_dir, onnx_cache, CLASSIFIER_PATH="", MAX_INPUT_TOKENS="100",
                    MAX_TOTAL_TOKENS="128", MAX_CONCURRENT_REQUESTS="16", PREFILL_CHUNK_TOKENS="8", **extra)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_lm_dir, onnx_cache) -> Iterator[tuple[Server, Server]]:
    tmp = tmp_path_factory.mktemp("prefix")
    on = start_server(tmp, _env(tiny_lm_dir, onnx_cache, PREFIX_CACHE_MB="64"), wait=False)
    off = start_server(tmp, _env(tiny_lm_dir, onnx_cache, PREFIX_CACHING="false"))
    wait_healthy(on)
    yield on, off
    stop_server(on)
    stop_server(off)


def questions(seed: int, n: int, context: int = 40, ending: int = 9) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[ctx + rng.integers(0, 1000, ending).tolist() for _ in range(4)]
            for ctx in (rng.integers(0, 1000, context).tolist() for _ in range(n))]


async def score(url: str, prompts: list[list[int]], concurrency: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def one(p: list[int]) -> dict:
            async with sem:
                r = await c.post("/v1/completions", json={"prompt": p, "echo": True, "logprobs": 2, "max_tokens": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["logprobs"]
        return await asyncio.gather(*(one(p) for p in prompts))


def _close(a: dict, b: dict, tol: float) -> None:
    np.testing.assert_allclose(np.asarray(a["token_logprobs"][1:], float), np.asarray(b["token_logprobs"][1:], float),
                               atol=tol)
    for x, y in zip(a["top_logprobs"][1:], b["top_logprobs"][1:], strict=True):
        np.testing.assert_allclose(sorted(x.values()), sorted(y.values()), atol=tol)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_multiple_choice_scoring_is_exact_and_hits_the_shared_contexts(servers, hf, concurrency) -> None:
    on, off = servers
    prompts = [p for q in questions(concurrency, 3) for p in q]
    hits0, queries0 = metric(on, "gpt2_prefix_cache_hits_total"), metric(on, "gpt2_prefix_cache_queries_total")
    got = asyncio.run(score(on.url, prompts, concurrency))
    want = asyncio.run(score(off.url, prompts, concurrency))
    for p, a, b in zip(prompts, got, want, strict=True):
        _close(a, b, 1e-5)  # with the cache and without
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p])).logits[0].double(), -1)
        np.testing.assert_allclose(a["token_logprobs"][1:], ref[torch.arange(len(p) - 1), torch.tensor(p[1:])],
                                   atol=1e-4)  # and transformers
    hits = metric(on, "gpt2_prefix_cache_hits_total") - hits0
    assert metric(on, "gpt2_prefix_cache_queries_total") - queries0 == sum(len(p) for p in prompts)
    context_hit = 40 // BLOCK * BLOCK - 1  # the context's whole blocks, less the last token (it scores the next)
    if concurrency == 1:  # endings 2-4 of each question reuse its context
        assert hits == 3 * 3 * context_hit
    else:  # concurrent endings can all miss before the first one is in; they must not all miss
        assert hits >= context_hit
    assert metric(off, "gpt2_prefix_cache_hits_total") == 0


def test_streams_sharing_a_system_prompt_match_the_server_without_the_cache(servers, hf) -> None:
    on, off = servers
    rng = np.random.default_rng(11)
    system = rng.integers(0, 1000, 3 * BLOCK + 5).tolist()
    prompts = [system + rng.integers(0, 1000, int(n)).tolist() for n in rng.integers(1, 20, 8)]

    async def stream(url: str, prompt: list[int]) -> list[int]:
        body = {"prompt": prompt, "max_tokens": 12, "stream": True, "logprobs": 1, "ignore_eos": True,
                "temperature": 0}
        out = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions",
                                                                               json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    lp = json.loads(line[6:])["choices"][0]["logprobs"]
                    out += [round(x, 4) for x in lp["token_logprobs"]] if lp else []
        return out

    async def all_of(url: str) -> list[list[float]]:
        await stream(url, prompts[0])  # the system prompt is in the cache before the burst
        return await asyncio.gather(*(stream(url, p) for p in prompts))

    hits0 = metric(on, "gpt2_prefix_cache_hits_total")
    got, want = asyncio.run(all_of(on.url)), asyncio.run(all_of(off.url))
    for a, b in zip(got, want, strict=True):
        assert len(a) == len(b) == 12
        np.testing.assert_allclose(a, b, atol=2e-4)  # the 4-decimal rounding of both sides
    assert metric(on, "gpt2_prefix_cache_hits_total") - hits0 >= len(prompts) * 3 * BLOCK


def test_info_and_metrics_show_the_cache_and_its_budget(servers) -> None:
    on, off = servers
    asyncio.run(score(on.url, questions(5, 1)[0][:1], 1))  # one prompt of 49 tokens in the cache
    info = httpx.get(on.url + "/info").json()["generation"]["prefix_caching"]
    assert info["enabled"] and info["reason"] is None and info["block_tokens"] == BLOCK
    assert 0 < info["budget_bytes"] <= 64 << 20 and info["bytes_in_use"] <= info["budget_bytes"]
    assert metric(on, "gpt2_prefix_cache_budget_bytes") == info["budget_bytes"]
    assert info["bytes_in_use"] > 0 and info["cached_tokens"] >= 48
    assert metric(on, "gpt2_prefix_cache_bytes") >= info["bytes_in_use"]
    none = httpx.get(off.url + "/info").json()["generation"]["prefix_caching"]
    assert none == {"enabled": False, "reason": "PREFIX_CACHING=false"}
    assert "gpt2_prefix_cache_budget_bytes" not in httpx.get(off.url + "/metrics").text
