"""GPT-2 in PyTorch with fused residual-add + LayerNorm, and Hugging Face checkpoint I/O.

`from model import load_pretrained` is the stable surface (DESIGN §7). Names are resolved
lazily so that `model.tokenizer` can be imported on the ONNX Runtime path without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_pretrained": "model.checkpoint",
    "save_pretrained": "model.checkpoint",
    "read_config": "model.checkpoint",
    "CheckpointError": "model.checkpoint",
    "GPT2": "model.gpt2",
    "GPT2Config": "model.gpt2",
    "GPT2ForSequenceClassification": "model.gpt2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
