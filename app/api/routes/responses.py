"""OpenAI's Responses API, `POST /v1/responses` (streamed too), served by the chat route: the request is
translated into a chat request (`app.protocol.responses.to_chat`) and run by `chat_completions` itself,
so it takes the same chat template, limits, admission and engine path; its answer (or its stream
of chunks) is rendered as a Response (or as the typed Responses events). Nothing is stored."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from app.api.deps import StateDep
from app.api.routes.generate import SSEResponse
from app.api.routes.openai import ERRORS, chat_completions, model_id
from app.api.routing import api_router
from app.engine.engine import InputError
from app.protocol.openai import ChatCompletionResponse
from app.protocol.responses import EventStream, Names, Response, ResponsesRequest, from_chat, to_chat

logger = logging.getLogger(__name__)
router = api_router(prefix="/v1", tags=["openai"])
STREAM: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}, "description": "the Response; "
                                                "with stream: true the typed Responses events (`event:` + `data:`)"}}


@router.post("/responses", response_model=Response, responses=ERRORS | STREAM)
async def responses(body: ResponsesRequest, request: Request, state: StateDep) -> Any:
    """A model response to `input` (after `instructions`), with the chat template; nothing is stored."""
    chat, names = to_chat(body)
    ignored = body.ignored_fields()
    if ignored:
        logger.warning("request %s: ignored fields that are in neither OpenAI's nor vLLM's API: %s",
                       getattr(request.state, "request_id", "-"), ", ".join(ignored))
    rid, item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    try:
        answer = await chat_completions(chat, request, state)
    except InputError as e:
        raise names.error(e) from e
    if isinstance(answer, ChatCompletionResponse):
        return from_chat(body, rid, item_id, answer)
    events = EventStream(body, rid, item_id, int(time.time()), model_id(state))
    return SSEResponse(_events(events, names, answer.body_iterator), headers={"Cache-Control": "no-cache"})


async def _events(events: EventStream, names: Names, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The chat stream's `data:` chunks as the Responses events."""
    try:
        for e in events.start():
            yield e
        async for raw in chunks:
            data = raw[len("data: "):].strip() if raw.startswith("data: ") else ""
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk and chunk["error"].get("param"):
                chunk["error"]["param"] = names.field(chunk["error"]["param"])
            for e in events.feed(chunk):
                yield e
        for e in events.done():
            yield e
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
