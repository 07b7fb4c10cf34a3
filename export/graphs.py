"""Trace our PyTorch GPT-2 into the ONNX graphs the service runs (DESIGN §7).

Generation graph: one graph for prefill (past length 0) and decode (one new token)
    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             the selection inputs (below), past_key_values.{i}.key / .value (B, n_head, P, head_dim)
    outputs  logits (B, V) at each row's last kept position, the selection outputs (below),
             present.{i}.key / .value (B, n_head, P+T, head_dim)
Selection (`model.gpt2.select_tokens`: log-softmax, gather and top-N where the logits are):
    inputs   logits_index (B, K) int64: flat indices (b * T + t) of the positions whose logits
             are computed (K = 1: each row's last token; K = T: every position, to score a prompt)
             target_ids (B, K) int64: the token whose log-probability is gathered at each
             temperature (B,) float32: divides the last kept position's logits (1 = unchanged)
             top_n (1,) int64: how many alternatives per position (>= 1; the first is the argmax);
             TopK's k itself (`_top_n_straight_into_topk`)
    outputs  token_logprobs (B, K), top_ids (B, K, N) int64, top_logprobs (B, K, N)
Classification graph: input_ids, attention_mask -> logits (B, num_labels).
Embedding graph: input_ids, attention_mask -> last_hidden_state (B, T, n_embd), the trunk's final
hidden states (after `ln_f`), which `app.engine.pooling` pools into one vector per row.

The fused residual-add + LayerNorm and the bias+GELU of the model emit their ONNX Runtime
contrib nodes themselves while `torch.onnx.export` traces (see `model/gpt2.py`), so what comes
out is already fused; `export.fusion` counts and checks it.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir
import torch
from torch import nn
from torch.export import Dim

from export.manifest import DEFAULT_OPSET
from model.gpt2 import GPT2, GPT2ForSequenceClassification, KVSlots, select_tokens

logger = logging.getLogger(__name__)

# Friendly names for the symbolic dims the exporter invents.
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
CACHE, KEEP, TOP_N = "max_cache_length", "kept_positions", "top_n"
SELECT_INPUTS = ["logits_index", "target_ids", "temperature", "top_n"]
SELECT_OUTPUTS = ["logits", "token_logprobs", "top_ids", "top_logprobs"]


def kv_input_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def kv_output_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class _GenerationGraph(nn.Module):
    """Flat tensors in, flat tensors out: the signature the ONNX graph has."""

    def __init__(self, model: GPT2) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, logits_index, target_ids, temperature, top_n,  # noqa: ANN001
                past):  # noqa: ANN001
        out = self.model(input_ids, attention_mask, position_ids, past, logits_index=logits_index)
        return (*_selection(out.logits, target_ids, temperature, top_n), *(t for kv in out.past_key_values for t in kv))


def _selection(logits, target_ids, temperature, top_n) -> tuple:  # noqa: ANN001
    sel = select_tokens(logits, target_ids, temperature, top_n)
    return sel.logits, sel.token_logprobs, sel.top_ids, sel.top_logprobs


class _SlotGenerationGraph(nn.Module):
    """The `attention="gqa"` signature: KV buffers shared between past and present (see
    `model.gpt2.KVSlots`); no attention mask, each row's length is `seqlens_k + 1`."""

    def __init__(self, model: GPT2) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, seqlens_k, total_sequence_length, logits_index, target_ids,  # noqa: ANN001
                temperature, top_n, past):  # noqa: ANN001
        out = self.model(input_ids, None, position_ids, past, slots=KVSlots(seqlens_k, total_sequence_length),
                         logits_index=logits_index)
        return (*_selection(out.logits, target_ids, temperature, top_n), *(t for kv in out.past_key_values for t in kv))


class _ClassificationGraph(nn.Module):
    def __init__(self, model: GPT2ForSequenceClassification) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):  # noqa: ANN001
        return self.model(input_ids, attention_mask).logits


class _EmbeddingGraph(nn.Module):
    """The trunk alone (HF's `GPT2Model`): every position's hidden state after the final LayerNorm."""

    def __init__(self, model: GPT2) -> None:
        super().__init__()
        self.transformer = model.transformer

    def forward(self, input_ids, attention_mask):  # noqa: ANN001
        hidden, _ = self.transformer(input_ids, attention_mask)
        return hidden


def _set_dims(model: onnx_ir.Model, dims: dict[str, list[str | int]]) -> None:
    """Name the dynamic dims of the graph's inputs and outputs (the exporter's are like `s53`)."""
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.name not in dims or value.shape is None:
            continue
        want = dims[value.name]
        if len(want) != len(value.shape):
            raise ValueError(f"{value.name}: {len(want)} dim names for a rank-{len(value.shape)} value")
        value.shape = onnx_ir.Shape([onnx_ir.SymbolicDim(w) if isinstance(w, str) else d
                                     for d, w in zip(value.shape.dims, want, strict=True)])


