"""Next-token choice on last-position logits, with the semantics of transformers' processors.

Order (vLLM's for the processors transformers lacks, transformers' for the rest): logit bias and
the suppression of stop tokens under `min_tokens` (vLLM's logits processors), then the penalties
(repetition as transformers, OpenAI's presence and frequency penalties over the generated tokens,
TGI's frequency penalty over all tokens), then temperature, top-k, top-p, min-p, typical-p (the
order of transformers' warpers); then argmax (greedy) or a draw from the request's own seeded
generator, so a seeded request gives the same tokens whoever shares its batch. The reported
log-probability is the chosen token's under the distribution after the processors, penalties
and temperature, before top-k/top-p/min-p/typical-p truncation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

# Top-k sampling with k up to this many chooses from the runner's top-N alternatives (no full-vocabulary
# logits on the host); a larger k takes the full-logits path.
MAX_TOP_K = 64


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    # OpenAI's penalties, over the generated tokens: logit -= frequency_penalty * count + presence_penalty * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # TGI's `frequency_penalty`, over prompt and generated tokens: logit -= penalty * count / length
    relative_frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # added to the logits (OpenAI's logit_bias)
    min_p: float | None = None  # drop tokens less likely than min_p times the most likely (transformers, vLLM)
    typical_p: float | None = None  # locally typical sampling (transformers' TypicalLogitsWarper, TGI)
    # While fewer than `min_tokens` tokens are generated, `suppress_ids` (EOS, stop token ids) cannot be chosen.
    min_tokens: int = 0
    suppress_ids: tuple[int, ...] = ()

    @property
    def sampling(self) -> bool:
        """TGI's rule: any warper (temperature, top_k, top_p, typical_p; min_p too) switches sampling on."""
        warped = ((self.temperature not in (None, 1.0)) or bool(self.top_k) or (self.top_p not in (None, 1.0))
                  or (self.typical_p not in (None, 1.0)) or bool(self.min_p))
        return self.do_sample or warped

    @property
    def processed(self) -> bool:
        """Whether a processor other than temperature and the top-k/top-p warpers reads the full logits."""
        return (self.repetition_penalty not in (None, 1.0) or bool(self.presence_penalty)
                or bool(self.frequency_penalty) or bool(self.relative_frequency_penalty) or bool(self.logit_bias)
                or bool(self.min_p) or self.typical_p not in (None, 1.0))


