"""Sampling matches transformers' logits processors on the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from app.engine.sampling import (
    Sampler,
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency,
    apply_relative_frequency,
    apply_repetition_penalty,
    choose,
    min_p_mask,
    top_k_mask,
    top_of,
    top_p_mask,
    typical_mask,
)

V = 50257


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 3, size=V).astype(np.float32)


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(logits, penalty) -> None:
    seen = [5, 17, 17, 300, 50256, 1234]
    logits[[5, 17]] = [-2.5, 4.0]  # one negative and one positive seen logit
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), torch.from_numpy(logits[None].copy()))
    np.testing.assert_allclose(apply_repetition_penalty(logits, set(seen), penalty), ref[0].numpy(), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 50, 1000])
def test_top_k_matches_transformers(logits, k) -> None:
    ref = TopKLogitsWarper(k)(None, torch.from_numpy(logits[None].copy()))[0].numpy()
    ours = top_k_mask(logits, k)
    assert np.array_equal(np.isinf(ours), np.isinf(ref))
    assert np.isfinite(ours).sum() == k


@pytest.mark.parametrize("p", [0.001, 0.3, 0.9, 0.99])
def test_top_p_matches_transformers(logits, p) -> None:
    ref = TopPLogitsWarper(p)(None, torch.from_numpy(logits[None].copy()))[0].numpy()
    ours = top_p_mask(logits, p)
    assert np.array_equal(np.isinf(ours), np.isinf(ref))


@pytest.mark.parametrize("scale", [0.01, 1.0, 12.0], ids=["flat", "normal", "peaked"])
@pytest.mark.parametrize("p", [0.3, 0.9, 0.999])
def test_top_p_matches_transformers_flat_peaked_and_tied(scale, p) -> None:
    """Both paths (the 256-candidate partition for peaked distributions, the value sort for
    flat ones) and ties, which transformers' stable ascending sort breaks by index."""
    z = np.random.default_rng(1).normal(0, scale, size=V).astype(np.float32)
    z[:300] = z[300]  # 301 equal logits
    z[-5:] = z.max()  # a tie at the top
    ref = TopPLogitsWarper(p)(None, torch.from_numpy(z[None].copy()))[0].numpy()
    assert np.array_equal(np.isinf(top_p_mask(z, p)), np.isinf(ref))


def test_temperature_then_top_k_top_p_chain_matches_transformers(logits) -> None:
    t = torch.from_numpy(logits[None].copy())
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8)):
        t = proc(None, t)
    ours = logits / np.float32(0.7)
    ours = top_p_mask(top_k_mask(ours, 40), 0.8)
    np.testing.assert_allclose(np.where(np.isinf(ours), 0, ours), np.where(np.isinf(t[0].numpy()), 0, t[0].numpy()),
                               rtol=1e-6)


def test_top_k_1_and_tiny_top_p_equal_greedy(logits) -> None:
    greedy, _ = choose(logits, SamplingParams(), set(), np.random.default_rng(0))
    for params in (SamplingParams(do_sample=True, top_k=1), SamplingParams(do_sample=True, top_p=1e-6)):
        for seed in range(5):
            assert choose(logits, params, set(), np.random.default_rng(seed))[0] == greedy


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    rng = np.random.default_rng(0)
    draws = [choose(logits, SamplingParams(do_sample=True), set(), rng)[0] for _ in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.03)


def test_logprob_is_log_softmax_of_chosen(logits) -> None:
    token, lp = choose(logits, SamplingParams(), set(), np.random.default_rng(0))
    ref = torch.log_softmax(torch.from_numpy(logits), -1)[token].item()
    assert token == int(logits.argmax()) and lp == pytest.approx(ref, abs=1e-5)


def test_warpers_switch_sampling_on_like_tgi() -> None:
    assert not SamplingParams().sampling
    assert SamplingParams(temperature=0.5).sampling and SamplingParams(top_k=3).sampling
    assert not SamplingParams(temperature=1.0, top_p=1.0).sampling