def _top_n_straight_into_topk(model: onnx_ir.Model) -> None:
    """Make `top_n` a (1,) input that TopK reads as its k directly.

    TopK's k is a host input of ONNX Runtime's CUDA kernel. The exporter traces `topk(z, n)` with
    a 0-d `top_n` through one-element reshapes (`Reshape -> TopK`, or `Reshape -> Gather ->
    Reshape -> TopK`), and ONNX Runtime places such small int64 nodes that feed a host input on
    the CPU EP: CPU nodes, a Memcpy, and the CUDA EP then refuses to capture the decode step as a
    CUDA graph (seen on an H200, 2026-12-04). With the input shaped (1,) and wired straight into
    TopK, those nodes go and every node stays on the CUDA EP.
    """
    graph = model.graph
    top_n = next((v for v in graph.inputs if v.name == TOP_N), None)
    if top_n is None:
        return
    passthrough = {"Reshape", "Gather", "Squeeze", "Unsqueeze", "Identity"}  # one element in, one out
    chain: list[onnx_ir.Node] = []
    for node in list(graph):
        if node.op_type != "TopK":
            continue
        k, links = node.inputs[1], []
        while k is not None and k is not top_n and (link := k.producer()) is not None \
                and link.op_type in passthrough:
            links.append(link)
            k = link.inputs[0]
        if k is not top_n:
            raise RuntimeError(f"TopK {node.name!r}: k does not come from the {TOP_N} input")
        node.replace_input_with(1, top_n)
        chain += links
    for node in chain:  # the k chain, from TopK upwards: each is dead once the one below it is gone
        if all(not out.uses() for out in node.outputs) and node.graph is graph:
            graph.remove(node, safe=True)
    left = [n.op_type for n, _ in top_n.uses() if n.op_type != "TopK"]
    if left:
        raise RuntimeError(f"{TOP_N} still feeds {left} besides TopK")
    top_n.shape = onnx_ir.Shape([1])


def _save(program: torch.onnx.ONNXProgram, model: nn.Module, path: Path, dims: dict[str, list]) -> None:
    """Write the traced graph with its weights in `<path>.data` (external data), always.

    The exporter's in-memory model refers to the torch parameters; saving it this way streams
    them to the file one tensor at a time. Building the whole `ModelProto` first (what
    `program.model_proto` does) would hold a second copy of the weights, and protobuf cannot
    serialize a message past 2 GB at all (GPT-2 large and XL). `export.storage` decides later
    whether the final export keeps the data file or inlines a small model's weights.
    """
    _set_dims(program.model, dims)
    _top_n_straight_into_topk(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)
    _release_rewriter_state()


def _release_rewriter_state() -> None:
    """Drop what onnxscript's module-level rewrite rules remember of the last graph they matched.

    Each rule's `SimplePatternMatcher` keeps `_graph`, `_current_node` and its last `_match`
    after the exporter's optimizer ran; through them the exporter's in-memory model, and through its initializers
    every torch parameter, stays alive after the export returns. Freeing the model then frees
    nothing (GPT-2 large kept 3.1 GB resident while ONNX Runtime loaded its own copy). Each
    match sets these fields again before using them, so clearing them is safe.
    """
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # pragma: no cover - another onnxscript layout: nothing known to clear
        return
    cleared = 0
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            obj._graph = None
            obj._current_node = None
            if hasattr(obj, "_match"):
                obj._match = type(obj._match)()
            cleared += 1
    logger.debug("cleared the graph held by %d onnxscript pattern matchers", cleared)


def _select_example(cfg, rows: int, width: int, dev: torch.device, batch: Dim) -> tuple[tuple, dict]:  # noqa: ANN001
    """Example selection inputs (K = 2 kept positions, N = 3) and their dynamic shapes. K and N
    must not be 0 or 1 in the trace (torch.export would specialise them)."""
    K = 2
    logits_index = (torch.arange(rows, device=dev)[:, None] * width + torch.arange(width - K, width, device=dev))
    target_ids = torch.zeros(rows, K, dtype=torch.long, device=dev)
    temperature = torch.ones(rows, device=dev)
    top_n = torch.tensor(3, dtype=torch.long, device=dev)
    keep = Dim(KEEP, max=cfg.n_positions)
    shapes = {"logits_index": {0: batch, 1: keep}, "target_ids": {0: batch, 1: keep}, "temperature": {0: batch},
              "top_n": None}
    return (logits_index, target_ids, temperature, top_n), shapes


