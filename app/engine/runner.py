"""The runner interface: a running batch of sequences whose KV cache lives inside the runner.

    add(prompts)          prefill new rows together and append them to the batch
    step(tokens)          one decode step for every row; returns last-position logits (B, V)
    drop(rows)            remove rows (finished or cancelled) at once; returns the new row order
    start_prefill(prompt) / advance(pending, n) / abort(pending)
                          prefill one prompt a chunk at a time, between decode steps; the row
                          joins the batch (as its last row) when its last chunk is done
Logits come back as numpy float32 (sampling runs on the host); ids go in as numpy int64. The KV
cache never leaves the runner's device.

Two bookkeeping schemes implement it:
- `PaddedRunner` (PyTorch, and ONNX graphs with the standard past/present signature): rows are
  left-padded to a common past length P, each row keeps its own next position id, so padding
  never shifts positions; a step concatenates one column onto every cache. Backends implement
  the forward pass and four KV moves.
- `app.engine.ort_runner.OrtSlotRunner` (ONNX graphs with GroupQueryAttention): fixed-size KV
  buffers, one row per sequence, written in place; no padding and no copies per step.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
class PendingPrefill:
    """A prompt being prefilled a chunk at a time; `state` belongs to the runner."""

    prompt: list[int]
    done: int = 0  # tokens already in the cache
    state: Any = None

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done

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

    @property
    @abstractmethod
    def num_rows(self) -> int: ...

    @abstractmethod
    def add(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Prefill `prompts` and append them as new rows; returns their next-token logits (n, V)."""

    @abstractmethod
    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed one token per row; returns next-token logits (B, V)."""

    @abstractmethod
    def drop(self, rows: Sequence[int]) -> np.ndarray:
        """Remove rows by index (indices refer to the batch before the call). Returns, for each
        remaining row in its new place, its index before the call (the order may change)."""

    def start_prefill(self, prompt: Sequence[int]) -> PendingPrefill:
        if not len(prompt):
            raise ValueError("every prompt needs at least one token")
        return PendingPrefill(list(prompt))

    @abstractmethod
    def advance(self, pending: PendingPrefill, n_tokens: int) -> np.ndarray | None:
        """Prefill up to `n_tokens` more of `pending`'s prompt. When that finishes it, the row is
        appended to the batch and its next-token logits (1, V) are returned; else None."""

    def abort(self, pending: PendingPrefill) -> None:  # noqa: B027 - optional hook
        """Forget a pending prefill (cancelled)."""
        pending.state = None

    def reset(self) -> None:
        self.drop(list(range(self.num_rows)))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources (sessions, memory)."""


class PaddedRunner(GenerationRunner):
    """Left-padded batch bookkeeping over a backend's forward pass and KV moves."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.mask = np.zeros((0, 0), dtype=np.int64)  # (B, P): 1 where the cache holds a real token
        self.next_pos = np.zeros((0,), dtype=np.int64)  # (B,): position id of each row's next token
        self.kv: KV | None = None

    @property
    def num_rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def past_length(self) -> int:
        return int(self.mask.shape[1])

    # ---- what a backend provides -------------------------------------------------------------
    @abstractmethod
    def _forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, kv: KV | None) -> tuple[np.ndarray, KV]:
        """Run the graph: ids/pos (n, T), mask (n, P+T), kv with past length P (None: P = 0)."""

    @abstractmethod
    def _kv_pad_left(self, kv: KV, cols: int) -> KV: ...

    @abstractmethod
    def _kv_cat_rows(self, a: KV, b: KV) -> KV: ...

    @abstractmethod
    def _kv_take_rows(self, kv: KV, rows: np.ndarray) -> KV: ...

    @abstractmethod
    def _kv_drop_cols(self, kv: KV, cols: int) -> KV: ...

    # ---- the batch ---------------------------------------------------------------------------
    def add(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        ids, mask = left_pad(prompts)
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        logits, kv = self._forward(ids, mask, pos, None)
        self._merge(kv, mask, mask.sum(-1))
        return logits

    def advance(self, pending: PendingPrefill, n_tokens: int) -> np.ndarray | None:
        ids, pos, end = pending.next_chunk(n_tokens)
        logits, kv = self._forward(ids, np.ones((1, end), np.int64), pos, pending.state)
        pending.state, pending.done = kv, end
        if pending.remaining:
            return None
        pending.state = None
        self._merge(kv, np.ones((1, end), np.int64), np.asarray([end], np.int64))
        return logits

    def _merge(self, kv: KV, mask: np.ndarray, next_pos: np.ndarray) -> None:
        """Append rows (their KV, (n, T) mask and next positions) to the batch."""
        if self.kv is None or self.num_rows == 0:
            self.kv, self.mask, self.next_pos = kv, mask, next_pos
        else:
            P, T = self.past_length, mask.shape[1]
            width = max(P, T)
            old_kv, new_kv = self.kv, kv
            if width > P:
                old_kv = self._kv_pad_left(old_kv, width - P)
            if width > T:
                new_kv = self._kv_pad_left(new_kv, width - T)
            self.kv = self._kv_cat_rows(old_kv, new_kv)
            self.mask = np.concatenate([_pad_cols(self.mask, width), _pad_cols(mask, width)])
            self.next_pos = np.concatenate([self.next_pos, next_pos])

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        if len(tokens) != self.num_rows:
            raise ValueError(f"step got {len(tokens)} tokens for {self.num_rows} rows")
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        mask = np.concatenate([self.mask, np.ones((self.num_rows, 1), np.int64)], axis=1)
        logits, self.kv = self._forward(ids, mask, self.next_pos.reshape(-1, 1), self.kv)
        self.mask, self.next_pos = mask, self.next_pos + 1
        return logits

    def drop(self, rows: Sequence[int]) -> np.ndarray:
        keep = np.setdiff1d(np.arange(self.num_rows), np.asarray(rows, dtype=np.int64))
        if not len(rows):
            return keep
        if keep.size == 0:
            self.kv, self.mask, self.next_pos = None, np.zeros((0, 0), np.int64), np.zeros((0,), np.int64)
            return keep
        self.kv = self._kv_take_rows(self.kv, keep)
        self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]
        # Columns that are padding for every remaining row carry nothing: cut them.
        lead = int(np.argmax(self.mask.any(axis=0))) if self.mask.any() else 0
        if lead:
            self.kv = self._kv_drop_cols(self.kv, lead)
            self.mask = self.mask[:, lead:]
        return keep


def _pad_cols(mask: np.ndarray, width: int) -> np.ndarray:
    return np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))


class ClassificationRunner(ABC):
    backend: str = "?"
    device: str = "cpu"
    n_positions: int = 1024  # the model's context: longer inputs must be cut or rejected

    @abstractmethod
    def classify(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (n, num_labels) for a batch of token-id lists."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""
