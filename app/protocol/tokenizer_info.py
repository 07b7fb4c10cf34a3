"""`GET /tokenizer_info` as vLLM serves it (`--enable-tokenizer-info-endpoint`): the tokenizer's
configuration, what `tokenizer_config.json` holds, with `tokenizer_class` and the served chat
template. lm-evaluation-harness's remote tokenizer reads `eos_token`, `bos_token`, `pad_token` and
`chat_template` from it.

vLLM returns the Hugging Face tokenizer's `init_kwargs` (minus the vocabulary and merges paths, an
`AddedToken` as its text). This server has no transformers tokenizer, so it builds the same object
from the checkpoint's `tokenizer_config.json` (when there is one) and what GPT-2's tokenizer is
(the checkpoint's special tokens, no BOS added, no prefix space), and names the checkpoint by the
served model id instead of a path on the server.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from app.protocol.chat_template import special_tokens
from model.tokenizer import GPT2Tokenizer

logger = logging.getLogger(__name__)

# Paths on the server, and the template (the served one replaces it): never sent.
_DROPPED = ("vocab_file", "merges_file", "tokenizer_file", "chat_template", "name_or_path")


def _json_value(value: Any) -> Any:
    """An `AddedToken` as tokenizer_config.json stores it (`{"content": ...}`) becomes its text (vLLM's rule)."""
    if isinstance(value, dict):
        if isinstance(value.get("content"), str) and ("__type" in value or "special" in value):
            return value["content"]
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def tokenizer_info(checkpoint: Path, model_id: str, tokenizer: GPT2Tokenizer,
                   chat_template: str | None) -> dict[str, Any]:
    """The `/tokenizer_info` object of the served generation model."""
    config: dict[str, Any] = {}
    path = checkpoint / "tokenizer_config.json"
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError) as e:  # the tokenizer itself loaded from vocab.json + merges.txt
            logger.warning("tokenizer_info: %s is not readable JSON (%s); using GPT-2's defaults", path, e)
    info = {k: _json_value(v) for k, v in config.items() if k not in _DROPPED}
    for key, text in special_tokens(checkpoint).items():
        info.setdefault(key, text)
    info.setdefault("add_bos_token", False)
    info.setdefault("add_prefix_space", False)
    info.setdefault("clean_up_tokenization_spaces", False)
    special = sorted(tokenizer.special_ids)
    info.setdefault("added_tokens_decoder", {str(i): tokenizer.id_to_token_text(i) for i in special})
    info["name_or_path"] = model_id
    info.setdefault("tokenizer_class", "GPT2Tokenizer")  # what transformers 5 loads for it (vLLM: its class)
    if chat_template is not None:
        info["chat_template"] = chat_template
    return info