class _EdgeRng:
    """A generator stand-in whose draw is the largest float below 1: the top of the CDF."""

    def random(self) -> float:
        return float(np.nextafter(1.0, 0.0))


def test_a_draw_at_the_top_of_the_cdf_stays_on_a_kept_token(logits) -> None:
    logits[:] = -10.0
    logits[[3, 7]] = [5.0, 4.0]  # top-k=2 keeps 3 and 7; everything above index 7 is masked
    token, lp = choose(logits, SamplingParams(do_sample=True, top_k=2), set(), _EdgeRng())
    assert token == 7 and np.isfinite(lp)


def test_a_draw_at_the_top_of_the_cdf_skips_underflowed_tokens(logits) -> None:
    """No mask, but every token except 3 and 7 underflows to probability 0 in float32: the edge
    draw must still land on a token that has probability, not on the vocabulary's last."""
    logits[:] = -200.0
    logits[[3, 7]] = [5.0, 4.0]
    token, lp = choose(logits, SamplingParams(do_sample=True, temperature=0.5), set(), _EdgeRng())
    assert token == 7 and np.isfinite(lp)


def test_top_p_ties_straddling_the_candidate_cut_keep_the_highest_index() -> None:
    """255 clear winners, then 20 tokens tied at rank 256: the cut lands inside the tie, and the
    kept one must be the one a stable ascending sort ranks highest (the largest index)."""
    z = np.full(V, -10.0, np.float32)
    z[:255] = 5.0
    z[500:520] = 1.0
    e = np.exp(z.astype(np.float64) - 5.0)
    probs = e / e.sum()
    p = probs[:255].sum() + probs[500] / 2
    kept = np.flatnonzero(np.isfinite(top_p_mask(z, p)))
    assert kept.tolist() == list(range(255)) + [519]
    order = np.argsort(z, kind="stable")  # the reference: transformers' rule with a stable sort
    remove = np.cumsum(probs[order]) <= 1 - p
    remove[-1] = False
    assert sorted(order[~remove].tolist()) == kept.tolist()


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30, 1e300])
def test_extreme_temperatures_stay_finite(logits, temperature) -> None:
    """Found by the HTTP fuzzer: a subnormal temperature used to overflow the scores to +/-inf
    (and 0 / 0 to NaN). Scaled after a shift, a tiny one is greedy and a huge one near-uniform."""
    rng = np.random.default_rng(0)
    for params in (SamplingParams(do_sample=True, temperature=temperature),
                   SamplingParams(do_sample=True, temperature=temperature, top_k=1, top_p=5e-324),
                   SamplingParams(do_sample=True, temperature=temperature, top_p=0.9)):
        token, lp = choose(logits, params, set(), rng)
        assert 0 <= token < V and np.isfinite(lp)
        if temperature < 1e-20:
            assert token == int(np.argmax(logits)) and lp == 0.0


@pytest.mark.parametrize("penalty", [5e-324, 1e-300, 1e300])
def test_extreme_repetition_penalties_stay_finite(logits, penalty) -> None:
    """Also found by the fuzzer: a penalty that rounds to 0 in float32 made seen tokens +inf and
    0 / 0 NaN. A tiny penalty now makes the seen positive-logit tokens the only candidates."""
    seen = {3, 15, 40}
    logits[[3, 15, 40]] = [2.0, -1.0, 4.0]
    for params in (SamplingParams(repetition_penalty=penalty),
                   SamplingParams(do_sample=True, temperature=5e-324, top_k=1, top_p=5e-324,
                                  repetition_penalty=penalty),
                   SamplingParams(do_sample=True, top_p=0.9, repetition_penalty=penalty)):
        token, lp = choose(logits, params, seen, np.random.default_rng(0))
        assert 0 <= token < V and not np.isnan(lp)
        if penalty < 1e-30:
            assert token in (3, 40)


