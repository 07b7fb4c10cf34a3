"""Next-token choice on last-position logits, with the semantics of transformers' processors.

Order as in `transformers.generate`: repetition penalty, then temperature, top-k, top-p; then
argmax (greedy) or a draw from the request's own seeded generator, so a seeded request gives the
same tokens whoever shares its batch. The reported log-probability is the chosen token's under
the distribution after penalty and temperature, before top-k/top-p truncation.
"""

from __future__ import annotations

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

    @property
    def sampling(self) -> bool:
        """TGI's rule: any warper (temperature, top_k, top_p) switches sampling on."""
        warped = (self.temperature not in (None, 1.0)) or bool(self.top_k) or (self.top_p not in (None, 1.0))
        return self.do_sample or warped


class Sampler:
    """Per-request state: the parameters, the seeded generator, and the tokens seen so far.

    The generator (and a seed drawn from the OS when none was given) is made on first use: a
    greedy request never draws, and that setup cost every request about 20 us. Seen tokens are
    kept only when a repetition penalty reads them."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params = params
        self._penalized = params.repetition_penalty not in (None, 1.0)
        self.seen: set[int] = set(prompt_ids) if self._penalized else set()
        self._seed = params.seed
        self._rng: np.random.Generator | None = None

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
        if self._penalized:
            return True
        if not p.sampling:
            return False
        return p.top_p not in (None, 1.0) or not p.top_k or p.top_k > MAX_TOP_K

    @property
    def top_n(self) -> int:
        """How many of the runner's top alternatives choosing from them needs (rows that do not
        need the logits): 1 for greedy, k for top-k sampling."""
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

    def __call__(self, logits: np.ndarray) -> tuple[int, float]:
        """Choose the next token from one row of logits (V,); returns (id, logprob)."""
        token, logprob = choose(logits, self.params, self.seen, self.rng if self.params.sampling else None)
        self.record(token)
        return token, logprob

    def record(self, token: int) -> None:
        """A token chosen for this request (here or by `from_top`)."""
        if self._penalized:
            self.seen.add(token)


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


def choose(logits: np.ndarray, params: SamplingParams, seen: set[int],
           rng: np.random.Generator | None) -> tuple[int, float]:
    """One token and its log-probability; `rng` is only read when `params.sampling`."""
    scores = logits.astype(np.float32, copy=False)
    if params.repetition_penalty not in (None, 1.0):
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
        if scores.max() == np.inf:  # the penalty overflowed: those tokens outrank all others, equally
            scores = np.where(scores == np.inf, np.float32(0), np.float32(-np.inf))
    if not params.sampling:
        token = int(np.argmax(scores))
        return token, float(log_softmax(scores)[token])
    if params.temperature not in (None, 1.0):
        # Shift first (softmax is shift-invariant) and divide in float64: a tiny temperature then
        # sends the others to -inf instead of overflowing the best to +inf (and 0 / 0 to NaN).
        shifted = scores.astype(np.float64) - float(scores.max())
        with np.errstate(over="ignore"):  # overflowing to -inf is the intended result
            scores = (shifted / params.temperature).astype(np.float32)
    logprobs = log_softmax(scores)
    if params.top_k:
        scores = top_k_mask(scores, params.top_k)
    if params.top_p not in (None, 1.0):
        scores = top_p_mask(scores, params.top_p)
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
