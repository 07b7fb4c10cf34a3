"""OpenAI-style `/v1/completions`, `/v1/chat/completions` (both with `stream`) and `/v1/models`.

OpenAI's semantics, not TGI's: `temperature` defaults to 1 (sampling; 0 is greedy), the stop
sequence is cut from the returned text, and `finish_reason` is "stop" or "length". The request
models and their mapping to the engine are in `app.protocol.openai`; the log-probabilities'
formats in `app.protocol.logprobs`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request

from app.api.deps import ServiceState, StateDep
from app.api.routes.generate import SSEResponse, Tracker, run_generation, until_disconnect
from app.api.routing import api_router, json_response
from app.core.errors import BadRequestError, NotFoundError, stream_error
from app.engine import admission
from app.engine.engine import InputError
from app.engine.scheduler import Finish, GenerationRequest, PromptToken, Token
from app.protocol import mean_logprob
from app.protocol.chat_template import ChatTemplateError, ChatTemplateLimitError
from app.protocol.logprobs import StreamedTokens, chat_logprobs, completion_logprobs, text_offsets
from app.protocol.openai import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
    candidates,
    text_and_reason,
    to_requests,
)
from app.schemas import OpenAIErrorResponse

logger = logging.getLogger(__name__)
router = api_router(prefix="/v1", tags=["openai"])

# OpenAI's envelope and codes (app.core.errors): bad input is 400, not 422.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
}


def model_id(state: ServiceState) -> str:
    s = state.settings
    return s.model_id or s.model_path.name


def _check(state: ServiceState, request: Request, body: SamplingFields) -> None:
    """The model name, and vLLM's rule for fields in neither API: ignored, named in one WARNING line.
    Another model name is served by the one model (TGI's and llama.cpp's rule: the response names
    the served model), or refused with 404 under STRICT_MODEL_NAME (vLLM's, for a router in front)."""
    if body.model is not None and body.model != model_id(state) and state.settings.strict_model_name:
        raise NotFoundError(f"model: {body.model!r} is not served here; this server serves {model_id(state)!r}",
                            param="model")
    ignored = body.ignored_fields()
    if ignored:
        logger.warning("request %s: ignored fields that are in neither OpenAI's nor vLLM's API: %s",
                       getattr(request.state, "request_id", "-"), ", ".join(ignored))


@router.get("/models", response_model=ModelList, responses={k: ERRORS[k] for k in (401, 503)})
async def models(state: StateDep) -> ModelList:
    """The served generation model, with `max_model_len` (the prompt + generation limit enforced)."""
    name = model_id(state)
    limit = state.engine.limits()["max_total_tokens"] if state.engine else None
    return ModelList(data=[ModelCard(id=name, created=int(state.started), root=name, max_model_len=limit)])


@router.get("/models/{model:path}", response_model=ModelCard, responses={k: ERRORS[k] for k in (401, 404, 503)})
async def model_card(model: str, state: StateDep) -> ModelCard:
    """The served model's card (the SDK's `models.retrieve`); another id is a 404 `model_not_found`."""
    if model != model_id(state):
        raise NotFoundError(f"model: {model!r} does not exist; this server serves {model_id(state)!r}", param="model")
    return (await models(state)).data[0]


async def _prepare(state: ServiceState, body: SamplingFields, prompts: list[str | list[int]], max_tokens: int | None,
                   fields: list[str], logprobs: int | None = None,
                   prompt_logprobs: int | None = None) -> tuple[int, list[list[GenerationRequest]]]:
    """(n, per prompt its best_of engine requests). `max_tokens` None: what the limits leave (chat)."""
    n, best_of = candidates(body)
    groups = []
    for prompt, field in zip(prompts, fields, strict=True):
        limit = max_tokens
        if limit is None:
            n_prompt = len(prompt) if isinstance(prompt, list) else len(state.engine.tokenizer.encode(prompt))
            if body.truncate_prompt_tokens and body.truncate_prompt_tokens > 0:
                n_prompt = min(n_prompt, body.truncate_prompt_tokens)
            limit = max(1, (state.engine.limits()["max_total_tokens"] or n_prompt + 1) - n_prompt)
        groups.append(await to_requests(state.engine, body, prompt, limit, best_of, field, state.settings.max_best_of,
                                        logprobs=logprobs, prompt_logprobs=prompt_logprobs))
    admission.one_request(r for g in groups for r in g)  # admitted fairly against other requests
    return n, groups


async def _finish_all(state: ServiceState, request: Request, groups: list[list[GenerationRequest]],
                      n: int) -> list[tuple[Finish, GenerationRequest]]:
    """Run every candidate together; per prompt, the n choices (with best_of > n, the n with the
    highest mean token log-probability, best first), each with its engine request."""
    flat = [r for g in groups for r in g]
    finishes = await until_disconnect(request, _all_or_none([run_generation(state, request, r) for r in flat]))
    out, k = [], 0
    for g in groups:
        mine = list(zip(finishes[k:k + len(g)], g, strict=True))
        k += len(g)
        out += mine if len(mine) == n else sorted(mine, key=lambda fr: mean_logprob(fr[0]), reverse=True)[:n]
    return out


def _usage(groups: list[list[GenerationRequest]], finishes: list[tuple[Finish, GenerationRequest]]) -> Usage:
    prompt_tokens = sum(len(g[0].prompt_ids) for g in groups)
    completion_tokens = sum(f.generated_tokens for f, _ in finishes)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Any:
    """Text completion for one prompt or several (strings or token ids): n choices each."""
    _check(state, request, body)
    prompts = body.prompts
    weight = len(prompts) * candidates(body)[1]
    state.acquire(weight, "prompt" if len(prompts) > 1 else "best_of" if body.best_of else "n")
    try:
        fields = ["prompt" if len(prompts) == 1 else f"prompt[{i}]" for i in range(len(prompts))]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        # echo + logprobs scores the prompt; echo with max_tokens 0 alone too (the engine's score-only request)
        prompt_logprobs = (body.logprobs if body.logprobs is not None else 0 if max_tokens == 0 else None) \
            if body.echo else None
        n, groups = await _prepare(state, body, prompts, max_tokens, fields, body.logprobs, prompt_logprobs)
    except BaseException:
        state.release(weight)
        raise
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        def choice(i: int, text: str, reason: str | None, stop_reason: Any, first: bool,
                   items: list[tuple[PromptToken | Token, int]] | None) -> dict:
            return {"index": i, "text": text, "logprobs": None if items is None else completion_logprobs(items),
                    "finish_reason": reason, "stop_reason": stop_reason}

        return SSEResponse(_stream(state, request, body, groups, cid, created, "text_completion", choice,
                                   echo=bool(body.echo), logprobs=body.logprobs is not None),
                           headers={"Cache-Control": "no-cache"})
    try:
        finishes = await _finish_all(state, request, groups, n)
    finally:
        state.release(weight)
    # 64 candidates with 20 log-probabilities a token make tens of MB: built in the JSON thread
    return await json_response(_completion_response, state, body, cid, created, groups, finishes)


def _completion_response(state: ServiceState, body: CompletionRequest, cid: str, created: int,
                         groups: list[list[GenerationRequest]], finishes: list[tuple[Finish, GenerationRequest]]
                         ) -> CompletionResponse:
    tok = state.engine.tokenizer
    choices = []
    for i, (f, req) in enumerate(finishes):
        text, reason = text_and_reason(f, bool(body.include_stop_str_in_output))
        echo = tok.decode(req.prompt_ids) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            items: list[tuple[PromptToken | Token, int]] = []
            if body.echo:
                items += zip(f.prompt, text_offsets(tok, req.prompt_ids), strict=True)
            offsets = text_offsets(tok, [t.id for t in f.tokens], len(echo), req.skip_special_tokens)
            items += zip(f.tokens, offsets, strict=True)
            logprobs = completion_logprobs(items)
        token_ids = {"token_ids": [t.id for t in f.tokens], "prompt_token_ids": req.prompt_ids} \
            if body.return_token_ids else {}
        choices.append(CompletionChoice(text=echo + text, index=i, logprobs=logprobs, finish_reason=reason,
                                        stop_reason=f.stop_reason, **token_ids))
    return CompletionResponse(id=cid, created=created, model=model_id(state), choices=choices,
                              usage=_usage(groups, finishes))


async def _chat_prompt(state: ServiceState, request: Request, body: ChatCompletionRequest) -> tuple[str, str]:
    """(prompt text, echo prefix) of a chat request, rendered with the chat template in a worker
    process (`app.protocol.template_sandbox`: time and size limits)."""
    template = state.chat_template
    if template is None:
        raise BadRequestError("this model has no chat template: set CHAT_TEMPLATE to a Jinja chat template file "
                              "(the checkpoint has no chat_template), as vLLM's --chat-template; see the README")
    if body.tools and body.tool_choice not in ("none",):
        raise InputError("tools", 'tool calls are not supported: send tool_choice "none" to have the template '
                                  'render the tools, or leave tools out')
    if body.tool_choice not in (None, "none", "auto"):
        raise InputError("tool_choice", 'only "none" or "auto" (no tool calls are made)')
    messages = [m.for_template(f"messages[{i}]") for i, m in enumerate(body.messages)]
    if body.continue_final_message and body.add_generation_prompt:
        raise InputError("continue_final_message", "cannot be used with add_generation_prompt (send "
                                                   "add_generation_prompt: false)")
    try:
        text = await template.render(messages, add_generation_prompt=body.add_generation_prompt is not False,
                                     continue_final_message=bool(body.continue_final_message), tools=body.tools,
                                     documents=body.documents, kwargs=body.chat_template_kwargs)
    except ChatTemplateLimitError as e:
        logger.warning("request %s: chat template: %s", getattr(request.state, "request_id", "-"), e)
        raise InputError("messages", f"the chat template could not render the messages: {e}") from e
    except ChatTemplateError as e:
        raise InputError("messages", f"the chat template refused the messages: {e}") from e
    last = messages[-1]
    echo = last["content"] if body.echo and last["role"] == "assistant" and isinstance(last["content"], str) else ""
    return text, echo


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep) -> Any:
    """Chat: the messages rendered with the model's chat template (CHAT_TEMPLATE or the checkpoint's)."""
    _check(state, request, body)
    weight = candidates(body)[1]
    state.acquire(weight, "best_of" if getattr(body, "best_of", None) else "n")
    try:
        text, echo = await _chat_prompt(state, request, body)
        # the rendered text holds its special tokens (no BOS added); a long one is tokenized off the loop
        ids = await state.engine.encode(text, "messages", *state.engine.prompt_limit())
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        n, groups = await _prepare(state, body, [ids], body.completion_limit, ["messages"], logprobs)
    except BaseException:
        state.release(weight)
        raise
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    tok = state.engine.tokenizer
    if body.stream:
        def choice(i: int, text: str, reason: str | None, stop_reason: Any, first: bool,
                   items: list[tuple[PromptToken | Token, int]] | None) -> dict:
            delta: dict[str, Any] = {"role": "assistant", "content": echo + text} if first else {"content": text}
            if reason is not None and not text and not first:
                delta = {}
            lp = None if items is None or first else chat_logprobs([t for t, _ in items], tok)
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason, "stop_reason": stop_reason}

        return SSEResponse(_stream(state, request, body, groups, cid, created, "chat.completion.chunk", choice,
                                   logprobs=logprobs is not None),
                           headers={"Cache-Control": "no-cache"})
    try:
        finishes = await _finish_all(state, request, groups, n)
    finally:
        state.release(weight)
    choices = []
    for i, (f, _) in enumerate(finishes):
        content, reason = text_and_reason(f, bool(body.include_stop_str_in_output))
        choices.append(ChatChoice(index=i, message=ChatResponseMessage(content=echo + content), finish_reason=reason,
                                  logprobs=chat_logprobs(f.tokens, tok) if logprobs is not None else None,
                                  stop_reason=f.stop_reason,
                                  token_ids=[t.id for t in f.tokens] if body.return_token_ids else None))
    return ChatCompletionResponse(id=cid, created=created, model=model_id(state), choices=choices,
                                  usage=_usage(groups, finishes),
                                  prompt_token_ids=groups[0][0].prompt_ids if body.return_token_ids else None)


