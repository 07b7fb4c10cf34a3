"""The runner interface: a running batch of sequences whose KV cache lives inside the runner.

    add(prompts, want)    prefill new rows together and append them to the batch
    step(tokens, want)    one decode step for every row
    drop(rows)            remove rows (finished or cancelled) at once; returns the new row order
    start_prefill(prompt) / advance(pending, n, want) / abort(pending)
                          prefill one prompt a chunk at a time, between decode steps; the row
                          joins the batch (as its last row) when its last chunk is done
Each call returns a `Selected`: per row the top-N next tokens and their log-probabilities
(the first is the argmax), computed where the logits are (`model.gpt2.select_tokens`, in the
ONNX graph or the PyTorch model), the prompt's log-probabilities for the rows `want.score` names,
and the raw last-position logits for the host-side sampling that needs the whole vocabulary
(penalties, top-p). The KV cache never leaves the runner's device.

Two bookkeeping schemes implement it:
- `app.engine.padded_runner.PaddedRunner` (PyTorch, and ONNX graphs with the standard past/present
  signature): rows are left-padded to a common past length P, each row keeps its own next position
  id, so padding never shifts positions; a step concatenates one column onto every cache. Backends
  implement the forward pass and four KV moves.
- `app.engine.ort_runner.OrtSlotRunner` (ONNX graphs with GroupQueryAttention): fixed-size KV
  buffers, one row per sequence, written in place; no padding and no copies per step.

`Loaded` (a runner and how it was loaded; `app.loading` makes it) and `SettingRefusedError`
(raised by a runner or the loader) live here, on the engine's side, so the engine never imports
`app.loading`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from app.engine.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

KV = Any  # the backend's KV state: a list of 2 * n_layer (B, n_head, P, head_dim) arrays/tensors


@dataclass(frozen=True)
class ModelInfo:
    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int
    n_positions: int


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both (n, max_len) int64, real tokens right-aligned."""
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, T - len(r):] = r
            mask[b, T - len(r):] = 1
    return ids, mask


@dataclass
class Want:
    """What one runner call returns besides updating the cache."""

    top_n: int = 1  # alternatives at each row's last position (the first is the argmax)
    temperature: np.ndarray | None = None  # (n,) float32 per row, for the last position; None: 1
    score: Sequence[int] = ()  # rows (of this call) whose prompt is scored at every position
    score_top_n: int = 0  # alternatives at each scored prompt position
    logits: bool = True  # whether the raw logits must reach the host (free on CPU; a copy on CUDA)

    @property
    def n(self) -> int:
        """N of the graph's top-N: enough for both the next token and the prompt positions."""
        return max(1, self.top_n, self.score_top_n if self.score else 0)


@dataclass
class PromptScores:
    """A scored prompt of L tokens: entry i is about token i + 1 given the tokens before it."""

    token_logprobs: np.ndarray  # (L-1,) float32
    top_ids: np.ndarray  # (L-1, n) int64, best first
    top_logprobs: np.ndarray  # (L-1, n) float32

    @staticmethod
    def concat(parts: Sequence[PromptScores]) -> PromptScores:
        return PromptScores(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                              ("token_logprobs", "top_ids", "top_logprobs")))


@dataclass
class Selected:
    """A runner call's result, one row per sequence of the call."""

    top_ids: np.ndarray  # (n, N) int64: the most likely next tokens, best first ([:, 0] is the argmax)
    top_logprobs: np.ndarray  # (n, N) float32: their log-probabilities (after the row's temperature)
    logits: np.ndarray | None = None  # (n, V) raw next-token logits, when `want.logits`
    prompt: list[PromptScores | None] | None = None  # per row, for the rows `want.score` named


