"""Embeddings below HTTP: the pooling functions, the embedding graph on ONNX Runtime and the PyTorch
fallback against transformers' `GPT2Model.last_hidden_state` (pooled and normalized the same way),
padding invariance, and `Engine.embed` through the scheduler's worker thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.engine import InputError
from app.engine.ort_runner import GraphContractError, OrtEmbeddingRunner
from app.engine.pooling import normalize, plan_calls, pool
from app.engine.torch_runner import TorchEmbeddingRunner
from app.loading.engine_loader import load_engine
from app.loading.loader import ensure_export
from export.manifest import read_manifest
from model.tokenizer import GPT2Tokenizer

TOL = 1e-5
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "A somewhat longer sentence, which has commas, "
         "a few more words than the others and ends here.", "Hi there"]


# ---- the pooling functions, on numbers worked out by hand -------------------------------------------

def test_pool_last_and_mean_read_only_the_real_positions() -> None:
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # (B=2, T=3, C=2)
    left = np.array([[0, 1, 1], [1, 1, 1]])  # row 0 left-padded
    right = np.array([[1, 1, 0], [1, 1, 1]])  # row 0 right-padded
    np.testing.assert_array_equal(pool(hidden, left, "last"), [[4, 5], [10, 11]])
    np.testing.assert_array_equal(pool(hidden, right, "last"), [[2, 3], [10, 11]])
    np.testing.assert_array_equal(pool(hidden, left, "mean"), [[3, 4], [8, 9]])
    np.testing.assert_array_equal(pool(hidden, right, "mean"), [[1, 2], [8, 9]])
    with pytest.raises(ValueError, match="pooling must be one of last, mean"):
        pool(hidden, left, "cls")


def test_normalize_gives_unit_rows_and_keeps_a_zero_row() -> None:
    out = normalize(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_plan_calls_sorts_by_length_and_keeps_the_token_budget() -> None:
    lengths = [5, 1, 9, 2, 2, 30]
    calls = plan_calls(lengths, max_tokens=10)
    assert sorted(i for c in calls for i in c) == list(range(len(lengths)))
    for c in calls:
        assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 10
    assert calls == [[1, 3, 4], [0], [2], [5]]  # shortest first; the 30-token input alone
    assert plan_calls([3] * 5, max_tokens=100, max_rows=2) == [[0, 1], [2, 3], [4]]


# ---- the graph and the fallback against transformers ------------------------------------------------

@pytest.fixture(scope="module")
def embed_onnx(tiny_lm_dir: Path, onnx_cache: Path) -> Path:
    path, _ = ensure_export(tiny_lm_dir, "embed", "fp32", onnx_cache)
    return path


@pytest.fixture(scope="module")
def prompts(tiny_lm_dir: Path) -> list[list[int]]:
    tok = GPT2Tokenizer.from_dir(tiny_lm_dir)
    return [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def hf_trunk(tiny_lm_dir: Path):  # noqa: ANN201
    import transformers

    return transformers.GPT2Model.from_pretrained(tiny_lm_dir).eval()


def hf_vectors(hf_trunk, prompts: list[list[int]], pooling: str) -> np.ndarray:  # noqa: ANN001
    """transformers' reference: each input alone (no padding), pooled, then F.normalize."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            h = hf_trunk(torch.tensor([ids])).last_hidden_state[0]  # (T, C)
            out.append(h[-1] if pooling == "last" else h.mean(0))
    return torch.nn.functional.normalize(torch.stack(out), dim=-1).numpy()


def test_export_manifest_records_the_embedding_graph(embed_onnx: Path) -> None:
    m = read_manifest(embed_onnx.parent)
    assert m["task"] == "embed" and m["attention"] is None
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask"]
    assert m["outputs"] == [{"name": "last_hidden_state", "dtype": "float32",
                             "shape": ["batch_size", "sequence_length", 32]}]
    assert m["fused_ops"]["SkipLayerNormalization"] == m["expected_skip_layer_norm"] == 5
    assert m["fused_ops"]["LayerNormalization"] == 0
    assert m["parity"]["passed"] and m["parity"]["max_abs_diff_by_output"]["last_hidden_state"] < TOL


def test_graph_hidden_states_equal_transformers(embed_onnx: Path, hf_trunk, prompts) -> None:  # noqa: ANN001
    runner = OrtEmbeddingRunner(embed_onnx)
    assert runner.dim == 32
    for ids in prompts:
        got = runner.hidden_states(np.array([ids]), np.ones((1, len(ids)), np.int64))
        with torch.no_grad():
            want = hf_trunk(torch.tensor([ids])).last_hidden_state.numpy()
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_vectors_equal_transformers(backend: str, pooling: str, embed_onnx: Path, tiny_lm_dir: Path,
                                           hf_trunk, prompts) -> None:  # noqa: ANN001
    runner = OrtEmbeddingRunner(embed_onnx) if backend == "onnxruntime" else TorchEmbeddingRunner(tiny_lm_dir)
    batched = normalize(runner.embed(prompts, pooling))  # one padded call: lengths 1 to 21
    np.testing.assert_allclose(batched, hf_vectors(hf_trunk, prompts, pooling), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=-1), 1.0, atol=1e-6)
    # padding changes nothing: each input alone, and in calls cut by a small token budget, give the same
    alone = np.concatenate([runner.embed([p], pooling) for p in prompts])
    np.testing.assert_allclose(runner.embed(prompts, pooling), alone, atol=1e-6, rtol=0)
    np.testing.assert_allclose(runner.embed(prompts, pooling, max_tokens=16), alone, atol=1e-6, rtol=0)


