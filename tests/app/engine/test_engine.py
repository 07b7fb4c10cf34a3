"""The engine end to end below HTTP: real runners (ONNX Runtime and PyTorch), real tokenizer,
transformers' `generate` as the reference."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from app.engine import scheduler as scheduler_module
from app.engine.engine import InputError, ShuttingDownError
from app.engine.sampling import MAX_TOP_K, SamplingParams
from app.loading.engine_loader import load_engine
from tests.conftest import make_hf_checkpoint

PROMPTS = [f"Request {i} is about" + " the weather" * (i % 6) + ("!" * (i % 3)) for i in range(16)]


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def engine(request, tiny_lm_dir, tiny_classifier_dir, onnx_cache):
    eng = load_engine(tiny_lm_dir, tiny_classifier_dir, backend=request.param,
                      cache_dir=onnx_cache, max_batch_size=8,
                      max_batch_total_tokens=4096, max_input_tokens=100, prefix_cache_bytes=8 << 20)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def hf_lm(tiny_lm_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_lm_dir).eval()


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def run(coro):
    return asyncio.run(coro)


def test_greedy_alone_equals_transformers(engine, hf_lm) -> None:
    for text in PROMPTS[:3]:
        res = run(engine.generate(engine.prepare(text, 24)))
        ids = engine.tokenizer.encode(text)
        assert [t.id for t in res.tokens] == hf_greedy(hf_lm, ids, 24)
        assert res.reason == "length" and res.generated_tokens == 24
        assert res.generated_text == engine.tokenizer.decode([t.id for t in res.tokens])


def test_16_concurrent_requests_equal_transformers(engine, hf_lm) -> None:
    """More requests than MAX_BATCH_SIZE (8), all lengths differ: rows join and leave mid-flight."""
    lens = [5 + 3 * i for i in range(16)]

    async def go():
        return await asyncio.gather(*[engine.generate(engine.prepare(p, n)) for p, n in zip(PROMPTS, lens,
                                                                                             strict=True)])

    results = run(go())
    for p, n, res in zip(PROMPTS, lens, results, strict=True):
        assert [t.id for t in res.tokens] == hf_greedy(hf_lm, engine.tokenizer.encode(p), n), p


def test_seeded_sampling_is_the_same_alone_or_batched(engine) -> None:
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    alone = run(engine.generate(engine.prepare(PROMPTS[1], 16, params)))

    async def batched():
        others = [engine.generate(engine.prepare(p, 12, SamplingParams(do_sample=True, seed=i)))
                  for i, p in enumerate(PROMPTS[4:10])]
        return await asyncio.gather(engine.generate(engine.prepare(PROMPTS[1], 16, params)), *others)

    together = run(batched())[0]
    assert [t.id for t in together.tokens] == [t.id for t in alone.tokens]
    assert together.seed == alone.seed == 1234
    other_seed = run(engine.generate(engine.prepare(PROMPTS[1], 16, SamplingParams(do_sample=True, seed=99))))
    assert [t.id for t in other_seed.tokens] != [t.id for t in alone.tokens]


def test_top_k_1_equals_greedy(engine) -> None:
    greedy = run(engine.generate(engine.prepare(PROMPTS[2], 12)))
    k1 = run(engine.generate(engine.prepare(PROMPTS[2], 12, SamplingParams(do_sample=True, top_k=1, seed=3))))
    assert [t.id for t in k1.tokens] == [t.id for t in greedy.tokens]


def test_a_top_k_past_the_vocabulary_samples_from_all_of_it(engine) -> None:
    """top_k beyond MAX_TOP_K is applied on the host, and one past the vocabulary keeps every token
    (transformers' warper): the same draws as no top_k. The fuzzer found top_k 50258 reaching the
    graph's TopK (a 500)."""
    def draw(top_k: int | None) -> list[int]:
        params = SamplingParams(do_sample=True, top_k=top_k, seed=5)
        return [t.id for t in run(engine.generate(engine.prepare(PROMPTS[1], 8, params, logprobs=3))).tokens]

    assert draw(engine.vocab_size + 1) == draw(None)
    assert len(draw(MAX_TOP_K + 1)) == 8


def test_logprobs_are_reported_and_negative(engine) -> None:
    res = run(engine.generate(engine.prepare(PROMPTS[0], 5)))
    assert all(t.logprob <= 0 and np.isfinite(t.logprob) for t in res.tokens)


def test_stop_sequence_spanning_tokens(engine) -> None:
    full = run(engine.generate(engine.prepare(PROMPTS[0], 24)))
    ids = [t.id for t in full.tokens]
    # A stop string made of the tail of token 3 and the head of token 4: it spans a boundary.
    t3, t4 = engine.tokenizer.decode(ids[:4]), engine.tokenizer.decode(ids[:5])
    assert len(t3) >= 2 and len(t4) > len(t3)
    stop = t4[len(t3) - 2: len(t3) + 1]
    expected_end = t4.find(stop) + len(stop)
    res = run(engine.generate(engine.prepare(PROMPTS[0], 24, stop=[stop, "never-appears-xyz"])))
    assert res.reason == "stop_sequence"
    assert res.generated_text == t4[:expected_end]
    assert res.generated_text.endswith(stop)
    assert res.generated_tokens <= 5


@pytest.fixture(scope="module")
def eos_engine(tmp_path_factory, request):
    """A tiny LM rigged so that EOS is always the greedy choice: ln_f outputs a constant vector b
    (weight 0, bias b) and the EOS row of the tied embedding points along b."""
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("eos_lm"), "generate", seed=7)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        b = torch.randn(hf.config.n_embd)
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.copy_(b)
        hf.transformer.wte.weight[hf.config.eos_token_id] = 10 * b / b.norm()
    hf.save_pretrained(folder)
    eng = load_engine(folder, None, backend="onnxruntime", cache_dir=tmp_path_factory.mktemp("eos_cache"))
    eng.start()
    yield eng
    eng.stop()


