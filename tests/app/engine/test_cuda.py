"""CUDA paths: run only where a GPU is present (marked `cuda`; CI has none)."""

from __future__ import annotations

import numpy as np
import pytest

from app.loading import loader
from export.manifest import read_manifest
from export.verify import FP32_TOL

pytestmark = pytest.mark.cuda

PROMPTS = [[464, 2068, 7586, 21831], [1212, 318], [40, 588, 257, 1332, 13, 383]]


def greedy_batch(runner, prompts, n: int) -> list[list[int]]:
    out = [[int(t)] for t in runner.add(prompts).top_ids[:, 0]]
    for _ in range(n - 1):
        sel = runner.step([o[-1] for o in out])
        for o, t in zip(out, sel.top_ids[:, 0], strict=True):
            o.append(int(t))
    runner.reset()
    return out


def test_onnxruntime_cuda_with_io_binding_matches_cpu(tmp_path, tiny_lm_dir) -> None:
    cpu = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cpu", cache_dir=tmp_path)
    gpu = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", precision="fp32",
                      cache_dir=tmp_path)
    assert gpu.device == "cuda" and gpu.runner.io_binding
    assert gpu.runner.sess.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(gpu.runner.add([PROMPTS[0]]).logits, cpu.runner.add([PROMPTS[0]]).logits, atol=1e-3)
    gpu.runner.reset()
    cpu.runner.reset()
    assert greedy_batch(gpu.runner, PROMPTS, 16) == greedy_batch(cpu.runner, PROMPTS, 16)
    # The KV cache stays on the device between steps.
    gpu.runner.add(PROMPTS[:1])
    gpu.runner.step([0])
    assert all(v.device_name() == "cuda" for v in gpu.runner.kv)


def test_fp16_on_cuda_agrees_with_fp32(tmp_path, tiny_lm_dir) -> None:
    fp32 = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", precision="fp32",
                       cache_dir=tmp_path)
    fp16 = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", precision="fp16",
                       cache_dir=tmp_path)
    a, b = greedy_batch(fp32.runner, PROMPTS, 8), greedy_batch(fp16.runner, PROMPTS, 8)
    agree = np.mean([x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)])
    assert agree >= 0.9


def test_torch_fallback_on_cuda_matches(tmp_path, tiny_lm_dir) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    ort_cuda = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", precision="fp32",
                           cache_dir=tmp_path)
    torch_cuda = loader.load("generate", tiny_lm_dir, backend="torch", device="cuda", precision="fp32",
                             cache_dir=tmp_path)
    assert torch_cuda.device == "cuda"
    assert greedy_batch(torch_cuda.runner, PROMPTS, 16) == greedy_batch(ort_cuda.runner, PROMPTS, 16)


def test_fp32_on_cuda_is_fp32_tf32_off_and_parity_within_1e4(tmp_path, tiny_lm_dir, tiny_classifier_dir) -> None:
    for task, ckpt in (("generate", tiny_lm_dir), ("classify", tiny_classifier_dir)):
        lo = loader.load(task, ckpt, backend="onnxruntime", device="cuda", precision="fp32", cache_dir=tmp_path)
        parity = read_manifest(lo.onnx_path.parent)["parity"]
        assert parity["passed"] and parity["provider"] == "CUDAExecutionProvider", parity
        assert parity["tf32"] is False
        worst = max(parity["max_abs_diff_by_output"].values())
        assert worst <= FP32_TOL * 10, parity  # logits scale the gate by their magnitude (at most ~10 here)
        options = lo.runner.sess.get_provider_options()["CUDAExecutionProvider"]
        assert options["use_tf32"] == "0"


def test_auto_precision_is_fp16_on_cuda(tmp_path, tiny_lm_dir) -> None:
    lo = loader.load("generate", tiny_lm_dir, cache_dir=tmp_path)  # BACKEND, DEVICE and PRECISION all auto
    assert (lo.backend, lo.device, lo.precision, lo.fallback_reason) == ("onnxruntime", "cuda", "fp16", None)
    assert read_manifest(lo.onnx_path.parent)["precision"] == "fp16"


