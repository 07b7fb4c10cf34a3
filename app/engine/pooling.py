"""Embeddings: the model's final hidden states pooled into one vector per input (`/v1/embeddings`).

The runners return `last_hidden_state` (B, T, n_embd), the trunk's output after the final
LayerNorm `ln_f` (HF's `GPT2Model.last_hidden_state`), for a left-padded batch; everything after
that is here, on the host, the same for ONNX Runtime and PyTorch:

- `pool`: `last` (the last real token's state: vLLM's default for a causal LM's embedding task,
  since only the last position has seen the whole input) or `mean` (the mean over the real tokens).
  Padding positions never enter either, so a row's vector does not depend on its batch.
- `normalize`: unit L2 norm, as vLLM's embedding pooler does by default
  (`torch.nn.functional.normalize`: x / max(||x||, 1e-12)).
- `EmbeddingRunner.embed`: the inputs sorted by length and cut into calls of at most
  `max_tokens` padded tokens (rows x longest), so a batch of one long and many short inputs does
  not pad every short one to the long one.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from app.engine.runner import left_pad

logger = logging.getLogger(__name__)

POOLINGS = ("last", "mean")
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps, which vLLM's pooler uses


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """(B, C) from `hidden` (B, T, C) over the positions where `mask` (B, T) is 1 (any padding side)."""
    if pooling == "last":
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] != 0, axis=1)  # each row's rightmost real token
        return hidden[np.arange(hidden.shape[0]), last]
    if pooling == "mean":
        m = (mask != 0).astype(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")


def normalize(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)


def plan_calls(lengths: Sequence[int], max_tokens: int, max_rows: int = 256) -> list[list[int]]:
    """Indices of the inputs per call: shortest first, each call at most `max_rows` rows and
    `max_tokens` padded tokens (an input longer than that alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    calls: list[list[int]] = []
    for i in order:
        # sorted ascending: the input joining a call is its longest
        if calls and len(calls[-1]) < max_rows and (len(calls[-1]) + 1) * lengths[i] <= max_tokens:
            calls[-1].append(i)
        else:
            calls.append([i])
    return calls


class EmbeddingRunner(ABC):
    """Runs the embedding graph (or the PyTorch trunk) and pools its hidden states."""

    backend: str = "?"
    device: str = "cpu"
    n_positions: int = 1024  # the model's context: longer inputs must be cut or refused
    dim: int = 0  # n_embd: the length of a vector

    @property
    def loaded(self) -> bool:
        """Whether the model's weights are held now (a runner may load them at its first call)."""
        return True

    @abstractmethod
    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """`last_hidden_state` (B, T, C) float32 of a padded batch (ids and mask (B, T) int64)."""

    def embed(self, prompts: Sequence[Sequence[int]], pooling: str = "last", max_tokens: int = 4096) -> np.ndarray:
        """Pooled, not yet normalized vectors (n, C) float32 of token-id lists, in their order."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        out = np.empty((len(prompts), self.dim), np.float32)
        for rows in plan_calls([len(p) for p in prompts], max_tokens):
            ids, mask = left_pad([prompts[i] for i in rows])
            out[rows] = pool(self.hidden_states(ids, mask), mask, pooling)
        return out

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""
