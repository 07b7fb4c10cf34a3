"""The runners below the scheduler: the shared-buffer GQA runner against the left-padded ones
(ONNX Runtime standard graph, PyTorch) and transformers, through the same script of joins,
steps, drops and chunked prefills."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine.fixed_runner import OrtFixedRunner
from app.engine.ort_runner import OrtGenerationRunner, OrtSlotRunner
from app.engine.runner import GenerationRunner, Selected, Want
from app.engine.torch_runner import TorchGenerationRunner


def make_runner(kind: str, graphs, tiny_lm_dir) -> GenerationRunner:
    if kind == "gqa":
        return OrtSlotRunner(graphs["gqa"], n_positions=128, initial_capacity=1)  # grows during the script
    if kind == "standard":
        return OrtGenerationRunner(graphs["standard"], n_positions=128)
    if kind in ("fixed", "fixed-buckets"):  # the CUDA runner's code on the CPU: slots, fixed buffers
        return OrtFixedRunner(graphs["gqa"], "cpu", capacity=8, n_positions=128, cuda_graphs="off",
                              pad_to_buckets=kind == "fixed-buckets")
    return TorchGenerationRunner(tiny_lm_dir)


@torch.no_grad()
def next_logits(hf, seq: list[int]) -> np.ndarray:
    return hf(torch.tensor([seq])).logits[0, -1].numpy()


def run_script(runner: GenerationRunner, hf) -> list[list[int]]:
    """Joins, steps, a drop in the middle, a chunked prefill and a late join; every logit row
    is checked against transformers on that row's whole sequence. Returns the sequences."""
    rng = np.random.default_rng(1)
    rows: list[list[int]] = []  # rows[r] is the sequence in runner row r

    def accept(sel: Selected, seqs: list[list[int]]) -> None:
        assert sel.logits.shape == (len(seqs), hf.config.vocab_size)
        assert sel.top_ids.shape == (len(seqs), 1)
        for row, top, lp, seq in zip(sel.logits, sel.top_ids[:, 0], sel.top_logprobs[:, 0], seqs, strict=True):
            ref = next_logits(hf, seq)
            np.testing.assert_allclose(row, ref, atol=1e-4)
            assert top == ref.argmax()  # the graph's top-1 is the argmax of the logits
            np.testing.assert_allclose(lp, torch.log_softmax(torch.from_numpy(ref), -1)[top].item(), atol=1e-4)
            seq.append(int(top))

    def step(n: int) -> None:
        for _ in range(n):
            accept(runner.step([s[-1] for s in rows]), rows)

    def drop(*seqs: list[int]) -> None:  # by sequence, whatever row the runner moved it to
        order = runner.drop([next(i for i, r in enumerate(rows) if r is s) for s in seqs])
        rows[:] = [rows[i] for i in order]

    first = [rng.integers(0, 1000, n).tolist() for n in (3, 11, 6, 1)]
    accept(runner.add(first), first)
    rows.extend(first)
    step(3)
    drop(first[0], first[2])
    assert runner.num_rows == 2
    step(2)
    long = rng.integers(0, 1000, 23).tolist()
    pending = runner.start_prefill(long)
    for _ in range(10):  # 5-token chunks, decode steps of the others in between
        sel = runner.advance(pending, 5)
        if sel is not None:
            break
        assert pending.remaining > 0 and runner.num_rows == 2
        step(1)
    assert pending.remaining == 0 and runner.num_rows == 3
    accept(sel, [long])
    rows.append(long)
    late = [[5, 6], [7] * 9]
    accept(runner.add(late), late)
    rows.extend(late)
    step(4)
    drop(first[1])
    step(2)
    runner.reset()
    assert runner.num_rows == 0
    return sorted(rows)


KINDS = ["gqa", "standard", "torch", "fixed", "fixed-buckets"]


@pytest.mark.parametrize("kind", KINDS)
def test_runner_script_matches_transformers(kind, graphs, tiny_lm_dir, hf) -> None:
    run_script(make_runner(kind, graphs, tiny_lm_dir), hf)


def test_all_runners_produce_the_same_sequences(graphs, tiny_lm_dir, hf) -> None:
    got = {k: run_script(make_runner(k, graphs, tiny_lm_dir), hf) for k in KINDS}
    assert all(seqs == got["gqa"] for seqs in got.values())


def test_gqa_step_writes_the_cache_in_place(graphs) -> None:
    r = OrtSlotRunner(graphs["gqa"], n_positions=128, initial_capacity=4)
    r.add([[1, 2, 3], [4, 5]])
    bufs = list(r.bufs)
    key0 = bufs[0]
    before = key0[:2].copy()
    r.step([7, 8])
    assert all(a is b for a, b in zip(r.bufs, bufs, strict=True))  # same memory: no new cache per step
    changed = np.argwhere(np.any(key0[:2] != before, axis=(1, 3)))  # (row, position) pairs written
    assert sorted(map(tuple, changed[:, [0, 1]].tolist())) == sorted({(0, 3), (1, 2)})
    np.testing.assert_array_equal(r.lengths, [4, 3])


