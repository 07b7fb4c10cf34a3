"""OpenAI's protocol (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) with vLLM's extra
sampling fields, and its mapping to the engine.

vLLM's rules: every field of OpenAI's request is accepted and `null` means its default; a field
in neither OpenAI's nor vLLM's API is ignored and named in one WARNING line (`ignored_fields`).
Fields this server does not implement are accepted only at their "off" value; any other value is
a 400 naming the field. Types stay strict (`"5"` is not a number).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.engine.engine import Engine, InputError
from app.engine.sampling import SamplingParams
from app.engine.scheduler import MAX_LOGPROBS, Finish, GenerationRequest
from app.protocol import structured
from app.protocol.logprobs import ChatLogprobs, CompletionLogprobs
from app.schemas import (
    MAX_LOGIT_BIAS,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKEN_ID_DIGITS,
)

MAX_PROMPTS = 16  # prompts in one completions request
SEED_MOD = 2**63


class OpenAIModel(BaseModel):
    """Extra fields are kept (not refused) so that `ignored_fields` can name them."""

    model_config = ConfigDict(extra="allow", strict=True)

    def ignored_fields(self, prefix: str = "") -> list[str]:
        """Dotted names of every field, at any depth, that no model here knows."""
        out = [prefix + k for k in (self.model_extra or {})]
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                if isinstance(item, OpenAIModel):
                    out += item.ignored_fields(f"{prefix}{name}{'' if i is None else f'[{i}]'}.")
        return out


def _off(value: Any, off: tuple[Any, ...], name: str, what: str = "not supported by this server") -> Any:
    if value is not None and value not in off:
        shown = " or ".join(repr(o).replace("None", "null").replace("False", "false") for o in off)
        raise ValueError(f"{name} is {what} (send {shown or 'null'} or leave it out)")
    return value


class StreamOptions(OpenAIModel):
    include_usage: bool | None = Field(False, description="a usage chunk (empty `choices`) before [DONE]")
    continuous_usage_stats: bool | None = Field(False, description="vLLM: with include_usage, every chunk "
                                                                   "carries the usage so far")
    include_obfuscation: bool | None = Field(None, description="accepted; no obfuscation is added")


# vLLM's request fields this server does not implement, with the values that mean "off".
VLLM_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,), "length_penalty": (1.0, 1), "allowed_token_ids": (), "bad_words": ([],),
    "prompt_logprobs": (), "logits_processors": (), "return_tokens_as_token_ids": (False,), "priority": (0,),
    "prompt_embeds": (),
}


class SamplingFields(OpenAIModel):
    """The sampling fields that completions and chat share: OpenAI's, then vLLM's."""

    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100], added to "
                                                                  "its logit")
    n: int | None = Field(1, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    temperature: float | None = Field(None, ge=0, le=2, description="default 1; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = Field(None, ge=-1, description="vLLM: -1 or 0 is off")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(0, ge=0, description="no EOS, stop token or stop string before this many")
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = Field(True, description="accepted; GPT-2's byte-level "
                                                                         "decoder adds no spaces either way")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="keep the prompt's last N tokens; -1: "
                                                                         "the input limit")
    return_token_ids: bool | None = Field(None, description="vLLM: the prompt's token ids (`prompt_token_ids`) and "
                                                            "each choice's generated ids (`token_ids`); streamed: "
                                                            "each chunk's ids, the prompt's in the first")
    # Structured outputs (app/protocol/structured.py reads them; at most one per request)
    response_format: Any = Field(None, description='{"type": "text" | "json_object" | "json_schema", '
                                                   '"json_schema": {"name", "schema", "strict"}}')
    guided_json: Any = Field(None, description="vLLM: a JSON schema the output follows")
    guided_regex: str | None = Field(None, description="vLLM: a regular expression the output matches")
    guided_choice: list[str] | None = Field(None, description="vLLM: the output is one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM: a Lark (or GBNF) grammar the output follows")
    structured_outputs: dict[str, Any] | None = Field(None, description="vLLM: {json | regex | choice | grammar | "
                                                                        "json_object: ...}")
    # vLLM's fields that are not implemented: only their "off" value
    use_beam_search: Any = None
    length_penalty: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    prompt_logprobs: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: Any = None
    priority: Any = None
    prompt_embeds: Any = None

    @field_validator(*VLLM_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        return _off(v, VLLM_UNSUPPORTED[info.field_name], info.field_name)

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} token ids, not {len(v)}")
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit() or len(key) > MAX_TOKEN_ID_DIGITS:
                raise ValueError(f"key {key[:20]!r} is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias {bias} of token {key} is outside [-100, 100]")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(v) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} token ids, not {len(v)}")
        return v

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1, description="candidates per prompt, >= n; the n with the highest mean "
                                                        "token log-probability are returned. Not with streaming "
                                                        "unless equal to n")
    echo: bool | None = Field(False, description="return the prompt before the completion (with `logprobs`: the "
                                                "prompt's log-probabilities too)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the log-probability of each token and of "
                                                                         "this many most likely alternatives")
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing")
    suffix: str | None = Field(None, description="not supported: only null (as vLLM)")
    add_special_tokens: bool | None = Field(True, description="accepted; GPT-2's tokenizer adds no special tokens")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) or v and isinstance(v[0], int) else v
        if not items or any(len(p) == 0 for p in items):
            raise ValueError("must be a non-empty string, list of strings, list of token ids or list of lists of "
                             "token ids")
        if len(items) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v == 0 and not info.data.get("echo"):
            raise ValueError("0 is only allowed with echo: true (score the prompt without generating)")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        return _off(v, (), "suffix", "not supported (as in vLLM)")

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None
    stop_reason: int | str | None = Field(None, description="vLLM: the stop string or stop token id that ended it")
    token_ids: list[int] | None = Field(None, description="vLLM, with return_token_ids: the generated token ids")
    prompt_token_ids: list[int] | None = Field(None, description="vLLM, with return_token_ids: the prompt's ids")


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
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = Field(None, description="prompt + generated tokens at most (vLLM's field)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- the mapping to the engine --------------------------------------------------------------------

def sampling_params(body: SamplingFields, engine: Engine, seed: int | None) -> SamplingParams:
    """OpenAI's semantics: temperature defaults to 1 and 0 is greedy (then the warpers are off, as
    vLLM); the penalties, logit_bias and min_tokens hold for greedy and sampled requests alike."""
    vocab = engine.vocab_size
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if int(key) >= vocab:
            raise InputError("logit_bias", f"token id {key} is out of the vocabulary (0 to {vocab - 1})")
        bias[int(key)] = float(value)
    stop_ids = sorted(set(body.stop_token_ids or ()))
    if any(not 0 <= t < vocab for t in stop_ids):
        raise InputError("stop_token_ids", f"token ids must be in the vocabulary (0 to {vocab - 1})")
    eos = engine.tokenizer.eos_token_id
    suppress = tuple(stop_ids + ([] if body.ignore_eos or eos is None else [eos]))
    common = dict(seed=None if seed is None else seed % SEED_MOD, repetition_penalty=body.repetition_penalty,
                  presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                  logit_bias=bias or None, min_tokens=body.min_tokens or 0, suppress_ids=suppress)
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature == 0:
        return SamplingParams(do_sample=False, **common)
    top_k = body.top_k if body.top_k and body.top_k > 0 else None
    return SamplingParams(do_sample=True, temperature=temperature, top_p=body.top_p, top_k=top_k,
                          min_p=body.min_p or None, **common)


def candidates(body: SamplingFields) -> tuple[int, int]:
    """(n, best_of), checked: best_of >= n, and best_of > n cannot be streamed."""
    n = body.n or 1
    best_of = getattr(body, "best_of", None) or n
    if best_of < n:
        raise InputError("best_of", f"best_of must be greater than or equal to n, got n={n} and best_of={best_of}")
    if body.stream and best_of != n:
        raise InputError("best_of", "best_of greater than n cannot be streamed")
    return n, best_of


async def to_requests(engine: Engine, body: SamplingFields, prompt: str | list[int], max_tokens: int, best_of: int,
                      field: str, max_best_of: int, logprobs: int | None = None,
                      prompt_logprobs: int | None = None) -> list[GenerationRequest]:
    """The `best_of` engine requests of one prompt, candidate j seeded with seed + j (as vLLM). `field`
    names the prompt in errors (`prompt`, `prompt[2]`, `messages`). `logprobs`: alternatives per
    generated token; `prompt_logprobs`: score the prompt (each candidate scores it)."""
    if best_of > max_best_of:
        raise InputError("best_of" if getattr(body, "best_of", None) else "n",
                         f"at most {max_best_of} completions per prompt (MAX_BEST_OF)")
    if body.min_tokens and body.min_tokens > max_tokens:
        raise InputError("min_tokens", f"min_tokens ({body.min_tokens}) must be less than or equal to max_tokens "
                                       f"({max_tokens})")
    truncate = body.truncate_prompt_tokens
    if truncate == 0:
        raise InputError("truncate_prompt_tokens", "must be -1 (the input limit) or at least 1")
    if truncate == -1:
        truncate = engine.limits()["max_input_tokens"]
    seeds = [None if body.seed is None else body.seed + j for j in range(best_of)]
    try:
        first = await engine.prepare_async(prompt, max_tokens, sampling_params(body, engine, seeds[0]), body.stops,
                                           logprobs=logprobs, prompt_logprobs=prompt_logprobs, truncate=truncate)
    except InputError as e:  # name the field as this API spells it
        name = {"inputs": field, "max_new_tokens": "max_tokens", "prompt_logprobs": "logprobs"}.get(e.field, e.field)
        message = str(e).split(": ", 1)[1].replace("inputs (", "prompt (").replace("max_new_tokens", "max_tokens")
        raise InputError(name, message) from e
    first.grammar = await engine.compile_grammar(structured.openai_spec(body))
    first.stop_token_ids = frozenset(body.stop_token_ids or ())  # checked for every token: a set
    first.stop_at_eos = not body.ignore_eos
    first.skip_special_tokens = body.skip_special_tokens is not False
    out = [first]
    for seed in seeds[1:]:
        out.append(dataclasses.replace(first, params=dataclasses.replace(
            first.params, seed=None if seed is None else seed % SEED_MOD)))
    return out


def text_and_reason(finish: Finish, include_stop: bool) -> tuple[str, str]:
    """OpenAI's text (the stop string or stop token's text cut, unless include_stop_str_in_output)
    and finish_reason."""
    text = finish.generated_text
    if finish.stop_text and not include_stop and text.endswith(finish.stop_text):
        text = text[: -len(finish.stop_text)]
    return text, "length" if finish.reason == "length" else "stop"


# ---- chat ------------------------------------------------------------------------------------------

class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: str = Field(min_length=1)
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def for_template(self, field: str) -> dict[str, Any]:
        """The message as the template sees it: text parts joined with newlines (vLLM's "string"
        content format); other part types are refused."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise InputError(f"{field}.content[{j}].type", f"{part.type!r} content is not supported: only "
                                                                   f"text (this model reads text)")
                texts.append(part.text)
            content = "\n".join(texts)
        out: dict[str, Any] = {"role": self.role, "content": content}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


