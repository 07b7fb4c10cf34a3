"""Checkpoint folder -> `model.onnx` + `manifest.json`: trace, fuse-check, precision, verify."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from export import manifest as mf
from export.fusion import check_fusion, fused_op_counts, prune_unused_optional_outputs
from export.graphs import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, export_classification, export_generation
from export.precision import PRECISIONS, to_fp16, to_int8
from export.verify import ParityError, verify

logger = logging.getLogger(__name__)

TASKS = ("generate", "classify")
ATTENTIONS = ("standard", "gqa")


class ExportError(RuntimeError):
    """The export could not be made (bad arguments, unwritable folder, fusion check failed)."""


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ExportError(f"output folder {str(out)!r} is not writable ({e.strerror or e})") from e


def _io_spec(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def one(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [one(i) for i in model.graph.input], "outputs": [one(o) for o in model.graph.output]}


def _save_proto(model: onnx.ModelProto, path: Path) -> None:
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    kwargs = {"all_tensors_to_one_file": True, "location": path.name + ".data"} if external else {}
    onnx.save_model(model, str(path), save_as_external_data=external, **kwargs)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    task: str = "generate",
    precision: str = "fp32",
    verify_parity: bool = True,
    opset: int = DEFAULT_OPSET,
    providers: list[str] | None = None,
    attention: str = "standard",
) -> dict[str, Any]:
    """Export `checkpoint` into folder `out` and return the manifest written there.

    `attention` ("standard" or "gqa") picks the generation graph's signature (see
    `export.graphs`); classification graphs ignore it.

    Raises `ExportError` / `CheckpointError` (bad input) or `ParityError` (verification failed;
    the manifest is still written, with `parity.passed = false`).
    """
    from model import load_pretrained
    from model.gpt2 import GPT2ForSequenceClassification

    if task not in TASKS:
        raise ExportError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if attention not in ATTENTIONS:
        raise ExportError(f"unknown attention {attention!r}; expected one of {', '.join(ATTENTIONS)}")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old; the graphs need opset >= 17")
    _check_writable(out)

    t0 = time.perf_counter()
    model = load_pretrained(checkpoint)
    is_classifier = isinstance(model, GPT2ForSequenceClassification)
    if is_classifier != (task == "classify"):
        kind = "sequence classifier" if is_classifier else "language model"
        raise ExportError(f"{checkpoint} holds a {kind} ({model.config.architectures}), not a model for task {task!r}")
    n_layer = model.config.n_layer
    target = out / mf.MODEL_FILE
    for stale in mf.model_files(out) + [mf.MANIFEST]:
        (out / stale).unlink(missing_ok=True)  # a half-replaced export must never look complete

    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        if is_classifier:
            export_classification(model, fp32_path, opset)
        else:
            export_generation(model, fp32_path, opset, attention=attention)
        proto = onnx.load(str(fp32_path))
        pruned = prune_unused_optional_outputs(proto)
        logger.info("traced in %.1f s; pruned %d unused optional outputs", time.perf_counter() - t0, pruned)
        counts = check_fusion(proto, n_layer, "standard" if is_classifier else attention)
        if precision == "fp16":
            logger.info("converting to fp16")
            proto = to_fp16(proto)
            _save_proto(proto, target)
        elif precision == "int8":
            logger.info("quantizing MatMul weights to int8")
            to_int8(proto, target)
            proto = onnx.load(str(target), load_external_data=False)
            counts = fused_op_counts(proto)
        else:
            _save_proto(proto, target)

    manifest: dict[str, Any] = {
        "format_version": mf.FORMAT_VERSION,
        "task": task,
        "precision": precision,
        "attention": None if is_classifier else attention,
        "opset": opset,
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": mf.checkpoint_sha256(checkpoint)},
        "model": {"architectures": model.config.architectures, "n_layer": n_layer, "n_head": model.config.n_head,
                  "n_embd": model.config.n_embd, "vocab_size": model.config.vocab_size,
                  "n_positions": model.config.n_positions, "num_labels": model.config.num_labels if is_classifier
                  else None},
        **_io_spec(proto),
        "fused_ops": counts,
        "expected_skip_layer_norm": 2 * n_layer + 1,
        "files": {name: mf.file_sha256(out / name) for name in mf.model_files(out)},
        "versions": mf.tool_versions(),
        "export_seconds": round(time.perf_counter() - t0, 2),
        "parity": None,
    }
    report = None
    if verify_parity:
        logger.info("verifying parity against PyTorch (%s)", precision)
        report = verify(model, target, precision, providers, checkpoint)
        manifest["parity"] = report.to_dict()
        manifest["parity"].pop("checks")  # per-scenario detail stays in the CLI output
    mf.write_json_atomic(out / mf.MANIFEST, manifest)
    if report is not None and not report.passed:
        raise ParityError("; ".join(report.failures()))
    logger.info("wrote %s (%s, %s) in %.1f s", target, task, precision, time.perf_counter() - t0)
    return manifest