@dataclass
class Verified:
    """A verify call's result (speculative decoding): row b's fed tokens are its last `fed[b]`
    positions of the K kept, so its position j (the distribution after its j-th fed token) is
    column K - fed[b] + j; the last column is each row's next-token distribution, with its
    temperature, and `logits` are the raw logits there."""

    top_ids: np.ndarray  # (n, K, N) int64
    top_logprobs: np.ndarray  # (n, K, N) float32
    fed: np.ndarray  # (n,) int64
    logits: np.ndarray | None = None  # (n, V)

    def last(self) -> Selected:
        """The next-token selection at each row's last fed token (a plain step's result)."""
        return Selected(self.top_ids[:, -1], self.top_logprobs[:, -1], self.logits)

    def at(self, row: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, log-probabilities) (N,) of row `row`'s distribution after its j-th fed token."""
        col = self.top_ids.shape[1] - int(self.fed[row]) + j
        return self.top_ids[row, col], self.top_logprobs[row, col]


def select_inputs(first: np.ndarray, last: np.ndarray, width: int, want: Want,
                  prompts: Sequence[Sequence[int]] | None = None, starts: Sequence[int] | None = None,
                  ) -> dict[str, np.ndarray]:
    """The generation graph's selection inputs for a call of n rows x `width` tokens, where row
    b's tokens sit at positions first[b]..last[b] of the call (right padding: first = 0; left
    padding: last = width - 1).

    A row that is not scored keeps one position, its last, repeated K times (K = the most
    positions any scored row has). A scored row keeps all its positions, front-padded with its
    first to K; `target_ids` there are the prompt's next tokens (row b's tokens of this call are
    prompts[b][starts[b]:], as a chunk starts mid-prompt). The last position's target is unused:
    its token is the one to come."""
    n = len(last)
    K = max([1] + [int(last[b] - first[b]) + 1 for b in want.score])
    offs = np.arange(K) - (K - 1)  # (K,) = -(K-1), ..., -1, 0
    idx = np.repeat(np.asarray(last)[:, None], K, axis=1)
    target = np.zeros((n, K), np.int64)
    for b in want.score:
        pos = np.clip(last[b] + offs, first[b], None)  # (K,) the row's positions, front-padded
        idx[b] = pos
        ahead = (starts[b] if starts is not None else 0) + (pos - first[b]) + 1  # prompt index of the next token
        target[b] = np.asarray(prompts[b], np.int64)[np.clip(ahead, 0, len(prompts[b]) - 1)]
    temperature = want.temperature if want.temperature is not None else np.ones(n, np.float32)
    return {"logits_index": (np.arange(n)[:, None] * width + idx).astype(np.int64), "target_ids": target,
            "temperature": np.ascontiguousarray(temperature, dtype=np.float32), "top_n": np.array([want.n], np.int64)}


def parse_selection(first: np.ndarray, last: np.ndarray, want: Want, token_logprobs: np.ndarray,
                    top_ids: np.ndarray, top_logprobs: np.ndarray, logits: np.ndarray | None,
                    final: bool = True) -> Selected:
    """The `Selected` of a call from the graph's selection outputs. A scored row's scores cover its
    positions of this call except, when `final` (the call ends the prompt), the last one: that
    position's distribution is the next token's, not a prompt token's."""
    n_top = max(1, want.top_n)
    prompt = None
    if want.score:
        prompt = [None] * len(last)
        K, k = top_ids.shape[1], want.score_top_n
        for b in want.score:
            L = int(last[b] - first[b]) + 1
            cols = slice(K - L, K - 1 if final else K)
            prompt[b] = PromptScores(np.asarray(token_logprobs[b, cols], np.float32),
                                     np.asarray(top_ids[b, cols, :k], np.int64),
                                     np.asarray(top_logprobs[b, cols, :k], np.float32))
    return Selected(np.asarray(top_ids[:, -1, :n_top], np.int64), np.asarray(top_logprobs[:, -1, :n_top], np.float32),
                    logits, prompt)


