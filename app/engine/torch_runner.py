"""PyTorch runners: the fallback, running the `model/` GPT-2 directly on CPU or CUDA."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from app.engine.padded_runner import PaddedRunner
from app.engine.pooling import EmbeddingRunner
from app.engine.runner import KV, ClassificationRunner, ModelInfo, left_pad
from model import load_pretrained
from model.gpt2 import select_tokens

logger = logging.getLogger(__name__)


def _load(checkpoint: str | Path, device: str, precision: str, num_threads: int | None) -> torch.nn.Module:
    if num_threads:
        torch.set_num_threads(num_threads)
    # int8 is an ONNX Runtime feature; the torch fallback serves such a request in fp32.
    dtype = torch.float16 if precision == "fp16" and device == "cuda" else torch.float32
    return load_pretrained(checkpoint, dtype=dtype, device=device)


class TorchGenerationRunner(PaddedRunner):
    backend = "torch"

    def __init__(self, checkpoint: str | Path, device: str = "cpu", precision: str = "fp32",
                 num_threads: int | None = None) -> None:
        self.device = device
        self.model = _load(checkpoint, device, precision, num_threads)
        cfg = self.model.config
        super().__init__(ModelInfo(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.n_positions))
        logger.info("PyTorch generation runner on %s (%s)", device, self.model.transformer.wte.weight.dtype)

    @torch.inference_mode()
    def _forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, kv: KV | None, sel: dict[str, np.ndarray],
                 want_logits: bool) -> tuple[tuple, KV]:
        t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        past = tuple((kv[2 * i], kv[2 * i + 1]) for i in range(self.info.n_layer)) if kv is not None else None
        out = self.model(t(ids), t(mask), t(pos), past, logits_index=t(sel["logits_index"]))
        # The same selection the ONNX graph computes (`select_tokens`), in fp32 like the graph's.
        s = select_tokens(out.logits.float(), t(sel["target_ids"]), t(sel["temperature"]), int(sel["top_n"][0]))
        flat = [x for pair in out.past_key_values for x in pair]
        logits = s.logits.cpu().numpy() if want_logits else None
        return (logits, s.token_logprobs.cpu().numpy(), s.top_ids.cpu().numpy(), s.top_logprobs.cpu().numpy()), flat

    def _kv_pad_left(self, kv: KV, cols: int) -> KV:
        return [torch.nn.functional.pad(a, (0, 0, cols, 0)) for a in kv]

    def _kv_cat_rows(self, a: KV, b: KV) -> KV:
        return [torch.cat([x, y]) for x, y in zip(a, b, strict=True)]

    def _kv_take_rows(self, kv: KV, rows: np.ndarray) -> KV:
        idx = torch.from_numpy(rows).to(self.device)
        return [a.index_select(0, idx) for a in kv]

    def _kv_drop_cols(self, kv: KV, cols: int) -> KV:
        return [a[:, :, cols:].contiguous() for a in kv]


class TorchClassificationRunner(ClassificationRunner):
    backend = "torch"

    def __init__(self, checkpoint: str | Path, device: str = "cpu", precision: str = "fp32",
                 num_threads: int | None = None) -> None:
        self.device = device
        self.model = _load(checkpoint, device, precision, num_threads)
        self.n_positions = self.model.config.n_positions

    @torch.inference_mode()
    def classify(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask = left_pad(prompts)
        out = self.model(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))
        return out.logits.float().cpu().numpy()


class TorchEmbeddingRunner(EmbeddingRunner):
    """The language model's trunk (`GPT2Model`): its final hidden states, pooled by `EmbeddingRunner`."""

    backend = "torch"

    def __init__(self, checkpoint: str | Path, device: str = "cpu", precision: str = "fp32",
                 num_threads: int | None = None) -> None:
        self.device = device
        self.model = _load(checkpoint, device, precision, num_threads)
        self.n_positions = self.model.config.n_positions
        self.dim = self.model.config.n_embd

    @torch.inference_mode()
    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        hidden, _ = self.model.transformer(t(ids), t(mask))
        return hidden.float().cpu().numpy()