# OpenAI chat fields that change nothing on a self-hosted server (accepted, any value).
CHAT_ACCEPTED = ("metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                 "prompt_cache_options", "safety_identifier", "verbosity", "reasoning_effort", "parallel_tool_calls")
# OpenAI chat features this server does not have: only their "off" value.
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "audio": (), "prediction": (), "web_search_options": (), "functions": ([],), "function_call": ("none",),
    "moderation": (), "modalities": (["text"],),
}


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = Field(False, description="the log-probability of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: this many most likely "
                                                                            "alternatives per token")
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: what the limits leave")
    tools: list[dict] | None = Field(None, description="only with tool_choice \"none\" (rendered by the template; "
                                                       "no tool calls are parsed)")
    tool_choice: str | dict | None = None
    # vLLM's chat fields
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    echo: bool | None = Field(False, description="vLLM: prepend the last message's content when its role is "
                                                "the assistant's")
    chat_template: str | None = Field(None, description="refused: set CHAT_TEMPLATE on the server (vLLM refuses "
                                                        "request templates unless trusted)")
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict] | None = None
    add_special_tokens: bool | None = Field(False, description="accepted; GPT-2's tokenizer adds no special tokens")
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    safety_identifier: Any = None
    verbosity: Any = None
    reasoning_effort: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    moderation: Any = None
    modalities: Any = None

    @field_validator(*CHAT_UNSUPPORTED)
    @classmethod
    def _chat_unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        return _off(v, CHAT_UNSUPPORTED[info.field_name], info.field_name)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        return _off(v, (), "chat_template", "not accepted in a request: the server's CHAT_TEMPLATE setting")

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    tool_calls: list[dict] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = Field(None, description="vLLM, with return_token_ids: the generated token ids")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = Field(None, description="vLLM, with return_token_ids: the rendered "
                                                                 "prompt's token ids")