def _top(logits: np.ndarray, n: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """What the graph returns for one row: the top n ids of logits / temperature, their logprobs."""
    lp = torch.log_softmax(torch.from_numpy(logits).double() / temperature, -1).numpy()
    ids = np.argsort(-lp, kind="stable")[:n]
    return ids, lp[ids].astype(np.float32)


def test_which_rows_need_the_full_logits() -> None:
    cases = [
        (SamplingParams(), False),  # greedy: the top 1
        (SamplingParams(do_sample=True, top_k=50, temperature=0.7), False),  # top-k: the top 50
        (SamplingParams(do_sample=True), True),  # the whole vocabulary is drawn from
        (SamplingParams(do_sample=True, top_k=50, top_p=0.9), True),
        (SamplingParams(do_sample=True, top_k=10_000), True),  # more than the graph returns
        (SamplingParams(repetition_penalty=1.3), True),
    ]
    for params, want in cases:
        assert Sampler(params, [1, 2]).needs_logits is want, params


def test_host_choice_reports_the_alternatives_of_its_own_distribution(logits) -> None:
    """When the host chooses from the logits (penalties, pure temperature), the alternatives a
    request reports (`Sampler.top`) come from the distribution the token's log-probability comes
    from: after the penalty and the temperature, as transformers' processors give it."""
    rep = SamplingParams(repetition_penalty=1.8)
    s = Sampler(rep, [int(logits.argmax())])
    s.report_top = 4
    token, lp = s(logits)
    want = torch.log_softmax(RepetitionPenaltyLogitsProcessor(1.8)(
        torch.tensor([[int(logits.argmax())]]), torch.from_numpy(logits)[None].clone())[0].double(), -1)
    ids, lps = s.top
    assert ids.tolist() == want.topk(4).indices.tolist() and token == ids[0] and lp == lps[0]
    assert np.allclose(lps, want.topk(4).values.numpy(), atol=1e-5)
    hot = Sampler(SamplingParams(do_sample=True, temperature=0.6, seed=1), [])
    hot.report_top = 3
    token, lp = hot(logits)
    want = torch.log_softmax(torch.from_numpy(logits).double() / 0.6, -1)
    assert np.allclose(hot.top[1], want.topk(3).values.numpy(), atol=1e-5) and abs(lp - want[token].item()) < 1e-5
    plain = Sampler(rep, [])
    plain(logits)
    assert plain.top is None  # nothing kept unless the request reports alternatives


def test_top_of_orders_equal_values_by_id() -> None:
    lps = np.array([-3.0, -1.0, -2.0, -1.0, -5.0, -1.0], np.float32)
    ids, vals = top_of(lps, 4)
    assert ids.tolist() == [1, 3, 5, 2] and vals.tolist() == [-1.0, -1.0, -1.0, -2.0]
    assert top_of(lps, 10)[0].tolist() == [1, 3, 5, 2, 0, 4]


def test_greedy_from_the_top_is_the_first(logits) -> None:
    ids, lps = _top(logits, 3)
    s = Sampler(SamplingParams(), [])
    assert s.from_top(ids, lps) == (int(ids[0]), float(lps[0]))
    assert s.from_top(ids, lps) == choose(logits, SamplingParams(), set(), None)[:1] + (float(lps[0]),)


def test_top_k_from_the_top_draws_like_transformers_top_k(logits) -> None:
    """The draws from the graph's top k (after temperature) follow transformers' top-k warper's
    distribution: 20,000 seeded draws, each token's frequency within 4 standard errors."""
    k, temp = 5, 0.8
    ids, lps = _top(logits, 16, temp)  # the graph may return more than k (another row asked for more)
    scores = TemperatureLogitsWarper(temp)(None, torch.from_numpy(logits)[None].double())
    scores = TopKLogitsWarper(k)(None, scores)
    p = torch.softmax(scores, -1)[0].numpy()
    s = Sampler(SamplingParams(do_sample=True, top_k=k, temperature=temp, seed=1), [])
    assert s.temperature == temp and s.top_n == k and not s.needs_logits
    n = 20_000
    counts: dict[int, int] = {}
    for _ in range(n):
        token, lp = s.from_top(ids, lps)
        counts[token] = counts.get(token, 0) + 1
        assert lp == float(lps[list(ids).index(token)])  # its log-probability after temperature
    assert set(counts) == set(ids[:k].tolist())
    for token, c in counts.items():
        se = np.sqrt(p[token] * (1 - p[token]) / n)
        assert abs(c / n - p[token]) < 4 * se, (token, c / n, p[token])


def test_top_k_from_the_top_repeats_with_its_seed(logits) -> None:
    ids, lps = _top(logits, 8)
    draws = [[Sampler(SamplingParams(do_sample=True, top_k=8, seed=3), []).from_top(ids, lps) for _ in range(1)]
             for _ in range(2)]
    assert draws[0] == draws[1]
    one = Sampler(SamplingParams(do_sample=True, top_k=1, seed=3), [])
    assert one.from_top(ids, lps)[0] == int(ids[0])  # top_k=1 is greedy


def test_a_sampler_draws_its_seed_once_and_only_when_asked() -> None:
    seeded = Sampler(SamplingParams(do_sample=True, seed=7), [1, 2])
    assert seeded.seed == 7
    unseeded = Sampler(SamplingParams(do_sample=True), [1, 2])
    assert unseeded.seed == unseeded.seed  # drawn on first use, then kept
    logits = np.random.default_rng(3).normal(0, 1, size=V).astype(np.float32)
    a = [Sampler(SamplingParams(do_sample=True, seed=11), [1])(logits)[0] for _ in range(2)]
    assert a[0] == a[1]  # the lazily made generator is still seeded by the request's seed


# ---- the processors of issue 19 -------------------------------------------------------------------

def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x[None].copy())


