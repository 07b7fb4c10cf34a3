"""The accuracy gates' numbers for every quantized kernel (`export.kernels.KERNELS`), per checkpoint.

    python -m bench.kernel_accuracy [--checkpoints small,demo] [--update-md]

Each kernel's export is made (or found) in the anchors' cache with `QUANT_KERNEL` forced, as the
server makes it, and its manifest read: top-1 agreement with PyTorch fp32 (near-ties within
`export.verify.TIE_NATS` counted, and exact), the largest logit error, the held-out perplexity
ratio, the floors, and the weight file's size. A kernel that fails a gate is reported with its
failure (the server would not serve it). Checkpoints: `small` (GPT-2 124M shape, random
weights, as `bench.anchors`), `demo` (the bundled demo LM, trained weights), or a folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from app.loading.loader import ExportFailedError, ensure_export
from bench.anchors import CACHE, REPO
from bench.common import machine_info
from bench.report import replace_section
from bench.sizes import build_checkpoint
from export.kernels import CANDIDATES
from export.manifest import read_manifest

logger = logging.getLogger("bench.kernel_accuracy")


def row(label: str, ckpt: Path, precision: str, kernel: str) -> str:
    try:
        path, _ = ensure_export(ckpt, "generate", precision, CACHE / "anchors-run" / "onnx", "cpu",
                                attention="gqa", kernel=kernel)
        m, verdict = read_manifest(path.parent), "served"
        size = (path.parent / "model.onnx.data").stat().st_size / 1e6
    except ExportFailedError as e:
        m, verdict, size = e.manifest or {}, f"**rejected**: {e.summary}", None
    par = m.get("parity") or {}
    ppl = (par.get("perplexity") or {}).get("ratio")
    cells = [f"{par['top1_agreement']:.3f} ({par.get('top1_exact_agreement', 0):.3f})" if par else "-",
             f"{par['top1_floor']:g}" if par else "-", f"{par['max_logit_error']:.3f}" if par else "-",
             f"{ppl:.4f}" if ppl else "-", f"{(par.get('perplexity') or {}).get('margin', 0):g}" if ppl else "-",
             f"{size:,.0f} MB" if size else "-", verdict]
    return f"| {label} | {precision} {kernel} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default="small,demo")
    p.add_argument("--update-md", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    lines = ["| checkpoint | kernel | top-1 (exact) | floor | max logit error | perplexity ratio | margin | "
             "weights file | verdict |", "| --- |" + " --- |" * 8]
    for name in args.checkpoints.split(","):
        ckpt = {"small": lambda: build_checkpoint("small", CACHE / "checkpoints"),
                "demo": lambda: REPO / "model" / "demo" / "lm"}.get(name, lambda: Path(name))()  # noqa: B023
        label = {"small": "124M shape, random", "demo": "demo LM, trained"}.get(name, name)
        for precision, kernels in CANDIDATES.items():
            for k in kernels:
                logger.info("%s: %s %s", label, precision, k.name)
                lines.append(row(label, ckpt, precision, k.name))
    cmd = "python -m bench.kernel_accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    m = machine_info()
    body = (f"Command: `{cmd}`  \nMachine: {m['cpu']}, flags {', '.join(m['flags'])}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Top-1 over the parity check's positions "
            "(near-ties within 0.2 nats counted; exact in brackets); perplexity over 8 x 128 held-out tokens.\n\n"
            + "\n".join(lines) + "\n")
    sys.stdout.write(body)
    if args.update_md:
        replace_section(REPO / "BENCHMARKS.md", "kernel-accuracy", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
