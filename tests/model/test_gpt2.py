"""model/gpt2.py against the `transformers` reference (GPT2LMHeadModel / GPT2ForSequenceClassification).

The checkpoints are built with `make_hf_checkpoint` and then "sharpened" (bigger weights, random
biases) so attention is far from uniform and every parameter matters: a wrong mask, position,
scale or bias moves the logits by far more than the 1e-4 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from model.checkpoint import load_pretrained
from model.gpt2 import (
    GPT2,
    FusedAddLayerNorm,
    GPT2Config,
    GPT2ForSequenceClassification,
    KVSlots,
)
from tests.conftest import make_hf_checkpoint
from tests.model.conftest import max_diff

ATOL = 1e-4
SMALL_VOCAB = 1000

# (id, make_hf_checkpoint config); small vocabulary where the real one is not needed.
LM_CONFIGS = [
    ("base", dict(vocab_size=SMALL_VOCAB)),
    ("head3_embd48_1layer", dict(vocab_size=SMALL_VOCAB, n_embd=48, n_head=3, n_layer=1)),
    ("head5_embd40_3layers", dict(vocab_size=SMALL_VOCAB, n_embd=40, n_head=5, n_layer=3)),
    ("n_inner24", dict(vocab_size=SMALL_VOCAB, n_inner=24, n_head=2)),
    ("inverse_layer_idx", dict(vocab_size=SMALL_VOCAB, n_layer=3, scale_attn_by_inverse_layer_idx=True)),
    ("gelu_exact", dict(vocab_size=SMALL_VOCAB, activation_function="gelu")),
    ("relu_no_attn_scale", dict(vocab_size=SMALL_VOCAB, activation_function="relu", scale_attn_weights=False)),
    ("eps1e-3_head1", dict(vocab_size=SMALL_VOCAB, layer_norm_epsilon=1e-3, n_head=1, n_embd=16)),
    ("real_vocab", dict()),
]


def sharpen(folder: Path, seed: int) -> Path:
    """Scale the checkpoint's weights up and give every bias random values (in place)."""
    gen = torch.Generator().manual_seed(seed)
    path = folder / "model.safetensors"
    state = load_file(str(path))
    out = {}
    for k, v in state.items():
        if ".ln_" in k:
            out[k] = v
        elif k.endswith(".bias"):
            out[k] = v + 0.2 * torch.randn(v.shape, generator=gen)
        elif k.endswith("wte.weight"):
            out[k] = v * 3.0  # std 0.06: bigger makes tied-head greedy decoding repeat one token
        elif k.endswith("wpe.weight"):
            out[k] = v * 10.0  # std 0.2
        else:
            out[k] = v * 8.0  # std 0.16
    save_file(out, str(path), metadata={"format": "pt"})
    return folder


def make_pair(folder: Path, task: str, seed: int, **config) -> tuple[nn.Module, nn.Module]:
    sharpen(make_hf_checkpoint(folder, task, seed=seed, **config), seed)
    ours = load_pretrained(folder)
    hf_cls = transformers.GPT2ForSequenceClassification if task == "classify" else transformers.GPT2LMHeadModel
    hf = hf_cls.from_pretrained(folder).eval()
    return ours, hf


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_padded(lengths: list[int], vocab: int, pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows of the given lengths, left-padded with `pad` to the longest; (ids, mask)."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(0, vocab, (n,), generator=gen)
        mask[b, T - n :] = 1
    return ids, mask


def right_padded(lengths: list[int], vocab: int, pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_padded(lengths, vocab, pad, seed)
    for b, n in enumerate(lengths):
        ids[b] = torch.cat([ids[b, ids.shape[1] - n :], ids[b, : ids.shape[1] - n]])
        mask[b] = torch.cat([mask[b, mask.shape[1] - n :], mask[b, : mask.shape[1] - n]])
    return ids, mask


@pytest.fixture(scope="module", params=LM_CONFIGS, ids=[c[0] for c in LM_CONFIGS])
def lm_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name, config = request.param
    seed = LM_CONFIGS.index(request.param) + 10
    ours, hf = make_pair(tmp_path_factory.mktemp(f"lm_{name}"), "generate", seed, **config)
    return ours, hf


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory: pytest.TempPathFactory):
    """One small-vocabulary LM for the tests that do not need every config."""
    return make_pair(tmp_path_factory.mktemp("small_lm"), "generate", 3, vocab_size=SMALL_VOCAB, n_layer=3)


@pytest.fixture(scope="module")
def cls_pair(tmp_path_factory: pytest.TempPathFactory):
    """A sharpened sequence classifier with the real vocabulary; pad_token_id = 50256."""
    return make_pair(tmp_path_factory.mktemp("cls"), "classify", 4, n_head=2)


# --------------------------------------------------------------------------------------------
# Language model vs transformers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_logits_match_hf(lm_pair) -> None:
    ours, hf = lm_pair
    V = ours.config.vocab_size
    assert isinstance(ours, GPT2)
    ids = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(0))
    expected = hf(ids).logits
    got = ours(ids).logits
    assert got.shape == (3, 17, V)
    assert max_diff(got, expected) < ATOL
    # The sharpened weights make the comparison meaningful: logits are O(1) and vary.
    assert expected.std() > 0.1


