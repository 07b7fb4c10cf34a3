"""Automatic prefix caching (issue 28) below the scheduler: the block index on its own, then the CPU
slot runner and the fixed-buffer runner (its block copies are the ONNX graphs CUDA runs) with a
cache, against the same runner without one and against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine.fixed_runner import OrtFixedRunner
from app.engine.ort_runner import OrtGenerationRunner, OrtSlotRunner
from app.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from app.engine.runner import GenerationRunner, PromptScores, Selected, Want

B = BLOCK_TOKENS


# ---- the index ---------------------------------------------------------------------------------
class Rows:
    """A pool and rows of plain arrays: one number per token, so a copy can be read back."""

    def __init__(self, num_blocks: int) -> None:
        self.pool = np.full((num_blocks, B), -1.0)
        self.rows: dict[str, np.ndarray] = {}

    def save(self, src: str, start: int, ids: list[int]) -> None:
        self.pool[ids] = self.rows[src][start:start + len(ids) * B].reshape(len(ids), B)

    def load(self, dst: str, ids: list[int]) -> None:
        self.rows[dst] = self.pool[ids].reshape(-1)

    def cache(self) -> PrefixCache:
        return PrefixCache(self.pool.shape[0], 100, self.save, self.load)


def scores_of(prompt: list[int], k: int) -> PromptScores:
    """Made-up scores with entry i about token i + 1: its logprob is -(i + 1)."""
    n = len(prompt) - 1
    return PromptScores(-np.arange(1, n + 1, dtype=np.float32), np.tile(np.arange(k), (n, 1)),
                        np.zeros((n, k), np.float32))


def test_a_hit_reuses_whole_blocks_and_leaves_the_last_token_to_compute() -> None:
    rows = Rows(8)
    cache = rows.cache()
    prompt = list(range(100, 100 + 3 * B + 1))  # 3 whole blocks and 1 token
    rows.rows["a"] = np.arange(len(prompt), dtype=float)
    assert cache.store(prompt, "a") == 3
    assert cache.lookup(prompt, count=False).reuse == 3 * B
    assert cache.lookup(prompt[:3 * B], count=False).reuse == 3 * B - 1  # all cached: the last is computed
    assert cache.lookup(prompt[:2 * B] + [7] * B, count=False).reuse == 2 * B  # differs in block 3
    assert cache.lookup([1] + prompt[1:], count=False).reuse == 0  # a different first token: nothing
    hit = cache.lookup(prompt[:2 * B + 1])
    assert hit.reuse == 2 * B and len(hit.pool_ids) == 2
    cache.load(hit, "b")
    np.testing.assert_array_equal(rows.rows["b"], np.arange(2 * B))  # the tokens' own KV, in order
    assert (cache.stats.queries, cache.stats.hits) == (2 * B + 1, 2 * B)
    assert cache.cached_tokens == 3 * B and cache.bytes_in_use == 300


def test_a_scored_lookup_needs_kept_scores_with_enough_alternatives() -> None:
    rows = Rows(8)
    cache = rows.cache()
    prompt = list(range(2 * B + 1))
    rows.rows["a"] = np.zeros(len(prompt))
    cache.store(prompt, "a")  # generated, not scored: no scores kept
    assert cache.lookup(prompt, score_k=0, count=False).reuse == 0
    assert cache.bytes_in_use == 200
    cache.store(prompt, "a", scores_of(prompt, 2), 2)  # a scored prompt refreshes the blocks
    assert cache.bytes_in_use == 200 + 2 * B * (4 + 2 * 8 + 2 * 4)  # and their scores count
    assert cache.lookup(prompt, score_k=3, count=False).reuse == 0
    hit = cache.lookup(prompt, score_k=1, count=False)
    assert hit.reuse == 2 * B - 1  # from the last cached token: its logits score the first uncached one
    assert hit.scores.token_logprobs.tolist() == (-np.arange(1, 2 * B)).tolist()  # tokens 1..reuse
    assert hit.scores.top_ids.shape == (2 * B - 1, 1)


def test_eviction_takes_the_least_recent_leaf_and_never_the_prompt_being_stored() -> None:
    rows = Rows(3)
    cache = rows.cache()
    a, b = [1] * B + [2] * B, [1] * B + [3] * B  # share block 1
    rows.rows["a"], rows.rows["b"] = np.arange(2 * B, dtype=float), np.arange(2 * B, dtype=float) + 100
    cache.store(a, "a")
    cache.store(b, "b")  # 3 blocks: [1], [1][2], [1][3]
    cache.lookup(a + [0])  # a used again: b's leaf is now the least recent
    new = [5] * (2 * B)
    rows.rows["c"] = np.arange(2 * B, dtype=float)
    assert cache.store(new, "c") == 2  # evicts b's leaf, then a's: leaves go before the block they extend
    assert cache.stats.evicted_blocks == 2
    assert cache.lookup(b + [0], count=False).reuse == B  # the shared first block outlived both leaves
    assert cache.lookup(a + [0], count=False).reuse == B
    assert cache.lookup(new + [0], count=False).reuse == 2 * B
    rows.rows["d"] = np.arange(4 * B, dtype=float)
    long = [6] * (4 * B)  # more blocks than the pool: the older blocks go, then it keeps its own head
    assert cache.store(long, "d") == 3
    assert cache.lookup(long, count=False).reuse == 3 * B
    assert cache.lookup(new + [0], count=False).reuse == 0
    # a prompt longer than the whole pool keeps the blocks it can, and the cache stays consistent
    rows2 = Rows(2)
    small = rows2.cache()
    rows2.rows["x"] = np.arange(5 * B, dtype=float)
    assert small.store(list(range(5 * B)), "x") == 2
    assert small.lookup(list(range(5 * B)), count=False).reuse == 2 * B


# ---- the runners -------------------------------------------------------------------------------
def make(kind: str, graphs, cache_bytes: int = 1 << 20) -> GenerationRunner:
    if kind == "slot":
        return OrtSlotRunner(graphs["gqa"], n_positions=128, initial_capacity=1, prefix_cache_bytes=cache_bytes)
    return OrtFixedRunner(graphs["gqa"], "cpu", capacity=4, n_positions=128, cuda_graphs="off",
                          pad_to_buckets=kind == "fixed-buckets", prefix_cache_bytes=cache_bytes)


KINDS = ["slot", "fixed", "fixed-buckets"]


def prefill(runner: GenerationRunner, prompt: list[int], want: Want, chunk: int = 1000,
            between=None) -> Selected:  # noqa: ANN001
    """`prompt` through `start_prefill` (which uses the cache) in chunks; `between`: a call after
    each chunk (other rows' decode steps)."""
    pending = runner.start_prefill(prompt, want.score_top_n if want.score else None)
    while (out := runner.advance(pending, chunk, want)) is None:
        if between:
            between()
    return out


@torch.no_grad()
def reference(hf, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' log-probabilities of the prompt's tokens 1.. and of the next token."""
    lp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), -1)
    return lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].numpy(), lp[-1].numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_a_cached_head_scores_and_continues_as_a_whole_prefill(kind, graphs, hf) -> None:
    rng = np.random.default_rng(3)
    context = rng.integers(0, 1000, 10 * B + 1).tolist()
    endings = [rng.integers(0, 1000, n).tolist() for n in (7, 12, 1)]
    cached, plain = make(kind, graphs), make(kind, graphs, 0)
    assert plain.prefix is None and plain.prefix_off_reason == "PREFIX_CACHING=false"
    want = Want(top_n=3, score=(0,), score_top_n=2)
    busy = rng.integers(0, 1000, 9).tolist()
    for r in (cached, plain):  # another row decodes between the chunks of each prompt
        r.add([busy])
    for i, ending in enumerate(endings):
        prompt = context + ending
        if i:
            assert cached.prefix_hit(prompt, 2) == 10 * B - 1
        got = prefill(cached, prompt, want, chunk=5, between=lambda: cached.step([busy[-1]] * cached.num_rows))
        ref = prefill(plain, prompt, want, chunk=5, between=lambda: plain.step([busy[-1]] * plain.num_rows))
        # with the cache and without: the same scores and alternatives, to 1e-5 (fp32)
        np.testing.assert_allclose(got.prompt[0].token_logprobs, ref.prompt[0].token_logprobs, atol=1e-5)
        np.testing.assert_allclose(got.prompt[0].top_logprobs, ref.prompt[0].top_logprobs, atol=1e-5)
        np.testing.assert_array_equal(got.prompt[0].top_ids, ref.prompt[0].top_ids)
        np.testing.assert_array_equal(got.top_ids, ref.top_ids)
        np.testing.assert_allclose(got.top_logprobs, ref.top_logprobs, atol=1e-5)
        tokens, nxt = reference(hf, prompt)  # and transformers'
        np.testing.assert_allclose(got.prompt[0].token_logprobs, tokens, atol=1e-4)
        assert got.top_ids[0].tolist() == np.argsort(-nxt)[:3].tolist()
        # the row decodes on from the loaded cache as transformers does
        row = cached.num_rows - 1
        token = int(got.top_ids[0, 0])
        sel = cached.step([busy[-1]] * row + [token])
        _, after = reference(hf, prompt + [token])
        np.testing.assert_allclose(sel.top_logprobs[row, 0], after.max(), atol=1e-4)
        cached.drop([row])
        plain.drop([plain.num_rows - 1])
    st = cached.prefix.stats
    assert st.hits == 2 * (10 * B - 1) and st.queries == len(busy) + sum(len(context) + len(e) for e in endings)


@pytest.mark.parametrize("kind", KINDS)
def test_generation_hits_reuse_up_to_the_last_token_and_match_transformers(kind, graphs, hf) -> None:
    rng = np.random.default_rng(4)
    system = rng.integers(0, 1000, 2 * B).tolist()
    runner = make(kind, graphs)
    runner.add([system + [5, 6]])  # batched prefill (`add`) keeps the blocks too
    runner.drop([0])
    for question in ([7, 8, 9], []):  # the whole prompt cached: its last token is still computed
        prompt = system + question
        assert runner.prefix_hit(prompt) == min(2 * B, len(prompt) - 1)
        got = prefill(runner, prompt, Want(top_n=4))
        _, nxt = reference(hf, prompt)
        assert got.top_ids[0].tolist() == np.argsort(-nxt)[:4].tolist()
        np.testing.assert_allclose(got.top_logprobs[0], np.sort(nxt)[::-1][:4], atol=1e-4)
        runner.drop([0])


@pytest.mark.parametrize("kind", KINDS)
def test_under_eviction_pressure_every_answer_stays_exact(kind, graphs) -> None:
    rng = np.random.default_rng(5)
    heads = [rng.integers(0, 1000, 2 * B).tolist() for _ in range(3)]
    tiny, plain = make(kind, graphs, 1), make(kind, graphs, 0)
    assert tiny.prefix is None and "no block" in tiny.prefix_off_reason  # less than one block: off, said why
    small = make(kind, graphs, 3 * make(kind, graphs).prefix.block_bytes)  # room for 3 of the 6 blocks
    assert small.prefix.num_blocks == 3
    want = Want(top_n=2, score=(0,), score_top_n=1)
    for i in (0, 0, 1, 1, 2, 2, 0, 0, 1, 2, 2, 1):  # hits, and heads pushed out by others
        prompt = heads[i] + rng.integers(0, 1000, int(rng.integers(1, 9))).tolist()
        got, ref = prefill(small, prompt, want, chunk=7), prefill(plain, prompt, want, chunk=7)
        np.testing.assert_allclose(got.prompt[0].token_logprobs, ref.prompt[0].token_logprobs, atol=1e-5)
        np.testing.assert_array_equal(got.top_ids, ref.top_ids)
        small.drop([0])
        plain.drop([0])
        assert small.prefix.cached_tokens <= 3 * B
    assert small.prefix.stats.evicted_blocks > 0 and small.prefix.stats.hits > 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_prefill_cancelled_after_its_hit_keeps_nothing_and_harms_nothing(kind, graphs, hf) -> None:
    rng = np.random.default_rng(6)
    head = rng.integers(0, 1000, 2 * B).tolist()
    runner = make(kind, graphs)
    runner.add([head + [1]])
    runner.drop([0])
    before = runner.prefix.cached_tokens
    pending = runner.start_prefill(head + rng.integers(0, 1000, 3 * B).tolist())
    assert pending.done == 2 * B
    assert runner.advance(pending, 4) is None  # mid-prefill
    runner.abort(pending)
    assert runner.prefix.cached_tokens == before  # the unfinished prompt kept no block
    prompt = head + [9, 9]
    got = prefill(runner, prompt, Want(top_n=2))
    assert got.top_ids[0].tolist() == np.argsort(-reference(hf, prompt)[1])[:2].tolist()


def test_a_scored_prompt_in_chunks_scores_each_chunks_last_position_at_temperature_one(graphs) -> None:
    """A chunk before the last one scores its last position as a prompt position: the row's
    temperature (for the next token only) must not reach it. Without the cache too."""
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, 1000, 40).tolist()
    runner = make("slot", graphs, 0)
    hot = Want(top_n=1, temperature=np.array([0.5], np.float32), score=(0,), score_top_n=1)
    cold = Want(top_n=1, score=(0,), score_top_n=1)
    a = prefill(runner, prompt, hot, chunk=8)
    runner.drop([0])
    b = prefill(runner, prompt, cold, chunk=8)
    np.testing.assert_allclose(a.prompt[0].token_logprobs, b.prompt[0].token_logprobs, atol=1e-6)


def test_the_padded_runner_says_it_has_no_prefix_cache(graphs) -> None:
    runner = OrtGenerationRunner(graphs["standard"], n_positions=128)
    assert runner.prefix is None and "not supported" in runner.prefix_off_reason
    assert runner.prefix_hit(list(range(40))) == 0


def test_the_fixed_runner_checks_its_block_copies_at_start(graphs) -> None:
    runner = make("fixed", graphs)
    assert runner.check_prefix_cache(list(range(2 * B + 3)))
    assert runner.prefix is not None and runner.prefix.cached_tokens == 0 and runner.num_rows == 0
    assert runner.prefix.stats.queries == 0  # its own lookups are not counted as traffic
