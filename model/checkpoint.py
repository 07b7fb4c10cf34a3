"""Hugging Face GPT-2 checkpoint folders <-> our modules, with every key and shape checked.

A folder holds `config.json` and the weights as `model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin` (read with `weights_only=True`).
The head is chosen from `config.json`'s `architectures`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.gpt2 import GPT2, GPT2Config, GPT2ForSequenceClassification

logger = logging.getLogger(__name__)

LM_ARCHITECTURES = {"GPT2LMHeadModel", "GPT2Model"}
CLASSIFIER_ARCHITECTURES = {"GPT2ForSequenceClassification"}

# HF's GPT-2 keeps OpenAI's TF-era `Conv1D` layers, whose weight is stored (in, out); our
# `nn.Linear` holds (out, in). These four are the only Conv1D weights in the model.
_CONV1D_WEIGHT = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Causal-mask buffers older HF versions saved with the weights; they carry no parameters.
_IGNORED = re.compile(r"\.attn\.(bias|masked_bias)$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or the keys."""


def transpose_conv1d(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swap the Conv1D weights between HF's (in, out) and nn.Linear's (out, in) layout.

    The one place the transpose happens; it is its own inverse, so loading and saving share it.
    """
    return {k: (v.t().contiguous() if _CONV1D_WEIGHT.search(k) else v) for k, v in state.items()}


def read_config(path: str | Path) -> GPT2Config:
    """Parse `config.json` in a checkpoint folder into a `GPT2Config`."""
    cfg_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist or is not a folder")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (a GPT-2 checkpoint folder needs config.json)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{cfg_file}: model_type is {raw['model_type']!r}, only 'gpt2' is supported")
    try:
        return GPT2Config.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{index}: shard {shard!r} is missing")
                state.update(load_file(str(folder / shard)))
            return state
        if legacy.is_file():
            state = torch.load(legacy, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{legacy}: expected a state dict, got {type(state).__name__}")
            return state
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or foreign file: name it, never a bare traceback
        raise CheckpointError(f"{folder}: could not read the weights ({type(e).__name__}: {e})") from e
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _build(config: GPT2Config, folder: Path) -> nn.Module:
    archs = set(config.architectures or ["GPT2LMHeadModel"])
    if archs & CLASSIFIER_ARCHITECTURES:
        return GPT2ForSequenceClassification(config)
    if archs & LM_ARCHITECTURES:
        return GPT2(config)
    raise CheckpointError(
        f"{folder / 'config.json'}: architectures {sorted(archs)} not supported; "
        f"expected one of {sorted(LM_ARCHITECTURES | CLASSIFIER_ARCHITECTURES)}"
    )


def _to_our_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names, with or without the `transformer.` prefix, -> this model's names."""
    out = {}
    for k, v in state.items():
        if _IGNORED.search(k):
            continue
        if not (k.startswith("transformer.") or k in ("lm_head.weight", "score.weight")):
            k = "transformer." + k  # a bare `GPT2Model` checkpoint (e.g. OpenAI's `gpt2`)
        out[k] = v
    return out


def _shape_mismatch(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    if _CONV1D_WEIGHT.search(key):  # say it in the layout the file uses: HF Conv1D (in, out)
        return f"{key}: checkpoint {got[::-1]} vs model {want[::-1]} (Conv1D layout, in x out)"
    return f"{key}: checkpoint {got} vs model {want}"


def load_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a HF GPT-2 checkpoint folder into `GPT2` or `GPT2ForSequenceClassification`, in eval mode.

    Raises `CheckpointError` (a `ValueError`) naming every missing, unexpected or mis-shaped tensor.
    """
    folder = Path(path)
    config = read_config(folder)
    # Parameters start on the meta device (no memory, no random init) and become the loaded
    # tensors themselves (`assign=True`); Conv1D weights are transposed views, not copies. So
    # loading holds one copy of the weights, not three (init + file + transposes): GPT-2 XL's
    # 6.2 GB would otherwise peak near 19 GB.
    with torch.device("meta"):
        model = _build(config, folder)
    state = _to_our_names(_read_weights(folder))
    state = {k: (v.t() if _CONV1D_WEIGHT.search(k) else v) for k, v in state.items()}

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    lm_head = state.pop("lm_head.weight", None)
    expected.pop("lm_head.weight", None)  # tied to transformer.wte.weight
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(_shape_mismatch(k, tuple(state[k].shape), expected[k])
                       for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if lm_head is not None and "transformer.wte.weight" in state:
        wte = state["transformer.wte.weight"]
        if lm_head.shape != wte.shape or not torch.equal(lm_head.to(wte.dtype), wte):
            unexpected.append("lm_head.weight (differs from transformer.wte.weight; only tied heads are supported)")
    if missing or unexpected or misshaped:
        parts = [f"{name}: {', '.join(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if keys]
        raise CheckpointError(f"{folder}: checkpoint does not match the GPT-2 config; " + "; ".join(parts))

    model.load_state_dict(state, strict=False, assign=True)  # strict check done above, with better messages
    if isinstance(model, GPT2):
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied Parameter
    model.to(device=device, dtype=dtype).eval()
    logger.info("loaded %s from %s (%d layers, %d dims)", type(model).__name__, folder, config.n_layer, config.n_embd)
    return model


def save_pretrained(model: nn.Module, path: str | Path) -> None:
    """Write `config.json` + `model.safetensors` in HF's format (loadable by `transformers`)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config: GPT2Config = model.config
    arch = "GPT2ForSequenceClassification" if isinstance(model, GPT2ForSequenceClassification) else "GPT2LMHeadModel"
    cfg = config.to_dict() | {"architectures": [arch], "dtype": "float32", "tie_word_embeddings": True}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied: HF re-ties it from wte on load
    save_file(transpose_conv1d(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
