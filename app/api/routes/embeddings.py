"""`POST /v1/embeddings`: OpenAI's embeddings (vLLM's semantics), computed by the engine.

The request and response models are in `app.protocol.embeddings`; the vectors (the final hidden
state pooled by EMBEDDING_POOLING, unit L2 norm) come from `Engine.embed`, which batches them on
the scheduler's worker thread (`app.engine.pooling`).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from app.api.deps import StateDep
from app.api.routes.generate import until_disconnect
from app.api.routes.openai import ERRORS, _check, model_id
from app.api.routing import api_router, json_response
from app.core.errors import BadRequestError
from app.protocol.embeddings import EmbeddingRequest, EmbeddingResponse, embedding_response

router = api_router(prefix="/v1", tags=["openai"])


@router.post("/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request, state: StateDep) -> Any:
    """One vector per input (a text or token ids), in the order given."""
    _check(state, request, body)  # the model name and the ignored fields, as on the other /v1 routes
    state.acquire()
    try:
        engine = state.engine
        if engine.embedding is None:
            raise BadRequestError("this server has no embedding model: EMBEDDING_POOLING is off", param="input")
        limit = engine.embedding.runner.n_positions
        truncate = limit if body.truncate_prompt_tokens == -1 else body.truncate_prompt_tokens or None
        vectors, tokens = await until_disconnect(request, engine.embed(
            body.inputs(), body.fields(), truncate, unit=body.normalize is not False))
    finally:
        state.release()
    return await json_response(embedding_response, vectors, body.encoding_format, model_id(state), tokens)
