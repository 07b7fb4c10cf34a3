"""Block-quantized weights for CPU: ONNX Runtime's `MatMulNBits` and `GatherBlockQuantized`.

Every MatMul with a constant 2-D weight B (K, N), the tied LM head included, becomes one
`com.microsoft.MatMulNBits` node: each column of B is cut into blocks of `block_size` weights
along K, each block stored as `bits`-bit integers with one fp32 scale (and, when asymmetric,
one zero point), the layout llama.cpp's q8_0 / q4_0 use. `accuracy_level=4` lets ONNX
Runtime's CPU kernel quantize the activations per block too and multiply in int8 (VNNI where
the CPU has it). The token embedding, tied to the LM head, becomes a `GatherBlockQuantized`
over the same kind of blocks (a row of `wte` is a column of the head's B), so the 38.6M
embedding parameters of GPT-2 are stored at `bits` too. The position embedding, LayerNorms,
biases and attention stay fp32.

The "dynamic" scheme (int8 only) makes each such MatMul a `com.microsoft.DynamicQuantizeMatMul`
instead: int8 weights with one scale per output column, the activations quantized to uint8 at
each call, MLAS's integer GEMM (`export.kernels` chooses between the schemes per CPU). The token
embedding is the same `GatherBlockQuantized` in both.

The weights are packed with ONNX Runtime's own kernels (`quantize_matmul_8bits` /
`quantize_matmul_4bits`, what its `MatMulNBitsQuantizer` calls), one tensor at a time: each
fp32 weight is read as a memory map of the trace's data file and the packed result is appended
to the export's data file (`export.storage`), so quantizing GPT-2 XL holds one weight matrix
in memory, not the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export import storage
from export.fusion import CONTRIB_DOMAIN, consumers, prune_dangling, selection_nodes, strip_initializer_value_info

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockConfig:
    """How a precision's weights are blocked; `export.kernels.CANDIDATES` lists the ones tried."""

    bits: int
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations and int8 dot products on CPU



