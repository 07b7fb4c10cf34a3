"""Which int8/int4 MatMul kernel ONNX Runtime runs fast on this CPU: one GPT-2 MLP weight.

    python -m bench.quant_kernels [--k 768] [--threads 2] [--budget 12]

What the export measures to choose a quantized precision's kernel (`export.kernels.rank`), with
fp32 beside it and a longer budget: one (K, 4K) weight in each candidate's form, at M = 1 (a
decode step), 32 (a decode step of 32 streams) and 512 (a 512-token prompt). At M = 1 and 32 the
graph holds enough distinct copies of the weight to fill twice the last-level cache, so the
weights come from memory as in a real decode step; the time is per copy. Milliseconds per call,
median of 5 timed batches; the score is the geometric mean over M of the time over the fastest
candidate's (fp32 not counted). Which kernels MLAS has depends on the CPU's instruction sets,
printed first. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnxruntime as ort

from bench.common import machine_info
from export.kernels import ROWS, isa_tag, last_level_cache_bytes, matmul_model, rank, time_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quant_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=768, help="n_embd: the weight is (k, 4k)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=12.0, help="seconds per precision, about")
    args = p.parse_args(argv)
    m = machine_info()
    w = (np.random.default_rng(0).standard_normal((args.k, 4 * args.k)) * 0.02).astype(np.float32)
    copies = min(64, -(-2 * last_level_cache_bytes() // w.size))
    per = args.budget / 9
    fp32 = [time_ms(matmul_model(None, w, copies if r < 512 else 1), r, per, args.threads) for r in ROWS]
    sys.stdout.write(f"onnxruntime {ort.__version__}; {m['cpu']}, flags {', '.join(m['flags'])} ({isa_tag()}); "
                     f"W {args.k}x{4 * args.k}, {copies} copies at M < 512; {args.threads} threads; ms per "
                     "weight per call\n\n| kernel | M = 1 | M = 32 | M = 512 | score |\n"
                     "| --- | --- | --- | --- | --- |\n| fp32 MatMul | " + " | ".join(f"{t:.4f}" for t in fp32)
                     + " | - |\n")
    for precision in ("int8", "int4"):
        order, rec = rank(precision, args.k, budget_s=args.budget, threads=args.threads)
        for k in order:
            t = rec["timings_ms"][k.name]
            sys.stdout.write(f"| {precision} {k.name} | " + " | ".join(f"{t[str(r)]:.4f}" for r in ROWS)
                             + f" | {rec['score'][k.name]:.2f} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
