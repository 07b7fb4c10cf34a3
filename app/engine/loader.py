"""Backend selection and the export cache.

`BACKEND=auto` serves on ONNX Runtime from an export made on first start (or found in
`ONNX_CACHE_DIR`, keyed by checkpoint hash, task, precision, attention and opset) and falls back to PyTorch
when the export, the session or the requested provider fails; the reason is logged and kept
for `/info`. A cached export is used only if its manifest matches the checkpoint hash, its
parity check passed and every model file still has its recorded sha256; otherwise it is rebuilt.
Exports run in a child process (`python -m export`), write to a temporary folder and are renamed
into place, so two processes starting at once never see (or leave) half an export, and the
serving process never imports torch on the ONNX Runtime path.

On CPU the generation graph is the GroupQueryAttention one with shared KV buffers
(`OrtSlotRunner`): decode steps copy no cache. On CUDA it is the standard past/present graph
(ONNX Runtime's CUDA GroupQueryAttention takes fp16/bf16 only), run with IO binding.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export import manifest as mf

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    runner: Any  # GenerationRunner | ClassificationRunner
    task: str
    backend: str
    device: str
    precision: str
    checkpoint: Path
    onnx_path: Path | None = None
    fallback_reason: str | None = None
    cache_hit: bool | None = None
    attention: str | None = None  # generation graph signature: "gqa" | "standard"


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_device(device: str, backend: str) -> str:
    if device != "auto":
        return device
    if backend != "torch" and ort_cuda_available():
        return "cuda"
    if backend == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def attention_for(task: str, device: str) -> str:
    """The generation graph each device serves best (see the module docstring)."""
    return "gqa" if task == "generate" and device == "cpu" else "standard"


def cache_key(sha: str, task: str, precision: str, attention: str = "standard") -> str:
    """The cache folder name for a checkpoint (by its `checkpoint_sha256`) and the export options."""
    kind = f"-{attention}" if task == "generate" else ""
    return f"{task}-{precision}{kind}-opset{mf.DEFAULT_OPSET}-{sha[:20]}"


def _valid(folder: Path, sha: str) -> str | None:
    """None if `folder` holds a usable export of checkpoint `sha`, else why not."""
    try:
        m = mf.read_manifest(folder)
    except ValueError as e:
        return str(e)
    if m.get("checkpoint", {}).get("sha256") != sha:
        return "checkpoint hash differs"
    if not (m.get("parity") or {}).get("passed"):
        return "parity was not verified or failed"
    bad = mf.verify_files(folder, m)
    return f"damaged files: {', '.join(bad)}" if bad else None


class LoadCancelledError(RuntimeError):
    """Loading was cancelled (the server is shutting down); not a reason to fall back."""


def ensure_export(checkpoint: Path, task: str, precision: str, cache_dir: Path, device: str = "cpu",
                  cancel: threading.Event | None = None) -> tuple[Path, bool]:
    """(path of a verified `model.onnx` for the checkpoint, whether the cache already had it),
    exporting it if the cache has none."""
    sha = mf.checkpoint_sha256(checkpoint)  # hashes every weight file: once per start
    attention = attention_for(task, device)
    final = cache_dir / cache_key(sha, task, precision, attention)
    if final.exists():
        why = _valid(final, sha)
        if why is None:
            logger.info("using cached export %s", final)
            return final / mf.MODEL_FILE, True
        logger.warning("cached export %s is unusable (%s); rebuilding", final, why)
        trash = cache_dir / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process moved it first
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{final.name}-{uuid.uuid4().hex}"
    logger.info("exporting %s (%s, %s) to the cache; first start only", checkpoint, task, precision)
    try:
        _export_subprocess(checkpoint, tmp, task, precision, device, cancel, attention)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same export first: keep theirs if it is sound.
            if _valid(final, sha) is not None:
                raise
            logger.info("another process wrote %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / mf.MODEL_FILE, False


def _export_subprocess(checkpoint: Path, out: Path, task: str, precision: str, device: str,
                       cancel: threading.Event | None = None, attention: str = "standard") -> None:
    """Run `python -m export` in a child process: torch and the tracer's memory stay out of the
    server process, and the tracer never shares the interpreter with the event loop's threads.
    Setting `cancel` stops the child (a shutdown during a first-start export)."""
    cmd = [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--task", task, "--out", str(out),
           "--precision", precision, "--attention", attention]
    if device == "cuda":
        cmd += ["--provider", "CUDAExecutionProvider"]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=Path(__file__).resolve().parents[2])
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    proc.terminate()
                    proc.wait()
                    raise LoadCancelledError("export cancelled: shutting down") from None
        if proc.returncode != 0:
            err.seek(0)
            tail = "\n".join(err.read().decode(errors="replace").strip().splitlines()[-5:])
            raise RuntimeError(f"export failed (exit {proc.returncode}): {tail}")


def _context_length(onnx_path: Path) -> int:
    return int(mf.read_manifest(onnx_path.parent)["model"]["n_positions"])


def load(task: str, checkpoint: Path, backend: str = "auto", device: str = "auto", precision: str = "fp32",
         cache_dir: Path = Path(".onnx_cache"), num_threads: int | None = None,
         cancel: threading.Event | None = None) -> Loaded:
    """Build the runner for `task` ("generate" or "classify") following BACKEND/DEVICE/PRECISION."""
    checkpoint = Path(checkpoint)
    dev = resolve_device(device, backend)
    reason = None
    if backend in ("auto", "onnxruntime"):
        try:
            if dev == "cuda" and not ort_cuda_available():
                raise RuntimeError("DEVICE=cuda but ONNX Runtime has no CUDAExecutionProvider "
                                   "(install onnxruntime-gpu)")
            if precision == "fp16" and dev == "cpu":
                logger.warning("PRECISION=fp16 on CPU: ONNX Runtime runs it, but fp32 or int8 is faster there")
            path, cache_hit = ensure_export(checkpoint, task, precision, cache_dir, dev, cancel)
            from app.engine.ort_runner import OrtClassificationRunner, OrtGenerationRunner, OrtSlotRunner

            attention = attention_for(task, dev)
            if task != "generate":
                runner = OrtClassificationRunner(path, dev, num_threads, n_positions=_context_length(path))
            elif attention == "gqa":
                runner = OrtSlotRunner(path, dev, num_threads, n_positions=_context_length(path))
            else:
                runner = OrtGenerationRunner(path, dev, num_threads, n_positions=_context_length(path))
            return Loaded(runner, task, "onnxruntime", dev, precision, checkpoint, path, None, cache_hit,
                          attention if task == "generate" else None)
        except LoadCancelledError:
            raise
        except Exception as e:
            if backend == "onnxruntime":
                raise
            reason = f"{type(e).__name__}: {e}"
            logger.warning("ONNX Runtime cannot serve %s (%s); falling back to PyTorch", checkpoint, reason)
    from app.engine.torch_runner import TorchClassificationRunner, TorchGenerationRunner

    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda but neither ONNX Runtime nor PyTorch can use a GPU here")
    cls = TorchGenerationRunner if task == "generate" else TorchClassificationRunner
    served_precision = precision if (precision == "fp16" and dev == "cuda") else "fp32"
    runner = cls(checkpoint, dev, precision, num_threads)
    return Loaded(runner, task, "torch", dev, served_precision, checkpoint, None, reason,
                  attention="standard" if task == "generate" else None)
