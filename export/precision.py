"""fp16 and int8 variants of an exported fp32 graph.

fp16 (for CUDA): weights and activations in half precision. The KV cache inputs and outputs
become fp16 too (half the memory traffic per step); `logits` stays fp32 so sampling sees full
precision. SkipLayerNormalization and Softmax accumulate in fp32 inside ONNX Runtime's kernels.
int8 and int4 (for CPU) are block-quantized weights (`export.quantize`: MatMulNBits, the LM
head and the embedding included). `to_int8_dynamic` is the int8 this project served before
(ONNX Runtime's dynamic quantization: per-channel int8 MatMul weights, activations quantized
per call; the LM head quantized, the embedding not); it is kept for the benchmarks that compare
the two (BENCHMARKS.md), not served.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from export.fusion import strip_initializer_value_info, untie_gemm_weights
from export.storage import INLINE_LIMIT, initializer_bytes

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
FP32_OUTPUTS = ("logits",)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert a fp32 graph to fp16, keeping `logits` fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = [o.name for o in model.graph.output if o.name in FP32_OUTPUTS]
    # The attention mask bias (float32 min) is clipped to the largest finite fp16 value.
    return convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=True)


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
            weight_type=QuantType.QInt8,
            per_channel=True,
            # Activation x activation MatMuls (attention scores) stay fp32; only weights are int8.
            extra_options={"MatMulConstBOnly": True},
        )
