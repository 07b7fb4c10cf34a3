"""Will this checkpoint fit? Said at start, in one line, before minutes of work run out of memory.

The numbers are the ones measured per GPT-2 size (BENCHMARKS.md, "Every GPT-2 size" and
"Export memory"): the export child holds the fp32 weights once at a time (the PyTorch model
while it traces and computes the parity check's reference, then ONNX Runtime's session once the
model is freed), and peaked at 1.16x (XL fp32) to 1.5x (XL int8) of them; `EXPORT_FACTOR`
covers the worst with the runtime on top. The PyTorch fallback holds the fp32 weights once.
Available memory is the smaller of the container's limit (cgroup v2 or v1) minus what is in
use, and the host's MemAvailable.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

GIB = 1 << 30
RUNTIME_BYTES = int(0.6 * GIB)  # python + torch + ONNX Runtime + activations, measured on the export child
EXPORT_FACTOR = 1.5  # the export child's peak over the fp32 weights, at most (measured per size and precision)


class MemoryFitError(RuntimeError):
    """Not enough memory for this checkpoint; the message is one line that says why."""


def fp32_weight_bytes(checkpoint: Path) -> int:
    """fp32 bytes of a GPT-2 checkpoint's parameters, from its config.json (tied head counted
    once). Read as plain JSON: `model.checkpoint` imports torch, which the serving process of the
    ONNX Runtime path never does."""
    try:
        raw = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
        e = int(raw.get("n_embd", 768))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0  # a broken checkpoint: the export or the loader says what is wrong with it
    inner = int(raw.get("n_inner") or 4 * e)
    per_layer = e * 3 * e + 3 * e + e * e + e + e * inner + inner + inner * e + e + 4 * e
    return 4 * (int(raw.get("vocab_size", 50257)) * e + int(raw.get("n_positions", 1024)) * e
                + int(raw.get("n_layer", 12)) * per_layer + 2 * e)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") or not text.isdigit() else int(text)


def available_bytes() -> int | None:
    """Memory this process can still take, or None if it cannot be told."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            room = limit - usage
            avail = room if avail is None else min(avail, room)
            break
    return avail


def check(checkpoint: Path, need: int, what: str, available: int | None = None) -> None:
    """Raise `MemoryFitError` (one line) if `need` bytes for `what` exceed what is available."""
    available = available_bytes() if available is None else available
    if available is None or need <= available:
        return
    w = fp32_weight_bytes(checkpoint)
    raise MemoryFitError(f"{checkpoint.name}: {what} needs about {need / GIB:.1f} GiB ({w / GIB:.1f} GiB of fp32 "
                         f"weights) but only {available / GIB:.1f} GiB is available; give the container more "
                         f"memory (docs/DEPLOY.md lists each GPT-2 size's needs)")


def export_need(checkpoint: Path) -> int:
    return int(EXPORT_FACTOR * fp32_weight_bytes(checkpoint)) + RUNTIME_BYTES


def serve_need(checkpoint: Path) -> int:
    """Serving on the CPU (the PyTorch fallback, or ONNX Runtime): the weights once (fp32, the most
    any precision holds) and the runtime; a prefix cache's budget is added by the caller."""
    return fp32_weight_bytes(checkpoint) + RUNTIME_BYTES