async def _all_or_none(coros: list) -> list[Finish]:
    """Run the requests together; if one fails (or we are cancelled), cancel the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


# (choice index, text, finish_reason, stop_reason, first chunk of the choice, (token, text offset) pairs or
# None when no log-probabilities were asked for) -> the chunk's choice object
ChoiceFn = Callable[[int, str, str | None, Any, bool, list[tuple[PromptToken | Token, int]] | None], dict]


async def _stream(state: ServiceState, request: Request, body: SamplingFields, groups: list[list[GenerationRequest]],
                  cid: str, created: int, obj: str, choice: ChoiceFn, echo: bool = False,
                  logprobs: bool = False) -> AsyncIterator[str]:
    """Chunks of every choice as they come; with `stream_options.include_usage` a usage chunk
    (empty `choices`) before `[DONE]`, and with `continuous_usage_stats` the usage so far in each
    chunk (vLLM). Only n == best_of streams, so every engine request is one choice.

    Text that could still be the start of a stop sequence is held back (the stop is cut from
    the output); partial UTF-8 characters never arrive (the engine decodes incrementally). A
    chunk's log-probabilities are those of the tokens whose text it carries, so they wait with
    their text. `echo` (completions): the prompt's text, and with `logprobs` its scored tokens,
    lead the choice's first chunk; a score-only request (max_tokens 0) is that one chunk.
    """
    reqs = [r for g in groups for r in g]
    prompt_lens = [len(g[0].prompt_ids) for g in groups for _ in g]
    queue: asyncio.Queue = asyncio.Queue()
    name = model_id(state)
    tok = state.engine.tokenizer
    include_stop = bool(body.include_stop_str_in_output)
    hold = 0 if include_stop else max((len(s) for s in body.stops), default=1) - 1
    include_usage, continuous = body.include_usage, body.continuous_usage
    chat, return_ids = obj == "chat.completion.chunk", bool(body.return_token_ids)

    async def pump(i: int, req: GenerationRequest) -> None:
        tracker = Tracker(state, request, req)
        try:
            async for ev in state.engine.generate_stream(req):
                if ev.token is not None:  # None: the one event of a score-only request
                    tracker.token()
                if ev.finish is not None:  # the access log's finish_reason, as the non-streamed path
                    tracker.finish(ev.finish)
                await queue.put((i, ev))
        except Exception as e:
            await queue.put((i, e))

    made = [0] * len(reqs)
    started = [False] * len(reqs)

    def chunk(i: int, text: str, reason: str | None, stop_reason: Any = None,
              items: list[tuple[PromptToken | Token, int]] | None = None) -> str:
        c = choice(i, text, reason, stop_reason, not started[i], (items or []) if logprobs else None)
        out: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": name, "choices": [c]}
        if return_ids:  # vLLM's: the ids of the tokens whose text the chunk carries, the prompt's in the first
            if not chat or started[i]:
                c["token_ids"] = [t.id for t, _ in items or () if isinstance(t, Token)]
            if not started[i] and not chat:
                c["prompt_token_ids"] = reqs[i].prompt_ids
            elif chat and not any(started):  # one prompt for every choice: on the stream's first chunk
                out["prompt_token_ids"] = reqs[i].prompt_ids
        started[i] = True
        if include_usage:
            out["usage"] = None
            if continuous:
                out["usage"] = {"prompt_tokens": prompt_lens[i], "completion_tokens": made[i],
                                "total_tokens": prompt_lens[i] + made[i]}
        return f"data: {json.dumps(out)}\n\n"

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    texts = [""] * len(reqs)  # generated text so far, held-back end included
    sent = [0] * len(reqs)  # how much of it has been sent
    heads = [tok.decode(r.prompt_ids) if echo else "" for r in reqs]  # the echoed prompt, before the text
    waiting = [StreamedTokens() for _ in reqs]  # generated tokens whose text is not sent yet
    done = 0
    try:
        roles = chat
        while done < len(reqs):
            i, ev = await queue.get()
            if roles:  # the role first, as OpenAI and vLLM send it, but once the prompt is processed:
                roles = False  # a client that times the first chunk then times the real first token
                for k in range(len(reqs)):
                    yield chunk(k, "", None)
            if isinstance(ev, Exception):
                yield f"data: {json.dumps(stream_error(request.url.path, ev))}\n\n"
                done += 1
                continue
            made[i] = ev.finish.generated_tokens if ev.finish is not None else ev.index + 1
            head, items = "", []
            if echo and not started[i]:
                head = heads[i]
                if ev.prompt is not None:
                    items += zip(ev.prompt, text_offsets(tok, reqs[i].prompt_ids), strict=True)
            base = len(heads[i])
            if ev.token is not None:  # None: the one event of a score-only request
                start = base + len(texts[i])
                texts[i] += ev.delta  # the engine's incremental decoder already holds back partial UTF-8
                waiting[i].push(ev.token, start, base + len(texts[i]))
            if ev.finish is not None:
                text, reason = text_and_reason(ev.finish, include_stop)
                done += 1
                yield chunk(i, head + text[sent[i]:], reason, ev.finish.stop_reason, items + waiting[i].release())
                continue
            safe = len(texts[i]) - hold
            if safe > sent[i] or head:
                new = texts[i][sent[i]:max(safe, sent[i])]
                sent[i] = max(safe, sent[i])
                yield chunk(i, head + new, None, None, items + waiting[i].release(base + sent[i]))
        if include_usage:
            prompt_tokens = sum(len(g[0].prompt_ids) for g in groups)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(made),
                     "total_tokens": prompt_tokens + sum(made)}
            body_ = {"id": cid, "object": obj, "created": created, "model": name, "choices": [], "usage": usage}
            yield f"data: {json.dumps(body_)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        state.release(len(reqs))