@pytest.mark.parametrize("min_p", [0.001, 0.05, 0.3, 0.9])
def test_min_p_matches_transformers(logits, min_p) -> None:
    ref = MinPLogitsWarper(min_p)(None, _t(logits))[0].numpy()
    ours = min_p_mask(logits, min_p)
    assert np.array_equal(np.isinf(ours), np.isinf(ref)) and 0 < np.isfinite(ours).sum() < V
    np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(ours)])


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0, 12.0])
@pytest.mark.parametrize("mass", [0.2, 0.5, 0.95])
def test_typical_p_matches_transformers(scale, mass) -> None:
    """Against transformers' warper run in float64 (ours computes in float64): in float32 the two
    differ only by rounding at the mass boundary (one token in or out, seen on flat distributions)."""
    z = np.random.default_rng(4).normal(0, scale, size=V).astype(np.float32)
    ref = TypicalLogitsWarper(mass)(None, _t(z.astype(np.float64)))[0].numpy()
    ours = typical_mask(z, mass)
    assert np.array_equal(np.isinf(ours), np.isinf(ref)), (np.isfinite(ours).sum(), np.isfinite(ref).sum())


def test_typical_p_after_top_k_matches_transformers(logits) -> None:
    t = _t(logits)
    for proc in (TopKLogitsWarper(100), TypicalLogitsWarper(0.9)):
        t = proc(None, t.double())
    assert np.array_equal(np.isinf(typical_mask(top_k_mask(logits, 100), 0.9)), np.isinf(t[0].numpy()))


def test_logit_bias_matches_transformers_sequence_bias(logits) -> None:
    bias = {5: 3.5, 50256: -100.0, 17: 0.25}
    ref = SequenceBiasLogitsProcessor({(k,): v for k, v in bias.items()})(torch.tensor([[1, 2]]), _t(logits))
    np.testing.assert_allclose(apply_logit_bias(logits, bias), ref[0].numpy(), rtol=1e-6)
    # -100 bans, +100 forces (OpenAI's description)
    assert choose(logits, SamplingParams(logit_bias={int(logits.argmax()): -100.0}), set(), None)[0] != logits.argmax()
    assert choose(logits, SamplingParams(do_sample=True, logit_bias={123: 100.0}), set(),
                  np.random.default_rng(0))[0] == 123


