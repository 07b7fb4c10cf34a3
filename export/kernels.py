"""Which quantized MatMul kernel a precision uses on this CPU: measured at export, as llama.cpp
picks its kernels at run time.

ONNX Runtime's CPU kernels for quantized weights (MLAS) are fast or slow by instruction set. On
an AVX2-only host (BENCHMARKS.md, `bench.quant_kernels`), `MatMulNBits` 8-bit with int8
compute took 2.3 ms on one 768x3072 weight at 32 rows, where the dynamic int8
`DynamicQuantizeMatMul` took 0.73 ms; so no one format is best for every CPU. Each quantized
precision has a short list of candidate kernels (`CANDIDATES`); the export times each one on a
weight of the model's own MLP shape at 1, 32 and 512 rows (a decode step, a decode step of 32
streams, a 512-token prompt) and ranks them by the geometric mean of their time over the
fastest's at each row count. The export then quantizes with the first, and falls back to the
next when the accuracy gates (`export.verify`, `export.agreement`) reject it.

The choice holds for the CPU it was measured on: the export cache key carries `isa_tag()` (the
instruction sets MLAS dispatches on), the manifest records the choice, the flags and the timings,
and `/info` shows them. `QUANT_KERNEL` (`python -m export --kernel`) names a kernel instead.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.fusion import CONTRIB_DOMAIN
from export.quantize import BlockConfig, quantized_matmul

logger = logging.getLogger(__name__)

# The flags MLAS picks its x86 integer and float kernels by, best first (/proc/cpuinfo names).
_X86_LEVELS = (("amx_int8", "amx"), ("avx512_vnni", "avx512vnni"), ("avx_vnni", "avxvnni"),
               ("avx512bw", "avx512"), ("avx2", "avx2"))
_ARM_LEVELS = (("i8mm", "arm-i8mm"), ("asimddp", "arm-dotprod"))
FLAGS = tuple(f for f, _ in _X86_LEVELS + _ARM_LEVELS) + ("avx512f", "avx512_bf16", "fma", "f16c")
ROWS = (1, 32, 512)  # a decode step, 32 streams' decode step, a 512-token prompt


@dataclass(frozen=True)
class Kernel:
    """One way to store and multiply a precision's weights. `scheme` "nbits": `MatMulNBits` with
    `block` (the token embedding a `GatherBlockQuantized` of the same blocks); "dynamic":
    `DynamicQuantizeMatMul` over int8 weights with one scale per output column, activations
    quantized per call (the token embedding a `GatherBlockQuantized` 8-bit, block 32)."""

    name: str
    scheme: str
    block: BlockConfig

    @property
    def bits(self) -> int:
        return self.block.bits


_Q8 = BlockConfig(bits=8)
CANDIDATES: dict[str, tuple[Kernel, ...]] = {
    "int8": (
        Kernel("nbits8-b32", "nbits", _Q8),  # llama.cpp's q8_0 layout; int8 dot products
        Kernel("nbits8-b128", "nbits", BlockConfig(bits=8, block_size=128)),
        Kernel("nbits8-b256", "nbits", BlockConfig(bits=8, block_size=256)),
        Kernel("dynamic8", "dynamic", _Q8),  # per-column int8 weights, per-call int8 activations
    ),
    "int4": (
        Kernel("nbits4-b32-zp", "nbits", BlockConfig(bits=4, symmetric=False)),  # q4_1's form
        Kernel("nbits4-b128-zp", "nbits", BlockConfig(bits=4, block_size=128, symmetric=False)),
        Kernel("nbits4-b256-zp", "nbits", BlockConfig(bits=4, block_size=256, symmetric=False)),
        Kernel("nbits4-b32", "nbits", BlockConfig(bits=4)),  # q4_0's form
    ),
}
KERNELS = {k.name: k for ks in CANDIDATES.values() for k in ks}


def cpu_flags() -> list[str]:
    """The flags of `FLAGS` this CPU has (Linux: /proc/cpuinfo's `flags`, or `Features` on Arm)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    have: set[str] = set()
    for ln in lines:
        key, _, value = ln.partition(":")
        if key.strip() in ("flags", "Features"):
            have |= set(value.split())
    return [f for f in FLAGS if f in have]


def isa_tag(flags: list[str] | None = None, machine: str | None = None) -> str:
    """The instruction-set level the quantized kernels dispatch on, as one cache-key word:
    amx, avx512vnni, avxvnni, avx512, avx2, arm-i8mm, arm-dotprod, or the machine name."""
    flags = cpu_flags() if flags is None else flags
    for flag, tag in _X86_LEVELS + _ARM_LEVELS:
        if flag in flags:
            return tag
    return (machine or platform.machine() or "cpu").lower()


def resolve(precision: str, kernel: str = "auto") -> tuple[Kernel, ...]:
    """The candidates for `precision` (auto), or the one named; `ValueError` names the field."""
    if precision not in CANDIDATES:
        raise ValueError(f"precision {precision!r} has no quantized kernels")
    if kernel == "auto":
        return CANDIDATES[precision]
    names = [k.name for k in CANDIDATES[precision]]
    if kernel not in names:
        raise ValueError(f"QUANT_KERNEL={kernel!r} is not a {precision} kernel; expected auto or one of "
                         f"{', '.join(names)}")
    return (KERNELS[kernel],)


def matmul_model(kernel: Kernel | None, w: np.ndarray, copies: int = 1) -> onnx.ModelProto:
    """x (M, K) @ w (K, N) as a graph of `copies` independent nodes in `kernel`'s form (None: fp32
    MatMul), each with its own copy of the weight packed as the export packs it: with copies that
    outgrow the CPU's last-level cache, a call reads its weights from memory, as a decode step of
    a real model does."""
    k, n = w.shape
    nodes, inits = [], []
    for i in range(copies):
        wi = np.roll(w, i, axis=1)  # a different weight in each: ONNX Runtime shares equal ones
        if kernel is None:
            node, weights = helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]), [(f"w{i}", wi)]
        else:
            node, weights = quantized_matmul(wi, kernel.block, kernel.scheme, "x", f"w{i}", f"y{i}", f"mm{i}")
        nodes.append(node)
        inits += [numpy_helper.from_array(array, name) for name, array in weights]
    g = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None, n])
                           for i in range(copies)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(CONTRIB_DOMAIN, 1)],
                             ir_version=10)


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs), or 32 MiB when it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        try:
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except ValueError:
            continue
    return max(sizes, default=32 << 20)