def pack_blocks(b: np.ndarray, cfg: BlockConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize B (K, N) fp32 column-blockwise with ONNX Runtime's kernel.

    Returns (packed (N, k_blocks, block_size * bits / 8) uint8, scales (N, k_blocks) fp32,
    zero points (N, ceil(k_blocks * bits / 8)) uint8, or None when symmetric).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if b.ndim != 2:
        raise ValueError(f"block quantization needs a 2-D weight, got shape {b.shape}")
    k, n = b.shape
    k_blocks = -(-k // cfg.block_size)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if k_blocks * cfg.block_size != k:  # the kernel reads whole blocks: pad K with zeros
        b = np.pad(b, ((0, k_blocks * cfg.block_size - k), (0, 0)))
    packed = np.zeros((n, k_blocks, cfg.block_size * cfg.bits // 8), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, -(-k_blocks * cfg.bits // 8)), np.uint8)
    kernel = quantize_matmul_8bits if cfg.bits == 8 else quantize_matmul_4bits
    kernel(packed, b, scales, zero_points, cfg.block_size, n, k, cfg.symmetric)
    return packed, scales, None if cfg.symmetric else zero_points


def quantize_per_channel(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B (K, N) fp32 -> (int8 B, one fp32 scale per column N): symmetric, the largest |weight| of
    a column at 127, what `DynamicQuantizeMatMul` multiplies with (its activations quantized per
    call). An all-zero column gets scale 1."""
    if b.ndim != 2:
        raise ValueError(f"per-channel quantization needs a 2-D weight, got shape {b.shape}")
    scale = np.abs(b).max(axis=0).astype(np.float32) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(b / scale), -127, 127).astype(np.int8)
    return q, scale


def quantized_matmul(b: np.ndarray, cfg: BlockConfig, scheme: str, a: str, base: str, output: str,
                     name: str) -> tuple[onnx.NodeProto, list[tuple[str, np.ndarray]]]:
    """The node computing `output` = a @ B for B (K, N) fp32, quantized by `scheme` ("nbits":
    `MatMulNBits` over `cfg`'s blocks; "dynamic": `DynamicQuantizeMatMul` over per-column int8),
    and its weights as (initializer name, array) pairs named after `base`. What the export writes
    and what `export.kernels` times are built here."""
    k, n = b.shape
    if scheme == "dynamic":
        q, scale = quantize_per_channel(b)
        weights = [(f"{base}_Q8c", q), (f"{base}_col_scales", scale)]
        node = helper.make_node("DynamicQuantizeMatMul", [a, *(w for w, _ in weights)], [output],
                                name=name + "_dq", domain=CONTRIB_DOMAIN)
        return node, weights
    packed, scales, zp = pack_blocks(b, cfg)
    weights = [(f"{base}_Q{cfg.bits}", packed), (f"{base}_scales", scales)]
    if zp is not None:
        weights.append((f"{base}_zero_points", zp))
    kw = {"K": k, "N": n, "bits": cfg.bits, "block_size": cfg.block_size}
    if cfg.accuracy_level:
        kw["accuracy_level"] = cfg.accuracy_level
    node = helper.make_node("MatMulNBits", [a, *(w for w, _ in weights)], [output], name=name + "_nbits",
                            domain=CONTRIB_DOMAIN, **kw)
    return node, weights


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int,
                      cfg: BlockConfig) -> np.ndarray:
    """The fp32 B (K, N) that MatMulNBits computes with: the inverse of `pack_blocks` (tests)."""
    n, k_blocks, _ = packed.shape
    if cfg.bits == 8:
        q = packed.reshape(n, k_blocks, cfg.block_size).astype(np.float32)
    else:
        q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, k_blocks, cfg.block_size).astype(np.float32)
    if zero_points is None:
        z = np.full((n, k_blocks), 2.0 ** (cfg.bits - 1), np.float32)
    elif cfg.bits == 8:
        z = zero_points[:, :k_blocks].astype(np.float32)
    else:
        z = np.stack([zero_points & 0x0F, zero_points >> 4], -1).reshape(n, -1)[:, :k_blocks].astype(np.float32)
    w = (q - z[..., None]) * scales[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Quantizer:
    def __init__(self, model: onnx.ModelProto, src_dir: Path, writer: storage.DataWriter, cfg: BlockConfig,
                 scheme: str = "nbits") -> None:
        self.model, self.src_dir, self.w, self.cfg, self.scheme = model, src_dir, writer, cfg, scheme
        self.inits = {t.name: t for t in model.graph.initializer}
        self.new_inits: list[TensorProto] = []
        self.quantized_params = 0
        # x @ W^T as a MatMul of a transposed weight (the LM head of a 3-D hidden state): the
        # Transpose's output -> W's name.
        self.transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"
                           and n.input[0] in self.inits and _attrs(n).get("perm", [1, 0]) == [1, 0]}
        # The tied LM head's weight (the Gemm's B, or the transposed MatMul's); its Gather is the
        # token embedding.
        self.head_weights = {n.input[1] for n in model.graph.node if n.op_type == "Gemm" and len(n.input) > 1}
        self.head_weights |= {self.transposed[n.input[1]] for n in model.graph.node
                              if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in self.transposed}
        # The selection after the LM head (log-softmax, top-N) stays fp32: its MatMul with a ones
        # vector is the sum over the vocabulary.
        self.skip = {n.name for n in selection_nodes(model)[1]}

    def _float_2d(self, name: str) -> TensorProto | None:
        t = self.inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            return None
        return t

    def _emit(self, base: str, packed: np.ndarray, scales: np.ndarray, zp: np.ndarray | None) -> list[str]:
        names = [f"{base}_Q{self.cfg.bits}", f"{base}_scales"]
        self.new_inits.append(self.w.put(names[0], packed))
        self.new_inits.append(self.w.put(names[1], scales))
        if zp is not None:
            names.append(f"{base}_zero_points")
            self.new_inits.append(self.w.put(names[2], zp))
        return names

    def matmul(self, node: onnx.NodeProto, b: np.ndarray, b_name: str, a: str) -> onnx.NodeProto:
        """MatMulNBits(a, B) (or DynamicQuantizeMatMul, scheme "dynamic") with B (K, N) fp32; same
        output name as `node`."""
        new, weights = quantized_matmul(b, self.cfg, self.scheme, a, b_name, node.output[0], node.name)
        self.new_inits += [self.w.put(name, array) for name, array in weights]
        self.quantized_params += b.size
        return new

    def gather(self, node: onnx.NodeProto, table: np.ndarray, t_name: str) -> onnx.NodeProto:
        """GatherBlockQuantized over `table` (rows, dim): each row blocked along dim, as the
        head's columns are (quantize_axis 1)."""
        rows, dim = table.shape
        packed, scales, zp = pack_blocks(np.ascontiguousarray(table.T), self.cfg)  # B = table^T: (dim, rows)
        # GatherBlockQuantized wants (rows, dim * bits / 8) bytes: drop the padding of a last
        # partial block (MatMulNBits keeps whole blocks).
        packed = np.ascontiguousarray(packed.reshape(rows, -1)[:, : dim * self.cfg.bits // 8])
        names = self._emit(t_name + "_gather", packed, scales, zp)
        self.quantized_params += rows * dim
        return helper.make_node("GatherBlockQuantized", [names[0], node.input[1], *names[1:]], list(node.output),
                                name=node.name + "_blockq", domain=CONTRIB_DOMAIN, gather_axis=0, quantize_axis=1,
                                block_size=self.cfg.block_size, bits=self.cfg.bits)

    def rewrite(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        if node.name in self.skip:
            return None
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in self.transposed:
            t = self._float_2d(self.transposed[node.input[1]])  # x @ W^T: B = W^T
            if t is None:
                return None
            w = storage.read_array(t, self.src_dir)
            try:
                return self.matmul(node, np.ascontiguousarray(w.T), t.name, node.input[0])
            finally:
                del w
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            t = self._float_2d(node.input[1])
            if t is None:
                return None
            b = storage.read_array(t, self.src_dir)
            try:
                return self.matmul(node, b, t.name, node.input[0])
            finally:
                del b
        if node.op_type == "Gemm":
            # The tied LM head: Gemm(x, wte, transB=1) with no bias, i.e. x @ wte^T.
            a = _attrs(node)
            t = self._float_2d(node.input[1])
            if (t is None or len(node.input) > 2 or a.get("transA", 0) or not a.get("transB", 0)
                    or a.get("alpha", 1.0) != 1.0):
                return None
            w = storage.read_array(t, self.src_dir)
            try:
                return self.matmul(node, np.ascontiguousarray(w.T), t.name, node.input[0])
            finally:
                del w
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and _attrs(node).get("axis", 0) == 0:
            t = self._float_2d(node.input[0])
            # Only the token embedding: a table as wide as the LM head's vocabulary. The small
            # position table stays fp32.
            if t is None or t.name not in self.head_weights:
                return None
            table = storage.read_array(t, self.src_dir)
            try:
                return self.gather(node, table, t.name)
            finally:
                del table
        return None


def _fold_bias(model: onnx.ModelProto) -> int:
    """`Add(DynamicQuantizeMatMul(x, B, scale), bias)` -> `DynamicQuantizeMatMul(x, B, scale, , bias)`
    where the Add is the product's only reader and `bias` a constant (N,) vector: ONNX Runtime
    folds such a bias into `MatMulNBits` or the next SkipLayerNormalization at load, not into this
    op, and the lone Adds (after c_attn and both c_proj; c_fc's bias is FastGelu's) cost 3% of a
    one-row decode step (`bench.decode_profile`, 124M shape). Returns how many were folded."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers = consumers(model)
    outputs = {o.name for o in g.output}
    drop, folded = set(), 0
    for n in g.node:
        if n.op_type != "DynamicQuantizeMatMul" or len(n.input) != 3 or n.output[0] in outputs:
            continue
        users = readers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
            continue
        add = users[0]
        bias = next((inits.get(i) for i in add.input if i != n.output[0]), None)
        n_cols = inits[n.input[2]].dims  # the per-column scales: (N,)
        if (bias is None or bias.data_type != TensorProto.FLOAT or list(bias.dims) != list(n_cols)
                or list(add.input).count(n.output[0]) != 1):
            continue
        n.input.extend(["", bias.name])
        n.output[0] = add.output[0]
        drop.add(id(add))
        folded += 1
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    return folded


def quantize_blockwise(model: onnx.ModelProto, src_dir: Path, cfg: BlockConfig,
                       scheme: str = "nbits") -> dict[str, int]:
    """Rewrite `model` (structure only, weights external in `src_dir`) in place with
    block-quantized weights, written to a new data file in `src_dir`; `storage.save` then
    writes the export. Returns counts of what was rewritten. `scheme` "dynamic": the MatMuls
    become `DynamicQuantizeMatMul` over per-column int8 weights instead (`cfg` still blocks the
    token embedding's `GatherBlockQuantized`)."""
    if scheme not in ("nbits", "dynamic") or (scheme == "dynamic" and cfg.bits != 8):
        raise ValueError(f"unknown quantization scheme {scheme!r} at {cfg.bits} bits")
    strip_initializer_value_info(model)
    with storage.DataWriter(src_dir / "blockq.onnx") as writer:
        q = _Quantizer(model, src_dir, writer, cfg, scheme)
        nodes, counts = [], {"MatMulNBits": 0, "DynamicQuantizeMatMul": 0, "GatherBlockQuantized": 0}
        for node in model.graph.node:
            new = q.rewrite(node)
            if new is not None:
                counts[new.op_type] += 1
            nodes.append(new if new is not None else node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        prune_dangling(model)  # the Transpose of a weight whose MatMul was quantized
        used = {i for n in model.graph.node for i in n.input}
        kept = [writer.copy(t, src_dir) for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept + q.new_inits)
    if scheme == "dynamic":
        counts["bias_folded"] = _fold_bias(model)
    if all(o.domain != CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    counts["quantized_params"] = q.quantized_params
    logger.info("quantized %d MatMul (%s) and %d Gather weights (%d parameters) to %d bits, block %d",
                counts["MatMulNBits"] + counts["DynamicQuantizeMatMul"], scheme, counts["GatherBlockQuantized"],
                q.quantized_params, cfg.bits, cfg.block_size)
    return counts