@torch.no_grad()
def test_single_token_and_full_context(lm_pair) -> None:
    ours, hf = lm_pair
    V, n_pos = ours.config.vocab_size, ours.config.n_positions
    gen = torch.Generator().manual_seed(1)
    for ids in (torch.randint(0, V, (1, 1), generator=gen), torch.randint(0, V, (1, n_pos), generator=gen)):
        assert max_diff(ours(ids).logits, hf(ids).logits) < ATOL


@torch.no_grad()
def test_left_padded_batch_matches_hf_at_real_positions(lm_pair) -> None:
    ours, hf = lm_pair
    V = ours.config.vocab_size
    ids, mask = left_padded([9, 5, 1, 9], V, pad=0, seed=2)
    got = ours(ids, attention_mask=mask).logits
    expected = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    real = mask.bool()
    assert max_diff(got[real], expected[real]) < ATOL
    assert torch.isfinite(got).all()  # padded query rows stay finite


@torch.no_grad()
def test_left_padding_does_not_change_a_rows_logits(small_lm) -> None:
    ours, _ = small_lm
    ids, mask = left_padded([10, 6, 3], SMALL_VOCAB, pad=7, seed=3)
    batch = ours(ids, attention_mask=mask).logits
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()].unsqueeze(0)
        alone = ours(row).logits[0]
        assert max_diff(batch[b][mask[b].bool()], alone) < ATOL


@torch.no_grad()
def test_right_padded_batch_matches_hf_at_real_positions(small_lm) -> None:
    ours, hf = small_lm
    ids, mask = right_padded([4, 8, 2], SMALL_VOCAB, pad=0, seed=4)
    got = ours(ids, attention_mask=mask).logits
    expected = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(got[real], expected[real]) < ATOL