@dataclass
class PendingPrefill:
    """A prompt being prefilled a chunk at a time; `state` belongs to the runner."""

    prompt: list[int]
    done: int = 0  # tokens already in the cache
    state: Any = None
    scores: list[PromptScores] = field(default_factory=list)  # scored chunks so far (when scored)

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done

    def chunk_want(self, want: Want, end: int) -> Want:
        """`want` for the chunk that ends at `end`: a chunk before the last one scores its last
        position as a prompt position, so that position is not divided by the row's temperature
        (only the next token's distribution is)."""
        if end == len(self.prompt) or want.temperature is None:
            return want
        return Want(want.top_n, None, want.score, want.score_top_n, want.logits)

    def next_chunk(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids, positions), both (1, c), of the next c <= n_tokens prompt tokens (at least one),
        and the cache length once they are in."""
        end = min(len(self.prompt), self.done + max(1, n_tokens))
        ids = np.asarray([self.prompt[self.done:end]], dtype=np.int64)
        return ids, np.arange(self.done, end, dtype=np.int64)[None], end


class GenerationRunner(ABC):
    """A KV-cached batch of sequences on one backend and device."""

    backend: str = "?"
    device: str = "cpu"
    info: ModelInfo
    # Automatic prefix caching (`app.engine.prefix_cache`): None when off, and why.
    prefix: PrefixCache | None = None
    _to_keep: list[tuple[list[int], Any, PromptScores | None, int]]  # prompts to store (`keep_pending`)
    prefix_off_reason: str | None = "not supported by this runner (a left-padded batch: the PyTorch fallback and " \
                                    "the standard-attention ONNX graph)"

    @property
    @abstractmethod
    def num_rows(self) -> int: ...

    @abstractmethod
    def add(self, prompts: Sequence[Sequence[int]], want: Want | None = None) -> Selected:
        """Prefill `prompts` and append them as new rows; returns their next-token selection."""

    @abstractmethod
    def step(self, tokens: Sequence[int], want: Want | None = None) -> Selected:
        """Feed one token per row; returns the next-token selection of every row."""

    # Speculative decoding (`app.engine.speculation`): None when this runner can verify proposals
    # (it has `_room_for`, `_feed` and a per-row `lengths`).
    speculation_off_reason: str | None = "not supported by this runner (only the GroupQueryAttention runners " \
                                         "verify proposals)"
    _verify_fed: np.ndarray = np.zeros(0, np.int64)  # (rows,) tokens each row was fed by the last `verify`

    def verify(self, tokens: Sequence[Sequence[int]], want: Want) -> Verified:
        """Feed each row its tokens (its last token, then its proposals; at least one), all kept in
        the cache until `rewind`; returns the selection at every fed position.

        ONNX Runtime's GroupQueryAttention (CPU and CUDA alike) refuses a call of several tokens per
        row over a cache for more than one row ("batch_size must be 1 when sequence_length > 1 and
        past context is given", its shared input check). So a row alone is fed all its tokens in one
        call; a batch is fed as a plain step (every row's first token in one call, the very call a
        step without speculation makes: a CUDA graph where they replay), then one call per row with
        proposals, of the rest of its tokens. Each such row costs one more read of the weights; the
        speculator measures whether that pays (`speculation.Speculator.record`)."""
        if self.speculation_off_reason is not None:
            raise NotImplementedError(self.speculation_off_reason)
        n = self.num_rows
        if len(tokens) != n or any(len(t) == 0 for t in tokens):
            raise ValueError(f"verify needs at least one token for each of the {n} rows")
        fed = np.asarray([len(t) for t in tokens], np.int64)
        K, n_top = int(fed.max()), max(1, want.n)
        self._room_for(fed)
        if n == 1:
            logits, top_ids, top_lps = self._feed(0, tokens[0], Want(want.top_n, want.temperature, [0], want.n,
                                                                     want.logits))
            top_ids, top_lps = top_ids[:, :, :n_top], top_lps[:, :, :n_top]
        else:
            first = self.step([t[0] for t in tokens], want)
            logits = first.logits
            top_ids = np.zeros((n, K, n_top), np.int64)
            top_lps = np.zeros((n, K, n_top), np.float32)
            top_ids[:, -1], top_lps[:, -1] = first.top_ids[:, :n_top], first.top_logprobs[:, :n_top]
            for b in np.flatnonzero(fed > 1):  # row b's positions: columns K - fed[b] .. K - 1
                _, ids, lps = self._feed(int(b), tokens[b][1:], Want(want.n, None, [0], want.n, False))
                col = K - int(fed[b])
                top_ids[b, col], top_lps[b, col] = first.top_ids[b, :n_top], first.top_logprobs[b, :n_top]
                top_ids[b, col + 1:], top_lps[b, col + 1:] = ids[0, :, :n_top], lps[0, :, :n_top]
        self._verify_fed = fed
        return Verified(top_ids, top_lps, fed, logits)

    def _room_for(self, fed: np.ndarray) -> None:
        """Check that each row can take `fed[b]` more tokens (and make room for them)."""
        raise NotImplementedError(self.speculation_off_reason)

    def _feed(self, row: int, tokens: Sequence[int], want: Want) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Row `row` alone fed `tokens` after its cache in one call, every position kept (`want.score`
        is [0]): (logits at the last position, top_ids (1, c, N), top_logprobs (1, c, N))."""
        raise NotImplementedError(self.speculation_off_reason)

    def truncate(self, row: int, length: int) -> None:
        """Row `row` keeps its first `length` cached tokens (`rewind`; a draft model's row after
        some of its proposals were refused). The runners that verify keep `lengths`, each row's
        cached tokens, and GroupQueryAttention reads a row only up to its length."""
        if self.speculation_off_reason is not None:
            raise NotImplementedError(self.speculation_off_reason)
        held = int(self.lengths[row])
        if not 0 < length <= held:
            raise ValueError(f"truncate: row {row} holds {held} tokens, not {length}")
        self.lengths[row] = length

    def rewind(self, keep: Sequence[int]) -> None:
        """After `verify`: each row keeps the first `keep[b]` of the tokens it was fed."""
        keep, fed = np.asarray(keep, np.int64), self._verify_fed
        if keep.shape != (self.num_rows,) or fed.shape != keep.shape or (keep < 1).any() or (keep > fed).any():
            raise ValueError(f"rewind: {keep.tolist()} for {self.num_rows} rows fed {fed.tolist()} tokens")
        self._verify_fed = np.zeros(0, np.int64)
        for b in np.flatnonzero(keep < fed):
            self.truncate(int(b), int(self.lengths[b] - fed[b] + keep[b]))

    @abstractmethod
    def drop(self, rows: Sequence[int]) -> np.ndarray:
        """Remove rows by index (indices refer to the batch before the call). Returns, for each
        remaining row in its new place, its index before the call (the order may change)."""

    def start_prefill(self, prompt: Sequence[int], score_k: int | None = None) -> PendingPrefill:
        """A prompt to prefill a chunk at a time. With a prefix cache, the cached head of the prompt
        is loaded and the prefill starts after it (`score_k`: the prompt is scored with that many
        alternatives, so only blocks that kept scores count)."""
        if not len(prompt):
            raise ValueError("every prompt needs at least one token")
        return PendingPrefill(list(prompt))

    def prefix_hit(self, prompt: Sequence[int], score_k: int | None = None) -> int:
        """Prompt tokens `start_prefill` would reuse from the prefix cache (a peek: not counted)."""
        return self.prefix.lookup(prompt, score_k, count=False).reuse if self.prefix is not None else 0

    def _reuse(self, pending: PendingPrefill, score_k: int | None, dst: Any) -> None:
        """Load the cached head of `pending`'s prompt into the runner's row `dst`; the prefill
        goes on after it."""
        if self.prefix is None:
            return
        hit = self.prefix.lookup(pending.prompt, score_k)
        if hit.reuse:
            self._before_load(dst, len(hit.pool_ids) * self.prefix.B)
            self.prefix.load(hit, dst)
            pending.done = hit.reuse
            pending.scores = [hit.scores] if hit.scores is not None else []

    def _before_load(self, dst: Any, tokens: int) -> None:  # noqa: B027 - optional hook
        """Make room in row `dst` for `tokens` cached tokens."""

    def _keep(self, prompts: Sequence[Sequence[int]], rows: Sequence[Any], out: Selected, score_k: int) -> None:
        """The prompts of a prefill call that finished them are in the cache of the runner's `rows`:
        their whole blocks (and scores, from `out`) are to be kept for later prompts. Recorded here
        and copied by `keep_pending`, which the scheduler calls once their first tokens have left
        (the copy is not part of the time to first token) and the runner calls before anything that
        moves or reuses rows (`drop`, a new prefill)."""
        if self.prefix is not None:
            for b, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
                self._to_keep.append((list(prompt), row, out.prompt[b] if out.prompt else None, score_k))

    def keep_pending(self) -> None:
        """Copy the prompts `_keep` recorded into the prefix cache."""
        if self.prefix is None:
            return
        todo, self._to_keep = self._to_keep, []
        for prompt, src, scores, score_k in todo:
            self.prefix.store(prompt, src, scores, score_k)

    def _count_misses(self, prompts: Sequence[Sequence[int]]) -> None:
        """Prompts prefilled from scratch (`add`: the scheduler sends a prompt with a hit through
        `start_prefill`) are queried tokens that were not hits."""
        if self.prefix is not None:
            self.prefix.stats.queries += sum(len(p) for p in prompts)

    @abstractmethod
    def advance(self, pending: PendingPrefill, n_tokens: int, want: Want | None = None) -> Selected | None:
        """Prefill up to `n_tokens` more of `pending`'s prompt. When that finishes it, the row is
        appended to the batch and its selection (one row; with the whole prompt's scores when
        `want.score`) is returned; else None."""

    def abort(self, pending: PendingPrefill) -> None:  # noqa: B027 - optional hook
        """Forget a pending prefill (cancelled)."""
        pending.state = None

    def reset(self) -> None:
        self._to_keep = []  # after a failure: keep nothing of this batch
        self.drop(list(range(self.num_rows)))

    @property
    def releasable(self) -> bool:
        """Whether `idle` would give memory back (buffers grown past what an empty batch needs)."""
        return False

    def idle(self) -> None:  # noqa: B027 - optional hook
        """The scheduler has had nothing to do for a while (`IDLE_RELEASE_S`): give back what an
        empty batch does not need. Not called per drop, so back-to-back requests reuse the grown
        buffers instead of growing them again for each one."""

    @property
    def kv_bytes(self) -> dict[str, int]:
        """KV cache memory in bytes: `reserved` (allocated) and `in_use` (by the tokens held)."""
        return {"reserved": 0, "in_use": 0}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources (sessions, memory)."""


class ClassificationRunner(ABC):
    backend: str = "?"
    device: str = "cpu"
    n_positions: int = 1024  # the model's context: longer inputs must be cut or rejected

    @abstractmethod
    def classify(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (n, num_labels) for a batch of token-id lists."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""


class SettingRefusedError(RuntimeError):
    """A setting that must hold cannot (e.g. CUDA_GRAPHS=on without CUDA): refuse to start rather
    than fall back."""


@dataclass
class Loaded:
    """A runner and how it was loaded (what /info reports); `app.loading.loader.load` makes it."""

    runner: Any  # GenerationRunner | ClassificationRunner
    task: str
    backend: str
    device: str
    precision: str
    checkpoint: Path
    onnx_path: Path | None = None
    fallback_reason: str | None = None
    cache_hit: bool | None = None
    attention: str | None = None  # generation graph signature: "gqa" | "standard"
    quantization: dict[str, Any] | None = None  # int8 / int4: the kernel served and how it was chosen