def test_gqa_drop_moves_tail_rows_into_holes_and_reports_the_order(graphs) -> None:
    r = OrtSlotRunner(graphs["gqa"], n_positions=128, initial_capacity=4)
    r.add([[1] * 2, [2] * 3, [3] * 4, [4] * 5])
    kept_row3 = r.bufs[0][3, :, :5].copy()
    order = r.drop([0])
    assert order.tolist() == [3, 1, 2]  # the last row fills the hole; the others stay put
    np.testing.assert_array_equal(r.lengths, [5, 3, 4])
    np.testing.assert_array_equal(r.bufs[0][0, :, :5], kept_row3)
    assert r.drop([]).tolist() == [0, 1, 2]
    assert r.drop([0, 1, 2]).tolist() == [] and r.num_rows == 0


def test_gqa_rejects_a_sequence_past_the_context(graphs) -> None:
    r = OrtSlotRunner(graphs["gqa"], n_positions=8)
    r.add([[1] * 8])
    with pytest.raises(ValueError, match="exceed the context of 8 tokens"):
        r.step([1])


@torch.no_grad()
def hf_logprobs(hf, seq: list[int]) -> np.ndarray:
    """(T, V) log_softmax of transformers' logits at every position of `seq`."""
    return torch.log_softmax(hf(torch.tensor([seq])).logits[0].double(), -1).numpy()


def check_scores(hf, prompt: list[int], scores, k: int) -> None:
    ref = hf_logprobs(hf, prompt)  # ref[i] is the distribution of token i + 1
    assert scores.token_logprobs.shape == (len(prompt) - 1,)
    want = ref[np.arange(len(prompt) - 1), prompt[1:]]
    np.testing.assert_allclose(scores.token_logprobs, want, atol=1e-4)
    assert scores.top_ids.shape == (len(prompt) - 1, k)
    if k:
        np.testing.assert_allclose(scores.top_logprobs, np.take_along_axis(ref[:-1], scores.top_ids, 1), atol=1e-4)
        np.testing.assert_allclose(scores.top_logprobs, -np.sort(-ref[:-1], axis=1)[:, :k], atol=1e-4)


@pytest.mark.parametrize("kind", ["gqa", "standard", "torch", "fixed"])
def test_prompt_scores_match_transformers_in_a_batch_of_different_lengths(kind, graphs, tiny_lm_dir, hf) -> None:
    """Every position's log-probability of the next prompt token and the top 5 there, for a
    prompt that fills the whole context (128) among shorter ones, with a row that is not scored;
    then the same long prompt prefilled in chunks."""
    runner = make_runner(kind, graphs, tiny_lm_dir)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 50257, n).tolist() for n in (128, 5, 40, 2)]
    sel = runner.add(prompts, Want(top_n=2, score=(0, 1, 3), score_top_n=5))
    for b in (0, 1, 3):
        check_scores(hf, prompts[b], sel.prompt[b], 5)
    assert sel.prompt[2] is None
    for b, p in enumerate(prompts):  # the next token as usual
        ref = hf_logprobs(hf, p)[-1]
        np.testing.assert_array_equal(sel.top_ids[b], np.argsort(-ref, kind="stable")[:2])
        np.testing.assert_allclose(sel.top_logprobs[b], np.sort(ref)[::-1][:2], atol=1e-4)
    runner.reset()
    pending = runner.start_prefill(prompts[0])
    parts = 0
    while (out := runner.advance(pending, 50, Want(score=(0,), score_top_n=3))) is None:
        parts += 1
    assert parts == 2  # 50 + 50 + 28 tokens
    check_scores(hf, prompts[0], out.prompt[0], 3)
    single = runner.add([prompts[3][:1]], Want(score=(0,), score_top_n=2))  # one token: nothing to score
    assert single.prompt[0].token_logprobs.shape == (0,)


@pytest.mark.parametrize("kind", ["gqa", "torch", "fixed"])
def test_temperature_scales_only_the_next_token_distribution(kind, graphs, tiny_lm_dir, hf) -> None:
    runner = make_runner(kind, graphs, tiny_lm_dir)
    prompt = [464, 2068, 7586, 21831, 18045]
    sel = runner.add([prompt, prompt], Want(top_n=4, temperature=np.array([1.0, 0.5], np.float32), score=(1,),
                                            score_top_n=1))
    logits = hf(torch.tensor([prompt])).logits[0].detach().double()
    hot = torch.log_softmax(logits[-1] / 0.5, -1).numpy()
    np.testing.assert_array_equal(sel.top_ids[1], np.argsort(-hot, kind="stable")[:4])
    np.testing.assert_allclose(sel.top_logprobs[1], np.sort(hot)[::-1][:4], atol=1e-4)
    np.testing.assert_allclose(sel.logits[1], logits[-1].numpy(), atol=1e-4)  # raw logits stay raw
    check_scores(hf, prompt, sel.prompt[1], 1)  # the prompt positions are not scaled


