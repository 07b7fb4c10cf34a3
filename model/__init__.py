"""GPT-2 in PyTorch with fused residual-add + LayerNorm, and Hugging Face checkpoint I/O."""

from model.checkpoint import CheckpointError, load_pretrained, read_config, save_pretrained
from model.gpt2 import GPT2, GPT2Config, GPT2ForSequenceClassification

__all__ = [
    "GPT2",
    "CheckpointError",
    "GPT2Config",
    "GPT2ForSequenceClassification",
    "load_pretrained",
    "read_config",
    "save_pretrained",
]
