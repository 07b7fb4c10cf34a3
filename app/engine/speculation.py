"""Speculative decoding: propose, verify in one call, keep what agrees.

A row's proposal is, with SPECULATION=ngram, the tokens that followed the last earlier occurrence
of its latest n-gram in its prompt and output (vLLM's `ngram`, TGI's n-gram speculation): no extra
model, no memory; with SPECULATION=draft, a smaller model's greedy continuation (`DraftProposer`,
its own KV cache for the one row it proposes for). A decode step with proposals feeds each row
its last token and its proposals in one runner call (`GenerationRunner.verify`), which returns the
top-N at every one of those positions. Then, row by
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
measured as they run (`record`; a plain step at least every `PLAIN_EVERY` steps), and while
speculating is the slower of the two, it pauses: a probe after `PROBE_EVERY` steps, and the gap
doubles (up to `MAX_PROBE_GAP`) for each probe that finds it still slower.

A step speculates only while the batch has at most the runner's `verify_max_rows` rows: ONNX
Runtime's CPU GroupQueryAttention refuses a call of several tokens per row over a cache for more
than one row ("batch_size must be 1 when sequence_length > 1 and past context is given"), and a
verify call per row would read the weights once per row where a plain step reads them once for
the batch. So speculation serves the case it helps most, a stream alone (decode bound by reading
the weights), and a busy batch decodes as before.
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
    """A smaller model with the same tokenizer (DRAFT_MODEL_PATH) proposes `k` tokens, greedily:
    each proposal is deterministic given the history (q = 1 on it), so the acceptance above stays
    the exact scheme. It keeps one row in its own KV cache, for the stream being speculated on: at
    each step the row keeps the longest prefix it shares with the stream's history, is fed the rest
    in one call (`verify`, which gives the first proposal), then decodes `k - 1` more steps. So a
    step costs the draft one call over the tokens new since the last step plus `k - 1` one-token
    steps; its refused proposals leave its cache at the next step."""

    def __init__(self, runner: GenerationRunner, checkpoint: str = "") -> None:
        self.runner = runner
        self.checkpoint = checkpoint
        self.cached = np.zeros(0, np.int64)  # the tokens in the draft's row

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        k = min(k, self.runner.info.n_positions - len(history))  # it holds history + k - 1 tokens
        if k <= 0:
            return []
        r = self.runner
        try:
            common = min(_common_prefix(self.cached, history), len(history) - 1)  # feed at least one
            if common == 0:
                if r.num_rows:
                    r.drop(list(range(r.num_rows)))
                sel = r.add([history.tolist()], Want())
            else:
                r.truncate(0, common)
                out = r.verify([history[common:].tolist()], Want())
                r.rewind([len(history) - common])
                sel = out.last()
            proposal = [int(sel.top_ids[0, 0])]
            for _ in range(k - 1):
                proposal.append(int(r.step([proposal[-1]], Want()).top_ids[0, 0]))
        except Exception:  # the draft only proposes: its failure costs speculation, not the request
            logger.exception("the draft model failed; its row is reset")
            self.cached = np.zeros(0, np.int64)
            return []
        self.cached = np.concatenate([history, np.asarray(proposal[:-1], np.int64)])
        return proposal


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


class Speculator:
    """Decides each step's proposals, and turns a verify call's top-N into accepted tokens."""

    def __init__(self, max_tokens: int = 4, ngram: int = 3, max_rows: int = 1,
                 draft: DraftProposer | None = None) -> None:
        if max_tokens < 1 or ngram < 1:
            raise ValueError("SPECULATION_MAX_TOKENS and SPECULATION_NGRAM must be at least 1")
        self.max_tokens = max_tokens
        self.ngram = ngram
        self.draft = draft  # None: prompt lookup
        self.max_rows = max_rows  # the runner's verify_max_rows
        self.stats = Stats()
        self._rows: dict[int, RowState] = {}  # by id(_Seq)
        # seconds per token of one-row steps, exponential averages: plain and speculative
        self._plain: float | None = None
        self._spec: float | None = None
        self._since_plain = self._since_spec = 0
        self._probe_gap = PROBE_EVERY
        self.measure = True  # False: speculate whatever the times say (tests that need it to happen)

    @property
    def paying(self) -> bool:
        """Whether speculative steps have made tokens faster than plain ones (or are unmeasured)."""
        return not self.measure or self._spec is None or self._plain is None or self._spec <= self._plain

    def record(self, plain: bool, seconds: float, tokens: int) -> None:
        """A one-row decode step's time and the tokens it made (the scheduler's `_decode`)."""
        per = seconds / max(1, tokens)
        if plain:
            self._plain = per if self._plain is None else (1 - EMA) * self._plain + EMA * per
            self._since_plain = 0
        else:
            self._spec = per if self._spec is None else (1 - EMA) * self._spec + EMA * per
            self._since_spec = 0
            self._probe_gap = PROBE_EVERY if self.paying else min(2 * self._probe_gap, MAX_PROBE_GAP)

    def info(self) -> dict[str, Any]:
        how = {"mode": "draft", "draft_model": self.draft.checkpoint} if self.draft else {"mode": "ngram",
                                                                                         "ngram": self.ngram}
        return how | {"max_tokens": self.max_tokens, "max_rows": self.max_rows,
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
        if not self.paying and self._since_spec < self._probe_gap:
            return 0
        if st.accept < 0.25:
            st.idle += 1
            if st.idle < PROBE_EVERY:
                return 0
            st.idle = 0
            return 1
        return min(left, max(1, round(self.max_tokens * st.accept)))

    def plan(self, seqs: Sequence[Any]) -> list[list[int]] | None:
        """Each row's proposal for this step, or None for a plain step (no row proposes, or the
        batch has more rows than a verify call takes)."""
        if len(seqs) > self.max_rows:
            return None
        self._since_plain += 1
        self._since_spec += 1
        if self.measure and (self._plain is None or self._since_plain >= PLAIN_EVERY):
            return None  # a plain step, measured
        self._rows = {id(s): st for s in seqs if (st := self._rows.get(id(s))) is not None and st.seq is s}
        proposals = []
        for s in seqs:
            st = self._state(s)
            k = self._k(s, st)
            if not k:
                proposals.append([])
            elif self.draft is not None:
                proposals.append(self.draft.propose(st.catch_up(), k))
            else:
                proposals.append(ngram_proposal(st.catch_up(), self.ngram, k))
        return proposals if any(proposals) else None

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
        return keep


def _eligible(seq: Any) -> bool:
    """Rows that choose from the runner's top-N at temperature 1 (see the module's docstring; a
    constrained row needs the logits)."""
    return not seq.sampler.needs_logits and seq.sampler.temperature == 1.0