def time_ms(model: onnx.ModelProto, m: int, budget_s: float, threads: int | None = None) -> float:
    """Milliseconds per weight per call at M = m rows (a call runs every copy of the weight): the
    median of 5 batches after a warm-up, each batch about budget_s / 6 long."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    k = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    feed = {"x": np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)}
    t = time.perf_counter()
    sess.run(None, feed)  # the first call packs the weights
    sess.run(None, feed)
    reps = max(1, int(budget_s / 6 / max(time.perf_counter() - t, 1e-6) * 2))
    batches = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            sess.run(None, feed)
        batches.append((time.perf_counter() - t) / reps * 1e3)
    return statistics.median(batches) / len(model.graph.output)


def rank(precision: str, n_embd: int, kernel: str = "auto", budget_s: float | None = None,
         threads: int | None = None) -> tuple[list[Kernel], dict[str, Any]]:
    """The kernels to try for `precision`, fastest first on this CPU, and the record for the
    manifest (`kernel` in the manifest: what was measured, on which CPU). Times each candidate
    on a random (n_embd, 4 n_embd) weight, the MLP's first (the largest per layer), at `ROWS`:
    at 1 and 32 rows in enough copies to fill twice the last-level cache at 8 bits (so the weights
    come from memory, as in a decode step), at 512 rows (compute-bound) once. `budget_s` is the
    whole measurement's time, about (default 3 s from GPT-2 small's width up, less below it: a
    tiny model's calls take microseconds)."""
    candidates = resolve(precision, kernel)
    record: dict[str, Any] = {"isa": isa_tag(), "cpu_flags": cpu_flags(), "cpu": _cpu_name(),
                              "chosen_by": "measured" if kernel == "auto" else "setting"}
    if len(candidates) == 1:
        return list(candidates), record
    t0 = time.perf_counter()
    budget_s = budget_s if budget_s is not None else 3.0 * min(1.0, max(0.1, n_embd / 768))
    w = (np.random.default_rng(0).standard_normal((n_embd, 4 * n_embd)) * 0.02).astype(np.float32)
    per = budget_s / (len(candidates) * len(ROWS))
    copies = min(64, -(-2 * last_level_cache_bytes() // w.size))
    timings = {}
    for c in candidates:
        spread, once = matmul_model(c, w, copies), matmul_model(c, w)
        timings[c.name] = {str(m): round(time_ms(spread if m < 512 else once, m, per, threads), 4) for m in ROWS}
        del spread, once
    best = {m: min(t[str(m)] for t in timings.values()) for m in ROWS}
    score = {name: round(math.exp(statistics.fmean(math.log(t[str(m)] / best[m]) for m in ROWS)), 3)
             for name, t in timings.items()}
    order = sorted(candidates, key=lambda c: score[c.name])
    record |= {"shape": [n_embd, 4 * n_embd], "rows": list(ROWS), "copies": copies, "timings_ms": timings,
               "score": score,
               "measure_seconds": round(time.perf_counter() - t0, 2)}
    logger.info("%s kernels on this CPU (%s), ms at %s rows: %s; order %s", precision, record["isa"], ROWS,
                timings, [c.name for c in order])
    return order, record


def _cpu_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
