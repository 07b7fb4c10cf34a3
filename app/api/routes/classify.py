"""`/classify`: labels with softmax scores, sorted, for one text or a list."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from app.api.deps import StateDep
from app.api.routes.generate import ERRORS, until_disconnect
from app.api.routing import api_router
from app.schemas import ClassifyRequest, LabelScore

router = api_router(tags=["classification"])


@router.post("/classify", response_model=list[LabelScore] | list[list[LabelScore]], responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request, state: StateDep) -> Any:
    """`[{"label", "score"}]` sorted by score; a list of those for a list of inputs."""
    state.acquire()
    try:
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        results = await until_disconnect(request, state.engine.classify(
            texts, body.top_k, body.truncate, state.settings.max_input_tokens))
    finally:
        state.release()
    out = [[LabelScore(label=r.label, score=r.score) for r in labels] for labels in results]
    return out[0] if isinstance(body.inputs, str) else out
