"""TGI-compatible `/generate`, `/generate_stream` and `POST /` (TGI's compat route, which the official
`text-generation` client posts to: its `stream` flag picks one of the other two; a non-streamed
answer comes as a one-element list, as TGI sends it)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import StreamingResponse

from app.api.deps import ServiceState, StateDep
from app.api.routing import api_router
from app.core.errors import ClientDisconnectedError, classify_exception, stream_error
from app.engine import admission
from app.engine.engine import InputError
from app.engine.scheduler import Finish, GenerationRequest, StreamEvent
from app.protocol import mean_logprob
from app.protocol.tgi import (
    BestOfSequence,
    Details,
    GenerateRequest,
    GenerateResponse,
    TokenOut,
    prefill,
    to_requests,
    top_tokens,
)
from app.schemas import ErrorResponse

logger = logging.getLogger(__name__)
router = api_router(tags=["generation"])
T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 500, 503)
}


async def until_disconnect(request: Request, work: Awaitable[T], poll: float = 0.1) -> T:
    """Await `work`, cancelling it (and so its engine request) if the client disconnects."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientDisconnectedError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


class SSEResponse(StreamingResponse):
    """Server-Sent Events that close their generator however the response ends, so its `finally`
    (slot release, engine cancel) runs at once, not whenever the garbage collector gets to it."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class Tracker:
    """Per-request token timing and counters for metrics and the access log."""

    def __init__(self, state: ServiceState, request: Request, req: GenerationRequest) -> None:
        self.metrics = state.metrics
        self.start = time.perf_counter()
        self.last: float | None = None
        self.request = request
        request.state.input_tokens = len(req.prompt_ids)
        request.state.generated_tokens = 0
        self.metrics.input_tokens.labels("generate").inc(len(req.prompt_ids))

    def token(self, n: int = 1) -> None:
        """`n` tokens arrived together (a stream that fell behind gets several at once)."""
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        for _ in range(n - 1):
            self.metrics.itl.observe(0.0)
        self.last = now
        self.metrics.generated_tokens.inc(n)
        self.request.state.generated_tokens += n

    def finish(self, finish: Finish) -> None:
        self.request.state.finish_reason = finish.reason


async def run_generation(state: ServiceState, request: Request, req: GenerationRequest) -> Finish:
    tracker = Tracker(state, request, req)
    async for ev in state.engine.generate_stream(req):
        if ev.token is not None:  # None: the one event of a score-only request
            tracker.token()
        if ev.finish is not None:
            tracker.finish(ev.finish)
            return ev.finish
    raise RuntimeError("generation ended without a finish event")  # pragma: no cover


async def prepare(state: ServiceState, body: GenerateRequest, stream: bool = False) -> list[GenerationRequest]:
    """The engine requests of a TGI request: one, or `best_of` (app.protocol.tgi); a long prompt is
    tokenized off the event loop."""
    reqs = await to_requests(state.engine, body, state.settings.max_best_of, stream)
    admission.one_request(reqs)  # its best_of candidates, admitted fairly against other requests
    return reqs


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_unset=True, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request, state: StateDep) -> Any:
    """Generate text for `inputs` (TGI's request and response). With `best_of`, the sequence with
    the highest mean token log-probability; the others in `details.best_of_sequences` (TGI)."""
    weight = body.parameters.best_of or 1
    state.acquire(weight, "parameters.best_of")
    try:
        reqs = await prepare(state, body)
        finishes = await until_disconnect(request, _gather([run_generation(state, request, r) for r in reqs]))
    finally:
        state.release(weight)
    best = max(range(len(finishes)), key=lambda i: mean_logprob(finishes[i]))  # the first of equals, as TGI
    finish = finishes[best]
    prefix = body.inputs if body.parameters.return_full_text else ""
    if not body.parameters.details:
        return GenerateResponse(generated_text=prefix + finish.generated_text)  # no `details` unless asked (TGI)
    # With decoder_input_details the first sequence scored the prompt, for all of them (TGI).
    prompt = prefill(finishes[0])
    special = state.engine.tokenizer.special_ids
    top_n = bool(body.parameters.top_n_tokens)

    def tokens(f: Finish) -> list[TokenOut]:
        return [TokenOut(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in f.tokens]

    def tops(f: Finish) -> dict[str, Any]:  # TGI leaves `top_tokens` out unless asked for
        return {"top_tokens": [top_tokens(t.top, special) for t in f.tokens]} if top_n else {}

    details = Details(finish_reason=finish.reason, generated_tokens=finish.generated_tokens, seed=finish.seed,
                      prefill=prompt, tokens=tokens(finish), **tops(finish))
    if len(finishes) > 1:
        details.best_of_sequences = [
            BestOfSequence(generated_text=prefix + f.generated_text, finish_reason=f.reason,
                           generated_tokens=f.generated_tokens, seed=f.seed, prefill=prompt, tokens=tokens(f),
                           **tops(f))
            for i, f in enumerate(finishes) if i != best]
    return GenerateResponse(generated_text=prefix + finish.generated_text, details=details)


async def _gather(coros: list) -> list[Finish]:
    """Run the best_of sequences together; if one fails (or we are cancelled), cancel the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "one `data:` JSON event per token"}}