@torch.no_grad()
def test_explicit_position_ids_are_used(small_lm) -> None:
    ours, hf = small_lm
    ids = torch.randint(0, SMALL_VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    pos = torch.tensor([[3, 4, 5, 6, 7, 8], [10, 11, 12, 13, 14, 15]])
    got = ours(ids, position_ids=pos).logits
    assert max_diff(got, hf(ids, position_ids=pos).logits) < ATOL
    assert max_diff(got, ours(ids).logits) > 1e-2


@torch.no_grad()
def test_last_only(lm_pair) -> None:
    ours, _ = lm_pair
    V = ours.config.vocab_size
    ids, mask = left_padded([6, 3, 6], V, pad=0, seed=6)
    full = ours(ids, attention_mask=mask)
    last = ours(ids, attention_mask=mask, last_only=True)
    assert last.logits.shape == (3, V)
    assert max_diff(last.logits, full.logits[:, -1, :]) < 1e-5
    for (k1, v1), (k2, v2) in zip(full.past_key_values, last.past_key_values, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


def _check_kv_shapes(past, config: GPT2Config, batch: int, total_len: int) -> None:
    assert len(past) == config.n_layer
    for k, v in past:
        assert k.shape == (batch, config.n_head, total_len, config.head_dim)
        assert v.shape == (batch, config.n_head, total_len, config.head_dim)


@pytest.mark.parametrize("prefill", [1, 4, 8])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(lm_pair, prefill: int, padded: bool) -> None:
    ours, _ = lm_pair
    cfg = ours.config
    V = cfg.vocab_size
    lengths = [12, 7, 10] if padded else [12, 12, 12]
    ids, mask = left_padded(lengths, V, pad=0, seed=7)
    B, T = ids.shape
    full = ours(ids, attention_mask=mask).logits  # (B, T, V)

    out = ours(ids[:, :prefill], attention_mask=mask[:, :prefill])
    _check_kv_shapes(out.past_key_values, cfg, B, prefill)
    steps = [out.logits]
    past = out.past_key_values
    for t in range(prefill, T):
        out = ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=past)
        assert out.logits.shape == (B, 1, V)
        past = out.past_key_values
        _check_kv_shapes(past, cfg, B, t + 1)
        steps.append(out.logits)
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    assert max_diff(cached[real], full[real]) < ATOL


def _slots(last: list[int], total: int) -> KVSlots:
    return KVSlots(torch.tensor(last, dtype=torch.int32), torch.tensor(total, dtype=torch.int32))


@torch.no_grad()
def test_slot_attention_matches_hf_for_right_padded_prompts_decode_and_chunks(small_lm) -> None:
    """The shared-buffer semantics the GQA graph has (KVSlots): right-padded first prompts of
    different lengths, decode steps at per-row cache indices, and a prompt in two chunks, all
    equal to transformers on each row's unpadded sequence."""
    ours, hf = small_lm
    cfg = ours.config
    M, lengths = 24, [5, 9, 1]
    ids, mask = right_padded(lengths, cfg.vocab_size, pad=0, seed=5)
    pos = torch.where(mask.bool(), torch.arange(ids.shape[1]), 0)
    bufs = tuple((torch.full((3, cfg.n_head, M, cfg.head_dim), 7.0),) * 2 for _ in range(cfg.n_layer))  # garbage
    out = ours(ids, None, pos, bufs, last_only=True, slots=_slots([n - 1 for n in lengths], ids.shape[1]))
    seqs = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
    for step in range(4):
        for b, seq in enumerate(seqs):
            ref = hf(torch.tensor([seq])).logits[0, -1]
            assert max_diff(out.logits[b], ref) < ATOL, (step, b)
        nxt = out.logits.argmax(-1)
        cur = torch.tensor([len(s) for s in seqs])
        out = ours(nxt[:, None], None, cur[:, None], out.past_key_values, last_only=True,
                   slots=_slots(cur.tolist(), int(cur.max()) + 1))
        for b, seq in enumerate(seqs):
            seq.append(int(nxt[b]))
    row = seqs[1]
    one = tuple((torch.zeros(1, cfg.n_head, M, cfg.head_dim),) * 2 for _ in range(cfg.n_layer))
    first = ours(torch.tensor([row[:4]]), None, torch.arange(4)[None], one, last_only=True, slots=_slots([3], 4))
    rest = ours(torch.tensor([row[4:]]), None, torch.arange(4, len(row))[None], first.past_key_values,
                last_only=True, slots=_slots([len(row) - 1], len(row)))
    assert max_diff(rest.logits[0], hf(torch.tensor([row])).logits[0, -1]) < ATOL


@torch.no_grad()
def test_cached_decoding_matches_hf_cache(small_lm) -> None:
    """Ours with cache vs HF with cache, position_ids given to HF each step."""
    ours, hf = small_lm
    ids, mask = left_padded([9, 4], SMALL_VOCAB, pad=0, seed=8)
    pos = hf_positions(mask)
    p = 5
    ours_out = ours(ids[:, :p], attention_mask=mask[:, :p])
    hf_out = hf(ids[:, :p], attention_mask=mask[:, :p], position_ids=pos[:, :p], use_cache=True)
    for t in range(p, ids.shape[1]):
        ours_out = ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=ours_out.past_key_values)
        hf_out = hf(
            ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            position_ids=pos[:, t : t + 1],
            past_key_values=hf_out.past_key_values,
            use_cache=True,
        )
        assert max_diff(ours_out.logits, hf_out.logits) < ATOL


