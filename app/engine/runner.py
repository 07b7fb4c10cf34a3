"""The runner interface: a running batch of sequences whose KV cache lives inside the runner.

    add(prompts)   prefill new rows (left-padded among themselves) and append them to the batch
    step(tokens)   one decode step for every row; returns last-position logits (B, V)
    drop(rows)     remove rows (finished or cancelled) at once
Logits come back as numpy float32 (sampling runs on the host); ids and masks go in as numpy
int64. The KV cache never leaves the runner's device.

The batch bookkeeping is shared: rows are left-padded to a common past length P; each row keeps
its own next position id, so padding never shifts positions. After drops, leading columns that
are padding for every row are trimmed. Backends implement the forward pass and five KV moves.
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


class GenerationRunner(ABC):
    """A KV-cached batch of sequences on one backend and device."""

    backend: str = "?"
    device: str = "cpu"

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
        """Prefill `prompts` and append them as new rows; returns their next-token logits (n, V)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        ids, mask = left_pad(prompts)
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        logits, kv = self._forward(ids, mask, pos, None)
        next_pos = mask.sum(-1)
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
        return logits

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed one token per row; returns next-token logits (B, V)."""
        if len(tokens) != self.num_rows:
            raise ValueError(f"step got {len(tokens)} tokens for {self.num_rows} rows")
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        mask = np.concatenate([self.mask, np.ones((self.num_rows, 1), np.int64)], axis=1)
        logits, self.kv = self._forward(ids, mask, self.next_pos.reshape(-1, 1), self.kv)
        self.mask, self.next_pos = mask, self.next_pos + 1
        return logits

    def drop(self, rows: Sequence[int]) -> None:
        """Remove rows by index (indices refer to the batch before the call)."""
        if not len(rows):
            return
        keep = np.setdiff1d(np.arange(self.num_rows), np.asarray(rows, dtype=np.int64))
        if keep.size == 0:
            self.kv, self.mask, self.next_pos = None, np.zeros((0, 0), np.int64), np.zeros((0,), np.int64)
            return
        self.kv = self._kv_take_rows(self.kv, keep)
        self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]
        # Columns that are padding for every remaining row carry nothing: cut them.
        lead = int(np.argmax(self.mask.any(axis=0))) if self.mask.any() else 0
        if lead:
            self.kv = self._kv_drop_cols(self.kv, lead)
            self.mask = self.mask[:, lead:]

    def reset(self) -> None:
        self.drop(list(range(self.num_rows)))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources (sessions, memory)."""


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
