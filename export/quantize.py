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
from export.fusion import CONTRIB_DOMAIN, prune_dangling, selection_nodes, strip_initializer_value_info

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockConfig:
    """How a precision's weights are blocked; see `BLOCK_CONFIGS` for the measured choices."""

    bits: int
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations and int8 dot products on CPU


# int8: symmetric blocks of 32 (llama.cpp's q8_0). int4: blocks of 32 with a zero point per
# block (asymmetric: q4_1's form; see BENCHMARKS.md for the measured accuracy against
# symmetric q4_0-style blocks).
BLOCK_CONFIGS = {"int8": BlockConfig(bits=8), "int4": BlockConfig(bits=4, symmetric=False)}


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
    def __init__(self, model: onnx.ModelProto, src_dir: Path, writer: storage.DataWriter, cfg: BlockConfig) -> None:
        self.model, self.src_dir, self.w, self.cfg = model, src_dir, writer, cfg
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
        """MatMulNBits(a, B) with B (K, N) fp32; same output name as `node`."""
        k, n = b.shape
        packed, scales, zp = pack_blocks(b, self.cfg)
        names = self._emit(b_name, packed, scales, zp)
        self.quantized_params += k * n
        kw = {"K": k, "N": n, "bits": self.cfg.bits, "block_size": self.cfg.block_size}
        if self.cfg.accuracy_level:
            kw["accuracy_level"] = self.cfg.accuracy_level
        return helper.make_node("MatMulNBits", [a, *names], list(node.output), name=node.name + "_nbits",
                                domain=CONTRIB_DOMAIN, **kw)

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


def quantize_blockwise(model: onnx.ModelProto, src_dir: Path, cfg: BlockConfig) -> dict[str, int]:
    """Rewrite `model` (structure only, weights external in `src_dir`) in place with
    block-quantized weights, written to a new data file in `src_dir`; `storage.save` then
    writes the export. Returns counts of what was rewritten."""
    strip_initializer_value_info(model)
    with storage.DataWriter(src_dir / "blockq.onnx") as writer:
        q = _Quantizer(model, src_dir, writer, cfg)
        nodes, counts = [], {"MatMulNBits": 0, "GatherBlockQuantized": 0}
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
    if all(o.domain != CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    counts["quantized_params"] = q.quantized_params
    logger.info("block-quantized %d MatMul and %d Gather weights (%d parameters) to %d bits, block %d",
                counts["MatMulNBits"], counts["GatherBlockQuantized"], q.quantized_params, cfg.bits, cfg.block_size)
    return counts