class Sampler:
    """Per-request state: the parameters, the seeded generator, and the tokens seen so far.

    The generator (and a seed drawn from the OS when none was given) is made on first use: a
    greedy request never draws, and that setup cost every request about 20 us. Seen tokens are
    kept only when a repetition penalty reads them, token counts only when a frequency or
    presence penalty does."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params = params
        self._penalized = params.repetition_penalty not in (None, 1.0)
        self._processed = params.processed
        self.seen: set[int] = set(prompt_ids) if self._penalized else set()
        self.generated = 0
        # OpenAI's penalties count the generated tokens; TGI's frequency penalty all of them.
        self._openai_counts = bool(params.presence_penalty or params.frequency_penalty)
        self._all_counts = bool(params.relative_frequency_penalty)
        self.counts: Counter[int] = Counter()
        self.all_counts: Counter[int] = Counter(prompt_ids) if self._all_counts else Counter()
        self.length = len(prompt_ids)
        self._seed = params.seed
        self._rng: np.random.Generator | None = None
        # When the host chooses from the logits: how many alternatives the request reports per token
        # (its `logprobs`), and after each choice the best of the distribution the token's log-probability
        # comes from (after penalties and temperature), so that both come from the same distribution.
        self.report_top = 0
        self.top: tuple[np.ndarray, np.ndarray] | None = None
        # A grammar-constrained row (structured outputs): before each choice, the (V,) bool mask of
        # the tokens that keep its output valid (`grammar.Constraint.allowed`).
        self.constrained = False
        self.allowed: np.ndarray | None = None

    @property
    def seed(self) -> int:
        if self._seed is None:
            self._seed = int(np.random.SeedSequence().entropy % 2**63)
        return self._seed

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    @property
    def needs_logits(self) -> bool:
        """Whether choosing this row's token needs the full-vocabulary logits on the host. Rows
        that do not (greedy, or top-k sampling with k <= MAX_TOP_K and nothing else) choose from
        the runner's top-N alternatives, computed where the logits are."""
        p = self.params
        if self._processed or self.suppressing or self.constrained:
            return True
        if not p.sampling:
            return False
        return p.top_p not in (None, 1.0) or not p.top_k or p.top_k > MAX_TOP_K

    @property
    def top_n(self) -> int:
        """How many of the runner's top alternatives choosing from them needs (rows that do not
        need the logits): 1 for greedy, k for top-k sampling; 1 when the host chooses from the
        logits (a top_k past MAX_TOP_K, up to the vocabulary or beyond, is applied there)."""
        if self.needs_logits:
            return 1
        return self.params.top_k if self.params.sampling and self.params.top_k else 1

    @property
    def temperature(self) -> float:
        """The temperature the runner applies to this row's next-token distribution (1 when the
        host samples from the raw logits, or for greedy)."""
        p = self.params
        return float(p.temperature) if p.sampling and not self.needs_logits and p.temperature else 1.0

    def from_top(self, ids: np.ndarray, logprobs: np.ndarray) -> tuple[int, float]:
        """Choose from the runner's top alternatives (`ids`, `logprobs` (N,), best first, after
        this row's temperature) when `needs_logits` is False: the first for greedy, else a draw
        from the top k renormalised (transformers' top-k warper; a tie at the k-th value keeps the
        lower id, as ONNX's TopK orders ties)."""
        if not self.params.sampling:
            j = 0
        else:
            k = self.top_n
            p = np.exp(logprobs[:k].astype(np.float64) - float(logprobs[0]))
            cdf = np.cumsum(p)
            j = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), k - 1)
        token = int(ids[j])
        self.record(token)
        return token, float(logprobs[j])

    @property
    def suppressing(self) -> bool:
        """Stop tokens are masked: fewer than `min_tokens` have been generated."""
        return bool(self.params.suppress_ids) and self.generated < self.params.min_tokens

    def __call__(self, logits: np.ndarray) -> tuple[int, float]:
        """Choose the next token from one row of logits (V,); returns (id, logprob)."""
        token, logprob = choose(logits, self.params, self.seen, self.rng if self.params.sampling else None,
                                self)
        self.record(token)
        return token, logprob

    def record(self, token: int) -> None:
        """A token chosen for this request (here or by `from_top`)."""
        self.generated += 1
        self.length += 1
        if self._penalized:
            self.seen.add(token)
        if self._openai_counts:
            self.counts[token] += 1
        if self._all_counts:
            self.all_counts[token] += 1


