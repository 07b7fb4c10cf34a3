"""PyTorch GPT-2 -> ONNX: one KV-cache generation graph (or a classification graph) in which
every fused residual-add + LayerNorm is a `com.microsoft.SkipLayerNormalization` node, with
optional fp16 / int8 variants, parity verification and a manifest. CLI: `python -m export`.

Importing this package is cheap and torch-free; `export_checkpoint` pulls torch in on use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_checkpoint"]


def export_checkpoint(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `export.pipeline.export_checkpoint`."""
    from export.pipeline import export_checkpoint as _export

    return _export(*args, **kwargs)
