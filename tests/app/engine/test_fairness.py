"""Admission is fair between requests (issue 27, item 4): one request of many candidates (prompts x
best_of, one `GenerationRequest.group`) does not keep another request's first token waiting for
more than a few engine steps; and (issue 28) a new stream's first token is handed to the event loop
when the prefill makes it. Real ONNX Runtime runner, real tokenizer."""

from __future__ import annotations

import asyncio

import pytest

from app.engine import scheduler as scheduler_module
from app.loading.engine_loader import load_engine

BATCH = 8


@pytest.fixture(scope="module")
def engine(tiny_lm_dir, onnx_cache):
    eng = load_engine(tiny_lm_dir, None, backend="onnxruntime", cache_dir=onnx_cache, max_batch_size=BATCH,
                      max_batch_total_tokens=8192, prefill_chunk_tokens=8)
    eng.start()
    yield eng
    eng.stop()


def steps_until_first_token(engine, big_prompt: str, big_rows: int, new_group: object) -> tuple[int, int]:
    """A request of `big_rows` candidates (60 tokens each, EOS ignored) runs; once its first tokens
    are out, a one-row request arrives. Returns (decode steps of the big request between the new
    request's arrival and its first token, rows of the big request decoding together at most)."""
    events: list[str] = []
    most = [0]

    async def stream(name: str, req) -> None:
        async for _ in engine.generate_stream(req):
            events.append(name)

    async def go() -> int:
        reqs = []
        for _ in range(big_rows):
            r = engine.prepare(big_prompt, 60)
            r.stop_at_eos, r.group = False, "big"
            reqs.append(r)
        big = [asyncio.create_task(stream("big", r)) for r in reqs]
        while events.count("big") < 2 * BATCH:
            await asyncio.sleep(0.001)
        most[0] = engine.scheduler.batch_size
        arrived = len(events)
        new = engine.prepare("A different prompt of a few words", 3)
        new.stop_at_eos, new.group = False, new_group
        await stream("new", new)
        first = events.index("new", arrived)
        for t in big:
            t.cancel()
        await asyncio.gather(*big, return_exceptions=True)
        return events[arrived:first].count("big")

    big_tokens = asyncio.run(go())
    # each decode step gives every decoding big row one token
    return -(-big_tokens // max(1, most[0])), most[0]


def test_a_new_request_starts_within_a_few_steps_of_a_big_one(engine) -> None:
    steps, rows = steps_until_first_token(engine, "Many candidates of one prompt", 3 * BATCH, "new")
    # the big request leaves BATCH // 8 row(s) free for others, so the newcomer is admitted at once:
    # its prompt's prefill and first token take a step or two (before: it waited for 8 rows of 60 tokens)
    assert rows == BATCH - BATCH // 8, rows
    assert steps <= 3, steps


def test_rows_of_one_request_are_not_held_back_when_alone(engine) -> None:
    # without a group every row is its own request: as before, all BATCH rows decode together
    async def go() -> int:
        reqs = [engine.prepare("Alone", 20) for _ in range(BATCH)]
        seen = []

        async def run(r) -> None:
            async for _ in engine.generate_stream(r):
                seen.append(engine.scheduler.batch_size)
        await asyncio.gather(*(run(r) for r in reqs))
        return max(seen)
    assert asyncio.run(go()) == BATCH


def test_a_first_token_is_delivered_before_the_next_decode_step(engine, monkeypatch) -> None:
    """Issue 28: the prefill's token leaves the worker at once. Before, it waited for the decode step
    that follows in the same iteration, and tokens 1 and 2 reached the stream in one delivery."""
    deliveries: list[dict[int, list[int]]] = []  # per hand-over to the event loop: queue -> event indexes
    real = scheduler_module._deliver

    def spy(items):
        per_queue: dict[int, list[int]] = {}
        for queue, ev in items:
            if isinstance(ev, scheduler_module.StreamEvent):
                per_queue.setdefault(id(queue), []).append(ev.index)
        deliveries.append(per_queue)
        real(items)
    monkeypatch.setattr(scheduler_module, "_deliver", spy)

    async def go() -> None:
        other = engine.prepare("Someone else decoding", 80)
        other.stop_at_eos = False
        seen = asyncio.Event()

        async def background() -> None:
            async for _ in engine.generate_stream(other):
                seen.set()
        bg = asyncio.create_task(background())
        await seen.wait()
        deliveries.clear()  # from here, a queue that gets index 0 is a new stream's
        for _ in range(3):  # each joins a running batch: prefill, then a decode step, in one iteration
            req = engine.prepare("A new stream", 4)
            req.stop_at_eos = False
            async for _ in engine.generate_stream(req):
                pass
        bg.cancel()
        await asyncio.gather(bg, return_exceptions=True)
    asyncio.run(go())
    firsts = [indexes for d in deliveries for indexes in d.values() if indexes[0] == 0]
    assert firsts == [[0]] * 3, firsts
