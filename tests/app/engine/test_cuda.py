"""CUDA paths: run only where a GPU is present (marked `cuda`; CI has none)."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine import loader

pytestmark = pytest.mark.cuda

PROMPTS = [[464, 2068, 7586, 21831], [1212, 318], [40, 588, 257, 1332, 13, 383]]


def greedy_batch(runner, prompts, n: int) -> list[list[int]]:
    out = [[int(t)] for t in runner.add(prompts).argmax(-1)]
    for _ in range(n - 1):
        logits = runner.step([o[-1] for o in out])
        for o, t in zip(out, logits.argmax(-1), strict=True):
            o.append(int(t))
    runner.reset()
    return out


def test_onnxruntime_cuda_with_io_binding_matches_cpu(tmp_path, tiny_lm_dir) -> None:
    cpu = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cpu", cache_dir=tmp_path)
    gpu = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", cache_dir=tmp_path)
    assert gpu.device == "cuda" and gpu.runner.io_binding
    assert gpu.runner.sess.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(gpu.runner.add([PROMPTS[0]]), cpu.runner.add([PROMPTS[0]]), atol=1e-3)
    gpu.runner.reset()
    cpu.runner.reset()
    assert greedy_batch(gpu.runner, PROMPTS, 16) == greedy_batch(cpu.runner, PROMPTS, 16)
    # The KV cache stays on the device between steps.
    gpu.runner.add(PROMPTS[:1])
    gpu.runner.step([0])
    assert all(v.device_name() == "cuda" for v in gpu.runner.kv)


def test_fp16_on_cuda_agrees_with_fp32(tmp_path, tiny_lm_dir) -> None:
    fp32 = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", cache_dir=tmp_path)
    fp16 = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", precision="fp16",
                       cache_dir=tmp_path)
    a, b = greedy_batch(fp32.runner, PROMPTS, 8), greedy_batch(fp16.runner, PROMPTS, 8)
    agree = np.mean([x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)])
    assert agree >= 0.9


def test_torch_fallback_on_cuda_matches(tmp_path, tiny_lm_dir) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    ort_cuda = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", cache_dir=tmp_path)
    torch_cuda = loader.load("generate", tiny_lm_dir, backend="torch", device="cuda", cache_dir=tmp_path)
    assert torch_cuda.device == "cuda"
    assert greedy_batch(torch_cuda.runner, PROMPTS, 16) == greedy_batch(ort_cuda.runner, PROMPTS, 16)
