"""Checkpoint folder -> `model.onnx` + `manifest.json`: trace, fuse-check, precision, verify."""

from __future__ import annotations

import errno
import gc
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from export import manifest as mf
from export import storage
from export.agreement import PPL_MARGIN, compare_perplexity, heldout_reference
from export.fusion import check_fusion, fused_op_counts, prune_unused_optional_outputs
from export.graphs import DEFAULT_OPSET, export_classification, export_embedding, export_generation
from export.kernels import CANDIDATES, Kernel, rank
from export.precision import PRECISIONS, to_fp16
from export.quantize import quantize_blockwise
from export.reference import reference
from export.verify import Check, ParityError, compare

logger = logging.getLogger(__name__)

TASKS = ("generate", "classify", "embed")  # embed: the trunk's hidden states (`export_embedding`)
ATTENTIONS = ("standard", "gqa")


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


class ExportError(RuntimeError):
    """The export could not be made (bad arguments, unwritable folder, fusion check failed)."""


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # a full disk, not an unwritable folder: the export may succeed later
        raise ExportError(f"output folder {str(out)!r} is not writable ({e.strerror or e})") from e


def _io_spec(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def one(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [one(i) for i in model.graph.input], "outputs": [one(o) for o in model.graph.output]}


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    task: str = "generate",
    precision: str = "fp32",
    verify_parity: bool = True,
    opset: int = DEFAULT_OPSET,
    providers: list[str] | None = None,
    attention: str = "standard",
    kernel: str = "auto",
) -> dict[str, Any]:
    """Export `checkpoint` into folder `out` and return the manifest written there.

    `attention` ("standard" or "gqa") picks the generation graph's signature (see
    `export.graphs`); classification and embedding graphs ignore it. `task="embed"` exports a
    language model's trunk (`export.graphs.export_embedding`). `kernel` (int8, int4): "auto"
    measures the candidate kernels on this CPU (`export.kernels`), or a kernel's name.

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
    config = model.config
    is_classifier = isinstance(model, GPT2ForSequenceClassification)
    if is_classifier != (task == "classify"):
        kind = "sequence classifier" if is_classifier else "language model"
        raise ExportError(f"{checkpoint} holds a {kind} ({config.architectures}), not a model for task {task!r}")
    n_layer = config.n_layer
    target = out / mf.MODEL_FILE
    for stale in mf.model_files(out) + [mf.MANIFEST]:
        (out / stale).unlink(missing_ok=True)  # a half-replaced export must never look complete

    ref = ppl_ref = None
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp_name:
        # The trace is saved with external weights and every pass below reads the graph's
        # structure alone, weights staying on disk until needed (export.storage): no step
        # holds a second copy of the weights, and nothing is serialized as one proto past 2 GB.
        tmp = Path(tmp_name)
        fp32_path = tmp / "fp32.onnx"
        if is_classifier:
            export_classification(model, fp32_path, opset)
        elif task == "embed":
            export_embedding(model, fp32_path, opset)
        else:
            export_generation(model, fp32_path, opset, attention=attention)
        gc.collect()  # the exporter's program and its copies of the graph
        logger.info("traced in %.1f s (peak RSS so far %.2f GiB)", time.perf_counter() - t0, peak_rss_gib())
        if verify_parity:
            # PyTorch's side of the checks runs now (every scenario's tokens are PyTorch's own
            # argmax, so nothing from the graph is needed), keeping only its answers; the model
            # is then freed before ONNX Runtime loads its copy of the weights.
            ref = reference(model, "classify" if is_classifier else "embed" if task == "embed" else attention,
                            checkpoint)
            if precision in PPL_MARGIN and task == "generate":
                ppl_ref = heldout_reference(model, checkpoint)
            logger.info("PyTorch reference for the parity check: %d scenarios, %.1f MB kept",
                        len(ref.scenarios), ref.nbytes / 1e6)
        del model
        gc.collect()
        # A quantized precision tries its kernels fastest first on this CPU (export.kernels) and
        # serves the first that passes the accuracy gates; the others have one candidate (None).
        candidates: list[Kernel | None] = [None]
        choice: dict[str, Any] | None = None
        if precision in CANDIDATES:
            try:
                ranked, choice = rank(precision, config.n_embd, kernel)
            except ValueError as e:
                raise ExportError(str(e)) from e
            candidates, choice["rejected"] = list(ranked), []
        about = {"format_version": mf.FORMAT_VERSION, "task": task, "precision": precision,
                 "attention": attention if task == "generate" else None, "opset": opset,
                 "checkpoint": {"path": str(checkpoint.resolve()), "sha256": mf.checkpoint_sha256(checkpoint)},
                 "model": {"architectures": config.architectures, "n_layer": n_layer, "n_head": config.n_head,
                           "n_embd": config.n_embd, "vocab_size": config.vocab_size,
                           "n_positions": config.n_positions,
                           "num_labels": config.num_labels if is_classifier else None},
                 "expected_skip_layer_norm": 2 * n_layer + 1, "versions": mf.tool_versions()}
        for attempt, kern in enumerate(candidates):
            manifest, report = _convert_and_verify(fp32_path, target, task, precision, attention, n_layer, kern,
                                                   ref, ppl_ref, providers)
            manifest |= about | {"export_seconds": round(time.perf_counter() - t0, 2)}
            if choice is None or kern is None:
                break
            manifest["kernel"] = choice | {"name": kern.name}
            if report is None or report.passed or attempt == len(candidates) - 1:
                break
            choice["rejected"].append({"name": kern.name, "failures": report.failures()})
            logger.warning("kernel %s failed the accuracy gates (%s); trying %s", kern.name,
                           "; ".join(report.failures()), candidates[attempt + 1].name)
    mf.write_json_atomic(out / mf.MANIFEST, manifest)
    if report is not None and not report.passed:
        raise ParityError("; ".join(report.failures()))
    logger.info("wrote %s (%s, %s) in %.1f s; peak RSS %.2f GiB", target, task, precision,
                time.perf_counter() - t0, peak_rss_gib())
    return manifest


def _convert_and_verify(fp32_path: Path, target: Path, task: str, precision: str, attention: str, n_layer: int,
                        kern: Kernel | None, ref: Any, ppl_ref: Any,
                        providers: list[str] | None) -> tuple[dict[str, Any], Any]:
    """The fp32 trace at `fp32_path` -> `target` at `precision` (with `kern`'s weights when
    quantized), then the parity and held-out checks against PyTorch's answers (`ref`, `ppl_ref`;
    None: not verified). Returns the manifest's graph, file and parity parts, and the report."""
    out = target.parent
    for stale in mf.model_files(out):
        (out / stale).unlink()
    tmp = fp32_path.parent
    proto = storage.load_structure(fp32_path)
    pruned = prune_unused_optional_outputs(proto)
    logger.info("pruned %d unused optional outputs", pruned)
    counts = check_fusion(proto, n_layer, attention if task == "generate" else "standard")
    quantized = None
    if precision == "fp16":
        logger.info("converting to fp16")
        onnx.external_data_helper.load_external_data_for_model(proto, str(tmp))
        proto = to_fp16(proto)
    elif kern is not None:
        cfg = kern.block
        logger.info("quantizing weights with kernel %s (%d bits)", kern.name, cfg.bits)
        quantized = quantize_blockwise(proto, tmp, cfg, kern.scheme) | {
            "kernel": kern.name, "scheme": kern.scheme, "bits": cfg.bits, "block_size": cfg.block_size,
            "symmetric": cfg.symmetric, "accuracy_level": cfg.accuracy_level}
        counts = fused_op_counts(proto)
    storage.save(proto, tmp, target)
    manifest: dict[str, Any] = {**_io_spec(proto), "fused_ops": counts, "quantization": quantized,
                                "files": {name: mf.file_sha256(out / name) for name in mf.model_files(out)},
                                "parity": None}
    del proto
    if ref is None:
        return manifest, None
    logger.info("verifying parity against PyTorch (%s%s)", precision, f", {kern.name}" if kern else "")
    report = compare(ref, target, precision, providers)
    ppl = None
    if ppl_ref is not None:
        gc.collect()  # verify's session, before the next one
        logger.info("held-out perplexity against PyTorch (%s)", precision)
        ppl = compare_perplexity(ppl_ref, target, precision, providers)
        report.checks.append(Check("held-out text", "perplexity ratio - 1", max(0.0, ppl["ratio"] - 1),
                                   ppl["margin"]))
    manifest["parity"] = report.to_dict() | {"perplexity": ppl}
    manifest["parity"].pop("checks")  # per-scenario detail stays in the CLI output
    return manifest, report
