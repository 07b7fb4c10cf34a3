"""ONNX Runtime execution providers with the options this project relies on; torch-free, so the
serving path (`app.engine.ort_runner`) and the export's parity check (`export.verify`) share it.

TF32 is off on CUDA. The CUDA EP's default `use_tf32=1` runs fp32 MatMul/Gemm on TF32 tensor
cores (a 10-bit mantissa) on Ampere and newer GPUs: on an H100 the fp32 GPT-2 logits then drifted
2e-3 from the CPU EP and the fp32 parity gate (1e-4) failed; with `use_tf32=0` they differ by
2.6e-6. fp32 must mean fp32, so every session we make on CUDA, verified or served, turns it off.
fp16 graphs do not use TF32, so the option costs them nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
CUDA_OPTIONS: dict[str, str] = {"use_tf32": "0"}

Provider = str | tuple[str, dict[str, str]]


def with_options(names: Sequence[str], cuda_options: dict[str, str] | None = None) -> list[Provider]:
    """ONNX Runtime's `providers=` list for `names`, each with the options we require (and
    `cuda_options` on top, e.g. `enable_cuda_graph`)."""
    return [(n, CUDA_OPTIONS | (cuda_options or {})) if n == CUDA else n for n in names]


def providers_for(device: str, cuda_options: dict[str, str] | None = None) -> list[Provider]:
    """Providers for `device` ("cuda" or "cpu"); CUDA keeps the CPU EP for the few ops it lacks."""
    return with_options([CUDA, CPU] if device == "cuda" else [CPU], cuda_options)
