"""`python -m bench.gpu`: the GPU benchmark's harness, run for real on CPU with a tiny checkpoint
(every system: transformers, our ONNX Runtime and PyTorch servers over HTTP, the runner alone).
The GPU numbers themselves come only from a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_smoke_run_measures_every_system_and_renders_the_table(tiny_lm_dir, tmp_path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--checkpoint", str(tiny_lm_dir), "--repeats", "1",
           "--per-round", "1", "--steps", "3", "--prompt-tokens", "4", "--new-tokens", "4", "--ttft-tokens", "16",
           "--streams", "2", "--duration", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert list(rec["summary"]) == [*gpu.HF_SYSTEMS, *gpu.OUR_SYSTEMS]
    for name, v in rec["summary"].items():
        assert v["decode_tok_s"] > 0 and v["aggregate_tok_s"] > 0 and v["ttft_s"] > 0, name
        if name in gpu.OUR_SYSTEMS:
            assert v["step_b1_s"] > 0 and v["step_b2_s"] > 0 and v["itl_p99_s"] >= v["itl_p50_s"] > 0, name
    assert rec["summary"]["ort-fp32"]["attention"] == "gqa"  # CPU serves the shared-buffer graph
    assert rec["settings"]["streams"] == 2 and rec["device"] == "cpu"
    table = proc.stdout
    assert "| ours, ONNX Runtime fp16, over HTTP |" in table and "one static batch of 2" in table
    md = tmp_path / "BENCHMARKS.md"
    gpu.update_md(rec, md)
    assert "<!-- gpu:start -->" in md.read_text() and "CPU only" in md.read_text()


def test_cuda_run_without_a_gpu_says_what_is_missing() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "onnxruntime-gpu" in proc.stderr