def test_eos_finishes_with_eos_token(eos_engine) -> None:
    res = run(eos_engine.generate(eos_engine.prepare(PROMPTS[0], 10)))
    assert res.reason == "eos_token" and res.generated_tokens == 1
    assert res.tokens[0].id == eos_engine.tokenizer.eos_token_id and res.tokens[0].special
    assert res.generated_text == ""  # special tokens are not part of the text


def test_max_new_tokens_and_context_limit(engine) -> None:
    assert run(engine.generate(engine.prepare("Hi", 1))).generated_tokens == 1
    with pytest.raises(InputError, match="max_new_tokens") as e:
        engine.prepare("Hi", engine.context_length)
    assert e.value.field == "max_new_tokens"
    with pytest.raises(InputError, match="inputs: must not be empty"):
        engine.prepare("", 5)
    with pytest.raises(InputError, match="MAX_INPUT_TOKENS"):
        engine.prepare("word " * 150, 5)


def test_cancelled_request_leaves_the_batch_and_others_finish(engine, hf_lm) -> None:
    async def go():
        long_req = engine.prepare(PROMPTS[3], 100)
        events = 0
        others = [asyncio.create_task(engine.generate(engine.prepare(p, 20))) for p in PROMPTS[5:8]]
        agen = engine.generate_stream(long_req)
        async for _ev in agen:
            events += 1
            if events == 3:
                break
        await agen.aclose()  # what a client disconnect does
        results = await asyncio.gather(*others)
        for _ in range(50):  # the cancelled row leaves at the next step
            if engine.scheduler.batch_size == 0:
                break
            await asyncio.sleep(0.02)
        return events, results

    events, results = run(go())
    assert events == 3
    assert engine.scheduler.batch_size == 0 and engine.scheduler.queue_size == 0
    for p, res in zip(PROMPTS[5:8], results, strict=True):
        assert [t.id for t in res.tokens] == hf_greedy(hf_lm, engine.tokenizer.encode(p), 20)


