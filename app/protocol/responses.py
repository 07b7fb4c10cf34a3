"""OpenAI's Responses API (`POST /v1/responses`), the part vLLM serves for a text model, and its
mapping onto the chat protocol.

A Responses request is translated into a `ChatCompletionRequest` (`to_chat`): `instructions` is a
system message before the input, `input` (a string, or message items whose content is a string or
`input_text` / `output_text` parts) the messages, `max_output_tokens` the completion limit,
`text.format` the chat's `response_format`. The route then runs the chat route itself, so a
Responses request takes the same template, limits, admission and engine path as chat. Errors are
named as this API spells its fields (`Names.error`).

Nothing is stored (vLLM's default, VLLM_ENABLE_RESPONSES_API_STORE off): `store: true` is accepted
and ignored as vLLM does; `previous_response_id`, `conversation` and `background`, which need a
store, are a 400. Tools, reasoning and prompt templates are accepted only at their "off" value.
A field in neither OpenAI's nor vLLM's API is ignored and named in one WARNING line (vLLM's rule).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from app.engine.engine import InputError
from app.engine.scheduler import MAX_LOGPROBS
from app.protocol.openai import ChatCompletionRequest, ChatCompletionResponse, OpenAIModel, _off

INCLUDE_LOGPROBS = "message.output_text.logprobs"
TEXT_PARTS = ("input_text", "output_text")  # output_text: an earlier response's message sent back as input

# OpenAI's fields this server cannot honour: only their "off" value (a 400 naming the field otherwise).
RESPONSES_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none", "auto"), "previous_response_id": (), "conversation": (),
    "background": (False,), "prompt": (), "moderation": (), "context_management": ([],),
}
WHY = {"previous_response_id": "not supported: nothing is stored on this server; send the whole conversation "
                               "as input",
       "conversation": "not supported: nothing is stored on this server; send the whole conversation as input",
       "background": "not supported: background responses need a response store, and nothing is stored here",
       "tools": "not supported: this server makes no tool calls",
       "tool_choice": "not supported: this server makes no tool calls",
       "prompt": "not supported: prompt templates are not stored here (as in vLLM)"}
# vLLM's extra sampling fields on /v1/responses, passed to the chat request as they are.
VLLM_FIELDS = ("top_k", "repetition_penalty", "seed", "stop", "ignore_eos", "skip_special_tokens",
               "include_stop_str_in_output", "logit_bias", "priority", "structured_outputs")


class InputPart(OpenAIModel):
    type: str
    text: str | None = None
    annotations: Any = None  # an output_text part sent back as input
    logprobs: Any = None


class InputItem(OpenAIModel):
    type: str | None = Field(None, description='"message" (the default); other item types are refused')
    role: str | None = None
    content: str | list[InputPart] | None = None
    name: str | None = None
    id: str | None = None
    status: str | None = Field(None, description='an assistant message last, "incomplete" or "in_progress": '
                                                 'continued, not answered (vLLM)')
    phase: str | None = None


class TextConfig(OpenAIModel):
    format: dict[str, Any] | None = Field(None, description='{"type": "text" | "json_object" | "json_schema", '
                                                            '"name", "schema", "strict"}')
    verbosity: str | None = Field(None, description="accepted; changes nothing")


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = Field(None, description="a system message before the input")
    max_output_tokens: int | None = Field(None, ge=1, description="default: what the limits leave")
    temperature: float | None = Field(None, ge=0, le=2, description="default 1; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = Field(None, description="accepted (include_obfuscation: none is added)")
    text: TextConfig | None = None
    include: list[str] | None = Field(None, description=f'"{INCLUDE_LOGPROBS}": log-probabilities; others change '
                                                        f'nothing')
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    truncation: Literal["auto", "disabled"] | None = Field(None, description='"auto": keep the input\'s last '
                                                                             'tokens that fit')
    store: bool | None = Field(None, description="accepted; nothing is stored (vLLM's default)")
    metadata: dict[str, str] | None = Field(None, description="echoed in the response")
    user: str | None = None
    reasoning: dict[str, Any] | None = Field(None, description="only null or unset values (no reasoning model)")
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    tools: Any = None
    tool_choice: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    prompt: Any = None
    moderation: Any = None
    context_management: Any = None
    # vLLM's extra fields (as on /v1/chat/completions)
    top_k: Any = None
    repetition_penalty: Any = None
    seed: Any = None
    stop: Any = None
    ignore_eos: Any = None
    skip_special_tokens: Any = None
    include_stop_str_in_output: Any = None
    logit_bias: Any = None
    priority: Any = None
    structured_outputs: Any = None

    @field_validator(*RESPONSES_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        return _off(v, RESPONSES_UNSUPPORTED[name], name, WHY.get(name, "not supported by this server"))

    @field_validator("reasoning")
    @classmethod
    def _reasoning(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and any(value not in (None, "none") for value in v.values()):
            raise ValueError("reasoning is not supported: this is not a reasoning model (send null or leave it out)")
        return v

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[InputItem]) -> str | list[InputItem]:
        if isinstance(v, list) and not v:
            raise ValueError("must be a string or a non-empty list of messages")
        return v

    @property
    def logprobs(self) -> bool:
        return INCLUDE_LOGPROBS in (self.include or ()) or bool(self.top_logprobs)


def response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as the chat request's `response_format`."""
    if fmt is None or fmt.get("type") == "text":
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if "schema" not in fmt:
            raise InputError("text.format.schema", 'is required with "type": "json_schema"')
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise InputError("text.format.type", f'must be "text", "json_object" or "json_schema", got {kind!r}')


