"""Speculative decoding by prompt lookup: the proposals, and exactness on the real ONNX Runtime
slot runner against transformers and against the same engine without speculation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from scipy import stats

from app.engine.sampling import SamplingParams
from app.engine.speculation import ngram_proposal
from app.loading.engine_loader import load_engine
from tests.conftest import make_hf_checkpoint

# Prompts whose continuation repeats them (a list, a loop) and one where little repeats.
PROMPTS = ["one two three four one two three four one two three", "a b c a b c a b c a b",
           "The weather is nice today and the weather is", "Zebras quietly juggle purple violins near Oslo"]


def test_ngram_proposal_follows_the_last_occurrence_of_the_longest_ngram() -> None:
    h = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_proposal(h, 3, 2) == [7, 8]  # the last earlier [1, 2, 3] is followed by 7, 8
    assert ngram_proposal(h, 3, 10) == [7, 8, 5, 1, 2, 3, 7, 8, 5, 1]  # past the end: the copy goes on
    assert ngram_proposal([6, 6, 6], 3, 4) == [6, 6, 6, 6]  # a loop of period 1, proposed going on
    assert ngram_proposal([4, 5, 6, 5], 3, 2) == [6, 5]  # no 3- or 2-gram repeats: the 1-gram [5]
    assert ngram_proposal([4, 5, 6, 5], 3, 2, n_min=2) == []
    assert ngram_proposal([1, 2, 3], 3, 4) == [] and ngram_proposal(h, 3, 0) == []


def make_engine(tiny_lm_dir: Path, onnx_cache: Path, speculation: str, **kw):  # noqa: ANN201
    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=8,
                      speculation=speculation, speculation_max_tokens=4, speculation_ngram=3, **kw)
    if eng.speculator is not None:
        # speculate whenever a row is alone and proposes, whatever the measured times say (on this
        # tiny model a verify call can cost more per token than a step): the tests below need it to
        # happen; test_speculation_pauses_while_it_does_not_pay checks the measuring
        eng.speculator.measure = False
    eng.start()
    return eng


@pytest.fixture(scope="module")
def engines(tiny_lm_dir: Path, onnx_cache: Path):  # noqa: ANN201
    on, off = make_engine(tiny_lm_dir, onnx_cache, "ngram"), make_engine(tiny_lm_dir, onnx_cache, "off")
    yield on, off
    on.stop()
    off.stop()


@pytest.fixture(scope="module")
def hf_lm(tiny_lm_dir: Path):  # noqa: ANN201
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_lm_dir).eval()


def generate_all(engine, requests: list[tuple]) -> list:  # noqa: ANN001
    """Run (prompt, max_new_tokens, params, stop, logprobs) requests concurrently in one batch."""
    async def go() -> list:
        return await asyncio.gather(*(engine.generate(engine.prepare(p, n, params, stop, logprobs))
                                      for p, n, params, stop, logprobs in requests))
    return asyncio.run(go())


def test_info_and_counters(engines) -> None:  # noqa: ANN001
    on, off = engines
    assert on.info()["generation"]["speculation"] | {"proposed_tokens": 0, "accepted_tokens": 0} == {
        "enabled": True, "mode": "ngram", "max_tokens": 4, "ngram": 3, "max_batch": 8, "proposed_tokens": 0,
        "accepted_tokens": 0}
    assert off.info()["generation"]["speculation"] == {"enabled": False, "mode": "off", "reason": "SPECULATION is off"}
    assert off.speculation_stats() is None


def test_greedy_is_token_for_token_transformers_and_proposals_are_accepted(engines, hf_lm) -> None:  # noqa: ANN001
    on, _ = engines
    before = on.speculation_stats()
    for text in PROMPTS:
        ids = on.tokenizer.encode(text)
        want = hf_lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
        (res,) = generate_all(on, [(text, 40, None, None, None)])
        assert [t.id for t in res.tokens] == want.tolist(), text
    after = on.speculation_stats()
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    # the tiny random model's greedy output falls into loops: most of it comes from accepted proposals
    assert accepted >= 40 and after["steps"] > before["steps"], after


def test_a_mixed_batch_equals_the_engine_without_speculation(engines) -> None:  # noqa: ANN001
    """Greedy rows with logprobs, a top-k sampled row at temperature 1, a top-p row and a
    temperature row (which never speculate), stop strings and the length limit, in one batch: the
    rows that propose are verified in the same steps as the plain rows. The same tokens, texts,
    finish reasons and log-probabilities as without speculation."""
    on, off = engines
    before = on.speculator.stats.batched
    plain = generate_all(off, [(PROMPTS[0], 30, None, None, None)])[0]
    stop = on.tokenizer.decode([t.id for t in plain.tokens[12:14]])  # a stop string the output meets
    requests = [
        (PROMPTS[0], 60, None, None, 3),  # alone for its last 30 tokens: it speculates
        (PROMPTS[1], 25, SamplingParams(do_sample=True, top_k=5, seed=11), None, 2),
        (PROMPTS[2], 30, SamplingParams(do_sample=True, top_p=0.9, seed=12), None, None),
        (PROMPTS[3], 30, SamplingParams(do_sample=True, temperature=0.7, top_k=10, seed=13), None, None),
        (PROMPTS[0], 30, None, [stop], None),
        (PROMPTS[1], 7, None, None, None),
    ]
    got, want = generate_all(on, requests), generate_all(off, requests)
    for g, w in zip(got, want, strict=True):
        assert [t.id for t in g.tokens] == [t.id for t in w.tokens]
        assert (g.generated_text, g.reason, g.stop_reason) == (w.generated_text, w.reason, w.stop_reason)
        np.testing.assert_allclose([t.logprob for t in g.tokens], [t.logprob for t in w.tokens], atol=1e-4)
        for gt, wt in zip(g.tokens, w.tokens, strict=True):
            assert [a.id for a in gt.top] == [a.id for a in wt.top]
    assert want[4].reason == "stop_sequence"
    assert on.speculator.stats.batched > before  # steps of several rows speculated


def test_seeded_sampling_is_reproducible_and_the_same_as_without(engines) -> None:  # noqa: ANN001
    on, off = engines
    req = [(PROMPTS[1], 30, SamplingParams(do_sample=True, top_k=3, seed=5), None, None)]
    first, second, plain = generate_all(on, req)[0], generate_all(on, req)[0], generate_all(off, req)[0]
    assert [t.id for t in first.tokens] == [t.id for t in second.tokens] == [t.id for t in plain.tokens]


def test_sampled_tokens_follow_the_models_distribution(engines, hf_lm) -> None:  # noqa: ANN001
    """Top-3 sampling at temperature 1, 600 seeds: the third generated token (the first one a
    verified proposal can decide) against its exact distribution from transformers (the 9 prefixes
    of the top-3 x top-3 first tokens). A scheme that keeps a proposal more often than the model
    would moves mass onto the proposed tokens: making each proposal twice as likely as the model
    has it (checked by hand) gives p = 2e-6 here, against the bound of 1e-3."""
    on, off = engines
    k, n_runs = 3, 600
    # a prompt that ends in the model's own greedy loop: its likely next tokens occur in it, so the
    # n-gram lookup proposes them and they are often, not always, what the draw picks
    loop = generate_all(off, [(PROMPTS[0], 20, None, None, None)])[0]
    ids = on.tokenizer.encode(PROMPTS[0]) + [t.id for t in loop.tokens]
    text = ids

    def topk(prefix: list[int]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits = hf_lm(torch.tensor([prefix])).logits[0, -1].double()
        v, i = torch.topk(logits, k)
        return i.numpy(), torch.softmax(v, 0).numpy()

    exact: dict[int, float] = {}
    i1, p1 = topk(ids)
    for a, pa in zip(i1, p1, strict=True):
        i2, p2 = topk(ids + [int(a)])
        for b, pb in zip(i2, p2, strict=True):
            i3, p3 = topk(ids + [int(a), int(b)])
            for c, pc in zip(i3, p3, strict=True):
                exact[int(c)] = exact.get(int(c), 0.0) + pa * pb * pc
    before = on.speculation_stats()["accepted_tokens"]
    reqs = [(text, 3, SamplingParams(do_sample=True, top_k=k, seed=s), None, None) for s in range(n_runs)]
    seen: dict[int, int] = {}
    for req in reqs:  # one at a time: a row alone speculates
        (res,) = generate_all(on, [req])
        seen[res.tokens[2].id] = seen.get(res.tokens[2].id, 0) + 1
    assert on.speculation_stats()["accepted_tokens"] > before  # proposals did decide third tokens
    assert set(seen) <= set(exact)
    support = sorted(exact)
    observed = np.array([seen.get(t, 0) for t in support], float)
    expected = np.array([exact[t] for t in support]) * n_runs
    table = {t: (o, e) for t, o, e in zip(support, observed, expected, strict=True)}
    assert stats.chisquare(observed, expected).pvalue > 1e-3, table


def test_off_with_a_reason_on_a_runner_that_cannot_verify(tiny_lm_dir: Path, onnx_cache: Path) -> None:
    eng = load_engine(tiny_lm_dir, None, backend="torch", cache_dir=onnx_cache, max_batch_size=4,
                      speculation="ngram")
    try:
        info = eng.info()["generation"]["speculation"]
        assert not info["enabled"] and "only the GroupQueryAttention runners" in info["reason"]
    finally:
        eng.stop()


# ---- a draft model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_draft(tmp_path_factory) -> Path:  # noqa: ANN001
    """Another tiny random model with the same tokenizer: a draft that rarely agrees."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("draft"), "generate", seed=5)