def greedy(model: GPT2, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with the KV cache, one token per step after the prefill."""
    out = model(ids, attention_mask=mask, last_only=True)
    tokens = []
    for i in range(steps):
        nxt = out.logits.argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(nxt)
        if i == steps - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(nxt, attention_mask=mask, past_key_values=out.past_key_values, last_only=True)
        assert out.logits.ndim == 2
    return torch.cat([ids, *tokens], dim=1)


@pytest.mark.parametrize("lengths", [[5], [8, 3], [2, 9, 6]], ids=["single", "left_padded_2", "left_padded_3"])
@torch.no_grad()
def test_greedy_32_steps_matches_hf_generate(lm_pair, lengths: list[int]) -> None:
    ours, hf = lm_pair
    V = ours.config.vocab_size
    ids, mask = left_padded(lengths, min(V, 50000), pad=0, seed=9)
    expected = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=32,
        do_sample=False,
        num_beams=1,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert expected.shape == (len(lengths), ids.shape[1] + 32)  # HF did not stop early
    got = greedy(ours, ids, mask, 32)
    assert torch.equal(got, expected)
    for row in got[:, -32:]:
        assert len(set(row.tolist())) > 1  # not a degenerate constant continuation


# --------------------------------------------------------------------------------------------
# Sequence classifier vs transformers
# --------------------------------------------------------------------------------------------

PAD = 50256


@pytest.mark.parametrize("lengths", [[6, 2, 9, 1], [5]], ids=["batch", "one_row"])
@torch.no_grad()
def test_classifier_left_padded_matches_hf(cls_pair, lengths: list[int]) -> None:
    ours, hf = cls_pair
    assert isinstance(ours, GPT2ForSequenceClassification)
    ids, mask = left_padded(lengths, PAD, pad=PAD, seed=10)  # real ids < 50256, never the pad id
    got = ours(ids, attention_mask=mask).logits
    expected = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert got.shape == (len(lengths), 3)
    assert max_diff(got, expected) < ATOL
    assert expected.std() > 0.05


@torch.no_grad()
def test_classifier_right_padded_matches_hf(cls_pair) -> None:
    ours, hf = cls_pair
    ids, mask = right_padded([3, 8, 5, 1], PAD, pad=PAD, seed=11)
    got = ours(ids, attention_mask=mask).logits
    expected = hf(ids, attention_mask=mask).logits
    assert max_diff(got, expected) < ATOL
    # Pooling at the last real token, not the last position: the padded rows would differ.
    last_pos = ours.score(ours.transformer(ids, mask)[0][:, -1])
    assert max_diff(got[[0, 2, 3]], last_pos[[0, 2, 3]]) > 1e-2


@pytest.mark.parametrize("side", ["left", "right", "none"])
@torch.no_grad()
def test_classifier_without_mask_pools_at_last_non_pad(cls_pair, side: str) -> None:
    ours, hf = cls_pair
    assert ours.config.pad_token_id == PAD
    if side == "none":
        ids = torch.randint(0, PAD, (2, 7), generator=torch.Generator().manual_seed(12))
    else:
        ids, _ = (left_padded if side == "left" else right_padded)([4, 7, 2], PAD, pad=PAD, seed=12)
    got = ours(ids).logits
    expected = hf(ids).logits
    assert max_diff(got, expected) < ATOL


@torch.no_grad()
def test_classifier_fixture_matches_hf(tiny_classifier_dir: Path) -> None:
    ours = load_pretrained(tiny_classifier_dir)
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    ids, mask = right_padded([3, 6], PAD, pad=PAD, seed=13)
    assert max_diff(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits) < ATOL
    assert max_diff(ours(ids).logits, hf(ids).logits) < ATOL


@torch.no_grad()
def test_classifier_without_pad_token_uses_last_position() -> None:
    config = GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        num_labels=2,
        architectures=["GPT2ForSequenceClassification"],
    )
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).eval()
    ids = torch.randint(0, 50, (2, 5))
    hidden, _ = model.transformer(ids)
    assert max_diff(model(ids).logits, model.score(hidden[:, -1])) < 1e-6


# --------------------------------------------------------------------------------------------
# FusedAddLayerNorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 5, 16), (1, 1, 48), (3, 7)])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@torch.no_grad()
def test_fused_add_layer_norm_equals_add_then_layer_norm(shape: tuple[int, ...], eps: float) -> None:
    gen = torch.Generator().manual_seed(14)
    C = shape[-1]
    fused = FusedAddLayerNorm(C, eps)
    fused.weight.copy_(torch.randn(C, generator=gen))
    fused.bias.copy_(torch.randn(C, generator=gen))
    ref = nn.LayerNorm(C, eps=eps)
    ref.weight.copy_(fused.weight)
    ref.bias.copy_(fused.bias)
    x = torch.randn(shape, generator=gen) * 3
    residual = torch.randn(shape, generator=gen) + 1

    out = fused(x, residual)
    assert isinstance(out, tuple) and len(out) == 2
    normed, residual_sum = out
    assert torch.equal(residual_sum, x + residual)
    assert max_diff(normed, ref(x + residual)) < 1e-6
    # The order matters: normed is the LayerNorm output, not the sum.
    assert max_diff(normed, residual_sum) > 0.1
    assert fused.eps == eps
    assert dict(fused.named_parameters()).keys() == {"weight", "bias"}


@pytest.mark.parametrize("n_layer", [1, 3])
@pytest.mark.parametrize("cls", [GPT2, GPT2ForSequenceClassification])
def test_every_layer_norm_is_fused(cls: type[nn.Module], n_layer: int) -> None:
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=12, n_layer=n_layer, n_head=3)
    model = cls(config)
    fused = [m for m in model.modules() if isinstance(m, FusedAddLayerNorm)]
    assert len(fused) == 2 * n_layer + 1
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    names = {n for n, m in model.named_modules() if isinstance(m, FusedAddLayerNorm)}
    expected = {f"transformer.h.{i}.ln_{j}" for i in range(n_layer) for j in (1, 2)} | {"transformer.ln_f"}
    assert names == expected


def test_lm_head_is_tied() -> None:
    model = GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=12, n_layer=1, n_head=3))
    assert model.lm_head.weight is model.transformer.wte.weight


# --------------------------------------------------------------------------------------------
# GPT2Config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_embd", "n_head"), [(30, 4), (32, 3), (40, 6)])
def test_config_rejects_n_embd_not_divisible_by_n_head(n_embd: int, n_head: int) -> None:
    with pytest.raises(ValueError, match=rf"n_embd \({n_embd}\).*divisible.*n_head \({n_head}\)"):
        GPT2Config(n_embd=n_embd, n_head=n_head)


def test_config_rejects_unknown_activation() -> None:
    with pytest.raises(ValueError, match="'swishy_gelu'"):
        GPT2Config(activation_function="swishy_gelu")


@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu", "silu", "gelu_pytorch_tanh", "gelu_fast"])
def test_config_accepts_known_activations(act: str) -> None:
    assert GPT2Config(activation_function=act).activation_function == act


def test_config_labels() -> None:
    config = GPT2Config(id2label={"0": "a", "1": "b", "2": "c"})
    assert config.id2label == {0: "a", 1: "b", 2: "c"}
    assert config.num_labels == 3
    assert GPT2Config().num_labels == 2
    d = config.to_dict()
    assert d["id2label"] == {"0": "a", "1": "b", "2": "c"}
    assert d["label2id"] == {"a": 0, "b": 1, "c": 2}
    assert d["model_type"] == "gpt2"
    assert GPT2Config.from_dict(d) == config


def test_config_from_dict_ignores_unknown_keys_and_nulls() -> None:
    raw = {"n_embd": 48, "n_head": 3, "resid_pdrop": 0.1, "n_inner": None, "bos_token_id": None}
    config = GPT2Config.from_dict(raw)
    assert (config.n_embd, config.n_head, config.n_inner, config.bos_token_id) == (48, 3, None, 50256)


def test_config_head_dim_and_inner_dim() -> None:
    assert GPT2Config(n_embd=48, n_head=3).head_dim == 16
    assert GPT2Config(n_embd=48).inner_dim == 192
    assert GPT2Config(n_embd=48, n_inner=20).inner_dim == 20