def test_stream_events_carry_tokens_and_final_text(engine) -> None:
    async def go():
        return [ev async for ev in engine.generate_stream(engine.prepare(PROMPTS[0], 6))]

    events = run(go())
    assert [e.index for e in events] == list(range(6))
    assert all(e.finish is None for e in events[:-1]) and events[-1].finish.reason == "length"
    assert events[-1].finish.generated_text == engine.tokenizer.decode([e.token.id for e in events])


def test_classify_batches_sorted_softmax(engine, tiny_classifier_dir) -> None:
    clf = transformers.GPT2ForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    texts = ["I love this film", "Terrible, awful, bad.", "It is a chair."]

    async def go():
        return await asyncio.gather(*[engine.classify([t]) for t in texts], engine.classify(texts, top_k=2))

    *singles, many = run(go())
    for text, (labels,) in zip(texts, singles, strict=True):
        ids = engine.cls_tokenizer.encode(text)
        with torch.no_grad():
            probs = torch.softmax(clf(torch.tensor([ids])).logits[0], -1).numpy()
        assert [lab.label for lab in labels] == [clf.config.id2label[i] for i in np.argsort(-probs)]
        np.testing.assert_allclose([lab.score for lab in labels], np.sort(probs)[::-1], atol=1e-5)
        assert sum(lab.score for lab in labels) == pytest.approx(1.0, abs=1e-5)
    assert [len(r) for r in many] == [2, 2, 2]
    assert [r[0].label for r in many] == [s[0][0].label for s in singles]


def test_classify_rejects_or_truncates_long_input(engine) -> None:
    long = "word" + " word" * 149
    with pytest.raises(InputError, match=r"inputs\[1\]: 150 tokens exceed the limit of 100"):
        run(engine.classify(["short", long]))
    (res,) = run(engine.classify([long], truncate=True))
    assert len(res) == 3
    with pytest.raises(InputError, match="top_k"):
        run(engine.classify(["x"], top_k=0))


def test_info_reports_backend_and_device(engine, request) -> None:
    info = engine.info()
    backend = request.node.callspec.params["engine"]
    assert info["generation"]["backend"] == backend and info["generation"]["device"] == "cpu"
    assert info["classification"]["backend"] == backend
    assert info["labels"] == ["negative", "neutral", "positive"]
    assert (info["generation"]["onnx_path"] is None) == (backend == "torch")
    prefix = info["generation"]["prefix_caching"]  # the PyTorch fallback has none, and says so
    assert prefix["enabled"] == (backend == "onnxruntime")
    assert (prefix["reason"] is None) if backend == "onnxruntime" else "not supported" in prefix["reason"]


def test_runner_failure_fails_its_requests_and_the_engine_keeps_serving(engine) -> None:
    runner = engine.generation.runner
    original = runner.step

    def broken(*args, **kwargs):  # the prefill works, the first decode step fails
        raise RuntimeError("simulated device fault")

    runner.step = broken
    try:
        with pytest.raises(RuntimeError, match="simulated device fault"):
            run(engine.generate(engine.prepare(PROMPTS[0], 5)))
    finally:
        runner.step = original
    assert run(engine.generate(engine.prepare(PROMPTS[0], 5))).generated_tokens == 5


