"""Log-probabilities through the engine (prompt scoring, alternatives of generated tokens,
score-only requests) on both backends, against transformers' log_softmax."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from app.engine.engine import InputError
from app.engine.sampling import SamplingParams
from app.loading.engine_loader import load_engine

TOL = 1e-4


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def engine(request, tiny_lm_dir, onnx_cache):
    # No input limit below the context (128), and scored prompts prefilled 48 tokens a call, so a
    # prompt that fills the context is scored in three chunks.
    eng = load_engine(tiny_lm_dir, None, backend=request.param, cache_dir=onnx_cache, max_batch_size=8,
                      max_batch_total_tokens=4096, score_chunk_tokens=48)
    eng.start()
    yield eng
    eng.stop()


@torch.no_grad()
def hf_logprobs(hf, ids: list[int]) -> np.ndarray:
    """(T, V) float64 log_softmax of transformers' logits; row i is the distribution of token i + 1."""
    return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()


def run(coro):
    return asyncio.run(coro)


def check_prompt(hf, ids: list[int], prompt, k: int) -> None:
    ref = hf_logprobs(hf, ids)
    assert [p.id for p in prompt] == ids
    assert prompt[0].logprob is None and prompt[0].top == []
    got = np.array([p.logprob for p in prompt[1:]])
    np.testing.assert_allclose(got, ref[np.arange(len(ids) - 1), ids[1:]], atol=TOL)
    for i, p in enumerate(prompt[1:]):
        assert len(p.top) == k
        best = np.sort(ref[i])[::-1][:k]
        np.testing.assert_allclose([t.logprob for t in p.top], best, atol=TOL)
        assert all(ref[i, t.id] >= best[-1] - TOL for t in p.top)


def test_prompt_scores_of_concurrent_prompts_equal_transformers(engine, hf) -> None:
    """A prompt that fills the model's whole context (score only) among shorter ones that also
    generate, all at once; every prompt token's log-probability and the top 3 there."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 50257, n).tolist() for n in (128, 7, 40, 2, 60)]
    news = [0, 4, 3, 5, 0]

    async def go():
        reqs = [engine.prepare(p, n, prompt_logprobs=3) for p, n in zip(prompts, news, strict=True)]
        return await asyncio.gather(*[engine.generate(r) for r in reqs])

    for ids, n, fin in zip(prompts, news, run(go()), strict=True):
        check_prompt(hf, ids, fin.prompt, 3)
        assert fin.generated_tokens == n and len(fin.tokens) == n
        if n:  # and the generation itself is greedy, as without scoring
            full = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert [t.id for t in fin.tokens] == full[0, len(ids):].tolist()


def test_a_score_only_request_streams_one_event_with_the_prompt(engine, hf) -> None:
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")

    async def go():
        return [ev async for ev in engine.generate_stream(engine.prepare(ids, 0, prompt_logprobs=0))]

    (ev,) = run(go())
    assert ev.token is None and ev.finish is not None
    assert ev.finish.reason == "length" and ev.finish.generated_tokens == 0 and ev.finish.generated_text == ""
    assert ev.prompt is ev.finish.prompt
    check_prompt(hf, ids, ev.prompt, 0)


def test_the_first_stream_event_carries_the_prompt_scores(engine, hf) -> None:
    ids = engine.tokenizer.encode("Once upon a time")

    async def go():
        return [ev async for ev in engine.generate_stream(engine.prepare(ids, 4, prompt_logprobs=1))]

    events = run(go())
    assert len(events) == 4
    check_prompt(hf, ids, events[0].prompt, 1)
    assert all(ev.prompt is None for ev in events[1:])
    assert events[-1].finish.prompt == events[0].prompt


def test_alternatives_of_generated_tokens_equal_transformers(engine, hf) -> None:
    """Greedy with `logprobs=5`: at each step the chosen token is the best of the five, and the
    five are transformers' top five of that step's distribution."""
    ids = engine.tokenizer.encode("In the beginning")
    fin = run(engine.generate(engine.prepare(ids, 6, logprobs=5)))
    seq = list(ids)
    for tok in fin.tokens:
        ref = hf_logprobs(hf, seq)[-1]
        assert len(tok.top) == 5
        np.testing.assert_allclose([t.logprob for t in tok.top], np.sort(ref)[::-1][:5], atol=TOL)
        assert tok.id == tok.top[0].id == int(ref.argmax())
        assert abs(tok.logprob - ref[tok.id]) < TOL
        assert tok.top[0].text == engine.tokenizer.id_to_token_text(tok.id)
        seq.append(tok.id)


def test_sampled_alternatives_are_after_temperature(engine, hf) -> None:
    """Top-k sampling chooses from the runner's top alternatives; its reported log-probability and
    alternatives are under the distribution after temperature."""
    ids = engine.tokenizer.encode("Hello there")
    params = SamplingParams(do_sample=True, top_k=4, temperature=0.5, seed=9)
    fin = run(engine.generate(engine.prepare(ids, 5, params, logprobs=4)))
    seq = list(ids)
    for tok in fin.tokens:
        logits = torch.from_numpy(hf_logprobs(hf, seq)[-1])  # log_softmax: shift-invariant under / 0.5
        ref = torch.log_softmax(logits / 0.5, -1).numpy()
        assert tok.id in [t.id for t in tok.top]  # drawn from the top 4
        assert abs(tok.logprob - ref[tok.id]) < TOL
        np.testing.assert_allclose([t.logprob for t in tok.top], np.sort(ref)[::-1][:4], atol=TOL)
        seq.append(tok.id)
    again = run(engine.generate(engine.prepare(ids, 5, params, logprobs=0)))  # fewer alternatives: same draw
    assert [t.id for t in again.tokens] == [t.id for t in fin.tokens]
    assert all(t.top == [] for t in again.tokens)


def test_logprob_limits_are_input_errors(engine) -> None:
    with pytest.raises(InputError, match="logprobs"):
        engine.prepare("Hi", 3, logprobs=21)
    with pytest.raises(InputError, match="prompt_logprobs"):
        engine.prepare("Hi", 3, prompt_logprobs=-1)
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.prepare("Hi", 0)  # generating nothing is only for scoring
