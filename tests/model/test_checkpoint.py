"""model/checkpoint.py: every weight format loads to the same logits as `transformers`, our
`save_pretrained` output loads back into `transformers`, and every bad folder fails clearly."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_pretrained, save_pretrained, transpose_conv1d
from model.gpt2 import GPT2, GPT2ForSequenceClassification
from tests.conftest import make_hf_checkpoint
from tests.model.conftest import max_diff

ATOL = 1e-4
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def ids_and_mask(vocab: int = 50256) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows of real ids (< 50256, so never the classifier's pad id)."""
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 6:] = 50256
    mask[1, 6:] = 0
    return ids, mask


def copy_config(src: Path, dst: Path, **changes) -> dict:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg))
    return cfg


@pytest.fixture(scope="module")
def hf_lm(tiny_lm_dir: Path) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_lm_dir).eval()


@pytest.fixture(scope="module")
def hf_logits(hf_lm) -> torch.Tensor:
    ids, _ = ids_and_mask()
    with torch.no_grad():
        return hf_lm(ids[:1]).logits


@torch.no_grad()
def assert_lm_matches(folder: Path, hf_logits: torch.Tensor) -> GPT2:
    model = load_pretrained(folder)
    assert isinstance(model, GPT2)
    assert not model.training
    ids, _ = ids_and_mask()
    assert max_diff(model(ids[:1]).logits, hf_logits) < ATOL
    return model


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def test_loads_model_safetensors(tiny_lm_dir: Path, hf_logits: torch.Tensor) -> None:
    assert (tiny_lm_dir / "model.safetensors").is_file()
    assert_lm_matches(tiny_lm_dir, hf_logits)


def test_loads_pytorch_model_bin(tiny_lm_dir: Path, hf_lm, hf_logits: torch.Tensor, tmp_path: Path) -> None:
    copy_config(tiny_lm_dir, tmp_path)
    state = {k: v.clone() for k, v in hf_lm.state_dict().items()}
    assert "lm_head.weight" in state  # the tied head is in the state dict; equal to wte, so accepted
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_lm_matches(tmp_path, hf_logits)


def test_loads_sharded_safetensors(hf_lm, hf_logits: torch.Tensor, tmp_path: Path) -> None:
    hf_lm.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2, shards
    assert not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).is_file() for s in shards)
    assert_lm_matches(tmp_path, hf_logits)


@pytest.mark.parametrize("arch", ["GPT2Model", "GPT2LMHeadModel"])
def test_loads_checkpoint_without_transformer_prefix(
    tiny_lm_dir: Path, hf_lm, hf_logits: torch.Tensor, tmp_path: Path, arch: str
) -> None:
    """Like OpenAI's `gpt2` on the Hub: the trunk's keys (`wte.weight`, `h.0.attn.c_attn.weight`, ...)."""
    copy_config(tiny_lm_dir, tmp_path, architectures=[arch])
    state = {k: v.clone().contiguous() for k, v in hf_lm.transformer.state_dict().items()}
    assert "wte.weight" in state and "h.0.attn.c_attn.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    assert_lm_matches(tmp_path, hf_logits)