def test_a_slow_consumer_gets_the_ready_events_together_then_the_failure(engine) -> None:
    """Events that wait in a request's queue come out in one batch (one SSE write); a failure
    behind them comes after them, never instead of them."""
    runner = engine.generation.runner
    original = runner.step
    calls = {"n": 0}

    def fails_third(tokens, want=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device fault")
        return original(tokens, want)

    async def go() -> list[list[int]]:
        batches = engine.generate_batches(engine.prepare(PROMPTS[0], 10))
        got = [[e.index for e in await batches.__anext__()]]  # the prefill's token (maybe a step's too)
        await asyncio.sleep(1.0)  # the steps and the failing third run while nobody reads
        with pytest.raises(RuntimeError, match="simulated device fault"):
            async for batch in batches:
                got.append([e.index for e in batch])
        return got

    runner.step = fails_third
    try:
        got = run(go())
    finally:
        runner.step = original
    assert [i for batch in got for i in batch] == [0, 1, 2]  # every token made before the failure
    assert len(got) <= 2  # what queued during the sleep came out as one batch
    assert run(engine.generate(engine.prepare(PROMPTS[0], 5))).generated_tokens == 5


def test_a_failed_prefill_fails_its_requests_instead_of_hanging(engine) -> None:
    runner = engine.generation.runner
    original = runner.add, runner.advance

    def broken(*args, **kwargs):
        raise RuntimeError("simulated prefill fault")

    # both prefill calls: a prompt whose head is in the prefix cache is prefilled by `advance`
    runner.add = runner.advance = broken
    try:
        with pytest.raises(RuntimeError, match="simulated prefill fault"):
            run(asyncio.wait_for(engine.generate(engine.prepare(PROMPTS[0], 5)), timeout=30))
    finally:
        runner.add, runner.advance = original
    assert engine.scheduler.batch_size == 0 and engine.scheduler.queue_size == 0
    assert run(engine.generate(engine.prepare(PROMPTS[0], 5))).generated_tokens == 5


def test_a_cancel_during_a_drop_keeps_batch_and_cache_in_step(engine) -> None:
    """`cancelled` flips on the event loop while the worker copies the cache in `drop`."""
    runner = engine.generation.runner
    original = runner.drop
    victims = []

    def drop_and_cancel(rows):
        for seq in victims:  # a client disconnects mid-copy
            seq.cancelled = True
        return original(rows)

    async def go():
        long_req = engine.prepare("Hi", 120)  # still running when the short one finishes
        agen = engine.generate_stream(long_req)
        first = await agen.__anext__()
        victims.extend(s for s in engine.scheduler._active if s.req is long_req)
        assert victims
        runner.drop = drop_and_cancel
        try:
            res = await engine.generate(engine.prepare(PROMPTS[0], 2))
        finally:
            runner.drop = original
        await agen.aclose()
        return first, res

    first, res = run(go())
    assert first.index == 0 and res.generated_tokens == 2
    for _ in range(100):
        if engine.scheduler.batch_size == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert runner.num_rows == engine.scheduler.batch_size == 0
    assert run(engine.generate(engine.prepare(PROMPTS[2], 4))).generated_tokens == 4


def test_classifier_limit_is_capped_by_its_context(engine) -> None:
    long = "word" + " word" * 149
    with pytest.raises(InputError, match="150 tokens exceed the limit of 128"):
        run(engine.classify([long], max_tokens=500))
    (res,) = run(engine.classify([long], truncate=True, max_tokens=500))
    assert len(res) == 3


def test_engine_path_of_onnxruntime_does_not_import_torch(tmp_path, tiny_lm_dir) -> None:
    """Neither the first start (export in a child process) nor a cache hit imports torch."""
    import subprocess
    import sys

    cache = tmp_path / "c"
    code = (
        "import sys; from pathlib import Path; from app.loading.engine_loader import load_engine\n"
        f"e = load_engine(Path({str(tiny_lm_dir)!r}), None, backend='onnxruntime', cache_dir=Path({str(cache)!r}))\n"
        "print('torch' in sys.modules, e.generation.cache_hit)\n"
    )
    repo = Path(__file__).resolve().parents[3]
    first = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["False", "False"]  # the export runs in a child process
    second = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(backend, tiny_lm_dir, onnx_cache, hf_lm) -> None:
    """PREFILL_CHUNK_TOKENS=4: a ~40-token prompt arriving while a stream decodes is prefilled
    4 tokens per iteration, and the running stream gets a token every iteration meanwhile."""
    eng = load_engine(tiny_lm_dir, None, backend=backend, cache_dir=onnx_cache, max_batch_size=8,
                      prefill_chunk_tokens=4)
    eng.start()
    long_text = " ".join(f"w{i}" for i in range(20))
    n_long = len(eng.tokenizer.encode(long_text))
    order: list[str] = []
    tokens: dict[str, list[int]] = {"short": [], "long": []}

    async def stream(name: str, req) -> None:
        async for ev in eng.generate_stream(req):
            order.append(name)
            tokens[name].append(ev.token.id)

    async def go() -> int:
        short = asyncio.create_task(stream("short", eng.prepare(PROMPTS[0], 60)))
        while "short" not in order:
            await asyncio.sleep(0.001)
        mark = len(order)
        await asyncio.gather(stream("long", eng.prepare(long_text, 3)), short)
        return mark

    try:
        mark = run(go())
    finally:
        eng.stop()
    assert n_long > 30
    first_long = order.index("long")
    # ceil(n_long / 4) prefill iterations, each followed by a decode step of the short stream
    assert order[mark:first_long].count("short") >= n_long // 4 - 1
    assert tokens["short"] == hf_greedy(hf_lm, eng.tokenizer.encode(PROMPTS[0]), 60)
    assert tokens["long"] == hf_greedy(hf_lm, eng.tokenizer.encode(long_text), 3)


@pytest.mark.parametrize("ratio", [1.2, 1e9], ids=["waiting_served_ratio", "always_chunk"])
def test_a_burst_of_waiting_prompts_is_prefilled_at_once(ratio, tiny_lm_dir, onnx_cache, hf_lm) -> None:
    """Three ~20-token prompts arrive while one stream decodes (PREFILL_CHUNK_TOKENS=4). With
    3 waiting per running row >= WAITING_SERVED_RATIO they are prefilled together (TGI's rule);
    with the rule off they are chunked, 4 tokens per decode step of the running stream."""
    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=8,
                      prefill_chunk_tokens=4, waiting_served_ratio=ratio)
    eng.start()
    texts = [" ".join(f"b{i}x{j}" for j in range(7)) for i in range(3)]
    order: list[str] = []
    tokens: dict[str, list[int]] = {}

    async def stream(name: str, req) -> None:
        tokens[name] = []
        async for ev in eng.generate_stream(req):
            order.append(name)
            tokens[name].append(ev.token.id)

    async def go() -> None:
        short = asyncio.create_task(stream("short", eng.prepare(PROMPTS[1], 60)))
        while "short" not in order:
            await asyncio.sleep(0.001)
        reqs = [eng.prepare(t, 2) for t in texts]  # tokenised first: the three are submitted back to back
        await asyncio.gather(*(stream(f"new{i}", r) for i, r in enumerate(reqs)), short)

    try:
        run(go())
    finally:
        eng.stop()
    firsts = sorted(order.index(f"new{i}") for i in range(3))
    between = order[firsts[0]:firsts[-1]].count("short")
    if ratio < 10:
        assert between <= 3
    else:
        assert between >= 8
    for i, t in enumerate(texts):
        assert tokens[f"new{i}"] == hf_greedy(hf_lm, eng.tokenizer.encode(t), 2)