def test_a_default_start_on_cuda_serves_onnxruntime_fp16(tmp_path, tiny_lm_dir, tiny_classifier_dir) -> None:
    import httpx

    from tests.app.conftest import start_server, stop_server

    env = {"MODEL_PATH": str(tiny_lm_dir), "CLASSIFIER_PATH": str(tiny_classifier_dir),
           "ONNX_CACHE_DIR": str(tmp_path / "cache")}
    server = start_server(tmp_path, env)
    try:
        info = httpx.get(server.url + "/info", timeout=10).json()
        for part in ("generation", "classification"):
            got = info[part]
            assert (got["backend"], got["device"], got["precision"]) == ("onnxruntime", "cuda", "fp16"), \
                got["fallback_reason"]
            assert got["fallback_reason"] is None
        graphs = info["generation"]["cuda_graphs"]
        assert graphs["setting"] == "auto" and graphs["enabled"] is True and graphs["reason"] is None, graphs
        assert info["settings"]["precision"] == "auto"
        r = httpx.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
                       timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"]
    finally:
        stop_server(server)


# ---- the fixed-buffer runner and CUDA graphs (issue 22) ---------------------------------------
def _fixed(tmp_path, tiny_lm_dir, graphs: str = "auto", batch: int = 8, prefix_cache_bytes: int = 0):
    from app.engine.fixed_runner import OrtFixedRunner

    lo = loader.load("generate", tiny_lm_dir, backend="onnxruntime", device="cuda", precision="fp16",
                     cache_dir=tmp_path, max_batch_size=batch, cuda_graphs=graphs,
                     prefix_cache_bytes=prefix_cache_bytes)
    assert isinstance(lo.runner, OrtFixedRunner) and lo.attention == "gqa", (lo.attention, lo.fallback_reason)
    return lo


def test_the_fp16_decode_graph_has_no_node_on_the_cpu(tmp_path, tiny_lm_dir) -> None:
    """ONNX Runtime refuses to make the session if any node would fall back to the CPU EP."""
    import onnxruntime as ort

    from export.providers import providers_for

    lo = _fixed(tmp_path, tiny_lm_dir, "off")
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    # Only the CUDA EP named: ONNX Runtime 1.31 refuses the CPU EP named beside this option.
    ort.InferenceSession(str(lo.onnx_path), opts, providers=providers_for("cuda")[:1])


def test_capture_at_every_bucket_equals_the_eager_steps(tmp_path, tiny_lm_dir) -> None:
    lo = _fixed(tmp_path, tiny_lm_dir, "on")
    r = lo.runner
    assert r.capture(PROMPTS[0]) and r.graphs_on and r.graphs_reason is None  # its self-check: every bucket
    assert r.buckets == [1, 2, 4, 8]
    graphs = greedy_batch(r, PROMPTS, 16)  # 3 rows: bucket 4, replayed
    r.graphs_on = False
    eager = greedy_batch(r, PROMPTS, 16)
    assert graphs == eager


def test_the_self_check_falls_back_to_eager_steps_when_a_replay_differs(tmp_path, tiny_lm_dir) -> None:
    """New step buffers after capture: the captured graphs still read the old ones, so the
    replayed tokens differ from the eager ones. `auto` serves eager steps and says why; `on`
    refuses."""
    lo = _fixed(tmp_path, tiny_lm_dir, "auto")
    r = lo.runner
    assert r.capture(PROMPTS[0])
    stale = dict(r._io)  # kept alive: the captured graphs point into them
    r._io.clear()
    assert r.capture(PROMPTS[0]) is False and not r.graphs_on
    assert "differs from eager" in r.graphs_reason
    assert greedy_batch(r, PROMPTS, 8) == greedy_batch(r, PROMPTS, 8)  # eager steps still serve
    r.graphs_mode = "on"
    with pytest.raises(loader.SettingRefusedError, match="CUDA_GRAPHS=on"):
        r.graphs_on = True
        r._io.clear()
        r.capture(PROMPTS[0])
    del stale


