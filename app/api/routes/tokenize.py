"""`/tokenize`: the generation model's tokens with character offsets."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import StateDep
from app.api.routes.generate import ERRORS
from app.core.errors import UnavailableError
from app.schemas import TokenizeRequest, TokenSpan

router = APIRouter(tags=["utility"])


@router.post("/tokenize", response_model=list[TokenSpan], responses=ERRORS)
async def tokenize(body: TokenizeRequest, state: StateDep) -> list[TokenSpan]:
    """Token ids, their text, and `start`/`stop` character offsets into `inputs`."""
    if not state.ready or state.engine is None or state.engine.tokenizer is None:
        raise UnavailableError("model is loading")
    spans = state.engine.tokenizer.encode_with_offsets(body.inputs)
    return [TokenSpan(id=i, text=t, start=a, stop=b) for i, t, a, b in spans]