def test_prompts_left_waiting_or_chunked_with_nothing_decoding_still_finish(tiny_lm_dir, onnx_cache, hf_lm) -> None:
    """MAX_BATCH_PREFILL_TOKENS=8: a 40-token prompt alone is prefilled in 8-token chunks, and
    one-token requests that do not fit one prefill call wait for the next iteration, while no
    row is decoding (the worker must not go to sleep on them)."""
    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=8,
                      max_batch_prefill_tokens=8)
    eng.start()
    long_text = " ".join(f"w{i}" for i in range(20))

    async def go():
        alone = await asyncio.wait_for(eng.generate(eng.prepare(long_text, 3)), timeout=30)
        several = await asyncio.wait_for(asyncio.gather(*[eng.generate(eng.prepare(p, 1)) for p in PROMPTS[:6]]),
                                         timeout=30)
        return alone, several

    try:
        alone, several = run(go())
    finally:
        eng.stop()
    assert [t.id for t in alone.tokens] == hf_greedy(hf_lm, eng.tokenizer.encode(long_text), 3)
    for p, res in zip(PROMPTS[:6], several, strict=True):
        assert [t.id for t in res.tokens] == hf_greedy(hf_lm, eng.tokenizer.encode(p), 1)


def test_a_failed_chunked_prefill_fails_only_its_request(tiny_lm_dir, onnx_cache, hf_lm) -> None:
    """A prompt chunk that raises fails that request; the stream already decoding carries on
    with the right tokens, and the engine serves the next request."""
    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=8,
                      prefill_chunk_tokens=4)
    eng.start()
    runner = eng.generation.runner
    original = runner.advance
    calls = {"n": 0}

    def flaky(pending, n, want=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated allocation failure")
        return original(pending, n, want)

    runner.advance = flaky
    order: list[str] = []

    async def go():
        async def running():
            out = []
            async for ev in eng.generate_stream(eng.prepare(PROMPTS[0], 40)):
                order.append("short")
                out.append(ev.token.id)
            return out

        short = asyncio.create_task(running())
        while "short" not in order:
            await asyncio.sleep(0.001)
        with pytest.raises(MemoryError, match="simulated allocation failure"):
            await asyncio.wait_for(eng.generate(eng.prepare(" ".join(f"w{i}" for i in range(20)), 3)), timeout=30)
        return await short

    try:
        short_tokens = run(go())
        runner.advance = original
        after = run(eng.generate(eng.prepare(PROMPTS[2], 4)))
    finally:
        runner.advance = original
        eng.stop()
    assert short_tokens == hf_greedy(hf_lm, eng.tokenizer.encode(PROMPTS[0]), 40)
    assert [t.id for t in after.tokens] == hf_greedy(hf_lm, eng.tokenizer.encode(PROMPTS[2]), 4)


def test_grown_buffers_are_kept_between_requests_and_given_back_when_idle(tiny_lm_dir, onnx_cache,
                                                                         monkeypatch) -> None:
    """Requests in quick succession reuse the KV buffers the previous ones grew; after
    IDLE_RELEASE_S with nothing to do, the engine gives them back."""
    monkeypatch.setattr(scheduler_module, "IDLE_RELEASE_S", 0.5)
    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=6)
    eng.start()
    try:
        runner = eng.generation.runner
        first = runner.kv_bytes["reserved"]
        run(eng.generate(eng.prepare(" ".join(f"w{i}" for i in range(20)), 30)))  # past the first width
        grown = runner.kv_bytes["reserved"]
        assert grown > first and runner.releasable
        deadline = time.monotonic() + 10
        while runner.releasable and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not runner.releasable and runner.kv_bytes["reserved"] == first
        assert len(run(eng.generate(eng.prepare("Hello there", 4))).tokens) == 4
    finally:
        eng.stop()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_warm_up_runs_the_largest_batch_and_leaves_it_empty(backend, tiny_lm_dir, onnx_cache, caplog) -> None:
    """ONNX Runtime's first call at a new largest batch is slow (about 1.2 s for GPT-2 124M at 32 rows
    on this CPU): the warm-up pays it at start, not the first burst of requests."""
    eng = load_engine(tiny_lm_dir, None, backend=backend, cache_dir=onnx_cache, max_batch_size=6)
    with caplog.at_level("INFO", logger="app.engine.engine"):
        eng.start()
    try:
        runner = eng.generation.runner
        assert runner.num_rows == 0
        if hasattr(runner, "first_size"):  # the GQA slot runner gives its 6 rows back when idle
            assert (runner.capacity, runner.width) == runner.first_size
        assert any("warm-up: a prefill and a decode step at batch 6" in r.getMessage() for r in caplog.records)
        req = eng.prepare("Hello there", 4)
        assert len(run(eng.generate(req)).tokens) == 4
    finally:
        eng.stop()