def apply_repetition_penalty(logits: np.ndarray, seen: set[int] | list[int], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' positive logits are divided
    by the penalty, negative ones multiplied."""
    if penalty == 1.0 or not seen:
        return logits
    idx = np.fromiter(seen, dtype=np.int64)
    idx = idx[(idx >= 0) & (idx < logits.shape[-1])]
    out = logits.copy()
    vals = out[idx].astype(np.float64)  # a float32 penalty can round to 0 (then 0 / 0 = NaN)
    with np.errstate(over="ignore"):  # an extreme penalty overflows to +/-inf: handled in `choose`
        out[idx] = np.where(vals < 0, vals * penalty, vals / penalty).astype(logits.dtype)
    return out


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest (ties at the k-th value kept, as transformers does); O(V) partition."""
    if k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_mask(logits: np.ndarray, p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper: drop the tail whose cumulative probability is <= 1 - p,
    always keeping the most likely token.

    Equivalently, keep the tokens whose more-likely tokens sum to < p. No argsort of V: when the
    top 256 (one partition) already sum to >= p, every kept token is among them and only they are
    sorted; a flat distribution instead gets one value sort, which gives the probability of the
    last kept token. Ties are ordered as transformers' stable ascending sort orders them (the
    higher index counts as more likely).
    """
    if p >= 1.0:
        return logits
    alive = np.flatnonzero(logits > -np.inf)
    if alive.size < logits.shape[-1]:  # already cut (top-k): work on the survivors, in index order
        out = np.full_like(logits, -np.inf)
        out[alive] = top_p_mask(logits[alive], p)
        return out
    probs = _softmax(logits.astype(np.float64))
    V = logits.shape[-1]
    k = min(256, V)
    # The top k plus every token tied with the k-th (a partition picks among those arbitrarily).
    kth = logits[np.argpartition(-logits, k - 1)[k - 1]] if k < V else -np.inf
    cand = np.flatnonzero(logits >= kth)
    if probs[cand].sum() >= p:
        cand = cand[np.lexsort((-cand, -logits[cand]))]  # most likely first
        ranked = probs[cand]
        keep = cand[np.cumsum(ranked) - ranked < p]
    else:
        ranked = np.sort(probs)[::-1]
        n_keep = max(1, int((np.cumsum(ranked) - ranked < p).sum()))
        last = ranked[n_keep - 1]
        above = np.flatnonzero(probs > last)
        ties = np.flatnonzero(probs == last)  # ascending index: the kept ones are at the end
        keep = np.concatenate([above, ties[ties.size - (n_keep - above.size):]])
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """OpenAI's logit_bias: each token's bias is added to its logit."""
    out = logits.copy()
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    out[ids] += np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
    return out


def apply_presence_frequency(logits: np.ndarray, counts: Counter[int], presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties (vLLM's formula): for each generated token j,
    logit[j] -= frequency * count[j] + presence."""
    if not counts:
        return logits
    out = logits.copy()
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    c = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out[ids] -= np.float32(frequency) * c + np.float32(presence)
    return out


def apply_relative_frequency(logits: np.ndarray, counts: Counter[int], length: int, penalty: float) -> np.ndarray:
    """TGI's frequency_penalty (its HeterogeneousFrequencyPenaltyLogitsProcessor): every token of
    the prompt and of the output so far lowers its logit by penalty * count / length."""
    if not counts or length <= 0:
        return logits
    out = logits.copy()
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    c = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out[ids] -= c / np.float32(length) * np.float32(penalty)
    return out


def min_p_mask(logits: np.ndarray, min_p: float) -> np.ndarray:
    """transformers' MinPLogitsWarper: drop tokens whose probability is below min_p times the
    most likely token's, i.e. whose logit is below max + log(min_p). The best token always stays."""
    if min_p <= 0:
        return logits
    top = float(logits.max())
    return np.where(logits.astype(np.float64) - top < np.log(min_p), np.float32(-np.inf), logits).astype(logits.dtype)


def typical_mask(logits: np.ndarray, mass: float) -> np.ndarray:
    """transformers' TypicalLogitsWarper (locally typical sampling, TGI's `typical_p`): rank the
    tokens by how far their information -log p is from the entropy, and keep the closest ones
    until their probability reaches `mass`. Needs a sort of the vocabulary."""
    if mass >= 1.0:
        return logits
    x = logits.astype(np.float64)
    logp = log_softmax(x)
    p = np.exp(logp)
    alive = p > 0
    ent = -np.sum(logp[alive] * p[alive])
    shifted = np.abs(-logp - ent)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(p[order])
    last = min(int((cum < mass).sum()), order.size - 1)
    remove = shifted > shifted[order[last]]
    remove[order[0]] = False  # min_tokens_to_keep = 1
    return np.where(remove, np.float32(-np.inf), logits).astype(logits.dtype)


def top_of(logprobs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n best (ids, log-probabilities), best first; equal values in id order (as ONNX's TopK)."""
    n = min(n, logprobs.size)
    part = np.argpartition(-logprobs, n - 1)[:n]
    order = np.lexsort((part, -logprobs[part]))
    ids = part[order]
    return ids.astype(np.int64), logprobs[ids]


def _report_top(state: Sampler | None, logprobs: np.ndarray) -> None:
    if state is not None and state.report_top:
        ids, lps = top_of(logprobs, state.report_top)
        if state.allowed is not None:  # a grammar's row lists only the tokens it could take
            keep = lps > -np.inf
            ids, lps = ids[keep], lps[keep]
        state.top = (ids, lps)


def choose(logits: np.ndarray, params: SamplingParams, seen: set[int],
           rng: np.random.Generator | None, state: Sampler | None = None) -> tuple[int, float]:
    """One token and its log-probability; `rng` is only read when `params.sampling`. `state` (the
    request's Sampler) holds what the penalties and `min_tokens` read: counts, length, tokens made."""
    scores = logits.astype(np.float32, copy=False)
    allowed = state.allowed if state is not None else None
    if allowed is not None:  # a grammar's mask: the first processor, so every later one sees only valid tokens
        scores = np.where(allowed, scores, np.float32(-np.inf))
    if params.logit_bias:
        scores = apply_logit_bias(scores, params.logit_bias)
    if state is not None and state.suppressing:
        kept = scores.copy()
        kept[list(params.suppress_ids)] = -np.inf
        if allowed is None or np.isfinite(kept).any():  # the grammar's end outranks min_tokens
            scores = kept
    if params.repetition_penalty not in (None, 1.0):
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
        if scores.max() == np.inf:  # the penalty overflowed: those tokens outrank all others, equally
            scores = np.where(scores == np.inf, np.float32(0), np.float32(-np.inf))
    if state is not None and (params.presence_penalty or params.frequency_penalty):
        scores = apply_presence_frequency(scores, state.counts, params.presence_penalty, params.frequency_penalty)
    if state is not None and params.relative_frequency_penalty:
        scores = apply_relative_frequency(scores, state.all_counts, state.length, params.relative_frequency_penalty)
    if not params.sampling:
        token = int(np.argmax(scores))
        logprobs = log_softmax(scores)
        _report_top(state, logprobs)
        return token, float(logprobs[token])
    if params.temperature not in (None, 1.0):
        # Shift first (softmax is shift-invariant) and divide in float64: a tiny temperature then
        # sends the others to -inf instead of overflowing the best to +inf (and 0 / 0 to NaN).
        shifted = scores.astype(np.float64) - float(scores.max())
        with np.errstate(over="ignore"):  # overflowing to -inf is the intended result
            scores = (shifted / params.temperature).astype(np.float32)
    logprobs = log_softmax(scores)
    _report_top(state, logprobs)
    if params.top_k:
        scores = top_k_mask(scores, params.top_k)
    if params.top_p not in (None, 1.0):
        scores = top_p_mask(scores, params.top_p)
    if params.min_p:
        scores = min_p_mask(scores, params.min_p)
    if params.typical_p not in (None, 1.0):
        scores = typical_mask(scores, params.typical_p)
    kept = np.flatnonzero(scores > -np.inf)  # after top-k / top-p usually a few tokens, not V
    probs = _softmax(scores[kept])
    # One float64 running sum for both the scale and the search, so the draw can never land
    # past the last kept token (a float32 cumsum and a pairwise sum differ by ~1e-5). Tokens
    # whose probability underflows to 0 add nothing, and `side="right"` never lands on them.
    cdf = np.cumsum(probs, dtype=np.float64)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if i >= kept.size:  # u * total rounded up to total: the last token with probability > 0
        i = int(np.flatnonzero(probs)[-1])
    token = int(kept[i])
    return token, float(logprobs[token])