@router.post("/generate_stream", responses=ERRORS | STREAM_RESPONSES)
async def generate_stream(body: GenerateRequest, request: Request, state: StateDep) -> SSEResponse:
    """Server-Sent Events, one per token; the last carries `generated_text` and `details`."""
    if body.parameters.decoder_input_details:
        raise InputError("parameters.decoder_input_details", "true is not supported when streaming tokens")
    state.acquire()
    try:
        [req] = await prepare(state, body, stream=True)
    except BaseException:
        state.release()
        raise
    prefix = body.inputs if body.parameters.return_full_text else ""
    special = state.engine.tokenizer.special_ids if body.parameters.top_n_tokens else None
    return SSEResponse(_sse(state, request, req, prefix, special), headers={"Cache-Control": "no-cache",
                                                                            "X-Accel-Buffering": "no"})


def _finite(lp: float) -> float | None:
    return lp if math.isfinite(lp) else None


def sse_event(ev: StreamEvent, prefix: str, special_ids: frozenset[int] | None = None, input_length: int = 0) -> bytes:
    """One `data:` line of `StreamResponse` JSON, built directly: this runs once per token, and
    building the pydantic models took about 15 us a token against 0.6 us for this with orjson
    (the stdlib's json.dumps: 4 us). tests/app/test_server.py checks the events against
    `StreamResponse`. `special_ids` (the tokenizer's), when the request asked for top_n_tokens:
    the event's `top_tokens` (TGI leaves the field out otherwise). `input_length`: the prompt's tokens,
    in the last event's `details`."""
    tok = ev.token
    out: dict[str, Any] = {"index": ev.index, "token": {"id": tok.id, "text": tok.text,
                                                        "logprob": _finite(tok.logprob), "special": tok.special}}
    if special_ids is not None:
        out["top_tokens"] = [{"id": t.id, "text": t.text, "logprob": _finite(t.logprob), "special": t.id in special_ids}
                             for t in tok.top]
    out["generated_text"] = out["details"] = None
    if ev.finish is not None:
        out["generated_text"] = prefix + ev.finish.generated_text
        out["details"] = {"finish_reason": ev.finish.reason, "generated_tokens": ev.finish.generated_tokens,
                          "seed": ev.finish.seed, "input_length": input_length}
    return b"data: " + orjson.dumps(out) + b"\n\n"


async def _sse(state: ServiceState, request: Request, req: GenerationRequest, prefix: str,
               special_ids: frozenset[int] | None = None) -> AsyncIterator[bytes]:
    tracker = Tracker(state, request, req)
    try:
        async for batch in state.engine.generate_batches(req):
            tracker.token(len(batch))
            if batch[-1].finish is not None:
                tracker.finish(batch[-1].finish)
            # one write for all that is ready
            yield b"".join(sse_event(ev, prefix, special_ids, len(req.prompt_ids)) for ev in batch)
    except Exception as exc:  # the stream has started: report in-band, as TGI does
        _, error_type, _ = classify_exception(exc)
        logger.error("stream %s failed", getattr(request.state, "request_id", "-"), exc_info=exc)
        state.metrics.failures.labels(error_type).inc()
        yield b"data: " + orjson.dumps(stream_error(request.url.path, exc)) + b"\n\n"
    finally:
        state.release()


@router.post("/", response_model=list[GenerateResponse], response_model_exclude_unset=True,
             responses=ERRORS | STREAM_RESPONSES)
async def compat_generate(body: GenerateRequest, request: Request, state: StateDep) -> Any:
    """TGI's compat route: `stream: true` answers as `/generate_stream`, otherwise as `/generate` but
    wrapped in a one-element list (what TGI and the `text-generation` client exchange)."""
    if body.stream:
        return await generate_stream(body, request, state)
    return [await generate(body, request, state)]
