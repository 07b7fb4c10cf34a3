"""Backend selection, the export cache (reuse, damage, concurrent starts) and the real fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from app.engine.ort_runner import GraphContractError, OrtGenerationRunner, OrtSlotRunner
from app.loading import export_memory, loader
from export.manifest import file_sha256, read_manifest

REPO = Path(__file__).resolve().parents[3]


def greedy(runner, ids: list[int], n: int) -> list[int]:
    out = [int(runner.add([ids]).top_ids[0, 0])]
    for _ in range(n - 1):
        out.append(int(runner.step([out[-1]]).top_ids[0, 0]))
    runner.reset()
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_first_start_exports_then_the_cache_is_reused(cache, tiny_lm_dir) -> None:
    first = loader.load("generate", tiny_lm_dir, cache_dir=cache)
    assert first.backend == "onnxruntime" and first.cache_hit is False and first.fallback_reason is None
    mtime = first.onnx_path.stat().st_mtime_ns
    second = loader.load("generate", tiny_lm_dir, cache_dir=cache)
    assert second.cache_hit is True and second.onnx_path == first.onnx_path
    assert second.onnx_path.stat().st_mtime_ns == mtime  # not rewritten
    assert sorted(p.name for p in cache.iterdir()) == [first.onnx_path.parent.name]  # no temp leftovers


def test_a_damaged_cached_file_is_detected_and_rebuilt(cache, tiny_lm_dir) -> None:
    lo = loader.load("generate", tiny_lm_dir, cache_dir=cache)
    ref = greedy(lo.runner, [464, 2068, 7586], 8)
    with open(lo.onnx_path, "r+b") as f:  # flip bytes in the middle of the weights
        f.seek(lo.onnx_path.stat().st_size // 2)
        f.write(b"\xff" * 64)
    rebuilt = loader.load("generate", tiny_lm_dir, cache_dir=cache)
    assert rebuilt.backend == "onnxruntime" and rebuilt.fallback_reason is None
    manifest = read_manifest(rebuilt.onnx_path.parent)
    assert file_sha256(rebuilt.onnx_path) == manifest["files"]["model.onnx"]
    assert greedy(rebuilt.runner, [464, 2068, 7586], 8) == ref


def test_unloadable_onnx_makes_auto_fall_back_to_torch_with_the_same_tokens(tmp_path, tiny_lm_dir) -> None:
    """A truncated model.onnx whose manifest vouches for it: ONNX Runtime really fails to load it."""
    good = loader.load("generate", tiny_lm_dir, cache_dir=tmp_path)
    ref = greedy(good.runner, [464, 2068, 7586, 21831], 10)
    path = good.onnx_path
    path.write_bytes(path.read_bytes()[:5000])
    manifest = json.loads((path.parent / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = file_sha256(path)
    (path.parent / "manifest.json").write_text(json.dumps(manifest))

    fell_back = loader.load("generate", tiny_lm_dir, cache_dir=tmp_path)
    assert fell_back.backend == "torch" and fell_back.onnx_path is None
    assert "onnxruntime" in fell_back.fallback_reason.lower() or "fail" in fell_back.fallback_reason.lower()
    assert greedy(fell_back.runner, [464, 2068, 7586, 21831], 10) == ref
    with pytest.raises(Exception):  # noqa: B017 - BACKEND=onnxruntime must not hide the failure
        loader.load("generate", tiny_lm_dir, backend="onnxruntime", cache_dir=tmp_path)


def test_export_failure_falls_back_and_names_the_reason(tmp_path, tiny_lm_dir) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    lo = loader.load("generate", tiny_lm_dir, cache_dir=blocker)
    assert lo.backend == "torch" and lo.fallback_reason
    assert "not-a-dir" in lo.fallback_reason


def test_cuda_request_without_a_gpu_is_a_clear_error(tmp_path, tiny_lm_dir) -> None:
    if loader.ort_cuda_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider"):
        loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="neither ONNX Runtime nor PyTorch can use a GPU"):
        loader.load("generate", tiny_lm_dir, backend="auto", device="cuda", cache_dir=tmp_path)


def test_runner_fails_fast_on_a_graph_missing_an_output(cache, tiny_lm_dir, tmp_path) -> None:
    lo = loader.load("generate", tiny_lm_dir, cache_dir=cache)
    proto = onnx.load(str(lo.onnx_path))
    out = next(o for o in proto.graph.output if o.name == "present.1.value")
    proto.graph.output.remove(out)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    assert lo.attention == "gqa"  # CPU serves the shared-buffer graph
    with pytest.raises(GraphContractError, match="missing output present.1.value"):
        OrtSlotRunner(tmp_path / "m.onnx")
    # The standard-signature runner names what the GQA graph lacks for it.
    with pytest.raises(GraphContractError, match="missing input attention_mask"):
        OrtGenerationRunner(lo.onnx_path)


def test_two_processes_starting_at_once_share_one_sound_export(tmp_path, tiny_lm_dir) -> None:
    code = (
        "import sys; from pathlib import Path; from app.loading import loader\n"
        f"lo = loader.load('generate', Path({str(tiny_lm_dir)!r}), cache_dir=Path({str(tmp_path)!r}))\n"
        "r = lo.runner; t = r.add([[464, 2068]]).top_ids[0, 0]; print(lo.backend, lo.onnx_path, int(t))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = [o[0].split() for o in outs]
    assert lines[0] == lines[1] and lines[0][0] == "onnxruntime"
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 1 and not entries[0].startswith(".")  # no temp or trash left behind
    assert loader._valid(tmp_path / entries[0], read_manifest(tmp_path / entries[0])["checkpoint"]["sha256"]) is None


def test_classifier_loads_on_both_backends_with_equal_logits(cache, tiny_classifier_dir) -> None:
    ort_lo = loader.load("classify", tiny_classifier_dir, cache_dir=cache)
    torch_lo = loader.load("classify", tiny_classifier_dir, backend="torch", cache_dir=cache)
    prompts = [[464, 2068, 7586], [1212]]
    np.testing.assert_allclose(ort_lo.runner.classify(prompts), torch_lo.runner.classify(prompts), atol=1e-4)


# ---- PRECISION=auto, and a fallback that is one line with the full report beside the cache ----
def test_auto_precision_is_fp16_on_cuda_and_fp32_on_cpu_and_explicit_wins() -> None:
    assert loader.resolve_precision("auto", "cuda") == "fp16"
    assert loader.resolve_precision("auto", "cpu") == "fp32"
    for explicit in ("fp32", "fp16", "int8", "int4"):
        assert loader.resolve_precision(explicit, "cuda") == explicit
        assert loader.resolve_precision(explicit, "cpu") == explicit


def test_default_load_on_cpu_serves_fp32(cache, tiny_lm_dir) -> None:
    lo = loader.load("generate", tiny_lm_dir, cache_dir=cache)  # precision defaults to auto
    assert (lo.device, lo.precision, lo.backend) == ("cpu", "fp32", "onnxruntime")
    assert read_manifest(lo.onnx_path.parent)["precision"] == "fp32"


def test_one_line_keeps_the_first_line_and_bounds_the_length() -> None:
    assert loader.one_line(ValueError("bad\n  detail 1\n\n detail 2")) == "ValueError: bad (+2 more lines in the log)"
    assert loader.one_line(RuntimeError("")) == "RuntimeError"
    long = loader.one_line(RuntimeError("x" * 1000), limit=100)
    assert len(long) == 100 and long.endswith("...")


def test_a_failed_parity_check_falls_back_with_one_line_and_the_full_report_beside_the_cache(
        nan_lm_dir, tmp_path, caplog) -> None:
    caplog.set_level("WARNING", logger="app.loading.loader")
    lo = loader.load("generate", nan_lm_dir, cache_dir=tmp_path)
    assert lo.backend == "torch"
    reason = lo.fallback_reason
    assert "\n" not in reason and len(reason) <= 400, reason
    assert reason.startswith("ExportFailedError: export parity failed on CPUExecutionProvider (fp32): ")
    report_path = Path(reason.rsplit("full report: ", 1)[1])
    assert report_path.parent == tmp_path and report_path.name.endswith(".failed.json")
    report = json.loads(report_path.read_text())
    failures = report["manifest"]["parity"]["failures"]
    assert len(failures) > 2 and all("max |diff| nan" in f for f in failures[:-1])
    assert failures[-1] == "top-1 agreement 0.0000 < floor 1.0"  # a NaN logit agrees with nothing
    assert "logits max |diff| nan" in failures[0]
    assert f"{failures[0]} (1 of {len(failures)} failed checks)" in reason
    assert "FAILED" in report["output"]  # the CLI's summary table, which the log line leaves out
    # The same one line at WARNING; nothing of the report's bulk in the log.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.endswith(reason) for w in warnings), warnings
    assert not any(len(w) > 1000 for w in warnings)
    # No half export was left in the cache: only the report.
    assert [p.name for p in tmp_path.iterdir()] == [report_path.name]
    # BACKEND=onnxruntime refuses, with the same line.
    with pytest.raises(loader.ExportFailedError) as err:
        loader.load("generate", nan_lm_dir, backend="onnxruntime", cache_dir=tmp_path, retry_failed_export=True)
    assert loader.one_line(err.value) == reason


def test_a_failed_export_is_remembered_and_not_rerun_until_retried(nan_lm_dir, tmp_path) -> None:
    first = loader.load("generate", nan_lm_dir, cache_dir=tmp_path)
    report = Path(first.fallback_reason.rsplit("full report: ", 1)[1])
    data = json.loads(report.read_text())
    assert data["exporter_version"] == export_memory.exporter_version() and data["failed_at"]
    stamp = report.stat().st_mtime_ns
    again = loader.load("generate", nan_lm_dir, cache_dir=tmp_path)  # same checkpoint, options, exporter
    assert again.backend == "torch" and "\n" not in again.fallback_reason
    assert again.fallback_reason.startswith("ExportFailedError: export parity failed on CPUExecutionProvider (fp32)")
    assert f"remembered from {data['failed_at']}, not retried: set RETRY_FAILED_EXPORT=1" in again.fallback_reason
    assert report.stat().st_mtime_ns == stamp  # the export did not run again
    assert [p.name for p in tmp_path.iterdir()] == [report.name]
    # An exporter that changed since (another version recorded) tries again, and so does a retry.
    report.write_text(json.dumps(data | {"exporter_version": "0.0.0+other"}))
    third = loader.load("generate", nan_lm_dir, cache_dir=tmp_path)
    assert "remembered" not in third.fallback_reason
    assert json.loads(report.read_text())["exporter_version"] == export_memory.exporter_version()
    stamp = report.stat().st_mtime_ns
    loader.load("generate", nan_lm_dir, cache_dir=tmp_path, retry_failed_export=True)
    assert report.stat().st_mtime_ns > stamp


def test_a_failed_export_names_the_childs_last_line_and_a_later_success_removes_the_report(
        tiny_lm_dir, tmp_path) -> None:
    with pytest.raises(loader.ExportFailedError, match=r"^export failed \(exit 2\): .*language model") as err:
        loader.ensure_export(tiny_lm_dir, "classify", "fp32", tmp_path)  # an LM is no classifier
    assert "language model" in json.loads(err.value.report.read_text())["output"]
    sha = loader.mf.checkpoint_sha256(tiny_lm_dir)
    stale = loader.failure_report_path(tmp_path / loader.cache_key(sha, "generate", "fp32", "gqa"))
    stale.write_text("{}")  # as if an earlier generation export had failed
    path, hit = loader.ensure_export(tiny_lm_dir, "generate", "fp32", tmp_path)
    assert not hit and path.parent == stale.with_name(stale.name.removesuffix(".failed.json"))
    assert not stale.exists()


def test_a_checkpoint_that_cannot_fit_says_why_in_one_line(tiny_lm_dir, tmp_path, monkeypatch) -> None:
    from app.loading import memory_fit

    need = memory_fit.export_need(tiny_lm_dir)
    assert need == int(memory_fit.EXPORT_FACTOR * memory_fit.fp32_weight_bytes(tiny_lm_dir)) + memory_fit.RUNTIME_BYTES
    # The weights as the config gives them are what the checkpoint holds (tied head once).
    raw = (tiny_lm_dir / "model.safetensors").read_bytes()  # 8-byte header length, header, tensors
    assert memory_fit.fp32_weight_bytes(tiny_lm_dir) == len(raw) - 8 - int.from_bytes(raw[:8], "little")
    monkeypatch.setattr(memory_fit, "available_bytes", lambda: 100 << 20)  # a 100 MiB container
    with pytest.raises(memory_fit.MemoryFitError) as err:
        loader.load("generate", tiny_lm_dir, cache_dir=tmp_path)  # auto: the export, then PyTorch, both too big
    line = loader.one_line(err.value)
    assert "\n" not in line and "serving it on PyTorch needs about 0.6 GiB" in line and "0.1 GiB is available" in line
    with pytest.raises(memory_fit.MemoryFitError, match="exporting it to ONNX needs about 0.6 GiB"):
        loader.load("generate", tiny_lm_dir, backend="onnxruntime", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_prefix_cache_budget_that_cannot_fit_refuses_to_start_and_names_the_setting(tiny_lm_dir, onnx_cache) -> None:
    """Issue 28: the start's memory check counts PREFIX_CACHE_MB; too much is a refusal that says
    which setting to lower, not a fall back to PyTorch (which has no prefix cache)."""
    with pytest.raises(loader.SettingRefusedError, match="PREFIX_CACHE_MB"):
        loader.load("generate", tiny_lm_dir, backend="auto", device="cpu", cache_dir=onnx_cache,
                    prefix_cache_bytes=1 << 50)
    lo = loader.load("generate", tiny_lm_dir, backend="auto", device="cpu", cache_dir=onnx_cache,
                     prefix_cache_bytes=1 << 20)
    assert lo.backend == "onnxruntime" and lo.runner.prefix is not None
    assert lo.runner.prefix.budget_bytes <= 1 << 20


def test_int8_cache_entry_is_keyed_by_the_cpu_and_info_shows_the_kernel(tmp_path, tiny_lm_dir, onnx_cache) -> None:
    """PRECISION=int8: the kernel measured on this CPU; the cache key carries the instruction-set
    level, a forced kernel gets its own entry, and an entry whose manifest says it was measured on
    another kind of CPU is not served (a cache folder copied between hosts): it is rebuilt."""
    from app.loading.engine_loader import load_engine
    from export.kernels import isa_tag

    lo = loader.load("generate", tiny_lm_dir, precision="int8", cache_dir=tmp_path)
    assert lo.backend == "onnxruntime" and lo.fallback_reason is None
    assert lo.onnx_path.parent.name.startswith(f"generate-int8-{isa_tag()}-gqa-")
    q = lo.quantization
    assert q["chosen_by"] == "measured" and q["isa"] == isa_tag() and q["kernel"] in q["score"]
    assert read_manifest(lo.onnx_path.parent)["kernel"]["name"] == q["kernel"]
    forced = loader.load("generate", tiny_lm_dir, precision="int8", cache_dir=tmp_path, quant_kernel="dynamic8")
    assert forced.onnx_path.parent.name.startswith("generate-int8-dynamic8-gqa-")
    assert forced.quantization | {"cpu_flags": None} == {
        "kernel": "dynamic8", "scheme": "dynamic", "bits": 8, "block_size": 32, "chosen_by": "setting",
        "isa": isa_tag(), "cpu_flags": None, "score": None, "rejected": []}
    # the forced kernel's graph serves
    assert len(greedy(forced.runner, [464, 2068, 7586], 8)) == 8
    # an entry measured on another CPU
    path = lo.onnx_path.parent / "manifest.json"
    m = json.loads(path.read_text())
    m["kernel"]["isa"] = "avx2" if isa_tag() != "avx2" else "avx512vnni"
    path.write_text(json.dumps(m))
    again = loader.load("generate", tiny_lm_dir, precision="int8", cache_dir=tmp_path)
    assert again.cache_hit is False and read_manifest(again.onnx_path.parent)["kernel"]["isa"] == isa_tag()
    # /info's generation.quantization
    engine = load_engine(tiny_lm_dir, None, precision="int8", cache_dir=tmp_path, quant_kernel="dynamic8")
    assert engine.info()["generation"]["quantization"]["kernel"] == "dynamic8"
    fp32 = load_engine(tiny_lm_dir, None, cache_dir=onnx_cache)
    assert fp32.info()["generation"]["quantization"] is None
