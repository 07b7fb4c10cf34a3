"""GPT-2 in one file: config, fused residual-add + LayerNorm, attention, MLP, blocks, heads.

Inference only. Parameter names follow Hugging Face's GPT-2 (`transformer.wte`,
`transformer.h.{i}.ln_1`, `attn.c_attn`, `mlp.c_fc`, `transformer.ln_f`, `lm_head`, `score`)
so that loading a checkpoint is a checked name-for-name mapping (see `model/checkpoint.py`).

Every LayerNorm is a `FusedAddLayerNorm`: it takes the sublayer output and the running residual
stream, adds them and normalises the sum in one call. That is the unit ONNX export turns into a
single `com.microsoft.SkipLayerNormalization` node (2 * n_layer + 1 of them):
    ln_1 of block 0  fuses  wte(ids) + wpe(pos)
    ln_2 of block i  fuses  attn_i(...) + residual
    ln_1 of block i  fuses  mlp_{i-1}(...) + residual      (i > 0)
    ln_f             fuses  mlp_last(...) + residual
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]

# HF `activation_function` names -> torch. GPT-2's "gelu_new" is the tanh approximation.
_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
# The ONNX Runtime contrib op that computes `activation(x + bias)` in one node, where one exists:
# FastGelu is the tanh approximation, BiasGelu the exact erf form.
_ONNX_GELU = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu_fast": "FastGelu", "gelu": "BiasGelu"}


@dataclass
class GPT2Config:
    """The subset of Hugging Face's `GPT2Config` that changes the forward pass."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int | None = None
    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)
    architectures: list[str] = field(default_factory=lambda: ["GPT2LMHeadModel"])

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"expected one of {sorted(_ACTIVATIONS)}"
            )
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if self.id2label:
            self.num_labels = len(self.id2label)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Build from a HF `config.json` dict; keys we do not use are ignored."""
        defaults = {f.name: f.default for f in fields(cls)}
        # A null in config.json means "unset": keep it only where our default is also None.
        kwargs = {k: v for k, v in d.items() if k in defaults and (v is not None or defaults[k] is None)}
        if "num_labels" not in d and d.get("id2label"):
            kwargs["num_labels"] = len(d["id2label"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A HF-compatible `config.json` dict (loadable by `transformers.GPT2Config`)."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["model_type"] = "gpt2"
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["label2id"] = {v: k for k, v in self.id2label.items()}
        if not self.id2label:
            del d["id2label"], d["label2id"]
        return d


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V); (B, V) with last_only=True; (B, K, V) with logits_index
    past_key_values: KVCache


@dataclass
class Selection:
    """What the generation graph returns besides the cache: the next-token choice and the
    log-probabilities, computed where the logits are, so only these cross to the host.
    K = the positions kept (`logits_index`), N = `top_n`."""

    logits: torch.Tensor  # (B, V) raw logits at each row's last kept position (for host-side sampling)
    token_logprobs: torch.Tensor  # (B, K) log p(target_ids[b, k]) at each kept position
    top_ids: torch.Tensor  # (B, K, N) int64, the N most likely tokens, best first (ties: lower id first)
    top_logprobs: torch.Tensor  # (B, K, N) their log-probabilities


def select_tokens(logits: torch.Tensor, target_ids: torch.Tensor, temperature: torch.Tensor,
                  top_n: torch.Tensor | int) -> Selection:
    """Log-softmax, the gather of `target_ids` and the top `top_n` of `logits` (B, K, V).

    The last kept position of each row is the next-token distribution: it is divided by the row's
    `temperature` (B,) first (1 = unchanged), so its log-probabilities are those sampling draws
    from. The positions before it score a prompt: raw. The top-N are taken on the (scaled) logits
    themselves rather than on the log-probabilities, so the first is exactly the argmax (a
    subtraction can round two neighbouring logits into a tie). `top_n` is a 0-d int64 tensor in
    the graph (a graph input: the caller picks N per call) or an int."""
    if isinstance(top_n, torch.Tensor):
        n = top_n.item()
        torch._check(n >= 1)
        torch._check(n <= logits.shape[-1])
    else:
        n = top_n
    last = logits[:, -1:, :] / temperature[:, None, None]  # (B, 1, V)
    z = torch.cat([logits[:, :-1, :], last], dim=1)  # (B, K, V)
    # log-sum-exp written out with the max subtracted. Against float64 on the demo LM's prompts,
    # ONNX Runtime's ReduceLogSumExp was off by up to 8e-4 (and took 56 ms for 32 x 50,257), its
    # ReduceSum of the exponentials by 4e-5; a product with a ones vector (MatMul accumulates in
    # blocks) by 2e-6. In eager PyTorch the opposite holds (its matrix-vector product: 1e-4, its
    # pairwise sum: 1e-6), so each side takes its accurate sum.
    peak = z.max(dim=-1, keepdim=True).values  # (B, K, 1)
    e = torch.exp(z - peak)
    if torch.onnx.is_in_onnx_export():
        total = e @ torch.ones(z.shape[-1], 1, dtype=z.dtype, device=z.device)
    else:
        total = e.sum(dim=-1, keepdim=True)
    lse = peak + torch.log(total)  # (B, K, 1)
    top_vals, top_ids = torch.topk(z, n, dim=-1)  # (B, K, N) each
    picked = torch.gather(z, 2, target_ids.unsqueeze(-1))  # (B, K, 1)
    return Selection(logits[:, -1, :], (picked - lse).squeeze(-1), top_ids, top_vals - lse)


@dataclass
class SequenceClassifierOutput:
    logits: torch.Tensor  # (B, num_labels)


def _skip_layer_norm_onnx(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Emit one ONNX Runtime contrib node; only reached while `torch.onnx.export` traces."""
    normed, _mean, _inv_std, residual_sum = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::SkipLayerNormalization",
        (x, residual, weight, bias),
        attrs={"epsilon": float(eps)},
        dtypes=(x.dtype, torch.float32, torch.float32, x.dtype),
        shapes=(x.shape, x.shape[:-1] + (1,), x.shape[:-1] + (1,), x.shape),
        version=1,
    )
    return normed, residual_sum


