"""`/tokenize`: the generation model's tokens with character offsets; `/tokenizer_info`: its
tokenizer's configuration, as vLLM serves it."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response

from app.api.deps import StateDep
from app.api.routes.generate import ERRORS
from app.api.routes.openai import model_id
from app.api.routing import api_router
from app.core.errors import UnavailableError
from app.engine.engine import INLINE_TOKENIZE_CHARS
from app.protocol.tokenizer_info import tokenizer_info
from app.schemas import TokenizeRequest, TokenSpan
from model.tokenizer import GPT2Tokenizer

router = api_router(tags=["utility"])

_JSON_SLICE = 4096  # spans per orjson call: a few milliseconds each, so the GIL changes hands between them


def tokenize_json(tok: GPT2Tokenizer, text: str) -> bytes:
    """`[{"id", "text", "start", "stop"}, ...]` of `text` as JSON bytes. A 2 MB text has 700k tokens
    and 39 MB of JSON: in a worker thread this takes seconds, none of them on the event loop."""
    ids, start, stop = tok.offsets(text)
    texts, parts = tok.token_texts, []
    for k in range(0, len(ids), _JSON_SLICE):
        a, b = start[k:k + _JSON_SLICE].tolist(), stop[k:k + _JSON_SLICE].tolist()
        parts.append(orjson.dumps([{"id": i, "text": texts[i], "start": x, "stop": y}
                                   for i, x, y in zip(ids[k:k + _JSON_SLICE], a, b, strict=True)])[1:-1])
    return b"[" + b",".join(parts) + b"]"


@router.post("/tokenize", response_model=list[TokenSpan], responses=ERRORS)
async def tokenize(body: TokenizeRequest, state: StateDep) -> Response:
    """Token ids, their text, and `start`/`stop` character offsets into `inputs`."""
    state.acquire()  # tokenizer work counts against MAX_CONCURRENT_REQUESTS like any model work
    try:
        tok = state.engine.tokenizer
        if tok is None:
            raise UnavailableError("no generation model is loaded")
        if len(body.inputs) <= INLINE_TOKENIZE_CHARS:
            content = tokenize_json(tok, body.inputs)
        else:
            content = await state.engine.offload(tokenize_json, tok, body.inputs)
    finally:
        state.release()
    return Response(content, media_type="application/json")


@router.get("/tokenizer_info", responses={k: ERRORS[k] for k in (401, 500, 503)})
async def get_tokenizer_info(state: StateDep) -> dict[str, Any]:
    """vLLM's `/tokenizer_info`: the tokenizer's configuration (tokenizer_config.json's fields,
    `tokenizer_class`, the special tokens) and the served `chat_template`."""
    state.check_ready()
    tok = state.engine.tokenizer
    if tok is None:
        raise UnavailableError("no generation model is loaded")
    template = state.chat_template.template.source if state.chat_template is not None else None
    return tokenizer_info(state.settings.model_path, model_id(state), tok, template)