def _select_dims(cfg) -> dict[str, list]:  # noqa: ANN001
    return {"logits_index": [BATCH, KEEP], "target_ids": [BATCH, KEEP], "temperature": [BATCH],
            "logits": [BATCH, cfg.vocab_size], "token_logprobs": [BATCH, KEEP], "top_ids": [BATCH, KEEP, TOP_N],
            "top_logprobs": [BATCH, KEEP, TOP_N]}


@contextmanager
def _fusion(model: nn.Module, fused: bool) -> Iterator[None]:
    """Switch the model's contrib-op emission (SkipLayerNormalization, FastGelu) for one trace."""
    flagged = [m for m in model.modules() if hasattr(m, "onnx_fused")]
    before = [m.onnx_fused for m in flagged]
    for m in flagged:
        m.onnx_fused = fused
    try:
        yield
    finally:
        for m, b in zip(flagged, before, strict=True):
            m.onnx_fused = b


def _export(module: nn.Module, args: tuple, fused: bool = True, **kwargs) -> torch.onnx.ONNXProgram:
    with warnings.catch_warnings():
        # The exporter warns that the axis names we give are merged into shared constraints,
        # and about torchvision ops it cannot register; neither concerns this graph.
        warnings.simplefilter("ignore")
        with _fusion(module, fused):
            program = torch.onnx.export(module, args, dynamo=True, verbose=False, **kwargs)
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    return program


@torch.no_grad()
def export_generation(model: GPT2, path: str | Path, opset: int = DEFAULT_OPSET, fused: bool = True,
                      attention: str = "standard") -> None:
    """Export the KV-cache generation graph of `model` (fp32) to `path`.

    `fused=False` keeps plain Add + LayerNormalization and the decomposed GELU: the baseline
    the benchmarks compare the fused graph against. `attention="gqa"` exports the shared-buffer
    signature instead (one GroupQueryAttention node per layer; see `export_generation_gqa`).
    """
    if attention == "gqa":
        return export_generation_gqa(model, path, opset, fused)
    if attention != "standard":
        raise ValueError(f"attention must be 'standard' or 'gqa', not {attention!r}")
    cfg = model.config
    model = model.eval().float()
    # torch.export specialises dims that are 0 or 1 in the example, so trace with B, T, P >= 2;
    # the graph is checked at P = 0 and T = 1 by `export.verify`.
    B, T, P = 2, 3, 4
    dev = next(model.parameters()).device
    input_ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    attention_mask = torch.ones(B, P + T, dtype=torch.long, device=dev)
    position_ids = torch.arange(P, P + T, device=dev).expand(B, T).contiguous()
    kv_shape = (B, cfg.n_head, P, cfg.head_dim)
    past = tuple((torch.zeros(kv_shape, device=dev), torch.zeros(kv_shape, device=dev)) for _ in range(cfg.n_layer))
    batch, seq, plen = Dim(BATCH), Dim(SEQ, max=cfg.n_positions), Dim(PAST, max=cfg.n_positions)
    select, select_shapes = _select_example(cfg, B, T, dev, batch)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},  # P + T: the exporter derives it from the graph
        "position_ids": {0: batch, 1: seq},
        **select_shapes,
        "past": tuple(({0: batch, 2: plen}, {0: batch, 2: plen}) for _ in range(cfg.n_layer)),
    }
    inputs = ["input_ids", "attention_mask", "position_ids", *SELECT_INPUTS, *kv_input_names(cfg.n_layer)]
    outputs = [*SELECT_OUTPUTS, *kv_output_names(cfg.n_layer)]
    logger.info("tracing the generation graph (%d layers)", cfg.n_layer)
    program = _export(
        _GenerationGraph(model), (input_ids, attention_mask, position_ids, *select, past),
        input_names=inputs, output_names=outputs, dynamic_shapes=dynamic_shapes, opset_version=opset, fused=fused,
    )
    kv_in = [BATCH, cfg.n_head, PAST, cfg.head_dim]
    kv_out = [BATCH, cfg.n_head, TOTAL, cfg.head_dim]
    dims = {"input_ids": [BATCH, SEQ], "attention_mask": [BATCH, TOTAL], "position_ids": [BATCH, SEQ],
            **_select_dims(cfg)}
    dims |= {n: kv_in for n in kv_input_names(cfg.n_layer)} | {n: kv_out for n in kv_output_names(cfg.n_layer)}
    _save(program, model, Path(path), dims)