class FusedAddLayerNorm(nn.Module):
    """`residual_sum = x + residual; normed = LayerNorm(residual_sum)`, as one operation.

    Holds the parameters of the HF LayerNorm it replaces (`weight`, `bias`), so checkpoints map
    unchanged. During ONNX export it becomes one SkipLayerNormalization node whose output 3 is
    the residual sum; in eager mode it is the plain composite.
    """

    def __init__(self, n_embd: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.eps = eps
        self.onnx_fused = True  # False exports the plain Add + LayerNormalization (for comparison)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.onnx_fused and torch.onnx.is_in_onnx_export():
            return _skip_layer_norm_onnx(x, residual, self.weight, self.bias, self.eps)
        residual_sum = x + residual  # (B, T, C)
        normed = F.layer_norm(residual_sum, (residual_sum.shape[-1],), self.weight, self.bias, self.eps)
        return normed, residual_sum


@dataclass
class KVSlots:
    """Attention over fixed-size KV buffers shared between past and present, the way ONNX
    Runtime's `GroupQueryAttention` contrib op runs it: `past_key_values` are (B, nh, M, hd)
    buffers, each row holds its tokens at cache indices 0.. with no padding, and the new tokens
    are written in place. A decode step then copies nothing, and rows of different lengths share
    a batch without left padding (positions are plain cache indices).

    Rows of one call are either first prompts (right-padded, past length 0) or continue their
    cache at index `seqlens_k + 1 - T` (decode steps, T = 1, and prompt chunks, batch 1): the
    two cases ONNX Runtime's CPU kernel accepts.
    """

    seqlens_k: torch.Tensor  # (B,) int32: cache index of each row's last real token after this call
    total_sequence_length: torch.Tensor  # () int32: max over rows of seqlens_k + 1

    def last_index(self, n_new: int) -> torch.Tensor:
        """(B,) index, within this call's `n_new` tokens, of each row's last real token."""
        seqlens = self.seqlens_k.long()
        return seqlens - (seqlens + 1 - n_new).clamp(min=0)


def _gqa_onnx(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor],
              slots: KVSlots, n_head: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Emit one ONNX Runtime GroupQueryAttention node (kv heads = heads: plain multi-head
    attention); only reached while `torch.onnx.export` traces."""
    out, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        (q, k, v, past[0], past[1], slots.seqlens_k, slots.total_sequence_length),
        attrs={"num_heads": n_head, "kv_num_heads": n_head, "scale": float(scale)},
        dtypes=(q.dtype, past[0].dtype, past[1].dtype),
        shapes=(q.shape, past[0].shape, past[1].shape),
        version=1,
    )
    return out, present_k, present_v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        attn_bias: torch.Tensor | None,  # (B, 1, T, P+T) additive: 0 where visible, dtype-min where not
        past: tuple[torch.Tensor, torch.Tensor] | None,
        slots: KVSlots | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        if slots is not None:
            return self._slot_attention(q, k, v, past, slots)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, P+T, hd)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y), (k, v)

    def _slot_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        past: tuple[torch.Tensor, torch.Tensor], slots: KVSlots,
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """q, k, v (B, T, C); past: (B, nh, M, hd) buffers (see `KVSlots`)."""
        if torch.onnx.is_in_onnx_export():
            y, pk, pv = _gqa_onnx(q, k, v, past, slots, self.n_head, self.scale)
            return self.c_proj(y), (pk, pv)
        B, T, C = q.shape
        M = past[0].shape[2]
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        last = slots.seqlens_k.long()  # (B,)
        start = (last + 1 - T).clamp(min=0)  # a right-padded first prompt starts at 0
        idx = start[:, None] + torch.arange(T, device=q.device)  # (B, T) cache index of each new token
        write = idx[:, None, :, None].expand(B, self.n_head, T, self.head_dim).clamp(max=M - 1)
        kbuf = past[0].scatter(2, write, k)  # (B, nh, M, hd)
        vbuf = past[1].scatter(2, write, v)
        key = torch.arange(M, device=q.device)
        visible = (key[None, None, :] <= idx[:, :, None]) & (key[None, None, :] <= last[:, None, None])  # (B, T, M)
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~visible, torch.finfo(q.dtype).min).unsqueeze(1)  # (B, 1, T, M)
        y = F.scaled_dot_product_attention(q, kbuf, vbuf, attn_mask=bias, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), (kbuf, vbuf)


def _bias_gelu_onnx(x: torch.Tensor, bias: torch.Tensor, op: str) -> torch.Tensor:
    """`gelu(x + bias)` as one ONNX Runtime contrib node; only reached while export traces."""
    return torch.onnx.ops.symbolic(f"com.microsoft::{op}", (x, bias), dtype=x.dtype, shape=x.shape, version=1)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.act = _ACTIVATIONS[config.activation_function]
        self.onnx_gelu = _ONNX_GELU.get(config.activation_function)
        self.onnx_fused = True  # False exports the decomposed activation (for comparison)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx_fused and self.onnx_gelu and torch.onnx.is_in_onnx_export():
            # The c_fc bias moves into the fused GELU node: MatMul -> FastGelu/BiasGelu(h, bias).
            h = _bias_gelu_onnx(F.linear(x, self.c_fc.weight), self.c_fc.bias, self.onnx_gelu)  # (B, T, 4C)
        else:
            h = self.act(self.c_fc(x))  # (B, T, 4C)
        return self.c_proj(h)


class Block(nn.Module):
    """One transformer block. Takes the previous sublayer's output and the residual stream
    separately, because the add happens inside `ln_1` (fused); returns the MLP output and the
    residual stream for the next fused norm."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = FusedAddLayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = FusedAddLayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        attn_bias: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        slots: KVSlots | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, residual = self.ln_1(x, residual)
        a, present = self.attn(h, attn_bias, past, slots)
        h, residual = self.ln_2(a, residual)
        return self.mlp(h), residual, present


class GPT2Model(nn.Module):
    """The transformer trunk (HF's `transformer.` prefix): embeddings, blocks, final norm."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = FusedAddLayerNorm(config.n_embd, config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, P+T), 1 = real token, 0 = padding
        position_ids: torch.Tensor | None = None,  # (B, T)
        past_key_values: KVCache | None = None,
        slots: KVSlots | None = None,  # past_key_values are fixed-size buffers; attention_mask is unused
    ) -> tuple[torch.Tensor, KVCache]:
        B, T = input_ids.shape
        if slots is not None:
            if past_key_values is None or position_ids is None:
                raise ValueError("slot attention needs the KV buffers and position_ids")
            x, residual = self.wte(input_ids), self.wpe(position_ids)  # (B, T, C) each
            presents = []
            for block, past in zip(self.h, past_key_values, strict=True):
                x, residual, present = block(x, residual, None, past, slots)
                presents.append(present)
            hidden, _ = self.ln_f(x, residual)
            return hidden, tuple(presents)
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            # As HF: positions count real tokens only, so left padding does not shift them.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]  # (B, T)

        dtype = self.wte.weight.dtype
        # Query i sits at absolute position P+i and may see key j <= P+i that is not padding.
        q_pos = torch.arange(T, device=input_ids.device).unsqueeze(1) + P  # (T, 1)
        k_pos = torch.arange(P + T, device=input_ids.device).unsqueeze(0)  # (1, P+T)
        visible = (k_pos <= q_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (B, T, P+T)
        # A large negative number, not -inf: a fully padded query row stays finite (and unused).
        attn_bias = torch.zeros(visible.shape, dtype=dtype, device=input_ids.device)
        attn_bias = attn_bias.masked_fill(~visible, torch.finfo(dtype).min).unsqueeze(1)  # (B, 1, T, P+T)

        x, residual = self.wte(input_ids), self.wpe(position_ids)  # (B, T, C) each
        presents = []
        for i, block in enumerate(self.h):
            x, residual, present = block(x, residual, attn_bias, past_key_values[i] if past_key_values else None)
            presents.append(present)
        hidden, _ = self.ln_f(x, residual)  # (B, T, C)
        return hidden, tuple(presents)


class GPT2(nn.Module):
    """GPT-2 with the language-model head (`GPT2LMHeadModel`); `lm_head` is tied to `wte`."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        last_only: bool = False,
        slots: KVSlots | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """`logits_index` (B, K) int64: flat indices into this call's B * T token positions
        (b * T + t) whose logits to compute, K per row (the generation graph's way to keep the
        last position, or every position of a prompt being scored, without a Shape-derived
        index: a host-computed input keeps the graph capturable as a CUDA graph)."""
        hidden, presents = self.transformer(input_ids, attention_mask, position_ids, past_key_values, slots)
        if logits_index is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[logits_index]  # (B*T, C) -> (B, K, C)
        elif last_only:
            # Generation needs the next-token distribution only: (B, V), never (B, T, V).
            if slots is None:
                hidden = hidden[:, -1, :]
            else:  # right-padded rows end at different indices
                hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), slots.last_index(hidden.shape[1])]
        return CausalLMOutput(logits=self.lm_head(hidden), past_key_values=presents)


class GPT2ForSequenceClassification(nn.Module):
    """GPT-2 with a linear `score` head read at the last real token of each row."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        B, T = input_ids.shape
        hidden, _ = self.transformer(input_ids, attention_mask, position_ids)  # (B, T, C)
        positions = torch.arange(T, device=input_ids.device)
        if attention_mask is not None:
            real = attention_mask.bool()
        elif self.config.pad_token_id is not None:
            # HF's rule when no mask is given: the rightmost token that is not the pad id.
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        last = (positions * real.long()).argmax(-1)  # (B,) rightmost real token (0 if none)
        pooled = hidden[torch.arange(B, device=input_ids.device), last]  # (B, C)
        return SequenceClassifierOutput(logits=self.score(pooled))