def _messages(body: ResponsesRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """The chat messages, and for each the Responses field it came from."""
    messages, sources = [], []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
        sources.append("instructions")
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        sources.append("input")
        return messages, sources
    for i, item in enumerate(body.input):
        field = f"input[{i}]"
        if item.type not in (None, "message"):
            raise InputError(f"{field}.type", f"{item.type!r} items are not supported: only messages (this server "
                                              f"has no tools, reasoning or stored items)")
        if not item.role:
            raise InputError(f"{field}.role", "is required")
        if item.content is None:
            raise InputError(f"{field}.content", "is required")
        content: str | list[dict[str, Any]] = item.content if isinstance(item.content, str) else []
        for j, part in enumerate(item.content if isinstance(item.content, list) else ()):
            if part.type not in TEXT_PARTS:
                raise InputError(f"{field}.content[{j}].type", f"{part.type!r} content is not supported: only "
                                                               f"input_text (this model reads text)")
            if part.text is None:
                raise InputError(f"{field}.content[{j}].text", "is required")
            content.append({"type": "text", "text": part.text})
        message: dict[str, Any] = {"role": item.role, "content": content}
        if item.name is not None:
            message["name"] = item.name
        messages.append(message)
        sources.append(field)
    return messages, sources


@dataclasses.dataclass
class Names:
    """The chat request's field names as this API spells them."""

    sources: list[str]  # chat message index -> the Responses field it came from

    def field(self, name: str) -> str:
        m = re.match(r"messages\[(\d+)\](.*)", name)
        if m and int(m.group(1)) < len(self.sources):
            return self.sources[int(m.group(1))] + m.group(2)
        if name.startswith("response_format"):
            return "text.format" + name.removeprefix("response_format").removeprefix(".json_schema")
        return {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                "logprobs": "include", "truncate_prompt_tokens": "truncation"}.get(name, name)

    def error(self, e: InputError) -> InputError:
        message = str(e).split(": ", 1)[1] if ": " in str(e) else str(e)
        message = message.replace("max_tokens", "max_output_tokens").replace("prompt (", "input (")
        return InputError(self.field(e.field), message)


def to_chat(body: ResponsesRequest) -> tuple[ChatCompletionRequest, Names]:
    """The chat request a Responses request stands for (4xx InputError naming this API's field)."""
    messages, sources = _messages(body)
    names = Names(sources)
    last = body.input[-1] if isinstance(body.input, list) else None
    cont = last is not None and last.role == "assistant" and last.status in ("incomplete", "in_progress")
    chat: dict[str, Any] = {
        "model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "stream": bool(body.stream), "user": body.user,
        "response_format": response_format(body.text.format if body.text else None),
        "logprobs": body.logprobs, "top_logprobs": body.top_logprobs if body.logprobs else None,
        "truncate_prompt_tokens": -1 if body.truncation == "auto" else None,
        "add_generation_prompt": not cont, "continue_final_message": cont,
    }
    if body.stream:  # the usage arrives in a last chunk, for response.completed
        chat["stream_options"] = {"include_usage": True}
    chat.update({k: getattr(body, k) for k in VLLM_FIELDS if getattr(body, k) is not None})
    try:
        return ChatCompletionRequest.model_validate(chat), names
    except ValidationError as e:
        err = e.errors()[0]
        name = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err.get("loc", ())).lstrip(".")
        raise InputError(names.field(name or "input"), err.get("msg", "invalid")) from None


# ---- the response ---------------------------------------------------------------------------------

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = Field(None, description=f'with include ["{INCLUDE_LOGPROBS}"]')


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0, "cache_write_tokens": 0})
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: None = None
    incomplete_details: dict[str, str] | None = Field(None, description='{"reason": "max_output_tokens"} when '
                                                                        'cut by the token limit')
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: dict[str, Any] | None = None
    store: bool = Field(False, description="always false: nothing is stored")
    temperature: float
    text: dict[str, Any]
    tool_choice: str = "auto"
    tools: list[Any] = Field(default_factory=list)
    top_logprobs: int | None = None
    top_p: float
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None


