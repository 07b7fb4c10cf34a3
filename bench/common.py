"""Timing harness shared by the benchmarks (numpy only, so the Optimum anchor's own venv can use it).

A *system* is anything with
    prefill(ids (B, T) int64) -> (logits (B, V), state)
    step(state, next_ids (B, 1) int64) -> (logits (B, V), state)
Each workload is timed `repeats` times after a warm-up; medians are reported.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

VOCAB = 50257
PREFILL_LENGTHS = (128, 512)
DECODE_BATCHES = (1, 8)
DECODE_PROMPT = 32
DECODE_STEPS = 32
WARMUP = 3


class System(Protocol):
    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Any]: ...

    def step(self, state: Any, next_ids: np.ndarray) -> tuple[np.ndarray, Any]: ...


@dataclass
class Workloads:
    prefill_lengths: tuple[int, ...] = PREFILL_LENGTHS
    decode_batches: tuple[int, ...] = DECODE_BATCHES
    decode_prompt: int = DECODE_PROMPT
    decode_steps: int = DECODE_STEPS
    repeats: int = 5


def _ids(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length), dtype=np.int64)


def time_prefill(system: System, length: int, repeats: int) -> float:
    """Median seconds for one batch-1 prefill of `length` tokens (last-position logits)."""
    ids = _ids(1, length, seed=length)
    for _ in range(WARMUP):  # allocations, arena growth, kernel selection: seen to take a few calls
        system.prefill(ids)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        system.prefill(ids)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_decode(system: System, batch: int, prompt: int, steps: int, repeats: int) -> float:
    """Median seconds per decode step (one new token for each of `batch` rows), greedy."""
    ids = _ids(batch, prompt, seed=batch)
    per_run = []
    for r in range(repeats + 1):
        logits, state = system.prefill(ids)
        step_times = []
        for _ in range(steps):
            nxt = logits.argmax(-1).astype(np.int64)[:, None]
            t = time.perf_counter()
            logits, state = system.step(state, nxt)
            step_times.append(time.perf_counter() - t)
        if r:  # the first run is the warm-up
            per_run.append(statistics.median(step_times))
    return statistics.median(per_run)


def run_workloads(system: System, w: Workloads) -> dict[str, float]:
    """All workloads for one system: prefill ms and decode tokens/s."""
    out: dict[str, float] = {}
    for n in w.prefill_lengths:
        out[f"prefill_{n}_ms"] = round(1000 * time_prefill(system, n, w.repeats), 2)
    for b in w.decode_batches:
        s = time_decode(system, b, w.decode_prompt, w.decode_steps, w.repeats)
        out[f"decode_b{b}_tok_s"] = round(b / s, 2)
        out[f"decode_b{b}_ms_per_step"] = round(1000 * s, 2)
    return out


# The instruction sets the CPU kernels dispatch on (export.kernels.FLAGS; repeated here so this
# module needs numpy only).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8",
              "asimddp", "i8mm")


def machine_info() -> dict[str, Any]:
    model, flags = "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "flags": [f for f in SIMD_FLAGS if f in flags]}


def memory_bandwidth_gbs(threads: int = 2, mib: int = 1024, repeats: int = 7) -> float:
    """This host's streaming read bandwidth, GB/s: `threads` threads each summing its share of
    a `mib` MiB float32 array (far past the caches; numpy's reductions release the GIL); the
    best of `repeats`. A decode step that reads every weight once can go no faster than
    bandwidth / weight bytes."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(mib << 18, np.float32)  # touched, so its pages are resident
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9
