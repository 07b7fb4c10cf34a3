"""Left-padded batch bookkeeping (`PaddedRunner`) for the runners without shared KV buffers: the
PyTorch fallback and ONNX graphs with the standard past/present signature. Rows are left-padded to
a common past length P, each row keeps its own next position id, so padding never shifts
positions; a step concatenates one column onto every cache. A backend implements the forward pass
and four KV moves."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from app.engine.runner import (
    KV,
    GenerationRunner,
    ModelInfo,
    PendingPrefill,
    PromptScores,
    Selected,
    Want,
    left_pad,
    parse_selection,
    select_inputs,
)


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

    @property
    def kv_bytes(self) -> dict[str, int]:
        """The padded caches are allocated per step at their exact size: reserved is what they hold,
        padding included; in use, the real tokens' share of it."""
        if self.kv is None or not self.num_rows or not self.past_length:
            return {"reserved": 0, "in_use": 0}
        reserved = sum(int(np.prod(a.shape)) * a.element_size() if hasattr(a, "element_size") else
                       int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.kv)
        return {"reserved": reserved, "in_use": reserved * int(self.mask.sum()) // self.mask.size}

    # ---- what a backend provides -------------------------------------------------------------
    @abstractmethod
    def _forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, kv: KV | None, sel: dict[str, np.ndarray],
                 want_logits: bool) -> tuple[tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray], KV]:
        """Run the graph: ids/pos (n, T), mask (n, P+T), kv with past length P (None: P = 0), `sel`
        the selection inputs (`select_inputs`). Returns ((logits or None unless `want_logits`,
        token_logprobs, top_ids, top_logprobs), kv)."""

    @abstractmethod
    def _kv_pad_left(self, kv: KV, cols: int) -> KV: ...

    @abstractmethod
    def _kv_cat_rows(self, a: KV, b: KV) -> KV: ...

    @abstractmethod
    def _kv_take_rows(self, kv: KV, rows: np.ndarray) -> KV: ...

    @abstractmethod
    def _kv_drop_cols(self, kv: KV, cols: int) -> KV: ...

    # ---- the batch ---------------------------------------------------------------------------
    def add(self, prompts: Sequence[Sequence[int]], want: Want | None = None) -> Selected:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        want = want or Want()
        ids, mask = left_pad(prompts)
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        T = ids.shape[1]
        first, last = T - mask.sum(-1), np.full(len(prompts), T - 1)
        (logits, *sel), kv = self._forward(ids, mask, pos, None, select_inputs(first, last, T, want, prompts),
                                           want.logits)
        self._merge(kv, mask, mask.sum(-1))
        return parse_selection(first, last, want, *sel, logits)

    def advance(self, pending: PendingPrefill, n_tokens: int, want: Want | None = None) -> Selected | None:
        want = want or Want()
        ids, pos, end = pending.next_chunk(n_tokens)
        want = pending.chunk_want(want, end)
        c = ids.shape[1]
        first, last = np.zeros(1, np.int64), np.full(1, c - 1)
        final = end == len(pending.prompt)
        sel_in = select_inputs(first, last, c, want, [pending.prompt], [pending.done])
        (logits, *sel), kv = self._forward(ids, np.ones((1, end), np.int64), pos, pending.state, sel_in, want.logits)
        pending.state, pending.done = kv, end
        out = parse_selection(first, last, want, *sel, logits, final)
        if out.prompt is not None:
            pending.scores.append(out.prompt[0])
        if pending.remaining:
            return None
        if pending.scores:
            out.prompt = [PromptScores.concat(pending.scores)]
        pending.state, pending.scores = None, []
        self._merge(kv, np.ones((1, end), np.int64), np.asarray([end], np.int64))
        return out

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

    def step(self, tokens: Sequence[int], want: Want | None = None) -> Selected:
        if len(tokens) != self.num_rows:
            raise ValueError(f"step got {len(tokens)} tokens for {self.num_rows} rows")
        want = want or Want()
        n = self.num_rows
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        mask = np.concatenate([self.mask, np.ones((n, 1), np.int64)], axis=1)
        zero = np.zeros(n, np.int64)
        (logits, *sel), self.kv = self._forward(ids, mask, self.next_pos.reshape(-1, 1), self.kv,
                                                select_inputs(zero, zero, 1, want), want.logits)
        self.mask, self.next_pos = mask, self.next_pos + 1
        return parse_selection(zero, zero, want, *sel, logits)

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
