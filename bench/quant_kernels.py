"""Which int8/int4 MatMul kernel ONNX Runtime runs fast on this CPU: one GPT-2 small MLP weight.

    python -m bench.quant_kernels [--k 768] [--n 3072] [--threads 2]

One MatMul (x: (M, K) @ W: (K, N)) as its own graph, at M = 1 (a decode step), 32 (a decode
step of 32 streams) and 512 (a 512-token prompt), in each form the export can give it:
fp32; `MatMulNBits` at 8 and 4 bits, block 32 and 128, `accuracy_level` 0 (fp32 compute) and
4 (int8 activations and dot products); and the dynamic int8 of `quantize_dynamic`
(`MatMulInteger` with per-call activation quantization), which `PRECISION=int8` served before
block quantization. Milliseconds per call, median of 5 timed batches. Which kernels MLAS has
depends on the CPU's instruction sets (AVX2, AVX-512, VNNI), printed first. Not part of
`make test`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> list[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in FLAGS if f in line.split()]


def _fp32_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def variants(w: np.ndarray) -> dict[str, onnx.ModelProto]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    out = {"fp32 MatMul": _fp32_model(w)}
    for bits in (8, 4):
        for acc in (4, 0):
            for block in (32, 128):
                cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits, accuracy_level=acc)
                q = MatMulNBitsQuantizer(_fp32_model(w), algo_config=cfg)
                q.process()
                out[f"MatMulNBits {bits}-bit, block {block}, accuracy_level {acc}"] = q.model.model
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(_fp32_model(w), f"{tmp}/f.onnx")
        quantize_dynamic(f"{tmp}/f.onnx", f"{tmp}/d.onnx", weight_type=QuantType.QInt8)
        out["dynamic int8 (MatMulInteger)"] = onnx.load(f"{tmp}/d.onnx")
    return out


def time_ms(sess: ort.InferenceSession, x: np.ndarray, reps: int) -> float:
    for _ in range(3):
        sess.run(None, {"x": x})
    batches = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            sess.run(None, {"x": x})
        batches.append((time.perf_counter() - t) / reps * 1e3)
    return statistics.median(batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quant_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.k, args.n)) * 0.02).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    sys.stdout.write(f"onnxruntime {ort.__version__}; CPU flags: {', '.join(cpu_flags()) or 'none of ' + str(FLAGS)}; "
                     f"W {args.k}x{args.n}; {args.threads} threads; ms per call\n\n"
                     "| kernel | M = 1 | M = 32 | M = 512 |\n| --- | --- | --- | --- |\n")
    for name, model in variants(w).items():
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        cells = [time_ms(sess, rng.standard_normal((m, args.k)).astype(np.float32), reps)
                 for m, reps in ((1, 200), (32, 40), (512, 4))]
        sys.stdout.write(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