def test_presence_and_frequency_penalties_are_openais_formula(logits) -> None:
    """vLLM's _apply_penalties: logits -= frequency * output counts + presence * (count > 0)."""
    generated = [5, 5, 5, 9, 300, 9]
    counts = torch.zeros(V).scatter_add_(0, torch.tensor(generated), torch.ones(len(generated)))
    ref = torch.from_numpy(logits.copy()) - 0.4 * counts - 1.5 * (counts > 0).float()
    s = Sampler(SamplingParams(presence_penalty=1.5, frequency_penalty=0.4), prompt_ids=[7, 7, 8])
    for t in generated:
        s.record(t)
    ours = apply_presence_frequency(logits, s.counts, 1.5, 0.4)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    assert ours[7] == logits[7]  # the prompt's tokens are not penalized (OpenAI: "the text so far" generated)


def test_tgi_frequency_penalty_is_tgis_heterogeneous_processor(logits) -> None:
    """TGI (server/.../logits_process.py, HeterogeneousFrequencyPenaltyLogitsProcessor): the
    frequency of each token in the prompt and output so far, times the penalty, off the logits."""
    prompt, generated = [7, 7, 8], [5, 5, 7]
    ids = torch.tensor([prompt + generated])
    freq = torch.zeros(1, V).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float)) / ids.shape[1]
    ref = _t(logits) - freq * 0.8
    s = Sampler(SamplingParams(relative_frequency_penalty=0.8), prompt)
    for t in generated:
        s.record(t)
    np.testing.assert_allclose(apply_relative_frequency(logits, s.all_counts, s.length, 0.8), ref[0].numpy(),
                               rtol=1e-6)


def test_min_tokens_suppresses_stop_tokens_as_transformers_min_new_tokens(logits) -> None:
    eos = int(logits.argmax())
    params = SamplingParams(min_tokens=2, suppress_ids=(eos, 11))
    s = Sampler(params, [1, 2, 3])
    proc = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=2, eos_token_id=[eos, 11])
    ids = [1, 2, 3]
    for _ in range(4):
        ref = int(proc(torch.tensor([ids]), _t(logits))[0].argmax())
        assert s.needs_logits == (len(ids) - 3 < 2)  # the top-N path again once min_tokens is reached
        token, _ = s(logits)
        assert token == ref
        ids.append(token)
    assert ids[3] != eos and ids[4] != eos and ids[5] == eos


@pytest.mark.parametrize("params", [
    SamplingParams(presence_penalty=0.5), SamplingParams(frequency_penalty=-0.5),
    SamplingParams(relative_frequency_penalty=1.0), SamplingParams(logit_bias={1: 1.0}),
    SamplingParams(do_sample=True, min_p=0.1), SamplingParams(typical_p=0.9), SamplingParams(repetition_penalty=1.2),
    SamplingParams(do_sample=True, top_k=5, presence_penalty=0.5),
])
def test_rows_with_a_processor_need_the_full_logits(params) -> None:
    """The scheduler gives rows with needs_logits == False only the top-N alternatives."""
    s = Sampler(params, [1, 2])
    assert s.needs_logits


def test_rows_without_a_processor_keep_the_fast_paths() -> None:
    assert not Sampler(SamplingParams(), [1]).needs_logits
    assert not Sampler(SamplingParams(do_sample=True, top_k=10), [1]).needs_logits
    assert SamplingParams(typical_p=0.5).sampling and SamplingParams(min_p=0.1).sampling  # warpers, as in TGI
    assert not Sampler(SamplingParams(min_tokens=3), [1]).needs_logits  # nothing to suppress


def test_penalties_change_the_choice_and_keep_the_logprob_finite(logits) -> None:
    best = int(logits.argmax())
    s = Sampler(SamplingParams(presence_penalty=2.0, frequency_penalty=2.0), [])
    s.record(best)
    s.record(best)
    token, lp = s(logits)
    penalized = logits.copy()
    penalized[best] -= 6.0
    assert token == int(penalized.argmax()) and np.isfinite(lp)
    assert lp == pytest.approx(float(torch.log_softmax(torch.from_numpy(penalized), -1)[token]), abs=1e-5)