def test_a_graph_without_hidden_states_fails_at_construction(tiny_classifier_dir: Path, onnx_cache: Path) -> None:
    path, _ = ensure_export(tiny_classifier_dir, "classify", "fp32", onnx_cache)
    with pytest.raises(GraphContractError, match="output last_hidden_state"):
        OrtEmbeddingRunner(path)


# ---- Engine.embed: the scheduler's worker thread, the checks on input --------------------------------

@pytest.fixture(scope="module")
def engine(tiny_lm_dir: Path, onnx_cache: Path):  # noqa: ANN201
    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=4,
                      embedding_pooling="mean")
    eng.start()
    yield eng
    eng.stop()


def test_engine_embeds_concurrent_requests_on_the_worker_thread(engine, hf_trunk, prompts) -> None:  # noqa: ANN001
    runner = engine.embedding.runner
    threads: list[str] = []
    real = runner.hidden_states

    def recording(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:  # the real graph call, its thread noted
        threads.append(threading.current_thread().name)
        return real(ids, mask)

    runner.hidden_states = recording
    try:
        async def many() -> list[tuple[np.ndarray, int]]:
            return await asyncio.gather(*(engine.embed([t, p], ["input[0]", "input[1]"])
                                          for t, p in zip(TEXTS, prompts, strict=True)))
        results = asyncio.run(many())
    finally:
        del runner.hidden_states
    assert set(threads) == {"engine-worker"}
    want = hf_vectors(hf_trunk, prompts, "mean")
    for i, (vectors, tokens) in enumerate(results):
        assert tokens == 2 * len(prompts[i])
        np.testing.assert_allclose(vectors, want[[i, i]], atol=TOL, rtol=0)
    info = engine.info()["embeddings"]
    assert info["available"] and info["pooling"] == "mean" and info["dimensions"] == 32
    assert info["backend"] == "onnxruntime"


@pytest.mark.parametrize(("inputs", "field", "message"), [
    ([""], "input", "must not be empty"),
    ([[1, 2], []], "input[1]", "must not be empty"),
    ([[50257]], "input", "token id out of the vocabulary"),
    ([[1] * 129], "input", "129 tokens exceed the model's context of 128 tokens"),
    (["word " * 200], "input", "the model's context"),
])
def test_engine_refuses_bad_inputs_naming_the_field(engine, inputs, field: str, message: str) -> None:  # noqa: ANN001
    fields = ["input"] if len(inputs) == 1 else [f"input[{i}]" for i in range(len(inputs))]
    with pytest.raises(InputError, match=message) as e:
        asyncio.run(engine.embed(inputs, fields))
    assert e.value.field == field


def test_engine_truncates_to_the_last_tokens(engine) -> None:  # noqa: ANN001
    ids = list(range(1, 200))
    (got,), tokens = asyncio.run(engine.embed([ids], ["input"], truncate=128))
    (want,), _ = asyncio.run(engine.embed([ids[-128:]], ["input"]))
    assert tokens == 128
    np.testing.assert_array_equal(got, want)
    raw, _ = asyncio.run(engine.embed([ids[-128:]], ["input"], unit=False))
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3  # unit=False really leaves the norm alone
    np.testing.assert_allclose(normalize(raw)[0], want, atol=1e-7)


def test_a_big_embedding_request_does_not_stall_a_running_stream(tiny_lm_dir: Path, onnx_cache: Path) -> None:
    """With a budget of 16 prompt tokens per worker iteration, a request of 40 inputs of 8 tokens
    takes 20 iterations, each followed by a decode step: a stream already running finishes its 10
    tokens while the embedding is still being worked through (before batch_jobs, the whole request
    ran in one iteration and the stream waited for all of it)."""
    from app.engine.scheduler import GenerationRequest

    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=4,
                      max_batch_prefill_tokens=16, embedding_pooling="last")
    eng.start()
    order: list[str] = []

    async def stream() -> None:
        async for ev in eng.generate_stream(GenerationRequest([1, 2, 3], max_new_tokens=11, stop_at_eos=False)):
            if ev.token is not None:
                order.append("token")
                if len(order) == 1:
                    started.set()
            if ev.finish is not None:
                order.append("stream done")

    async def embed() -> None:
        await started.wait()
        await eng.embed([[7] * 8] * 40, [f"input[{i}]" for i in range(40)])
        order.append("embedding done")

    async def both() -> None:
        nonlocal started
        started = asyncio.Event()
        await asyncio.gather(stream(), embed())

    started: asyncio.Event
    try:
        asyncio.run(both())
    finally:
        eng.stop()
    assert order.index("stream done") < order.index("embedding done"), order
    assert order.count("token") == 11


def test_the_session_is_made_at_the_first_call_not_held_before(embed_onnx: Path, prompts) -> None:  # noqa: ANN001
    """Construction checks the graph and lets its session go, so a server that never embeds does not
    hold the trunk's weights twice; the first call makes it again and keeps it."""
    runner = OrtEmbeddingRunner(embed_onnx)
    assert not runner.loaded and runner.dim == 32
    first = runner.embed(prompts[:2])
    assert runner.loaded
    np.testing.assert_array_equal(runner.embed(prompts[:2]), first)
    runner.close()
    assert not runner.loaded