@torch.no_grad()
def export_generation_gqa(model: GPT2, path: str | Path, opset: int = DEFAULT_OPSET, fused: bool = True) -> None:
    """The generation graph with ONNX Runtime's GroupQueryAttention and shared KV buffers:
        inputs   input_ids (B, T), position_ids (B, T) int64, seqlens_k (B,) int32,
                 total_sequence_length () int32, past_key_values.{i}.key / .value (B, n_head, M, head_dim)
        outputs  logits (B, V) at each row's last real token, present.{i}.key / .value (B, n_head, M, head_dim)
    Bind each present to the same buffer as its past and a decode step writes one column in place.
    """
    cfg = model.config
    model = model.eval().float()
    B, T, M = 2, 3, 8
    dev = next(model.parameters()).device
    input_ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    position_ids = torch.arange(2, 2 + T, device=dev).expand(B, T).contiguous()
    seqlens_k = torch.full((B,), 2 + T - 1, dtype=torch.int32, device=dev)
    total = torch.tensor(2 + T, dtype=torch.int32, device=dev)
    kv_shape = (B, cfg.n_head, M, cfg.head_dim)
    past = tuple((torch.zeros(kv_shape, device=dev), torch.zeros(kv_shape, device=dev)) for _ in range(cfg.n_layer))
    batch, seq, cache = Dim(BATCH), Dim(SEQ, max=cfg.n_positions), Dim(CACHE, max=cfg.n_positions)
    select, select_shapes = _select_example(cfg, B, T, dev, batch)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "seqlens_k": {0: batch},
        "total_sequence_length": None,
        **select_shapes,
        "past": tuple(({0: batch, 2: cache}, {0: batch, 2: cache}) for _ in range(cfg.n_layer)),
    }
    inputs = ["input_ids", "position_ids", "seqlens_k", "total_sequence_length", *SELECT_INPUTS,
              *kv_input_names(cfg.n_layer)]
    outputs = [*SELECT_OUTPUTS, *kv_output_names(cfg.n_layer)]
    logger.info("tracing the GQA generation graph (%d layers)", cfg.n_layer)
    program = _export(
        _SlotGenerationGraph(model), (input_ids, position_ids, seqlens_k, total, *select, past),
        input_names=inputs, output_names=outputs, dynamic_shapes=dynamic_shapes, opset_version=opset, fused=fused,
    )
    kv = [BATCH, cfg.n_head, CACHE, cfg.head_dim]
    dims = {"input_ids": [BATCH, SEQ], "position_ids": [BATCH, SEQ], "seqlens_k": [BATCH], **_select_dims(cfg)}
    dims |= {n: kv for n in kv_input_names(cfg.n_layer) + kv_output_names(cfg.n_layer)}
    _save(program, model, Path(path), dims)


def _export_padded(model: nn.Module, graph: type[nn.Module], path: str | Path, output: str,
                   output_dims: list[str | int], what: str, opset: int) -> None:
    """Export a graph of a padded batch, `input_ids` and `attention_mask` (B, T) -> `output`:
    `graph(model)` wraps `model` (fp32), traced on a 2 x 5 example with both dims dynamic."""
    cfg = model.config
    model = model.eval().float()
    B, T = 2, 5
    dev = next(model.parameters()).device
    input_ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    attention_mask = torch.ones(B, T, dtype=torch.long, device=dev)
    batch, seq = Dim(BATCH), Dim(SEQ, max=cfg.n_positions)
    logger.info("tracing the %s graph (%d layers)", what, cfg.n_layer)
    program = _export(
        graph(model), (input_ids, attention_mask),
        input_names=["input_ids", "attention_mask"], output_names=[output],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}, opset_version=opset,
    )
    dims = {"input_ids": [BATCH, SEQ], "attention_mask": [BATCH, SEQ], output: output_dims}
    _save(program, model, Path(path), dims)


@torch.no_grad()
def export_classification(model: GPT2ForSequenceClassification, path: str | Path, opset: int = DEFAULT_OPSET) -> None:
    """Export the sequence-classification graph of `model` (fp32) to `path`."""
    _export_padded(model, _ClassificationGraph, path, "logits", [BATCH, model.config.num_labels], "classification",
                   opset)


@torch.no_grad()
def export_embedding(model: GPT2, path: str | Path, opset: int = DEFAULT_OPSET) -> None:
    """Export the embedding graph of a language model `model` (fp32) to `path`: `input_ids`,
    `attention_mask` -> `last_hidden_state` (B, T, n_embd). Position ids come from the mask (as the
    classifier's), so left padding does not shift them."""
    _export_padded(model, _EmbeddingGraph, path, "last_hidden_state", [BATCH, SEQ, model.config.n_embd], "embedding",
                   opset)
