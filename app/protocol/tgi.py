"""TGI's protocol (DESIGN §4): `/generate`, `/generate_stream` and `POST /`, and its mapping to the engine.

Request models forbid unknown fields (a typo such as `max_token` is a 422 naming it, not a
silently ignored option) and use strict types (`"5"` is not a number). Parameter checks and their
messages follow TGI's router (router/src/validation.rs).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from app.engine.engine import Engine, InputError
from app.engine.sampling import SamplingParams
from app.engine.scheduler import MAX_LOGPROBS, Finish, GenerationRequest, TopToken
from app.protocol import structured
from app.schemas import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, _Request

# TGI parameters this server does not implement, with the value that means "off". The official
# `text-generation` client sends every one of them on every request, so they are accepted at that
# value; any other value is a 422 naming the parameter, never silently ignored.
UNSUPPORTED_TGI_PARAMETERS: dict[str, Any] = {"watermark": False, "adapter_id": None}


class GenerateParameters(_Request):
    max_new_tokens: int = Field(20, ge=1, description="tokens to generate at most")
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0, description="> 0; any value other than 1 turns sampling on")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    typical_p: float | None = Field(None, gt=0, lt=1, description="locally typical sampling (transformers' "
                                                                  "TypicalLogitsWarper); turns sampling on")
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="TGI's: each token's logit minus "
                                                                           "penalty x its frequency in prompt "
                                                                           "and output so far")
    truncate: int | None = Field(None, ge=1, description="keep only the prompt's last `truncate` tokens "
                                                         "(at most the input limit)")
    best_of: int | None = Field(None, ge=1, description="generate this many sequences (sampling, no seed) and "
                                                        "return the one with the highest mean token logprob; the "
                                                        "others in details.best_of_sequences. Not when streaming")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = Field(False, description="with details: the prompt's tokens in `details.prefill` "
                                                           "with their log-probabilities (the first null). Not with "
                                                           "streaming")
    top_n_tokens: int | None = Field(None, ge=0, description=f"the most likely alternatives of each generated token "
                                                             f"(0 to {MAX_LOGPROBS}; 0 or null: none), in "
                                                             f"`details.top_tokens` and each event's `top_tokens`")
    grammar: dict | None = Field(None, description='structured output: {"type": "json", "value": schema}, '
                                                   '{"type": "regex", "value": regex} or {"type": "json_schema", '
                                                   '"value": {"name", "schema"}}')
    # Accepted only at their "off" value (see UNSUPPORTED_TGI_PARAMETERS).
    watermark: bool = Field(False, description="not supported: only false")
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

    @property
    def sampling(self) -> bool:
        """TGI's router: sampling when do_sample or any warper is set (any value, even 1)."""
        return (self.do_sample or self.temperature is not None or self.top_k is not None or self.top_p is not None
                or self.typical_p is not None)


class GenerateRequest(_Request):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="on `POST /` (TGI's compat route): true streams as /generate_stream; "
                                            "ignored by /generate and /generate_stream")


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(None, description="log p(token | the tokens before it); null for the first")


class TokenOut(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool = False


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[TokenOut] = Field(default_factory=list)
    top_tokens: list[list[TokenOut]] | None = Field(None, description="with top_n_tokens")


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[TokenOut] = Field(default_factory=list)
    best_of_sequences: list[BestOfSequence] | None = Field(None, description="the other sequences, with best_of")
    top_tokens: list[list[TokenOut]] | None = Field(None, description="with top_n_tokens: per generated token its "
                                                                      "most likely alternatives, best first")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int = Field(description="prompt tokens (after `truncate`), as TGI's StreamDetails")


class StreamResponse(BaseModel):
    index: int
    token: TokenOut
    top_tokens: list[TokenOut] | None = Field(None, description="with top_n_tokens: this token's most likely "
                                                                "alternatives")
    generated_text: str | None = None
    details: StreamDetails | None = None


def sampling_params(p: GenerateParameters) -> SamplingParams:
    return SamplingParams(p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed,
                          relative_frequency_penalty=p.frequency_penalty or 0.0, typical_p=p.typical_p)


async def to_requests(engine: Engine, body: GenerateRequest, max_best_of: int, stream: bool,
                      ) -> list[GenerationRequest]:
    """The engine requests of one TGI request: one, or `best_of` with their own random seeds.
    Raises `InputError` naming the parameter (TGI's checks and messages)."""
    p = body.parameters
    best_of = p.best_of or 1
    if best_of > 1:
        if stream:
            raise InputError("parameters.best_of", "`best_of` != 1 is not supported when streaming tokens")
        if not p.sampling:
            raise InputError("parameters.best_of", "you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            raise InputError("parameters.seed", "`seed` must not be set when `best_of` > 1")
        if best_of > max_best_of:
            raise InputError("parameters.best_of", f"`best_of` must be > 0 and <= {max_best_of} (MAX_BEST_OF). "
                                                   f"Given: {best_of}")
    limit = engine.limits()["max_input_tokens"]
    if p.truncate is not None and limit is not None and p.truncate > limit:
        raise InputError("parameters.truncate", f"`truncate` must be strictly positive and at most the input limit "
                                                f"{limit}. Given: {p.truncate}")
    if p.top_n_tokens is not None and p.top_n_tokens > MAX_LOGPROBS:
        raise InputError("parameters.top_n_tokens", f"`top_n_tokens` must be >= 0 and <= {MAX_LOGPROBS}. "
                                                    f"Given: {p.top_n_tokens}")
    # The prompt is scored only when its scores are returned (details), and by one of the best_of sequences.
    score = 0 if p.decoder_input_details and p.details else None
    req = await engine.prepare_async(body.inputs, p.max_new_tokens, sampling_params(p), p.stop,
                                     logprobs=p.top_n_tokens or None, prompt_logprobs=score, truncate=p.truncate)
    req.grammar = await engine.compile_grammar(structured.tgi_spec(p.grammar))
    return [req] + [dataclasses.replace(req, params=dataclasses.replace(req.params), prompt_logprobs=None)
                    for _ in range(best_of - 1)]


def prefill(finish: Finish) -> list[PrefillToken]:
    """`details.prefill`: the scored prompt (TGI sends it only with decoder_input_details)."""
    return [PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in finish.prompt or []]


def top_tokens(top: list[TopToken], special_ids: frozenset[int]) -> list[TokenOut]:
    return [TokenOut(id=t.id, text=t.text, logprob=t.logprob, special=t.id in special_ids) for t in top]
