"""Where a one-stream decode step's time goes, per operator, at each precision and kernel.

    python -m bench.decode_profile [--checkpoint DIR] [--variants fp32,int8:nbits8-b32,int8:dynamic8,...]
                                   [--steps 64] [--update-md]

Each variant is `precision[:kernel]` (kernel: `export.kernels`' name, or auto). Its export is
made (or found) in the anchors' cache (`~/.cache/gpt2-serve/anchors-run/onnx`, the one the
anchors' servers use), loaded in `OrtSlotRunner` on 2 threads with ONNX Runtime's profiler on,
and runs a 32-token prompt, 8 warm-up steps, then `--steps` timed one-row decode steps. The
profiler's kernel times are summed per operator type and divided by the steps: microseconds
per step; "outside the kernels" is the step's wall time (Python included) less their sum. GPT-2
124M shape with random weights by default. The cores must be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.engine.ort_runner import OrtSlotRunner
from app.engine.runner import Want
from app.loading.loader import ensure_export
from bench.anchors import CACHE, REPO, THREADS
from bench.common import machine_info
from bench.report import replace_section
from bench.sizes import build_checkpoint

logger = logging.getLogger("bench.decode_profile")
PROMPT, WARMUP = 32, 8


def profile(path: Path, n_positions: int, steps: int, out_dir: Path) -> dict[str, float]:
    """Microseconds per decode step by operator type, plus `step` (wall) and `outside`."""
    runner = OrtSlotRunner(path, "cpu", THREADS, n_positions=n_positions, max_rows=1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = THREADS, 1, 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(out_dir / path.parent.name)
    runner.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])  # same graph, profiled
    want = Want(top_n=1, logits=False)
    sel = runner.add([list(np.random.default_rng(0).integers(0, 50000, PROMPT))], want)
    tok = int(sel.top_ids[0, 0])
    for _ in range(WARMUP):
        tok = int(runner.step([tok], want).top_ids[0, 0])
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        tok = int(runner.step([tok], want).top_ids[0, 0])
        walls.append(time.perf_counter() - t)
    trace = json.loads(Path(runner.sess.end_profiling()).read_text())
    # The profiler's clock starts at the session's creation; keep the last `steps` runs' nodes.
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")[-steps:]
    first = runs[0][0]
    per_op: dict[str, float] = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            per_op[e["args"]["op_name"]] += e["dur"] / steps
    step_us = statistics.median(walls) * 1e6
    return {**dict(per_op), "step": step_us, "outside": step_us - sum(per_op.values())}


def table(results: dict[str, dict[str, float]]) -> str:
    ops = sorted({op for r in results.values() for op in r if op not in ("step", "outside")},
                 key=lambda op: -max(r.get(op, 0.0) for r in results.values()))
    names = list(results)
    lines = ["| operator (us per step) | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for op in [*ops, "outside", "step"]:
        cells = []
        for n in names:
            v = results[n].get(op)
            share = f" ({100 * v / results[n]['step']:.0f}%)" if v and op != "step" else ""
            cells.append("-" if v is None else f"{v:,.0f}{share}")
        label = {"outside": "outside the kernels", "step": "**step (wall, median)**"}.get(op, op)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: GPT-2 124M shape, random weights")
    p.add_argument("--variants", default="fp32,int8:nbits8-b32,int8:auto,int4:auto")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--update-md", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    ckpt = args.checkpoint or build_checkpoint("small", CACHE / "checkpoints")
    n_positions = json.loads((ckpt / "config.json").read_text())["n_positions"]
    out_dir = CACHE / "decode-profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in args.variants.split(","):
        precision, _, kernel = v.partition(":")
        path, _ = ensure_export(ckpt, "generate", precision, CACHE / "anchors-run" / "onnx", "cpu",
                                attention="gqa", kernel=kernel or "auto")
        chosen = json.loads((path.parent / "manifest.json").read_text()).get("quantization") or {}
        name = precision + (f" {chosen['kernel']}" if chosen.get("kernel") else "")
        logger.info("profiling %s (%s)", name, path.parent.name)
        results[name] = profile(path, n_positions, args.steps, out_dir)
    cmd = "python -m bench.decode_profile " + " ".join(argv if argv is not None else sys.argv[1:])
    m = machine_info()
    body = (f"Command: `{cmd}`  \nMachine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m['flags'])}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; onnxruntime {ort.__version__}; "
            f"{args.steps} one-row decode steps after {WARMUP} warm-up, {THREADS} threads.\n\n" + table(results))
    (REPO / "bench" / "results" / "decode_profile.json").write_text(
        json.dumps({"command": cmd, "machine": m, "results": results}, indent=1) + "\n")
    sys.stdout.write(body)
    if args.update_md:
        replace_section(REPO / "BENCHMARKS.md", "decode-profile", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