def test_gqa_buffers_follow_the_tokens_held_and_go_back_when_idle(graphs, hf) -> None:
    """The KV buffers grow in rows and in width (cache positions) as the batch needs, keep every
    row's cache through a growth (the tokens still equal transformers'), stay grown when the
    batch empties (the next request reuses them), and return to their first size when idle."""
    r = OrtSlotRunner(graphs["gqa"], n_positions=128, initial_capacity=2, initial_width=8)
    first = r.kv_bytes["reserved"]
    assert (r.capacity, r.width) == (2, 8) and r.kv_bytes["in_use"] == 0
    per_token = 2 * 2 * 4 * 8 * 4  # layers x (key, value) x heads x head_dim x fp32
    seqs = [[464, 2068, 7586], [1212, 318, 257, 1332, 13]]
    sel = r.add(seqs)
    assert r.kv_bytes["in_use"] == per_token * 8
    for _ in range(6):  # lengths 3, 5 -> 9, 11: the width grows by half, to 12, on the way
        for s, t in zip(seqs, sel.top_ids[:, 0], strict=True):
            s.append(int(t))
        sel = r.step([s[-1] for s in seqs])
    assert r.width == 12 and r.capacity == 2
    for s, t in zip(seqs, sel.top_ids[:, 0], strict=True):
        assert int(t) == int(next_logits(hf, s).argmax())
    pending = r.start_prefill(list(range(100, 140)))  # a 40-token prompt in 16-token chunks, one more row
    while r.advance(pending, 16) is None:
        pass
    assert r.num_rows == 3 and r.capacity >= 3 and r.width == 48  # 12 -> 18 -> 32 -> 48
    assert r.kv_bytes["in_use"] == per_token * (9 + 11 + 40)
    r.reset()
    assert (r.capacity, r.width) == (4, 48) and r.releasable and r.kv_bytes["in_use"] == 0
    r.idle()
    assert (r.capacity, r.width) == (2, 8) and r.kv_bytes == {"reserved": first, "in_use": 0}
    assert not r.releasable


def test_gqa_rows_double_up_to_the_largest_batch_only(graphs) -> None:
    """Rows double as the batch grows, but not past `max_rows` (MAX_BATCH_SIZE): a burst that
    grew 30 rows to 31 reserved 60 (bench.memory's peak 1.1 GiB against 0.99 GiB)."""
    r = OrtSlotRunner(graphs["gqa"], n_positions=128, initial_capacity=2, initial_width=8, max_rows=5)
    r.add([[1, 2]] * 3)
    assert r.capacity == 4
    r.add([[3]] * 2)
    assert r.capacity == 5 and r.num_rows == 5
    r.step([4] * 5)
    assert r.capacity == 5


@pytest.mark.parametrize("kind", ["gqa", "fixed", "fixed-buckets"])
def test_verify_gives_every_fed_position_and_rewind_keeps_the_accepted(kind, graphs, tiny_lm_dir, hf) -> None:
    """Speculative decoding's runner calls (the GroupQueryAttention runners): rows fed one token
    (plain rows) and rows fed several (their last token and proposals) in one batch, then a row
    alone. Every fed position's top-N and log-probabilities are transformers' on the sequence up
    to it; `rewind` keeps each row's first `keep` fed tokens, and the steps after it see exactly
    those (the refused positions' cache entries are overwritten)."""
    runner = make_runner(kind, graphs, tiny_lm_dir)
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, 1000, n).tolist() for n in (5, 9, 3)]
    runner.add(seqs)

    def verify(feeds: list[list[int]], keep: list[int]) -> None:
        out = runner.verify(feeds, Want(top_n=3, logits=True))
        assert out.top_ids.shape == (len(feeds), max(map(len, feeds)), 3)
        for b, feed in enumerate(feeds):
            for j in range(len(feed)):
                ref = torch.log_softmax(torch.from_numpy(next_logits(hf, seqs[b] + feed[:j + 1])), -1).numpy()
                ids, lps = out.at(b, j)
                assert ids.tolist() == np.argsort(-ref)[:3].tolist(), (b, j)
                np.testing.assert_allclose(lps, ref[ids], atol=1e-4)
            if len(feed) == 1:  # a plain row's raw logits, as a step gives them
                np.testing.assert_allclose(out.logits[b], next_logits(hf, seqs[b] + feed), atol=1e-4)
        runner.rewind(keep)
        for b, (feed, k) in enumerate(zip(feeds, keep, strict=True)):
            seqs[b] += feed[:k]

    verify([[11], [12, 13, 14, 15], [16, 17]], keep=[1, 2, 2])
    verify([[18, 19, 20], [21], [22, 23, 24, 25, 26]], keep=[3, 1, 1])
    sel = runner.step([30, 31, 32])  # after the rewind: the kept tokens only
    for b, tok in enumerate((30, 31, 32)):
        seqs[b].append(tok)
        assert sel.top_ids[b, 0] == next_logits(hf, seqs[b]).argmax()
    with pytest.raises(ValueError, match="rewind"):
        runner.rewind([1, 1, 1])  # no verify since
    order = runner.drop([0, 2])
    seqs[:] = [seqs[i] for i in order]
    verify([[40, 41, 42]], keep=[2])  # a row alone: one call
    assert runner.step([50]).top_ids[0, 0] == next_logits(hf, seqs[0] + [50]).argmax()