def draft_engine(tiny_lm_dir: Path, onnx_cache: Path, draft: Path):  # noqa: ANN201
    return make_engine(tiny_lm_dir, onnx_cache, "draft", draft_model_path=draft)


@pytest.mark.parametrize("which", ["itself", "another"])
def test_a_draft_model_gives_transformers_greedy_output(which: str, tiny_lm_dir: Path, onnx_cache: Path,
                                                        other_draft: Path, hf_lm, engines) -> None:  # noqa: ANN001
    """The model as its own draft agrees on (nearly) every proposal; another random model on few.
    Either way the output is transformers' greedy output, and a seeded sampled request gives the
    tokens of the engine without speculation."""
    eng = draft_engine(tiny_lm_dir, onnx_cache, tiny_lm_dir if which == "itself" else other_draft)
    _, off = engines
    try:
        info = eng.info()["generation"]["speculation"]
        assert info["enabled"] and info["mode"] == "draft" and info["draft_model"].endswith(
            tiny_lm_dir.name if which == "itself" else other_draft.name)
        for texts in ([PROMPTS[2]], PROMPTS):  # a stream alone, then four in one batch (a draft row each)
            got = generate_all(eng, [(text, 30 + 3 * i, None, None, 2) for i, text in enumerate(texts)])
            for i, (text, res) in enumerate(zip(texts, got, strict=True)):
                ids = eng.tokenizer.encode(text)
                want = hf_lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=30 + 3 * i, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, len(ids):]
                assert [t.id for t in res.tokens] == want.tolist(), text
        assert eng.speculator.stats.batched > 0
        st = eng.speculation_stats()  # greedy proposals for greedy rows
        share = st["accepted_tokens"] / st["proposed_tokens"]
        assert share > 0.9 if which == "itself" else share < 0.5, st
        req = [(PROMPTS[3], 30, SamplingParams(do_sample=True, top_k=4, seed=8), None, None)]
        assert [t.id for t in generate_all(eng, req)[0].tokens] == [t.id for t in generate_all(off, req)[0].tokens]
    finally:
        eng.stop()


