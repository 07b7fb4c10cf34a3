"""The CUDA runner's code on the CPU EP (issue 22): fixed buffers bound by address, one slot per
sequence, junk rows, buckets, and the start-up capture's refusals. Everything here runs what
serves on a GPU, except the capture itself (tests/app/engine/test_cuda.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from app.engine.engine import Engine
from app.engine.fixed_runner import GRAPH_TOP_N, OrtFixedRunner, buckets_for
from app.engine.prefix_cache import BLOCK_TOKENS
from app.engine.runner import Want
from app.engine.sampling import SamplingParams
from app.loading import loader
from app.loading.loader import Loaded, SettingRefusedError
from export.pipeline import export_checkpoint

PROMPTS = [f"Request {i} is about" + " the weather" * (i % 6) + ("!" * (i % 3)) for i in range(12)]


@pytest.fixture(scope="module")
def gqa(tiny_lm_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fixed-gqa")
    export_checkpoint(tiny_lm_dir, folder, "generate", verify_parity=False, attention="gqa")
    return folder / "model.onnx"


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def fixed(gqa, capacity: int = 8, **kw) -> OrtFixedRunner:
    return OrtFixedRunner(gqa, "cpu", capacity=capacity, n_positions=128, cuda_graphs="off", **kw)


def test_buckets_end_at_the_capacity() -> None:
    assert buckets_for(32) == [1, 2, 4, 8, 16, 32]
    assert buckets_for(20) == [1, 2, 4, 8, 16, 20]
    assert buckets_for(1) == [1]


def test_a_freed_slot_is_reused_and_rows_keep_their_order(gqa, hf) -> None:
    r = fixed(gqa, pad_to_buckets=True)
    prompts = [[464, 2068], [7586, 21831, 18045], [1212, 318], [40, 588]]
    first = r.add(prompts)
    assert r.slots == [0, 1, 2, 3]
    assert r.drop([1]).tolist() == [0, 2, 3]  # no row moves: the order is kept
    assert r.slots == [0, 2, 3]
    late = [[50, 51, 52, 53, 54]]
    r.add(late)
    assert r.slots == [0, 2, 3, 1]  # the hole is filled first
    seqs = [prompts[0], prompts[2], prompts[3], late[0]]
    for s, t in zip(seqs[:3], [first.top_ids[0, 0], first.top_ids[2, 0], first.top_ids[3, 0]], strict=True):
        s.append(int(t))
    seqs[3].append(int(hf(torch.tensor([late[0]])).logits[0, -1].argmax()))
    for _ in range(4):  # slots 0..3 run as bucket 4; the tokens are each sequence's own
        sel = r.step([s[-1] for s in seqs])
        for s, t in zip(seqs, sel.top_ids[:, 0], strict=True):
            assert int(t) == int(hf(torch.tensor([s])).logits[0, -1].argmax())
            s.append(int(t))
    assert r.lengths == [len(s) - 1 for s in seqs]


def test_a_full_batch_names_the_setting(gqa) -> None:
    r = fixed(gqa, capacity=2)
    r.add([[1], [2]])
    with pytest.raises(ValueError, match="MAX_BATCH_SIZE"):
        r.add([[3]])
    with pytest.raises(ValueError, match="MAX_BATCH_SIZE"):
        r.start_prefill([4, 5, 6])


def test_a_step_returns_at_most_the_fixed_alternatives(gqa) -> None:
    r = fixed(gqa)
    r.add([[464, 2068]])
    assert r.step([1], Want(top_n=GRAPH_TOP_N)).top_ids.shape == (1, GRAPH_TOP_N)
    with pytest.raises(ValueError, match=f"at most {GRAPH_TOP_N}"):
        r.step([1], Want(top_n=GRAPH_TOP_N + 1))


def test_capture_needs_cuda(gqa) -> None:
    auto = OrtFixedRunner(gqa, "cpu", capacity=4, n_positions=128, cuda_graphs="auto")
    assert auto.capture([464, 2068]) is False and auto.graphs_reason == "not on CUDA" and not auto.graphs_on
    with pytest.raises(SettingRefusedError, match="CUDA_GRAPHS=on needs DEVICE=cuda"):
        OrtFixedRunner(gqa, "cpu", capacity=4, n_positions=128, cuda_graphs="on")


def test_cuda_graphs_on_refuses_to_start_without_cuda(tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> None:
    """Not a fallback to PyTorch: the start fails, naming what is missing."""
    with pytest.raises(SettingRefusedError, match="CUDA_GRAPHS=on needs DEVICE=cuda and PRECISION=fp16"):
        loader.load("generate", tiny_lm_dir, cache_dir=onnx_cache, cuda_graphs="on")
    cls = loader.load("classify", tiny_classifier_dir, cache_dir=onnx_cache, cuda_graphs="on")
    assert cls.backend == "onnxruntime"  # only the generation model captures


@pytest.mark.parametrize("pad", [False, True], ids=["exact", "buckets"])
def test_the_engine_on_the_fixed_runner_equals_transformers(pad, gqa, tiny_lm_dir, hf) -> None:
    """Concurrent greedy and sampled streams, a long prompt prefilled in chunks while others decode,
    one stream cancelled: greedy tokens equal transformers' and a seeded stream its own run alone."""
    runner = fixed(gqa, capacity=6, pad_to_buckets=pad, prefix_cache_bytes=4 << 20)
    eng = Engine(Loaded(runner, "generate", "onnxruntime", "cpu", "fp32", tiny_lm_dir, gqa, attention="gqa"), None,
                 max_batch_size=6, prefill_chunk_tokens=4)
    eng.start()
    long_text = " ".join(f"w{i}" for i in range(20))
    seeded = SamplingParams(do_sample=True, top_k=20, temperature=0.8, seed=5)

    async def go():
        alone = await eng.generate(eng.prepare(PROMPTS[1], 10, seeded))
        tasks = [asyncio.create_task(eng.generate(eng.prepare(p, 8 + i))) for i, p in enumerate(PROMPTS[2:9])]
        sampled = asyncio.create_task(eng.generate(eng.prepare(PROMPTS[1], 10, seeded)))
        cancelled = eng.generate_stream(eng.prepare(PROMPTS[9], 50))
        async for ev in cancelled:
            if ev.index == 2:
                break
        await cancelled.aclose()
        long = asyncio.create_task(eng.generate(eng.prepare(long_text, 5)))
        out = alone, await asyncio.gather(*tasks), await sampled, await long
        # the long prompt's head is in the prefix cache now: a longer prompt reuses it
        return *out, await eng.generate(eng.prepare(long_text + " w20 w21", 5))

    try:
        alone, greedy, sampled, long, again = asyncio.run(go())
    finally:
        eng.stop()
    for i, (p, res) in enumerate(zip(PROMPTS[2:9], greedy, strict=True)):
        assert [t.id for t in res.tokens] == hf_greedy(hf, eng.tokenizer.encode(p), 8 + i)
    assert [t.id for t in long.tokens] == hf_greedy(hf, eng.tokenizer.encode(long_text), 5)
    assert [t.id for t in again.tokens] == hf_greedy(hf, eng.tokenizer.encode(long_text + " w20 w21"), 5)
    assert runner.prefix.stats.hits >= 2 * BLOCK_TOKENS  # and the start's self-check passed: the cache is on
    assert [t.id for t in sampled.tokens] == [t.id for t in alone.tokens]
    assert runner.num_rows == 0 and not runner.reserved
    assert eng.info()["generation"]["cuda_graphs"] == {"setting": "off", "enabled": False, "buckets": [],
                                                       "reason": None}


def test_tokens_equal_the_cpu_slot_runner_with_scores(gqa, tiny_lm_dir) -> None:
    """The same prompts through today's CPU runner and the fixed one: the same tokens, scores and
    alternatives (one graph, two bookkeepings)."""
    from app.engine.ort_runner import OrtSlotRunner

    prompts = [[464, 2068, 7586, 21831, 18045, 625, 262], [1212, 318], [40, 588, 257, 1332, 13]]
    want = Want(top_n=3, score=(0, 2), score_top_n=2)
    outs = []
    for r in (OrtSlotRunner(gqa, n_positions=128), fixed(gqa, pad_to_buckets=True)):
        sel = r.add(prompts, want)
        seq = [sel.top_ids[:, 0]]
        for _ in range(5):
            seq.append(r.step(seq[-1].tolist(), Want(top_n=3)).top_ids[:, 0])
        outs.append((np.stack(seq), sel))
    (a, sa), (b, sb) = outs
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(sa.top_logprobs, sb.top_logprobs, atol=1e-5)
    for i in (0, 2):
        np.testing.assert_allclose(sa.prompt[i].token_logprobs, sb.prompt[i].token_logprobs, atol=1e-5)