def test_a_batch_size_that_cannot_be_warmed_up_names_the_setting(tiny_lm_dir, onnx_cache) -> None:
    """MAX_BATCH_SIZE far beyond memory: the KV buffers for that many rows cannot be allocated, and
    the start fails with the setting to lower, not a bare MemoryError."""
    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=10**7)
    try:
        with pytest.raises(RuntimeError, match=r"warm-up at MAX_BATCH_SIZE=10000000 rows failed .*lower "
                                               r"MAX_BATCH_SIZE"):
            eng.start()
    finally:
        eng.stop()


def test_limits_are_the_settings_capped_by_the_context(tiny_lm_dir, onnx_cache) -> None:
    """/info and /v1/models show these: the demo (context 256) under MAX_INPUT_TOKENS=512 and
    MAX_TOTAL_TOKENS=1024 enforces 256 for both, and says so."""
    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=2,
                      max_input_tokens=500, max_total_tokens=1000)
    try:
        assert eng.limits() == {"max_input_tokens": 128, "max_total_tokens": 128}
        with pytest.raises(InputError, match="exceed the model's context of 128"):
            eng.prepare("word" * 130, 1)
        eng.max_input_tokens, eng.max_total_tokens = 40, 100
        assert eng.limits() == {"max_input_tokens": 40, "max_total_tokens": 100}
        req = eng.prepare("word" + " word" * 70, 5, truncate=30)  # TGI's truncate: the last 30 tokens
        assert len(req.prompt_ids) == 30 and req.prompt_ids == eng.tokenizer.encode("word" + " word" * 70)[-30:]
    finally:
        eng.stop()


