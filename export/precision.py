"""fp16 and int8 variants of an exported fp32 graph.

fp16 (for CUDA): weights and activations in half precision. The KV cache inputs and outputs
become fp16 too (half the memory traffic per step); `logits` stays fp32 so sampling sees full
precision. SkipLayerNormalization and Softmax accumulate in fp32 inside ONNX Runtime's kernels.
int8 and int4 (for CPU) are quantized weights (`export.quantize`, the LM head and the embedding
included), in the kernel `export.kernels` measures fastest on the exporting CPU. `to_int8_dynamic`
is ONNX Runtime's own dynamic quantization of a whole model in memory (the LM head quantized,
the embedding not); it is kept for the benchmarks that compare it (BENCHMARKS.md), not served:
the served `dynamic8` kernel writes the same kind of per-column weights one tensor at a time.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from export.fusion import prune_dangling, selection_nodes, strip_initializer_value_info, untie_gemm_weights
from export.storage import INLINE_LIMIT, initializer_bytes

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
FP32_OUTPUTS = ("logits", "last_hidden_state")  # the embedding graph's hidden states are pooled in fp32


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert a fp32 graph to fp16, keeping `logits` and the selection after the LM head in fp32:
    the LM head's MatMul runs in fp16 and its output is cast up once; the log-softmax (a sum over
    the vocabulary that fp16 cannot hold to 1e-3) and the top-N run in fp32.

    ONNX Runtime's float16 tool has a block list, but it casts around every blocked node and
    names the casts after their input, so a value read by two blocked nodes gives two nodes of one
    name (an invalid model). So the selection is taken out of the graph while it converts (the
    LM head's output becomes a kept-fp32 graph output) and put back after."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    head, tail = selection_nodes(model)
    if not tail:  # the classifier: `logits` is the graph's output already, nothing to take out
        head = None
    g = model.graph
    made = {o for n in tail for o in n.output}
    outputs = list(g.output)
    moved_vi = [vi for vi in g.value_info if vi.name in made]
    if head is not None:
        for n in tail:
            g.node.remove(n)
        for vi in moved_vi:
            g.value_info.remove(vi)
        del g.output[:]
        g.output.extend([o for o in outputs if o.name not in made])
        g.output.append(onnx.helper.make_tensor_value_info(head, onnx.TensorProto.FLOAT, None))
    used = {i for n in g.node for i in n.input}
    fp32_inputs = [i.name for i in g.input  # read by the selection only (temperature): stays fp32
                   if i.name not in used and i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    keep = [o.name for o in g.output if o.name in FP32_OUTPUTS or o.name == head] + fp32_inputs
    # The attention mask bias (float32 min) is clipped to the largest finite fp16 value.
    model = convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=True)
    g = model.graph
    if head is not None:
        g.node.extend(tail)
        g.value_info.extend(moved_vi)
        converted = {o.name: o for o in g.output}  # the converter's types (the KV cache is fp16 now)
        restored = [onnx.ValueInfoProto() for _ in outputs]
        for new, o in zip(restored, outputs, strict=True):
            new.CopyFrom(converted.get(o.name, o))  # the selection's outputs keep their own types
        del g.output[:]
        g.output.extend(restored)
    prune_dangling(model)
    return model


def to_int8_dynamic(model: onnx.ModelProto, out_path: Path) -> None:
    """Write the dynamically quantized (int8 MatMul weights) version of `model` (weights
    inline) to `out_path`. Holds the whole model in memory: for benchmarks on small models."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    strip_initializer_value_info(model)
    n = untie_gemm_weights(model)
    if n:
        logger.info("untied %d shared Gemm weight(s) before quantization", n)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fp32.onnx"
        onnx.save_model(model, str(src), save_as_external_data=initializer_bytes(model) > INLINE_LIMIT)
        quantize_dynamic(
            src, out_path,
            op_types_to_quantize=["MatMul"],
            # The selection's sum over the vocabulary (a MatMul with a ones vector) stays fp32.
            nodes_to_exclude=[n.name for n in selection_nodes(model)[1]],
            weight_type=QuantType.QInt8,
            per_channel=True,
            # Activation x activation MatMuls (attention scores) stay fp32; only weights are int8.
            extra_options={"MatMulConstBOnly": True},
        )
