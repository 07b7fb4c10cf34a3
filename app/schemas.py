"""The HTTP protocol (DESIGN §4): TGI-compatible generation, classification, OpenAI completions.

Request models forbid unknown fields (a typo such as `max_token` is a 422 naming it, not a
silently ignored option) and use strict types (`"5"` is not a number).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 64

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


# TGI parameters this server does not implement, with the value that means "off". The official
# `text-generation` client sends every one of them on every request, so they are accepted at that
# value; any other value is a 422 naming the parameter, never silently ignored.
UNSUPPORTED_TGI_PARAMETERS: dict[str, Any] = {
    "best_of": 1, "frequency_penalty": None, "truncate": None, "typical_p": None, "watermark": False,
    "top_n_tokens": None, "grammar": None, "adapter_id": None,
}


class GenerateParameters(_Request):
    max_new_tokens: int = Field(20, ge=1, description="tokens to generate at most")
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0, description="> 0; any value other than 1 turns sampling on")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = Field(False, description="prompt tokens in `details.prefill` (ids and text; "
                                                           "no logprobs). Not with streaming")
    # Accepted only at their "off" value (see UNSUPPORTED_TGI_PARAMETERS).
    best_of: int | None = Field(None, description="not supported: only null or 1")
    frequency_penalty: float | None = Field(None, description="not supported: only null")
    truncate: int | None = Field(None, description="not supported: only null")
    typical_p: float | None = Field(None, description="not supported: only null")
    watermark: bool = Field(False, description="not supported: only false")
    top_n_tokens: int | None = Field(None, description="not supported: only null")
    grammar: dict | None = Field(None, description="not supported: only null")
    adapter_id: str | None = Field(None, description="not supported: only null")

    @field_validator(*UNSUPPORTED_TGI_PARAMETERS)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        off = UNSUPPORTED_TGI_PARAMETERS[info.field_name]
        if v is not None and v != off:
            raise ValueError(f"the TGI parameter {info.field_name} is not supported by this server "
                             f"(send null{' or ' + json.dumps(off) if off is not None else ''} or leave it out)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s:
                raise ValueError("stop sequences must not be empty")
            if len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"stop sequences must be at most {MAX_STOP_LENGTH} characters")
        return v


class GenerateRequest(_Request):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="on `POST /` (TGI's compat route): true streams as /generate_stream; "
                                            "ignored by /generate and /generate_stream")


class PrefillToken(BaseModel):
    id: int
    text: str


class TokenOut(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool = False


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[TokenOut] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None


class StreamResponse(BaseModel):
    index: int
    token: TokenOut
    generated_text: str | None = None
    details: StreamDetails | None = None


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


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="the usage chunk before [DONE]; this server always sends it")


class CompletionRequest(_Request):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or any(not s for s in items):
            raise ValueError("must be a non-empty string or a non-empty list of non-empty strings")
        if len(items) > 16:
            raise ValueError("at most 16 prompts per request")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [] if v is None else [v] if isinstance(v, str) else v
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in items):
            raise ValueError(f"stop sequences must be 1 to {MAX_STOP_LENGTH} characters")
        return v


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["length", "stop"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"]
