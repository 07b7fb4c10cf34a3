"""What the routes share of the HTTP protocol (DESIGN §4): the error envelopes, classification,
tokenization, health. Each generation API has its own module (`app.protocol.tgi`,
`app.protocol.openai`), as vLLM splits its protocol.

Request models forbid unknown fields (a typo such as `max_token` is a 422 naming it, not a
silently ignored option) and use strict types (`"5"` is not a number).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 64
# Fields whose size reaches per-token work are bounded (issue 27): the engine checks each new
# token against the stop token ids (a set) and adds the biases every step.
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
MAX_TOKEN_ID_DIGITS = 10  # any token id fits; Python refuses int() of a string past 4,300 digits

ErrorType = Literal["validation", "overloaded", "generation", "unavailable", "not_found", "unauthorized"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorResponse(BaseModel):
    error: str
    error_type: ErrorType


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, requests (429) or server_error")
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """The error body on `/v1/*` (OpenAI's and vLLM's)."""

    error: OpenAIError


class ClassifyRequest(_Request):
    inputs: str | list[str]
    top_k: int | None = Field(None, ge=1)
    truncate: bool = False

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("must hold at least one text")
        if len(items) > 64:
            raise ValueError("at most 64 texts per request")
        if any(not s for s in items):
            raise ValueError("texts must not be empty")
        return v


class LabelScore(BaseModel):
    label: str
    score: float


class TokenizeRequest(_Request):
    inputs: str = Field(min_length=1)


class TokenSpan(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class HealthResponse(BaseModel):
    status: Literal["ok"]