def response(body: ResponsesRequest, rid: str, created: int, model: str, output: list[OutputMessage] | None = None,
             reason: str | None = None, usage: ResponseUsage | None = None) -> Response:
    """The Response object; `reason` is the chat finish_reason ("length": incomplete), None in progress."""
    status = "in_progress" if reason is None else "incomplete" if reason == "length" else "completed"
    text = body.text.model_dump(exclude_none=True) if body.text and body.text.format else {"format": {"type": "text"}}
    return Response(
        id=rid, created_at=created, status=status, model=model, output=output or [], usage=usage,
        incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
        instructions=body.instructions, max_output_tokens=body.max_output_tokens, metadata=body.metadata or {},
        parallel_tool_calls=body.parallel_tool_calls is not False, temperature=1.0 if body.temperature is None
        else body.temperature, top_p=1.0 if body.top_p is None else body.top_p, top_logprobs=body.top_logprobs,
        text=text,
        tool_choice=body.tool_choice or "auto", truncation=body.truncation or "disabled", user=body.user,
        reasoning=body.reasoning)


def message(item_id: str, text: str, reason: str | None, logprobs: list[dict[str, Any]] | None) -> OutputMessage:
    status = "in_progress" if reason is None else "incomplete" if reason == "length" else "completed"
    return OutputMessage(id=item_id, status=status, content=[OutputText(text=text, logprobs=logprobs)])


def from_chat(body: ResponsesRequest, rid: str, item_id: str, chat: ChatCompletionResponse) -> Response:
    """The Response of a non-streamed chat completion."""
    choice = chat.choices[0]
    lps = None
    if body.logprobs:
        lps = [t.model_dump() for t in (choice.logprobs.content or [])] if choice.logprobs else []
    usage = ResponseUsage(input_tokens=chat.usage.prompt_tokens, output_tokens=chat.usage.completion_tokens,
                          total_tokens=chat.usage.total_tokens) if chat.usage else None
    item = message(item_id, choice.message.content, choice.finish_reason, lps)
    return response(body, rid, chat.created, chat.model, [item], choice.finish_reason, usage)


class EventStream:
    """The typed Responses events of a chat stream: `feed` takes each chat chunk (or error) and gives
    the events it makes, `sequence_number` counting from 0. The message item is opened by the first
    chunk (the prompt processed), each text delta is a `response.output_text.delta`, and the end
    (`done`) closes the text, the part and the item, then `response.completed` (status
    "incomplete" when cut by the token limit: the SDK's stream helper waits for this event)."""

    def __init__(self, body: ResponsesRequest, rid: str, item_id: str, created: int, model: str) -> None:
        self.body, self.rid, self.item_id, self.created, self.model = body, rid, item_id, created, model
        self.seq = 0
        self.opened = self.failed = False
        self.text: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.reason: str | None = None
        self.usage: ResponseUsage | None = None

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def _response(self, output: list[OutputMessage] | None = None, reason: str | None = None) -> dict[str, Any]:
        return response(self.body, self.rid, self.created, self.model, output, reason, self.usage).model_dump()

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def start(self) -> list[str]:
        return [self._event("response.created", response=self._response()),
                self._event("response.in_progress", response=self._response())]

    def feed(self, chunk: dict[str, Any]) -> list[str]:
        if self.failed:
            return []
        if "error" in chunk:  # the chat stream's in-band error: OpenAI's `error` event, and the stream ends
            self.failed = True
            err = chunk["error"]
            return [self._event("error", code=err.get("code"), message=err.get("message", "error"),
                                param=err.get("param"))]
        if chunk.get("usage") and not chunk.get("choices"):
            u = chunk["usage"]
            self.usage = ResponseUsage(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"],
                                       total_tokens=u["total_tokens"])
            return []
        out = []
        for choice in chunk.get("choices", ()):
            if not self.opened:
                self.opened = True
                item = OutputMessage(id=self.item_id, status="in_progress", content=[]).model_dump()
                out += [self._event("response.output_item.added", output_index=0, item=item),
                        self._event("response.content_part.added", **self._where(),
                                    part=OutputText(text="", logprobs=[]).model_dump())]
            text = (choice.get("delta") or {}).get("content") or ""
            lps = ((choice.get("logprobs") or {}).get("content") or []) if self.body.logprobs else []
            self.logprobs += lps
            if text:
                self.text.append(text)
                out.append(self._event("response.output_text.delta", **self._where(), delta=text, logprobs=lps))
            if choice.get("finish_reason"):
                self.reason = choice["finish_reason"]
        return out

    def done(self) -> list[str]:
        if self.failed or self.reason is None:
            return []
        text, lps = "".join(self.text), self.logprobs if self.body.logprobs else None
        item = message(self.item_id, text, self.reason, lps)
        return [self._event("response.output_text.done", **self._where(), text=text, logprobs=lps or []),
                self._event("response.content_part.done", **self._where(), part=item.content[0].model_dump()),
                self._event("response.output_item.done", output_index=0, item=item.model_dump()),
                self._event("response.completed", response=self._response([item], self.reason))]