def test_a_draft_with_another_tokenizer_is_refused(tmp_path: Path, tiny_lm_dir: Path, onnx_cache: Path,
                                                   other_draft: Path) -> None:
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(other_draft, odd)
    (odd / "merges.txt").write_text((odd / "merges.txt").read_text()[:-200], encoding="utf-8")
    with pytest.raises(ValueError, match="its merges.txt differs from MODEL_PATH's"):
        draft_engine(tiny_lm_dir, onnx_cache, odd)
    with pytest.raises(ValueError, match="SPECULATION=draft needs DRAFT_MODEL_PATH"):
        make_engine(tiny_lm_dir, onnx_cache, "draft")


def test_speculation_pauses_while_it_does_not_pay() -> None:
    """The speculator's own bookkeeping: with speculative steps measured slower per token than plain
    ones, rows stop proposing but for one step in PROBE_EVERY; measured faster, they propose again;
    a plain step comes at least every PLAIN_EVERY steps to keep the comparison fresh."""
    from types import SimpleNamespace

    from app.engine.sampling import Sampler
    from app.engine.speculation import PLAIN_EVERY, PROBE_EVERY, Speculator

    history = [5, 6, 7] * 10
    req = SimpleNamespace(prompt_ids=history, max_new_tokens=1000)
    row = SimpleNamespace(req=req, tokens=[], context_limit=1024, constraint=None,
                          sampler=Sampler(SamplingParams(), history))
    spec = Speculator(max_tokens=4, ngram=3)
    assert spec.plan([row]) is None  # nothing measured yet: a plain step first
    spec.record(1, True, 0.010, 1)
    assert spec.plan([row]) == [[5, 6, 7, 5]]
    spec.record(1, False, 0.040, 2)  # 20 ms a token against 10: it does not pay
    plans = []
    for _ in range(2 * PROBE_EVERY):  # each step measured as the scheduler does: still slower
        plans.append(spec.plan([row]))
        spec.record(1, plans[-1] is None, 0.010 if plans[-1] is None else 0.040, 1 if plans[-1] is None else 2)
    assert 1 <= sum(p is not None for p in plans) <= 2, plans  # the probes only
    # another batch size is measured apart: two rows, where speculating pays
    rows = [row, SimpleNamespace(**vars(row) | {"tokens": []})]
    assert spec.plan(rows) is None
    spec.record(2, True, 0.010, 2)
    assert spec.plan(rows) == [[5, 6, 7, 5]] * 2
    spec.record(2, False, 0.010, 8)
    assert spec.paying(2) and not spec.paying(1)
    spec.record(1, False, 0.010, 5)  # a probe made 5 tokens in 10 ms: 2 ms a token, it pays again
    spec.record(1, False, 0.010, 5)
    plans = []
    for _ in range(2 * PLAIN_EVERY):
        plans.append(spec.plan([row]))
        spec.record(1, plans[-1] is None, 0.010, 1 if plans[-1] is None else 5)
    assert 2 <= plans.count(None) <= 3, plans  # proposals at every step but the measuring plain ones
    assert Speculator(max_batch=1).plan(rows) is None  # over SPECULATION_MAX_BATCH: plain
    small = Speculator(max_batch=2)
    small.measure = False
    assert small.plan(rows) and small._rows  # the two rows' states are kept...
    assert small.plan(rows + rows) is None and not small._rows  # ...and forgotten over the limit
    # in a batch, a row proposes only where its expected accepted tokens pay for its extra call: more
    # than the tokens the batch makes in that call's time (a one-row step and 3 more positions), +10%
    four = [SimpleNamespace(**vars(row) | {"tokens": []}) for _ in range(4)]
    spec = Speculator(max_tokens=4, ngram=3)
    assert spec.pays(2, 1.0, 4) and not spec.pays(4, 1.0, 4)  # nothing measured: a one-row step = the batch's
    spec.record(1, True, 0.050, 1)  # 50 ms alone (reading the weights)
    spec.record(4, True, 0.062, 4)  # 62 ms at 4 rows: 4 ms a row; a 4-token call (62 ms) buys 4 batch tokens
    spec.record(2, True, 0.054, 2)  # at 2 rows a 4-token call (62 ms) buys 2.3 batch tokens
    assert not spec.pays(4, 1.0, 4) and spec.plan(four) is None
    assert spec.pays(2, 0.7, 4) and not spec.pays(2, 0.6, 4)
    assert spec.plan(rows) == [[5, 6, 7, 5]] * 2
