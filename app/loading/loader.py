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
(`OrtSlotRunner`): decode steps copy no cache. On CUDA in fp16 it is the same graph on fixed
device buffers (`OrtFixedRunner`), its decode steps captured as CUDA graphs per batch bucket
(`CUDA_GRAPHS`); in fp32 on CUDA (ONNX Runtime's CUDA GroupQueryAttention takes fp16/bf16 only),
or when the GQA export fails its parity check there, the standard past/present graph with IO
binding.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

# Loaded and SettingRefusedError live on the engine's side (it consumes them); re-exported here.
from app.engine.runner import Loaded, SettingRefusedError
from app.loading import export_child, export_lock, export_memory, memory_fit
from export import manifest as mf

logger = logging.getLogger(__name__)


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


def resolve_precision(precision: str, device: str) -> str:
    """`PRECISION=auto` is fp16 on CUDA and fp32 on CPU, as TGI and vLLM default to half precision
    on a GPU; an explicit precision is obeyed."""
    if precision != "auto":
        return precision
    return "fp16" if device == "cuda" else "fp32"


def attention_for(task: str, device: str, precision: str = "fp32") -> str:
    """The generation graph each device and precision serves best (see the module docstring)."""
    if task != "generate":
        return "standard"
    return "gqa" if device == "cpu" or precision == "fp16" else "standard"


QUANTIZED = ("int8", "int4")


def kernel_tag(precision: str, kernel: str = "auto") -> str:
    """The cache key's kernel word of a quantized precision: the instruction-set level the kernel
    was measured on (auto: `export.kernels.isa_tag`), or the forced kernel's name; "" otherwise.
    A cache shared by hosts of different CPUs then holds one measured choice per level."""
    if precision not in QUANTIZED:
        return ""
    from export.kernels import isa_tag

    return f"-{isa_tag()}" if kernel == "auto" else f"-{kernel}"


def cache_key(sha: str, task: str, precision: str, attention: str = "standard", kernel: str = "auto") -> str:
    """The cache folder name for a checkpoint (by its `checkpoint_sha256`) and the export options."""
    kind = f"-{attention}" if task == "generate" else ""
    return (f"{task}-{precision}{kernel_tag(precision, kernel)}{kind}-opset{mf.DEFAULT_OPSET}"
            f"-v{mf.FORMAT_VERSION}-{sha[:20]}")


def _valid(folder: Path, sha: str) -> str | None:
    """None if `folder` holds a usable export of checkpoint `sha`, else why not."""
    try:
        m = mf.read_manifest(folder)
    except ValueError as e:
        return str(e)
    if m.get("checkpoint", {}).get("sha256") != sha:
        return "checkpoint hash differs"
    chosen = m.get("kernel") or {}
    if chosen.get("chosen_by") == "measured":
        from export.kernels import isa_tag

        if chosen.get("isa") != (here := isa_tag()):  # a cache folder copied from another kind of CPU
            return f"its kernel {chosen.get('name')} was measured on {chosen.get('isa')}, this CPU is {here}"
    if not (m.get("parity") or {}).get("passed"):
        return "parity was not verified or failed"
    bad = mf.verify_files(folder, m)
    return f"damaged files: {', '.join(bad)}" if bad else None


class LoadCancelledError(RuntimeError):
    """Loading was cancelled (the server is shutting down); not a reason to fall back."""


class ExportFailedError(RuntimeError):
    """The export child failed. The message is one line (the first failed check and how many
    failed, or the child's last error line); `report` is the file with everything it printed."""

    def __init__(self, summary: str, output: str, manifest: dict[str, Any] | None = None) -> None:
        super().__init__(summary)
        self.summary, self.output, self.manifest = summary, output, manifest
        self.report: Path | None = None

    def __str__(self) -> str:
        return self.summary + (f"; full report: {self.report}" if self.report else "")


class TransientExportError(ExportFailedError):
    """The export did not finish for a reason that may not recur: the child was killed by a
    signal (the out-of-memory killer's SIGKILL), the cache filesystem was full or failing, memory
    ran out, or another process took the export lock over. Not remembered (`export_memory`):
    the next start tries again."""

    def __init__(self, cause: str, output: str = "", manifest: dict[str, Any] | None = None) -> None:
        super().__init__(f"export did not finish: {cause}; not remembered, retried at the next start",
                         output, manifest)


def one_line(e: BaseException, limit: int = 400) -> str:
    """`Type: first line of the message`, at most `limit` characters: what /info, /health and the
    WARNING line show. The whole message and traceback go to the log at DEBUG."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if len(lines) > 1:
        text += f" (+{len(lines) - 1} more lines in the log)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_report_path(export_dir: Path) -> Path:
    """Where a failed export's full output goes: next to where the export would have been."""
    return export_dir.with_name(export_dir.name + ".failed.json")


def ensure_export(checkpoint: Path, task: str, precision: str, cache_dir: Path, device: str = "cpu",
                  cancel: threading.Event | None = None, retry_failed: bool = False,
                  attention: str | None = None,
                  lock_stale_s: float = export_lock.STALE_AFTER_S, kernel: str = "auto") -> tuple[Path, bool]:
    """(path of a verified `model.onnx` for the checkpoint, whether the cache already had it),
    exporting it if the cache has none. One process exports an entry at a time; the others wait
    for it and use its export (`export_lock`, EXPORT_LOCK_STALE_SECONDS). An export that already
    failed with the same checkpoint, options and exporter version is not re-run unless
    `retry_failed` (`export_memory`); that is checked under the lock, so a process that waited for
    a failing export does not run it again."""
    sha = mf.checkpoint_sha256(checkpoint)  # hashes every weight file: once per start
    attention = attention or attention_for(task, device, precision)
    final = cache_dir / cache_key(sha, task, precision, attention, kernel)
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
    report = failure_report_path(final)
    if not retry_failed and (failed := export_memory.remembered(report)) is not None:
        raise ExportFailedError(export_memory.describe(failed, report), failed.get("output", ""),
                                failed.get("manifest"))
    memory_fit.check(checkpoint, memory_fit.export_need(checkpoint), "exporting it to ONNX")
    # One exporter per entry, across replicas sharing the cache; dead exports' leftovers go first.
    lock = export_lock.ExportLock(cache_dir, final.name, lock_stale_s)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        acquired = lock.acquire(cancel)
    except OSError as e:  # the same classification as the export child's
        info = export_child.transient_failure(e)
        if info is None or info["kind"] != "no_space":
            raise
        raise TransientExportError(f"no space left on the cache filesystem {cache_dir} ({info['errno']})") from e
    if not acquired:
        raise LoadCancelledError("export cancelled: shutting down")
    tmp = lock.tmp
    try:
        if lock.waited_s and final.exists() and _valid(final, sha) is None:
            logger.info("another process exported %s while this one waited %.0f s; using it", final, lock.waited_s)
            return final / mf.MODEL_FILE, True
        if lock.waited_s and not retry_failed and (failed := export_memory.remembered(report)) is not None:
            raise ExportFailedError(export_memory.describe(failed, report), failed.get("output", ""),
                                    failed.get("manifest"))
        logger.info("exporting %s (%s, %s) to the cache; first start only", checkpoint, task, precision)
        try:
            _export_subprocess(checkpoint, tmp, task, precision, device, cancel, attention, kernel)
        except TransientExportError as e:
            logger.debug("the export's output:\n%s", e.output)
            raise  # not remembered: the next start tries again
        except ExportFailedError as e:
            if not lock.still_held():  # the new holder may have removed this export's folder
                logger.debug("the export's output:\n%s", e.output)
                raise TransientExportError(f"another process took the export lock {lock.path.name} over "
                                           f"(no heartbeat seen for {lock_stale_s:.0f} s)", e.output) from e
            _write_failure_report(e, report)
            raise
        report.unlink(missing_ok=True)  # an earlier failure's report no longer applies
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same export first: keep theirs if it is sound.
            if _valid(final, sha) is not None:
                raise
            logger.info("another process wrote %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.release()
    return final / mf.MODEL_FILE, False


def _write_failure_report(e: ExportFailedError, path: Path) -> None:
    """Keep the child's whole output (parity table, every failed check) beside the cache entry;
    if that cannot be written, it goes to the log at DEBUG instead."""
    try:
        mf.write_json_atomic(path, {"summary": e.summary, "manifest": e.manifest, "output": e.output,
                                    "exporter_version": export_memory.exporter_version(),
                                    "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        e.report = path
    except OSError as err:
        logger.debug("could not write %s (%s); the export's output:\n%s", path, err, e.output)


def _error_line(output: str) -> str:
    """The last line of the child's output that says what went wrong: not a library's warning
    (`...: UserWarning: ...` and its indented source line), nor a traceback's indented lines."""
    for raw in reversed(output.splitlines()):
        line = raw.strip()
        if not line or raw[:1].isspace() or "Warning" in line or "warn(" in line:
            continue
        return line
    return "no output"


def _summarize(returncode: int, output: str, manifest: dict[str, Any] | None) -> str:
    """One line for a failed export: the first failed parity check and how many failed, or the
    child's last error line."""
    parity = (manifest or {}).get("parity") or {}
    failures = parity.get("failures") or []
    if failures:
        more = f" (1 of {len(failures)} failed checks)" if len(failures) > 1 else ""
        return (f"export parity failed on {parity.get('provider')} ({parity.get('precision')}): "
                f"{failures[0]}{more}")
    return f"export failed (exit {returncode}): {_error_line(output)}"


def _transient_cause(returncode: int, output: str, cache_dir: Path) -> str | None:
    """Why the child stopped, when that may not recur (a signal, or `export_child`'s
    EXIT_TRANSIENT report of a full disk, an I/O error, memory exhausted); None otherwise."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the export child was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    if returncode != export_child.EXIT_TRANSIENT:
        return None
    info: Any = {}
    tag = export_child.TRANSIENT_TAG
    if (tagged := next((ln for ln in reversed(output.splitlines()) if ln.startswith(tag)), None)) is not None:
        with contextlib.suppress(ValueError):
            info = json.loads(tagged[len(tag):])
    info = info if isinstance(info, dict) else {}
    kind, code, error = info.get("kind"), info.get("errno"), info.get("error") or _error_line(output)
    path = info.get("path")
    in_cache = path is None or Path(str(path)).resolve().is_relative_to(cache_dir.resolve())
    where = f"the cache filesystem {cache_dir}" if in_cache else f"the filesystem of {path}"
    if kind == "no_space":
        return f"no space left on {where}" + (f" ({code})" if code else "")
    if kind == "io_error":
        return f"I/O error on {where} ({error})"
    if kind == "memory":
        return f"the export ran out of memory ({error})"
    return f"the export child reported a transient failure ({error})"


def _export_subprocess(checkpoint: Path, out: Path, task: str, precision: str, device: str,
                       cancel: threading.Event | None = None, attention: str = "standard",
                       kernel: str = "auto") -> None:
    """Run `python -m export` in a child process: torch and the tracer's memory stay out of the
    server process, and the tracer never shares the interpreter with the event loop's threads.
    Setting `cancel` stops the child (a shutdown during a first-start export)."""
    # `python -m export` that the kernel kills if this process dies (export_child: PR_SET_PDEATHSIG)
    cmd = [sys.executable, "-m", "app.loading.export_child", "--checkpoint", str(checkpoint), "--task", task,
           "--out", str(out), "--precision", precision, "--attention", attention]
    if precision in QUANTIZED:
        cmd += ["--kernel", kernel]
    if device == "cuda":
        cmd += ["--provider", "CUDAExecutionProvider"]
    with tempfile.TemporaryFile() as log:  # stdout (the summary table) and stderr, interleaved
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
                                env={**os.environ, export_child.PARENT_ENV: str(os.getpid())})
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
            log.seek(0)
            output = log.read().decode(errors="replace")
            if (cause := _transient_cause(proc.returncode, output, out.parent)) is not None:
                raise TransientExportError(cause, output)
            try:
                manifest = mf.read_manifest(out)  # written even when parity fails
            except ValueError:
                manifest = None
            raise ExportFailedError(_summarize(proc.returncode, output, manifest), output, manifest)


def _load_ort(task: str, checkpoint: Path, dev: str, precision: str, cache_dir: Path, num_threads: int | None,
              cancel: threading.Event | None, max_batch_size: int, cuda_graphs: str, retry_failed: bool,
              lock_stale_s: float, prefix_cache_bytes: int = 0,
              session_config: dict[str, str] | None = None, quant_kernel: str = "auto") -> Loaded:
    from app.engine.ort_runner import OrtClassificationRunner, OrtEmbeddingRunner, OrtGenerationRunner, OrtSlotRunner

    attention = attention_for(task, dev, precision)
    note = None
    try:
        path, cache_hit = ensure_export(checkpoint, task, precision, cache_dir, dev, cancel, retry_failed, attention,
                                        lock_stale_s, quant_kernel)
    except ExportFailedError as e:
        if isinstance(e, TransientExportError) or not (dev == "cuda" and attention == "gqa") or cuda_graphs == "on":
            raise
        # The GQA graph did not pass on this GPU: the standard graph still serves ONNX Runtime.
        note = f"GroupQueryAttention graph not used ({one_line(e)}); standard graph, no CUDA graphs"
        logger.warning("%s", note)
        attention = "standard"
        path, cache_hit = ensure_export(checkpoint, task, precision, cache_dir, dev, cancel, retry_failed, attention,
                                        lock_stale_s, quant_kernel)
    manifest = mf.read_manifest(path.parent)
    n_positions = int(manifest["model"]["n_positions"])
    if task == "embed":
        runner = OrtEmbeddingRunner(path, dev, num_threads, n_positions=n_positions)
    elif task != "generate":
        runner = OrtClassificationRunner(path, dev, num_threads, n_positions=n_positions)
    elif attention == "gqa" and dev == "cuda":
        from app.engine.fixed_runner import OrtFixedRunner

        runner = OrtFixedRunner(path, dev, max_batch_size, num_threads, n_positions, cuda_graphs,
                                prefix_cache_bytes=prefix_cache_bytes)
    elif attention == "gqa":
        if prefix_cache_bytes:  # the pool is host memory here (on CUDA it is the GPU's)
            try:
                memory_fit.check(checkpoint, memory_fit.serve_need(checkpoint) + prefix_cache_bytes,
                                 f"serving it with a prefix cache of {prefix_cache_bytes >> 20} MiB")
            except memory_fit.MemoryFitError as e:  # a setting's doing: refuse, never fall back to PyTorch
                raise SettingRefusedError(f"{e}; or lower PREFIX_CACHE_MB (0 or PREFIX_CACHING=false: "
                                          f"no prefix cache)") from e
        runner = OrtSlotRunner(path, dev, num_threads, n_positions=n_positions, max_rows=max_batch_size,
                               prefix_cache_bytes=prefix_cache_bytes, session_config=session_config)
    else:
        runner = OrtGenerationRunner(path, dev, num_threads, n_positions=n_positions)
    return Loaded(runner, task, "onnxruntime", dev, precision, checkpoint, path, note, cache_hit,
                  attention if task == "generate" else None, _kernel_info(manifest))


def _kernel_info(m: dict[str, Any]) -> dict[str, Any] | None:
    """/info's `quantization`: the kernel a quantized export serves, how it was chosen, on what CPU."""
    q, k = m.get("quantization"), m.get("kernel") or {}
    if not q:
        return None
    return {"kernel": q.get("kernel"), "scheme": q.get("scheme"), "bits": q.get("bits"),
            "block_size": q.get("block_size"), "chosen_by": k.get("chosen_by"), "isa": k.get("isa"),
            "cpu_flags": k.get("cpu_flags"), "score": k.get("score"),
            "rejected": [r["name"] for r in k.get("rejected") or []]}


def load(task: str, checkpoint: Path, backend: str = "auto", device: str = "auto", precision: str = "auto",
         cache_dir: Path = Path(".onnx_cache"), num_threads: int | None = None,
         cancel: threading.Event | None = None, max_batch_size: int = 32, cuda_graphs: str = "auto",
         retry_failed_export: bool = False, lock_stale_s: float = export_lock.STALE_AFTER_S,
         prefix_cache_bytes: int = 0, session_config: dict[str, str] | None = None,
         quant_kernel: str = "auto") -> Loaded:
    """Build the runner for `task` ("generate", "classify", or "embed": the embedding graph of a
    language model's checkpoint) following BACKEND/DEVICE/PRECISION.
    `max_batch_size` sizes the fixed KV buffers of the CUDA runner; `cuda_graphs` (auto/on/off)
    is whether it captures its decode steps (`OrtFixedRunner.capture`, at the engine's warm-up);
    `retry_failed_export` re-runs an export that failed before (`export_memory`); `lock_stale_s`:
    when another process's export lock counts as dead (`export_lock`); `prefix_cache_bytes`: the
    prefix cache budget of a generation runner that has one (`app.engine.prefix_cache`; 0: off);
    `quant_kernel`: int8 / int4's kernel (`export.kernels`; auto: measured on this CPU)."""
    checkpoint = Path(checkpoint)
    dev = resolve_device(device, backend)
    precision = resolve_precision(precision, dev)
    reason = None
    if backend in ("auto", "onnxruntime"):
        try:
            if dev == "cuda" and not ort_cuda_available():
                raise RuntimeError("DEVICE=cuda but ONNX Runtime has no CUDAExecutionProvider "
                                   "(install onnxruntime-gpu)")
            if precision == "fp16" and dev == "cpu":
                logger.warning("PRECISION=fp16 on CPU: ONNX Runtime runs it, but fp32 or int8 is faster there")
            if cuda_graphs == "on" and task == "generate" and not (dev == "cuda" and precision == "fp16"):
                raise SettingRefusedError(f"CUDA_GRAPHS=on needs DEVICE=cuda and PRECISION=fp16 "
                                          f"(this start resolved to {dev}, {precision})")
            return _load_ort(task, checkpoint, dev, precision, cache_dir, num_threads, cancel, max_batch_size,
                             cuda_graphs, retry_failed_export, lock_stale_s, prefix_cache_bytes, session_config,
                             quant_kernel)
        except (LoadCancelledError, SettingRefusedError):
            raise
        except Exception as e:
            logger.debug("ONNX Runtime cannot serve %s %s", task, checkpoint, exc_info=e)
            if backend == "onnxruntime":
                raise
            reason = one_line(e)
            logger.warning("ONNX Runtime cannot serve %s %s, falling back to PyTorch: %s", task, checkpoint, reason)
    from app.engine.torch_runner import TorchClassificationRunner, TorchEmbeddingRunner, TorchGenerationRunner

    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda but neither ONNX Runtime nor PyTorch can use a GPU here")
    memory_fit.check(checkpoint, memory_fit.serve_need(checkpoint), "serving it on PyTorch")
    cls = {"generate": TorchGenerationRunner, "embed": TorchEmbeddingRunner}.get(task, TorchClassificationRunner)
    served_precision = precision if (precision == "fp16" and dev == "cuda") else "fp32"
    runner = cls(checkpoint, dev, precision, num_threads)
    return Loaded(runner, task, "torch", dev, served_precision, checkpoint, None, reason,
                  attention="standard" if task == "generate" else None)
