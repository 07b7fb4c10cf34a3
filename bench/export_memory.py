"""Where an export's memory goes: `python -m export` as a child, its RSS sampled per phase.

    python -m bench.export_memory --checkpoint DIR --out DIR [--precision fp32] [--attention gqa]
                                  [--interval 0.02] [--json FILE]

Runs `python -m export --task generate ...` (the CLI itself, nothing in-process) and samples
the child's VmRSS from /proc every `--interval` seconds. A phase starts at each progress line
the export logs on stderr ("[export] ..."), so each line of the table is the peak RSS between
one progress line and the next (and the RSS when the line was read). The last line is the
child's maximum resident set size as the kernel counted it (`getrusage(RUSAGE_CHILDREN)`, what
`/usr/bin/time -v` reports), beside the fp32 weight bytes of the checkpoint and the ratio.
Linux only; not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.sizes import _rss

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def weight_bytes(checkpoint: Path) -> int:
    """Bytes of the checkpoint's tensors (safetensors files; the header's few KB included)."""
    files = sorted(checkpoint.glob("*.safetensors")) or sorted(checkpoint.glob("pytorch_model.bin"))
    return sum(f.stat().st_size for f in files)


def run(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "export", "--checkpoint", str(args.checkpoint), "--task", "generate",
           "--out", str(args.out), "--precision", args.precision, "--attention", args.attention]
    phases: list[dict] = [{"phase": "start (imports, checkpoint load)", "t0": 0.0, "rss0": 0, "peak": 0}]
    lock = threading.Lock()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("[export]"):
                rss = _rss(proc.pid)
                with lock:
                    phases.append({"phase": line[len("[export]"):].strip()[:90], "t0": time.perf_counter() - t0,
                                   "rss0": rss, "peak": rss})

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = _rss(proc.pid)
        with lock:
            phases[-1]["peak"] = max(phases[-1]["peak"], rss)
        time.sleep(args.interval)
    # wait4's rusage is only there for a child not yet reaped: poll() reaped it, so ask the kernel
    # for the children's maximum instead (RUSAGE_CHILDREN: this process has one child).
    import resource

    max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    w = weight_bytes(args.checkpoint)
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(wall, 1),
            "fp32_weight_bytes": w, "max_rss_bytes": max_rss, "ratio": round(max_rss / w, 3),
            "phases": [{"phase": p["phase"], "start_s": round(p["t0"], 1),
                        "rss_at_start_gb": round(p["rss0"] / GB, 2), "peak_rss_gb": round(p["peak"] / GB, 2)}
                       for p in phases]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--attention", default="gqa")
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    res = run(args)
    for ph in res["phases"]:
        sys.stdout.write(f"{ph['start_s']:8.1f} s  {ph['rss_at_start_gb']:6.2f} -> {ph['peak_rss_gb']:6.2f} GB  "
                         f"{ph['phase']}\n")
    sys.stdout.write(f"exit {res['returncode']}, {res['wall_s']} s; max RSS {res['max_rss_bytes'] / GB:.2f} GB for "
                     f"{res['fp32_weight_bytes'] / GB:.2f} GB of fp32 weights: {res['ratio']:.2f}x\n")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return res["returncode"]


if __name__ == "__main__":
    sys.exit(main())
