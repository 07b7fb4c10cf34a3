"""A checkpoint whose graph crosses protobuf's 2 GB cap is exported and served on ONNX Runtime.

A wide, shallow random GPT-2 (1 layer, n_embd 1024, MLP width 262,144: 2.37 GB of fp32 weights,
the two MLP matrices 1.07 GB each) stands in for GPT-2 large and XL, whose exports died at
`ModelProto.ByteSize()` before. It goes through the real server's first start (export child,
cache, ONNX Runtime session); its greedy tokens must be transformers'. About 5 GB of memory
at the export's peak.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.app.conftest import start_server, stop_server
from tests.conftest import make_hf_checkpoint

pytestmark = pytest.mark.slow
WIDE = dict(n_layer=1, n_embd=1024, n_head=16, n_inner=262_144, n_positions=64)


def test_a_graph_over_2gb_exports_and_serves_with_transformers_tokens(tmp_path) -> None:
    ckpt = make_hf_checkpoint(tmp_path / "wide", "generate", seed=5, **WIDE)
    weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert weights > 2**31
    cache = tmp_path / "cache"
    srv = start_server(tmp_path, {"MODEL_PATH": str(ckpt), "CLASSIFIER_PATH": "", "ONNX_CACHE_DIR": str(cache),
                                  "BACKEND": "onnxruntime", "MAX_BATCH_SIZE": "2", "MAX_INPUT_TOKENS": "16",
                                  "MAX_TOTAL_TOKENS": "32", "NUM_THREADS": "2"}, timeout=900)
    try:
        info = httpx.get(srv.url + "/info", timeout=10).json()["generation"]
        assert (info["backend"], info["precision"], info["fallback_reason"]) == ("onnxruntime", "fp32", None)
        r = httpx.post(srv.url + "/generate", json={"inputs": "The computer", "parameters": {
            "max_new_tokens": 6, "details": True}}, timeout=120)
        assert r.status_code == 200, r.text
        got = [t["id"] for t in r.json()["details"]["tokens"]]
    finally:
        stop_server(srv)
    entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
    data = entry / "model.onnx.data"
    assert data.stat().st_size > 2**31 and (entry / "model.onnx").stat().st_size < 2**20
    import transformers

    from model.tokenizer import GPT2Tokenizer

    ids = GPT2Tokenizer.from_dir(ckpt).encode("The computer")
    hf = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got == out[0, len(ids):].tolist()