def test_stop_token_ids_min_tokens_and_special_tokens(engine, hf_lm) -> None:
    ids = engine.tokenizer.encode("The weather today is")
    plain = hf_greedy(hf_lm, ids, 8)
    k = next(i for i in range(1, 8) if plain[i] not in plain[:i])
    req = engine.prepare(ids, 8, SamplingParams())
    req.stop_token_ids = [plain[k]]
    f = run(engine.generate(req))
    assert [t.id for t in f.tokens] == plain[:k + 1] and f.reason == "eos_token" and f.stop_reason == plain[k]
    assert f.generated_text.endswith(f.stop_text)
    # min_tokens: the stop token can end it only after min_tokens tokens (vLLM); suppressed before
    req = engine.prepare(ids, 8, SamplingParams(min_tokens=k + 2, suppress_ids=(plain[k],)))
    req.stop_token_ids = [plain[k]]
    assert plain[k] not in [t.id for t in run(engine.generate(req)).tokens][:k + 2]
    # EOS forced by a bias; kept as text only without skip_special_tokens
    req = engine.prepare(ids, 3, SamplingParams(logit_bias={50256: 100.0}))
    req.stop_at_eos, req.skip_special_tokens = False, False
    f = run(engine.generate(req))
    assert f.generated_text == "<|endoftext|>" * 3 and f.reason == "length"


def test_shutdown_fails_running_and_queued_requests_at_once_and_refuses_new_ones(tiny_lm_dir, tiny_classifier_dir,
                                                                                 onnx_cache) -> None:
    """SIGTERM's grace is over (app.__main__): every request awaiting the engine gets
    `ShuttingDownError` at once, even while the worker is stuck in a step; its rows are dropped."""
    eng = load_engine(tiny_lm_dir, tiny_classifier_dir, backend="onnxruntime", cache_dir=onnx_cache,
                      max_batch_size=2, max_batch_total_tokens=4096, max_input_tokens=100)
    eng.start()
    runner = eng.generation.runner
    original = runner.step
    stepping, release = threading.Event(), threading.Event()

    def held(tokens, want=None):  # the first decode step blocks until the test lets it go
        stepping.set()
        release.wait(30)
        return original(tokens, want)

    async def go():
        tasks = [asyncio.create_task(eng.generate(eng.prepare(p, 50))) for p in PROMPTS[:4]]  # 2 rows, 2 queued
        assert await asyncio.to_thread(stepping.wait, 30)
        failed = await asyncio.to_thread(eng.shutdown)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)  # the step still holds
        with pytest.raises(ShuttingDownError):
            await eng.generate(eng.prepare(PROMPTS[0], 5))
        with pytest.raises(ShuttingDownError):
            await eng.classify(["a new request"])
        return failed, results

    runner.step = held
    try:
        failed, results = run(go())
        assert failed == 4
        assert all(isinstance(r, ShuttingDownError) for r in results), results
        assert str(results[0]) == "the server is shutting down"
        release.set()
        deadline = time.monotonic() + 10
        while eng.scheduler.batch_size or eng.scheduler.queue_size:  # their rows leave at the next step
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        release.set()
        runner.step = original
        eng.stop()