def test_prefix_cache_copies_on_the_gpu_give_the_whole_prefill(tmp_path, tiny_lm_dir) -> None:
    """Issue 28 on CUDA: the fixed runner's block copies (ONNX graphs with ScatterND in place on
    device buffers) pass the start's self-check, and a prompt prefilled after its cached head
    decodes, through the captured steps, the tokens of the same prompt prefilled whole."""
    from app.engine.runner import Want

    lo = _fixed(tmp_path, tiny_lm_dir, "on", prefix_cache_bytes=8 << 20)
    r = lo.runner
    assert r.capture(PROMPTS[0])
    prompt = (PROMPTS[2] * 8)[:40]
    assert r.check_prefix_cache(prompt) and r.prefix is not None, r.prefix_off_reason
    r.add([prompt])
    r.drop([0])  # the prompt's blocks go into the cache (at the latest when its row leaves)
    longer = prompt + [13, 14]
    assert r.prefix_hit(longer) == 40
    pending = r.start_prefill(longer)
    assert pending.done == 40
    hit = [int(r.advance(pending, 64, Want()).top_ids[0, 0])]
    for _ in range(11):  # captured decode steps on the row whose head was copied in
        hit.append(int(r.step([hit[-1]]).top_ids[0, 0]))
    r.reset()
    assert hit == greedy_batch(r, [longer], 12)[0]  # the whole prompt prefilled (`add` never reads the cache)
    assert r.prefix.stats.hits >= 40


def test_structured_outputs_on_the_gpu(tmp_path, tiny_lm_dir) -> None:
    """A JSON-schema request on the default CUDA server (fp16, the fixed runner, CUDA graphs): the
    constrained rows take the full-logits path beside captured greedy rows; outputs validate, and
    an unconstrained greedy request in the same batches gives the text it gives alone."""
    import asyncio
    import json

    import httpx
    import jsonschema

    from tests.app.conftest import start_server, stop_server

    schema = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
              "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 99}}}
    server = start_server(tmp_path, {"MODEL_PATH": str(tiny_lm_dir), "CLASSIFIER_PATH": "",
                                     "ONNX_CACHE_DIR": str(tmp_path / "cache")})
    try:
        plain = {"prompt": "Hello there", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        alone = httpx.post(server.url + "/v1/completions", json=plain, timeout=60).json()["choices"][0]["text"]

        async def burst() -> list[dict]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                bodies = [plain] + [{"prompt": "Hello there", "max_tokens": 60, "temperature": 0.8, "seed": i,
                                     "guided_json": schema} for i in range(6)]
                return [(await r).json() for r in [asyncio.ensure_future(c.post("/v1/completions", json=b))
                                                    for b in bodies]]
        outs = asyncio.run(burst())
        assert outs[0]["choices"][0]["text"] == alone
        for o in outs[1:]:
            assert o["choices"][0]["finish_reason"] == "stop", o
            jsonschema.validate(json.loads(o["choices"][0]["text"]), schema)
    finally:
        stop_server(server)


def test_speculation_on_the_gpu_gives_the_tokens_without_it(tmp_path, tiny_lm_dir) -> None:
    """SPECULATION=ngram on the fixed-buffer runner (decode steps replayed as CUDA graphs, each
    row's proposals verified by an eager call on its slot): a stream alone and a batch of four
    give the greedy tokens and log-probabilities of the engine without speculation."""
    import asyncio

    from app.loading.engine_loader import load_engine

    engines = []
    for mode in ("ngram", "off"):
        eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", device="cuda", precision="fp32",
                          cache_dir=tmp_path, max_batch_size=8, speculation=mode)
        if eng.speculator is not None:
            eng.speculator.measure = False  # speculate whenever a row proposes
        eng.start()
        engines.append(eng)
    on, off = engines

    def run(engine, texts: list[str]) -> list:  # noqa: ANN001
        async def go() -> list:
            return await asyncio.gather(*(engine.generate(engine.prepare(t, 40, None, None, 2)) for t in texts))
        return asyncio.run(go())

    texts = ["one two three four one two three four one two three", "a b c a b c a b c a b",
             "The weather is nice today and the weather is", "Zebras quietly juggle purple violins near Oslo"]
    try:
        assert on.info()["generation"]["speculation"]["enabled"]
        for batch in (texts[:1], texts):
            for g, w in zip(run(on, batch), run(off, batch), strict=True):
                assert [t.id for t in g.tokens] == [t.id for t in w.tokens]
                np.testing.assert_allclose([t.logprob for t in g.tokens], [t.logprob for t in w.tokens], atol=1e-3)
        st = on.speculator.stats
        assert st.accepted > 0 and st.batched > 0
    finally:
        on.stop()
        off.stop()
