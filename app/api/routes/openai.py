"""OpenAI-style `/v1/completions` (with `stream`) and `/v1/models`.

OpenAI's semantics, not TGI's: `temperature` defaults to 1 (sampling; 0 is greedy), the stop
sequence is cut from the returned text, and `finish_reason` is "stop" or "length".
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from app.api.deps import ServiceState, StateDep
from app.api.routes.generate import SSEResponse, Tracker, run_generation, until_disconnect
from app.api.routing import api_router
from app.core.errors import NotFoundError, stream_error
from app.engine.engine import InputError
from app.engine.sampling import SamplingParams
from app.engine.scheduler import Finish, GenerationRequest
from app.schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
    Usage,
)

logger = logging.getLogger(__name__)
router = api_router(prefix="/v1", tags=["openai"])

# OpenAI's envelope and codes (app.core.errors): bad input is 400, not 422.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
}


def model_id(state: ServiceState) -> str:
    s = state.settings
    return s.model_id or s.model_path.name


def _stops(body: CompletionRequest) -> list[str]:
    return [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else list(body.stop)


def _params(body: CompletionRequest) -> SamplingParams:
    if body.temperature == 0:
        return SamplingParams(do_sample=False, seed=body.seed)
    return SamplingParams(do_sample=True, temperature=body.temperature, top_p=body.top_p, seed=body.seed)


def _text_and_reason(finish: Finish, stops: list[str]) -> tuple[str, str]:
    text = finish.generated_text
    if finish.reason == "stop_sequence":
        # The engine cut the text after the earliest-starting match; of the stops that end the
        # text, that is the longest.
        for s in sorted(stops, key=len, reverse=True):
            if text.endswith(s):
                text = text[: -len(s)]
                break
    return text, "length" if finish.reason == "length" else "stop"


@router.get("/models", response_model=ModelList, responses={k: ERRORS[k] for k in (401, 503)})
async def models(state: StateDep) -> ModelList:
    """The served generation model."""
    return ModelList(data=[ModelCard(id=model_id(state), created=int(state.started))])


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Any:
    """Text completion for one prompt or a list (one choice each)."""
    if body.model is not None and body.model != model_id(state):
        raise NotFoundError(f"model: {body.model!r} is not served here; this server serves {model_id(state)!r}",
                            param="model")
    state.acquire()
    try:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        stops = _stops(body)
        reqs = []
        for i, p in enumerate(prompts):
            try:
                reqs.append(await state.engine.prepare_async(p, body.max_tokens, _params(body), stops))
            except InputError as e:  # name the field as this API spells it
                field = {"inputs": "prompt" if len(prompts) == 1 else f"prompt[{i}]",
                         "max_new_tokens": "max_tokens"}.get(e.field, e.field)
                message = str(e).split(": ", 1)[1].replace("inputs (", "prompt (")
                message = message.replace("max_new_tokens", "max_tokens")
                raise InputError(field, message) from e
    except BaseException:
        state.release()
        raise
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return SSEResponse(_stream(state, request, reqs, stops, cid, created), headers={"Cache-Control": "no-cache"})
    try:
        finishes = await until_disconnect(request, _all_or_none([run_generation(state, request, r) for r in reqs]))
    finally:
        state.release()
    choices = []
    for i, f in enumerate(finishes):
        text, reason = _text_and_reason(f, stops)
        choices.append(CompletionChoice(text=text, index=i, finish_reason=reason))
    prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
    completion_tokens = sum(f.generated_tokens for f in finishes)
    return CompletionResponse(id=cid, created=created, model=model_id(state), choices=choices,
                              usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                          total_tokens=prompt_tokens + completion_tokens))


async def _all_or_none(coros: list) -> list[Finish]:
    """Run the prompts together; if one fails (or we are cancelled), cancel the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


async def _stream(state: ServiceState, request: Request, reqs: list[GenerationRequest], stops: list[str], cid: str,
                  created: int) -> AsyncIterator[str]:
    """Chunks of every prompt's choice as they come, then one usage chunk and `[DONE]`.

    Text that could still be the start of a stop sequence is held back (the stop is cut from
    the output); partial UTF-8 characters never arrive (the engine decodes incrementally).
    """
    queue: asyncio.Queue = asyncio.Queue()
    name = model_id(state)
    hold = max((len(s) for s in stops), default=1) - 1

    async def pump(i: int, req: GenerationRequest) -> None:
        tracker = Tracker(state, request, req)
        try:
            async for ev in state.engine.generate_stream(req):
                tracker.token()
                await queue.put((i, ev))
        except Exception as e:
            await queue.put((i, e))

    def chunk(i: int, text: str, reason: str | None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}]
        body = {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    texts = [""] * len(reqs)
    sent = [0] * len(reqs)
    done, completion_tokens = 0, 0
    try:
        while done < len(reqs):
            i, ev = await queue.get()
            if isinstance(ev, Exception):
                yield f"data: {json.dumps(stream_error(request.url.path, ev))}\n\n"
                done += 1
                continue
            if ev.finish is not None:
                text, reason = _text_and_reason(ev.finish, stops)
                completion_tokens += ev.finish.generated_tokens
                done += 1
                yield chunk(i, text[sent[i]:], reason)
                continue
            # The engine's incremental decoder already holds back partial UTF-8 characters.
            texts[i] += ev.delta
            safe = len(texts[i]) - hold
            if safe > sent[i]:
                yield chunk(i, texts[i][sent[i]:safe], None)
                sent[i] = safe
        prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
        yield chunk(0, "", None, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        state.release()
