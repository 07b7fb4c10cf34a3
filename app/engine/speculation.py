"""Speculative decoding: propose, verify, keep what agrees.

A row's proposal is, with SPECULATION=ngram, the tokens that followed the last earlier occurrence
of its latest n-gram in its prompt and output (vLLM's `ngram`, TGI's n-gram speculation): no extra
model, no memory; with SPECULATION=draft, a smaller model's greedy continuation (`DraftProposer`,
its own KV cache, a row per stream it proposes for). A decode step with proposals feeds each row
its last token and its proposals (`GenerationRunner.verify`, below), which returns the top-N at
every one of those positions. Then, row by
row, position by position, the row's own sampler chooses a token from that position's top-N,
exactly as a plain step would: if it equals the next proposal, it is accepted and the next
position is read; otherwise it is the row's last token of this step. When every proposal agrees,
the last position gives one more token. The cache keeps the fed tokens that were accepted
(`GenerationRunner.rewind`).

Why this is exact: a proposal is deterministic given the history (q = 1 on the proposed token:
prompt lookup's by construction, the draft's because it decodes greedily), and the standard
rejection scheme with such a q (accept d with probability min(1, p(d)/q(d)) = p(d); on rejection
draw from max(0, p - q) normalized, which is p without d) is the same as drawing x ~ p and
accepting d when x == d. That draw is the one the row's sampler would have made at that step
without speculation, from the same random stream, so greedy output is token for token the same,
and a seeded request draws the same numbers in the same order.

Which rows speculate: those that choose from the runner's top-N at temperature 1 (greedy, and
top-k sampling at temperature 1 with no other processor; `Sampler.needs_logits` False). The
graph returns the full logits and the temperature only at a row's last position, so a row that
needs them decodes plainly in the same batch (its proposal is empty). Constrained rows need the
logits too, so they decode plainly.

It never costs much: a row's proposal length adapts to how much of its proposals it accepted
(an exponential average): it drops to none while little agrees, and a row with none tries one
proposal again every `PROBE_EVERY` steps. Acceptance alone does not say whether it pays (a draft
model's steps cost time of their own), so the time per token of speculative and of plain steps is
measured as they run, per batch size (`record`; a plain step at least every `PLAIN_EVERY` steps),
and while speculating is the slower of the two at a size, it pauses there: a probe after
`PROBE_EVERY` steps, and the gap doubles (up to `MAX_PROBE_GAP`) for each probe that finds it
still slower.

Speculating rows share the continuous batch with plain ones. ONNX Runtime's GroupQueryAttention
refuses a call of several tokens per row over a cache for more than one row ("batch_size must be 1
when sequence_length > 1 and past context is given"), so a verify call of a batch is the plain
step's call (every row's last token) and one more call per row with proposals (the rest of its
tokens); a row alone is one call. Each row with proposals thus costs the step one more read of the
weights, which pays while the batch is small and the proposals agree: the times per token are
measured per batch-size bucket (1, 2, 3-4, 5-8, ...: a `Clock` each), and `SPECULATION_MAX_BATCH`
(vLLM's `disable_by_batch_size`) turns it off above a batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.engine.runner import GenerationRunner, Verified, Want

logger = logging.getLogger(__name__)

PROBE_EVERY = 8  # a row whose proposals stopped tries one again after this many plain steps
PLAIN_EVERY = 32  # a plain step at least this often measures what speculation has to beat
MAX_PROBE_GAP = 256  # while it does not pay, the steps between probes double up to this
EMA = 0.5  # weight of the newest step in a row's acceptance average


def ngram_proposal(history: Sequence[int] | np.ndarray, n_max: int, k: int, n_min: int = 1) -> list[int]:
    """`k` tokens that followed the last earlier occurrence of `history`'s latest n-gram, the
    longest n from `n_max` down to `n_min` that occurs; [] when none does. Where the history ends
    before `k` tokens, the copy goes on over what it proposed (as an LZ77 copy overlaps itself): a
    loop of period p matches p tokens back and is proposed as going on, not cut at p tokens.

    One pass over the history per step (it runs for every speculating row at every step): the
    positions holding the last token, then, among those few, how far back each match reaches."""
    seq = np.asarray(history)
    L = len(seq)
    if k <= 0 or L < 2:
        return []
    ends = np.flatnonzero(seq[:-1] == seq[-1])  # where an earlier 1-gram match ends
    if ends.size == 0:
        return []
    length = np.ones(ends.size, np.int64)
    alive = np.ones(ends.size, bool)
    for j in range(1, min(n_max, L - 1)):  # extend each match one token further back
        prev = ends - j
        alive &= (prev >= 0) & (seq[np.maximum(prev, 0)] == seq[L - 1 - j])
        length += alive
    best = int(length.max())
    if best < n_min:
        return []
    start = int(ends[np.flatnonzero(length == best)[-1]]) + 1  # the latest of the longest
    ext = seq[start:start + k].tolist()
    while len(ext) < k:  # past the history's end: the copy continues over itself
        ext.append(ext[len(ext) - (L - start)])
    return ext


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class DraftProposer:
    """A smaller model with the same tokenizer (DRAFT_MODEL_PATH) proposes tokens greedily: each
    proposal is deterministic given the history (q = 1 on it), so the acceptance above stays the
    exact scheme. It keeps a row in its own KV cache for each stream it proposes for (those asking
    at this step; the others' rows leave). At each step a row keeps the longest prefix it shares
    with its stream's history and is fed the rest (`verify`, usually the one token the served model
    chose; a new stream's history is prefilled), which gives each row's first proposal, then the
    rows decode together `k - 1` more steps. So a step costs the draft one call over the new tokens,
    a prefill for new streams, and `k - 1` steps of the batch; refused proposals leave its cache at
    the next step."""

    def __init__(self, runner: GenerationRunner, checkpoint: str = "") -> None:
        self.runner = runner
        self.checkpoint = checkpoint
        self.keys: list[Any] = []  # the stream each draft row proposes for, in the runner's row order
        self.cached: list[np.ndarray] = []  # the tokens in each draft row

    def propose(self, asks: Sequence[tuple[Any, np.ndarray, int]]) -> list[list[int]]:
        """For each (stream, history, k): up to k proposed tokens ([] where the draft's context is
        full)."""
        r, out = self.runner, [[] for _ in asks]
        room = [(i, key, h, k) for i, (key, h, k) in enumerate(asks) if k > 0 and len(h) < r.info.n_positions]
        if not room:
            return out
        # every row holds its history + K - 1 tokens after the step
        K = min(max(k for *_, k in room), min(r.info.n_positions - len(h) for _, _, h, _ in room) + 1)
        hist = {id(key): h for _, key, h, _ in room}
        try:
            firsts = self._catch_up([key for _, key, _, _ in room], hist)
            proposals = [[t] for t in firsts]
            for _ in range(K - 1):
                for p, t in zip(proposals, r.step([p[-1] for p in proposals], Want()).top_ids[:, 0], strict=True):
                    p.append(int(t))
        except Exception:  # the draft only proposes: its failure costs speculation, not the request
            logger.exception("the draft model failed; its rows are reset")
            self.reset()
            return out
        self.cached = [np.concatenate([hist[id(key)], np.asarray(p[:-1], np.int64)])
                       for key, p in zip(self.keys, proposals, strict=True)]
        row = {id(key): p for key, p in zip(self.keys, proposals, strict=True)}
        for i, key, _, k in room:
            out[i] = row[id(key)][:k]
        return out

    def _catch_up(self, streams: Sequence[Any], hist: dict[int, np.ndarray]) -> list[int]:
        """Bring the draft's rows in line with `streams` (their histories in `hist`, by id): rows of
        other streams leave, the kept ones are fed what their stream added (at least its last
        token), new streams are prefilled. Returns each row's next token, in the runner's new row
        order (`self.keys`)."""
        r = self.runner
        common = {}
        for b, key in enumerate(self.keys):
            h = hist.get(id(key))
            if h is not None:
                c = min(_common_prefix(self.cached[b], h), len(h) - 1)  # feed at least one token
                if c > 0:
                    common[b] = c
        gone = [b for b in range(len(self.keys)) if b not in common]
        if gone:
            order = r.drop(gone)
            self.keys, self.cached = [self.keys[i] for i in order], [self.cached[i] for i in order]
            common = {new: common[old] for new, old in enumerate(order)}
        firsts: list[int] = []
        if self.keys:
            feeds = []
            for b, key in enumerate(self.keys):
                r.truncate(b, common[b])
                feeds.append(hist[id(key)][common[b]:].tolist())
            sel = r.verify(feeds, Want())
            r.rewind([len(f) for f in feeds])
            firsts = [int(t) for t in sel.last().top_ids[:, 0]]
        known = {id(key) for key in self.keys}
        new = [key for key in streams if id(key) not in known]
        if new:
            sel = r.add([hist[id(key)].tolist() for key in new], Want())
            firsts += [int(t) for t in sel.top_ids[:, 0]]
            self.keys += new
            self.cached += [hist[id(key)] for key in new]
        return firsts

    def reset(self) -> None:
        if self.runner.num_rows:
            self.runner.drop(list(range(self.runner.num_rows)))
        self.keys, self.cached = [], []


@dataclass
class RowState:
    """A row's speculation: its acceptance average and how many plain steps since it stopped."""

    seq: Any  # the scheduler's row
    history: np.ndarray  # its prompt and output so far, in a buffer that doubles (`size` used)
    size: int
    accept: float = 1.0  # the average share of proposals accepted (optimistic at first)
    idle: int = 0

    def catch_up(self) -> np.ndarray:
        """The history with the row's new tokens appended."""
        tokens, done = self.seq.tokens, self.size - len(self.seq.req.prompt_ids)
        if len(tokens) > done:
            new = [t.id for t in tokens[done:]]
            if self.size + len(new) > len(self.history):
                self.history = np.concatenate([self.history, np.zeros(len(self.history) + len(new), np.int64)])
            self.history[self.size:self.size + len(new)] = new
            self.size += len(new)
        return self.history[:self.size]


@dataclass
class Stats:
    proposed: int = 0  # proposal tokens fed to a verify call
    accepted: int = 0  # of those, accepted
    steps: int = 0  # speculative decode steps
    batched: int = 0  # of those, steps of more than one row


@dataclass
class Clock:
    """Seconds per token of the decode steps of one batch-size bucket, exponential averages: plain
    and speculative (None: not measured yet), and the steps since each was last measured."""

    plain: float | None = None
    spec: float | None = None
    since_plain: int = 0
    since_spec: int = 0
    probe_gap: int = PROBE_EVERY  # while speculating does not pay, the steps between probes

    @property
    def paying(self) -> bool:
        return self.spec is None or self.plain is None or self.spec <= self.plain


def bucket(rows: int) -> int:
    """The batch-size bucket a step is measured in: 1, 2, 3-4, 5-8, 9-16, ..."""
    return max(1, rows - 1).bit_length() + (rows > 1)


class Speculator:
    """Decides each step's proposals, and turns a verify call's top-N into accepted tokens."""

    def __init__(self, max_tokens: int = 4, ngram: int = 3, max_batch: int = 8,
                 draft: DraftProposer | None = None) -> None:
        if max_tokens < 1 or ngram < 1 or max_batch < 1:
            raise ValueError("SPECULATION_MAX_TOKENS, SPECULATION_NGRAM and SPECULATION_MAX_BATCH must be at least 1")
        self.max_tokens = max_tokens
        self.ngram = ngram
        self.draft = draft  # None: prompt lookup
        self.max_batch = max_batch  # larger batches decode plainly
        self.stats = Stats()
        self._rows: dict[int, RowState] = {}  # by id(_Seq)
        self.clocks: dict[int, Clock] = {}  # by `bucket`
        self.measure = True  # False: speculate whatever the times say (tests that need it to happen)

    def clock(self, rows: int) -> Clock:
        return self.clocks.setdefault(bucket(rows), Clock())

    def paying(self, rows: int) -> bool:
        """Whether speculative steps of a batch this size have made tokens faster than plain ones (or
        are unmeasured)."""
        return not self.measure or self.clock(rows).paying

    def record(self, rows: int, plain: bool, seconds: float, tokens: int) -> None:
        """A decode step of `rows` rows: its time and the tokens it made (the scheduler's `_decode`)."""
        if rows > self.max_batch:
            return
        c, per = self.clock(rows), seconds / max(1, tokens)
        if plain:
            c.plain = per if c.plain is None else (1 - EMA) * c.plain + EMA * per
            c.since_plain = 0
        else:
            c.spec = per if c.spec is None else (1 - EMA) * c.spec + EMA * per
            c.since_spec = 0
            c.probe_gap = PROBE_EVERY if c.paying else min(2 * c.probe_gap, MAX_PROBE_GAP)

    def info(self) -> dict[str, Any]:
        how = {"mode": "draft", "draft_model": self.draft.checkpoint} if self.draft else {"mode": "ngram",
                                                                                         "ngram": self.ngram}
        return how | {"max_tokens": self.max_tokens, "max_batch": self.max_batch,
                      "proposed_tokens": self.stats.proposed, "accepted_tokens": self.stats.accepted}

    def _state(self, seq: Any) -> RowState:
        st = self._rows.get(id(seq))
        if st is None or st.seq is not seq:
            st = self._rows[id(seq)] = RowState(seq, np.asarray(seq.req.prompt_ids, np.int64),
                                                len(seq.req.prompt_ids))
        return st

    def _k(self, seq: Any, st: RowState) -> int:
        """This step's proposal length for a row: by its acceptance, its token budget and the context."""
        left = min(seq.req.max_new_tokens - len(seq.tokens), seq.context_limit - len(seq.req.prompt_ids)
                   - len(seq.tokens)) - 1  # the step makes at least one token beyond the proposals
        if left <= 0 or not _eligible(seq):
            return 0
        if st.accept < 0.25:
            st.idle += 1
            if st.idle < PROBE_EVERY:
                return 0
            st.idle = 0
            return 1
        return min(left, max(1, round(self.max_tokens * st.accept)))

    def plan(self, seqs: Sequence[Any]) -> list[list[int]] | None:
        """Each row's proposal for this step, or None for a plain step (no row proposes, the batch
        is over SPECULATION_MAX_BATCH, or a plain step is due to measure what speculation has to
        beat, or speculation does not pay at this batch size and no probe is due)."""
        if len(seqs) > self.max_batch:
            if self._rows:  # a batch this large never speculates: forget its rows (and the draft's)
                self._rows = {}
                if self.draft is not None:
                    self.draft.reset()
            return None
        c = self.clock(len(seqs))
        c.since_plain += 1
        c.since_spec += 1
        if self.measure and (c.plain is None or c.since_plain >= PLAIN_EVERY):
            return None  # a plain step, measured
        if not self.paying(len(seqs)) and c.since_spec < c.probe_gap:
            return None
        self._rows = {id(s): st for s in seqs if (st := self._rows.get(id(s))) is not None and st.seq is s}
        ks = [(s, self._state(s)) for s in seqs]
        ks = [(s, st, self._k(s, st)) for s, st in ks]
        if self.draft is not None:
            ks = [(s, st, k if self.pays(len(seqs), st.accept, k) else 0) for s, st, k in ks]
            asks = [(st, st.catch_up(), k) for _, st, k in ks if k]
            drafted = iter(self.draft.propose(asks) if asks else [])
            proposals = [next(drafted) if k else [] for *_, k in ks]
        else:
            proposals = [ngram_proposal(st.catch_up(), self.ngram, k) if k else [] for _, st, k in ks]
            proposals = [p if self.pays(len(seqs), st.accept, len(p)) else []
                         for p, (_, st, _) in zip(proposals, ks, strict=True)]
        return proposals if any(proposals) else None

    def pays(self, rows: int, accept: float, k: int) -> bool:
        """Whether a row's k proposals, of which it accepts a share `accept` on average, are worth
        their verify call in a batch of `rows`. A row alone: always (its one call replaces the plain
        step). In a batch the call is one more: it costs a one-row step (t1) plus the work of k - 1
        more positions (c each, from the batch's step time tn = t1 + (rows - 1) c), in which time
        the batch makes (t1 + (k - 1) c) / (tn / rows) tokens of its own; the expected accepted
        tokens must beat that by 10% (the step's other work). The times are the measured plain
        ones; before they are, t1 = tn (reading the weights dominates, c = 0)."""
        if rows == 1 or not self.measure:
            return k > 0
        one, per = self.clock(1).plain, self.clock(rows).plain
        t1, tn = (one, rows * per) if one is not None and per else (1.0, 1.0)
        c = max(0.0, (tn - t1) / (rows - 1))
        return accept * k > 1.1 * (t1 + (k - 1) * c) * rows / tn

    def accept(self, seqs: Sequence[Any], proposals: list[list[int]], out: Verified) -> list[int]:
        """Row by row, the tokens of a verify call. A row without proposals chooses as in a plain
        step (`choose`: from the top-N or the logits of its one position); a row with proposals
        chooses at each position from its top-N (`choose_top`, the same draw) until a choice
        differs from the proposal. Returns how many of each row's fed tokens stay in the cache."""
        keep = []
        plain = out.last()
        for b, (s, prop) in enumerate(zip(seqs, proposals, strict=True)):
            if s.finished:
                keep.append(1)
                continue
            if not prop:
                s.choose(plain, b)
                keep.append(1)
                continue
            j = 0
            while True:
                token = s.choose_top(*out.at(b, j))
                if s.finished or j == len(prop) or token != prop[j]:
                    break
                j += 1
            keep.append(j + 1)  # the row's last token and the j proposals it accepted
            st = self._state(s)
            st.accept = (1 - EMA) * st.accept + EMA * (j / len(prop))
            st.idle = 0
            self.stats.proposed += len(prop)
            self.stats.accepted += j
        self.stats.steps += 1
        self.stats.batched += len(seqs) > 1
        return keep


def _eligible(seq: Any) -> bool:
    """Rows that choose from the runner's top-N at temperature 1 (see the module's docstring; a
    constrained row needs the logits)."""
    return not seq.sampler.needs_logits and seq.sampler.temperature == 1.0
