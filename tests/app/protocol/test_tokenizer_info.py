"""`/tokenizer_info`'s object equals what vLLM builds from the Hugging Face tokenizer (its
`init_kwargs`, the vocabulary and merges paths dropped, an `AddedToken` as its text), for a
checkpoint whose tokenizer transformers saved, and falls back to GPT-2's tokenizer without one."""

from __future__ import annotations

from pathlib import Path

import transformers

from app.protocol.tokenizer_info import tokenizer_info
from model.tokenizer import GPT2Tokenizer

DEMO = Path(__file__).resolve().parents[3] / "model" / "demo" / "lm"


def vllm_rule(tok: transformers.PreTrainedTokenizerBase) -> dict:
    """vLLM's TokenizerInfo: init_kwargs without vocab_file / merges_file, AddedToken -> its content."""

    def plain(v):
        if hasattr(v, "content"):
            return v.content
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, list) else v

    config = {k: plain(v) for k, v in tok.init_kwargs.items() if k not in ("vocab_file", "merges_file")}
    return config | {"tokenizer_class": type(tok).__name__}


def test_a_saved_tokenizer_gives_what_vllm_gives(tmp_path) -> None:
    hf = transformers.GPT2TokenizerFast(str(DEMO / "vocab.json"), str(DEMO / "merges.txt"), model_max_length=1024,
                                        pad_token="<|endoftext|>")
    hf.save_pretrained(tmp_path)
    want = vllm_rule(transformers.AutoTokenizer.from_pretrained(tmp_path))
    got = tokenizer_info(tmp_path, "gpt2-demo", GPT2Tokenizer.from_dir(tmp_path), "{{ messages }}")
    # where the checkpoint was loaded from, and how: the server's business, not the tokenizer's
    loading = {"name_or_path", "is_local", "local_files_only"}
    assert {k: got[k] for k in set(want) - loading} == {k: v for k, v in want.items() if k not in loading}
    assert want["model_max_length"] == 1024 and want["pad_token"] == "<|endoftext|>"  # the file's fields came through
    assert got["name_or_path"] == "gpt2-demo" and got["chat_template"] == "{{ messages }}"


def test_without_tokenizer_config_it_is_gpt2s() -> None:
    got = tokenizer_info(DEMO, "demo", GPT2Tokenizer.from_dir(DEMO), None)
    assert got == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "add_bos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                   "added_tokens_decoder": {"50256": "<|endoftext|>"}, "name_or_path": "demo",
                   "tokenizer_class": "GPT2Tokenizer"}
