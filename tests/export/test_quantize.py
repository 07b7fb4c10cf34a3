"""Block quantization (export.quantize) and tensor-at-a-time weight storage (export.storage),
against ONNX Runtime's own quantizer and kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import storage
from export.quantize import BlockConfig, dequantize_blocks, pack_blocks, quantize_blockwise


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False)])
def test_packing_is_onnxruntime_matmul_nbits_quantizer_format(bits, symmetric) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    w = np.random.default_rng(0).standard_normal((96, 40)).astype(np.float32)
    q = MatMulNBitsQuantizer(_matmul_model(w), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=symmetric, bits=bits))
    q.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    packed, scales, zp = pack_blocks(w, BlockConfig(bits=bits, symmetric=symmetric))
    np.testing.assert_array_equal(theirs[f"w_Q{bits}"].reshape(packed.shape), packed)
    np.testing.assert_array_equal(theirs["w_scales"].reshape(scales.shape), scales)
    if not symmetric:
        np.testing.assert_array_equal(theirs["w_zero_points"].reshape(zp.shape), zp)


@pytest.mark.parametrize("bits,symmetric,k,block", [(8, True, 96, 32), (4, False, 96, 32), (8, True, 48, 32),
                                                    (8, True, 320, 256), (4, False, 96, 256)])
def test_quantized_graph_computes_with_the_dequantized_weights(tmp_path, bits, symmetric, k, block) -> None:
    """MatMulNBits (fp32 compute) == x @ dequantize(B); GatherBlockQuantized rows == the
    dequantized table's rows; K not a multiple of the block is padded, not truncated."""
    rng = np.random.default_rng(1)
    vocab = 50
    table = rng.standard_normal((vocab, k)).astype(np.float32)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "w"], ["h"], name="mm"),
             helper.make_node("Gemm", ["emb", "table"], ["logits"], name="head", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h", "logits")],
                          [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
                    str(src / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    proto = storage.load_structure(src / "m.onnx")
    cfg = BlockConfig(bits=bits, block_size=block, symmetric=symmetric, accuracy_level=0)
    counts = quantize_blockwise(proto, src, cfg)
    assert counts["MatMulNBits"] == 2 and counts["GatherBlockQuantized"] == 1
    storage.save(proto, src, tmp_path / "out" / "model.onnx")
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([0, 7, vocab - 1])
    h, logits = sess.run(["h", "logits"], {"ids": ids})
    deq_table = dequantize_blocks(*pack_blocks(table.T, cfg), k, cfg).T  # (vocab, k)
    deq_w = dequantize_blocks(*pack_blocks(w, cfg), k, cfg)
    emb = deq_table[ids]
    np.testing.assert_allclose(h, emb @ deq_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, emb @ deq_table.T, rtol=1e-4, atol=1e-4)
    # and the blocks are close to the fp32 weights they replace
    step = np.abs(table).max() / (2 ** (bits - 1) - 1)
    assert np.abs(deq_table - table).max() <= step


def test_storage_sizes_without_serializing_and_round_trips(tmp_path) -> None:
    big = np.arange(4096, dtype=np.float32).reshape(64, 64)
    with storage.DataWriter(tmp_path / "a.onnx") as w:
        t_big = w.put("big", big)
        t_small = w.put("small", np.ones(3, np.float32))
    assert t_big.data_location == TensorProto.EXTERNAL and t_small.data_location != TensorProto.EXTERNAL
    assert storage.tensor_bytes(t_big) == big.nbytes and storage.tensor_bytes(t_small) == 12
    offsets = {e.key: e.value for e in t_big.external_data}
    assert int(offsets["offset"]) % storage.ALIGN == 0
    np.testing.assert_array_equal(storage.read_array(t_big, tmp_path), big)
    np.testing.assert_array_equal(storage.read_array(t_small, tmp_path), np.ones(3, np.float32))