@pytest.mark.parametrize("prefix", ["transformer.", ""], ids=["prefixed", "bare"])
def test_old_attention_buffers_are_ignored(
    tiny_lm_dir: Path, hf_lm, hf_logits: torch.Tensor, tmp_path: Path, prefix: str
) -> None:
    copy_config(tiny_lm_dir, tmp_path)
    trunk = {prefix + k: v.clone().contiguous() for k, v in hf_lm.transformer.state_dict().items()}
    n_pos = hf_lm.config.n_positions
    for i in range(hf_lm.config.n_layer):
        trunk[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        trunk[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(trunk, str(tmp_path / "model.safetensors"))
    assert_lm_matches(tmp_path, hf_logits)


def test_dtype_argument(tiny_lm_dir: Path) -> None:
    model = load_pretrained(tiny_lm_dir, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


# --------------------------------------------------------------------------------------------
# Heads and labels
# --------------------------------------------------------------------------------------------


def test_classifier_head_chosen_from_architectures(tiny_classifier_dir: Path) -> None:
    model = load_pretrained(tiny_classifier_dir)
    assert isinstance(model, GPT2ForSequenceClassification)
    assert model.config.id2label == LABELS
    assert model.config.num_labels == 3
    assert model.config.pad_token_id == 50256
    assert model.score.weight.shape == (3, model.config.n_embd)


def test_lm_head_chosen_from_architectures(tiny_lm_dir: Path) -> None:
    model = load_pretrained(tiny_lm_dir)
    assert isinstance(model, GPT2) and not isinstance(model, GPT2ForSequenceClassification)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_classifier_matches_hf(tiny_classifier_dir: Path) -> None:
    model = load_pretrained(tiny_classifier_dir)
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) < ATOL


# --------------------------------------------------------------------------------------------
# save_pretrained round trip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["generate", "classify"])
@torch.no_grad()
def test_save_pretrained_round_trip(tiny_lm_dir: Path, tiny_classifier_dir: Path, tmp_path: Path, task: str) -> None:
    src = tiny_classifier_dir if task == "classify" else tiny_lm_dir
    ours = load_pretrained(src)
    save_pretrained(ours, tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()

    hf_cls = transformers.GPT2ForSequenceClassification if task == "classify" else transformers.GPT2LMHeadModel
    hf, info = hf_cls.from_pretrained(saved, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    reloaded = load_pretrained(saved)
    assert type(reloaded) is type(ours)

    ids, mask = ids_and_mask()
    expected = ours(ids, attention_mask=mask).logits
    real = mask.bool() if task == "generate" else slice(None)  # LM: padded query rows are unused
    assert max_diff(hf(ids, attention_mask=mask).logits[real], expected[real]) < ATOL
    assert torch.equal(reloaded(ids, attention_mask=mask).logits, expected)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    if task == "classify":
        assert hf.config.id2label == LABELS
        assert reloaded.config.id2label == LABELS
        assert hf.config.pad_token_id == 50256
    # On disk the Conv1D weights are in HF's (in, out) layout, and the tied head is not stored.
    on_disk = load_file(str(saved / "model.safetensors"))
    assert "lm_head.weight" not in on_disk
    n_embd = ours.config.n_embd
    assert on_disk["transformer.h.0.attn.c_attn.weight"].shape == (n_embd, 3 * n_embd)
    assert on_disk["transformer.h.0.mlp.c_fc.weight"].shape == (n_embd, ours.config.inner_dim)


def test_transpose_conv1d_is_its_own_inverse() -> None:
    state = {
        "transformer.h.0.attn.c_attn.weight": torch.randn(4, 12),
        "transformer.h.0.attn.c_proj.weight": torch.randn(4, 4),
        "transformer.h.0.mlp.c_fc.weight": torch.randn(4, 16),
        "transformer.h.0.mlp.c_proj.weight": torch.randn(16, 4),
        "transformer.h.0.attn.c_attn.bias": torch.randn(12),
        "transformer.wte.weight": torch.randn(10, 4),
        "score.weight": torch.randn(3, 4),
    }
    once = transpose_conv1d(state)
    for k, v in state.items():
        expected = v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v
        assert torch.equal(once[k], expected), k
    twice = transpose_conv1d(once)
    assert all(torch.equal(twice[k], v) for k, v in state.items())


# --------------------------------------------------------------------------------------------
# Bad checkpoints
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small-vocabulary LM checkpoint to copy and break: vocab 1000, n_positions 128, n_embd 32."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("small"), "generate", seed=5, vocab_size=1000)


@pytest.fixture(scope="module")
def small_sharded_dir(small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("small_sharded")
    transformers.GPT2LMHeadModel.from_pretrained(small_dir).save_pretrained(d, max_shard_size="20KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    return d


def edit_weights(folder: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))


def edit_config(folder: Path, **changes) -> None:
    copy_config(folder, folder, **changes)


def _missing_folder(d: Path) -> Path:
    shutil.rmtree(d)
    return d


def _no_config(d: Path) -> Path:
    (d / "config.json").unlink()
    return d


def _bad_json(d: Path) -> Path:
    (d / "config.json").write_text('{"model_type": "gpt2", "n_embd": 32,')
    return d


def _json_list(d: Path) -> Path:
    (d / "config.json").write_text("[1, 2, 3]")
    return d


def _not_gpt2(d: Path) -> Path:
    edit_config(d, model_type="llama")
    return d


def _bad_arch(d: Path) -> Path:
    edit_config(d, architectures=["GPT2DoubleHeadsModel"])
    return d


def _no_weights(d: Path) -> Path:
    (d / "model.safetensors").unlink()
    return d


def _truncated(d: Path) -> Path:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


def _garbage(d: Path) -> Path:
    (d / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    return d


def _garbage_bin(d: Path) -> Path:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 definitely not a zip" * 10)
    return d


def _missing_key(d: Path) -> Path:
    edit_weights(d, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))
    return d


def _unexpected_key(d: Path) -> Path:
    edit_weights(d, lambda s: s.__setitem__("transformer.h.0.attn.rotary_freqs", torch.zeros(4)))
    return d


def _wrong_shape(d: Path) -> Path:
    edit_weights(d, lambda s: s.__setitem__("transformer.wpe.weight", torch.zeros(64, 32)))
    return d


def _wrong_shape_conv1d(d: Path) -> Path:
    edit_weights(d, lambda s: s.__setitem__("transformer.h.0.attn.c_attn.weight", torch.zeros(32, 90)))
    return d


def _untied_head(d: Path) -> Path:
    edit_weights(d, lambda s: s.__setitem__("lm_head.weight", s["transformer.wte.weight"] + 0.01))
    return d


def _indivisible(d: Path) -> Path:
    edit_config(d, n_head=5)
    return d


BAD = [
    ("folder_missing", _missing_folder, [r"does not exist"]),
    ("config_missing", _no_config, [r"config\.json", r"missing"]),
    ("config_malformed", _bad_json, [r"config\.json", r"not valid JSON"]),
    ("config_list", _json_list, [r"config\.json", r"expected a JSON object, got list"]),
    ("model_type", _not_gpt2, [r"model_type is 'llama'", r"only 'gpt2'"]),
    ("architectures", _bad_arch, [r"GPT2DoubleHeadsModel", r"not supported"]),
    ("no_weights", _no_weights, [r"no weights found", r"model\.safetensors"]),
    ("truncated_safetensors", _truncated, [r"could not read the weights"]),
    ("garbage_safetensors", _garbage, [r"could not read the weights"]),
    ("garbage_bin", _garbage_bin, [r"could not read the weights"]),
    ("missing_key", _missing_key, [r"missing: transformer\.h\.1\.mlp\.c_fc\.bias"]),
    ("unexpected_key", _unexpected_key, [r"unexpected: transformer\.h\.0\.attn\.rotary_freqs"]),
    ("wrong_shape", _wrong_shape, [r"wrong shape: transformer\.wpe\.weight", r"\(64, 32\)", r"\(128, 32\)"]),
    # Shapes of Conv1D weights are reported after the (in, out) -> (out, in) transpose; only the key is pinned.
    ("wrong_shape_conv1d", _wrong_shape_conv1d, [r"wrong shape: transformer\.h\.0\.attn\.c_attn\.weight"]),
    ("untied_lm_head", _untied_head, [r"lm_head\.weight", r"differs from transformer\.wte\.weight"]),
    ("n_embd_indivisible", _indivisible, [r"config\.json", r"n_embd \(32\).*divisible.*n_head \(5\)"]),
]


@pytest.mark.parametrize(("breaker", "patterns"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_checkpoint_raises_clear_error(
    small_dir: Path, tmp_path: Path, breaker: Callable[[Path], Path], patterns: list[str]
) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(small_dir, d)
    d = breaker(d)
    with pytest.raises(CheckpointError) as exc_info:
        load_pretrained(d)
    assert isinstance(exc_info.value, ValueError)
    msg = str(exc_info.value)
    for pattern in patterns:
        assert exc_info.match(pattern), (pattern, msg)


def test_missing_shard_is_named(small_sharded_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(small_sharded_dir, d)
    load_pretrained(d)  # intact: loads
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"model.safetensors.index.json: shard '{shard}' is missing")):
        load_pretrained(d)


def test_all_problems_are_reported_together(small_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(small_dir, d)

    def break_all(s: dict[str, torch.Tensor]) -> None:
        del s["transformer.ln_f.bias"], s["transformer.h.0.ln_1.weight"]
        s["transformer.extra.weight"] = torch.zeros(1)
        s["transformer.h.1.ln_2.bias"] = torch.zeros(31)

    edit_weights(d, break_all)
    with pytest.raises(CheckpointError) as exc_info:
        load_pretrained(d)
    msg = str(exc_info.value)
    assert "missing: transformer.h.0.ln_1.weight, transformer.ln_f.bias" in msg
    assert "unexpected: transformer.extra.weight" in msg
    assert "transformer.h.1.ln_2.bias: checkpoint (31,) vs model (32,)" in msg


def test_tied_lm_head_equal_to_wte_is_accepted(small_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(small_dir, d)
    edit_weights(d, lambda s: s.__setitem__("lm_head.weight", s["transformer.wte.weight"].clone()))
    model = load_pretrained(d)
    assert model.lm_head.weight is model.transformer.wte.weight
