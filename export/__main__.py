"""`python -m export --checkpoint DIR --task generate|classify|embed --out DIR [--precision ...]`.

Progress goes to stderr, the summary table to stdout; the exit code is 0 only when the export
was written and (unless --no-verify) matched PyTorch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from export.graphs import DEFAULT_OPSET
from export.kernels import KERNELS
from export.precision import PRECISIONS

logger = logging.getLogger("export")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description="Export a GPT-2 checkpoint folder to ONNX.")
    p.add_argument("--checkpoint", required=True, type=Path, help="HF GPT-2 checkpoint folder")
    p.add_argument("--task", required=True, choices=["generate", "classify", "embed"],
                   help="embed: a language model's final hidden states (the embeddings' graph)")
    p.add_argument("--out", required=True, type=Path, help="output folder for model.onnx + manifest.json")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="int8 / int4: quantized weights, for CPU (the kernel: --kernel); fp16: for CUDA")
    p.add_argument("--kernel", default="auto",
                   help="int8 / int4: the quantized MatMul kernel; auto (default) measures the candidates on "
                        "this CPU and takes the fastest that passes the accuracy gates, or one of: "
                        + ", ".join(KERNELS))
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check parity against PyTorch (default: on)")
    p.add_argument("--attention", choices=["standard", "gqa"], default="standard",
                   help="generation graph: standard past/present, or GroupQueryAttention with shared KV buffers")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--provider", default=None, help="ONNX Runtime provider for verification (default: CPU)")
    return p


def _summary(m: dict) -> str:
    rows = [("task", m["task"]), ("precision", m["precision"]), ("attention", m.get("attention") or "-"),
            ("opset", m["opset"]),
            ("checkpoint sha256", m["checkpoint"]["sha256"][:16] + "..."),
            ("SkipLayerNormalization", f"{m['fused_ops']['SkipLayerNormalization']} "
                                       f"(expected {m['expected_skip_layer_norm']})"),
            ("LayerNormalization", m["fused_ops"]["LayerNormalization"]),
            ("FastGelu / BiasGelu", f"{m['fused_ops']['FastGelu']} / {m['fused_ops']['BiasGelu']}"),
            ("GroupQueryAttention", m["fused_ops"].get("GroupQueryAttention", 0)),
            ("files", ", ".join(m["files"]))]
    if m.get("kernel"):
        k = m["kernel"]
        rows.append(("kernel", f"{k['name']} ({k['chosen_by']} on {k['isa']}"
                               + (f"; rejected {', '.join(r['name'] for r in k['rejected'])}" if k.get("rejected")
                                  else "") + ")"))
    par = m.get("parity")
    if par:
        rows += [("parity", "PASSED" if par["passed"] else "FAILED"), ("provider", par["provider"]),
                 ("max logit |diff|", f"{par['max_logit_error']:.3g}"),
                 ("top-1 agreement", f"{par['top1_agreement']:.4f} over {par['top1_positions']} positions "
                                     f"(floor {par['top1_floor']}; near-ties within {par.get('top1_tie_nats', 0)} "
                                     f"count; exact {par.get('top1_exact_agreement', par['top1_agreement']):.4f})")]
        rows += [(f"  {k}", f"{v:.3g}") for k, v in sorted(par["max_abs_diff_by_output"].items())]
        rows += [("  FAIL", f) for f in par["failures"]]
    else:
        rows.append(("parity", "not verified (--no-verify)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[export] %(message)s", stream=sys.stderr)
    for name in ("export", "model"):  # our progress lines; the tracer's chatter stays at WARNING
        logging.getLogger(name).setLevel(logging.INFO)
    warnings.filterwarnings("ignore")  # the tracer's warnings are noise to a CLI user

    from export.manifest import read_manifest
    from export.pipeline import ExportError, export_checkpoint
    from export.verify import ParityError
    from model.checkpoint import CheckpointError

    providers = [args.provider] if args.provider else None
    try:
        manifest = export_checkpoint(args.checkpoint, args.out, args.task, args.precision, args.verify, args.opset,
                                     providers, args.attention, args.kernel)
    except (CheckpointError, ExportError) as e:
        logger.error("%s", e)
        return 2
    except ParityError as e:
        sys.stdout.write(_summary(read_manifest(args.out)))
        logger.error("parity check failed: %s", e)
        return 1
    sys.stdout.write(_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
