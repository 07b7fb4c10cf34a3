"""How the OpenAI routes render the engine's log-probabilities (vLLM's output formats).

The engine gives, per generated token, its log-probability and the request's `logprobs` most
likely alternatives (`Token`), and per prompt token the same when the prompt was scored
(`PromptToken`; the first has none). This module turns them into:

- completions' `logprobs` object: `tokens`, `token_logprobs` (null for the first prompt token),
  `top_logprobs` (per token a {token text: logprob} dict of the token itself and the
  alternatives, so up to `logprobs` + 1 entries, as OpenAI and vLLM; null for the first prompt
  token) and `text_offset` (where each token's text starts in the choice's text);
- chat's `logprobs.content`: per generated token `{token, logprob, bytes, top_logprobs: [{token,
  logprob, bytes}]}` with the `top_logprobs` most likely alternatives.

A log-probability of -inf (a token the sampler ruled out) is sent as -9999.0, OpenAI's and
vLLM's stand-in, since JSON has no infinity.

`StreamedTokens` keeps a streamed choice's generated tokens until their text is sent: the stop
sequence hold-back delays text, and a chunk carries the log-probabilities of exactly the tokens
whose text it completes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from app.engine.scheduler import PromptToken, Token
from model.tokenizer import GPT2Tokenizer, IncrementalDecoder

FLOOR = -9999.0  # what -inf (and NaN) is sent as

Scored = PromptToken | Token


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


def finite(logprob: float) -> float:
    """A log-probability as JSON can carry it: -inf and NaN become -9999.0."""
    x = float(logprob)
    return x if x >= FLOOR else FLOOR


def text_offsets(tokenizer: GPT2Tokenizer, ids: Sequence[int], start: int = 0,
                 skip_special_tokens: bool = False) -> list[int]:
    """Where each token's text starts in the text the ids decode to (plus `start`). A token that
    ends inside a UTF-8 character adds no text; the character counts for the token completing it."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    out, pos = [], start
    for i in ids:
        out.append(pos)
        pos += len(decoder.push(i))
    return out


def completion_logprobs(items: Sequence[tuple[Scored, int]]) -> dict[str, Any]:
    """Completions' `logprobs` object for (token, text offset) pairs, prompt tokens first."""
    out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for tok, offset in items:
        out["text_offset"].append(offset)
        out["tokens"].append(tok.text)
        if tok.logprob is None:  # the first prompt token: nothing before it to predict it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp = finite(tok.logprob)
        out["token_logprobs"].append(lp)
        top = {tok.text: lp}  # the token itself, then the alternatives (a repeated text keeps its first value)
        for alt in tok.top:
            if alt.id != tok.id:
                top.setdefault(alt.text, finite(alt.logprob))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokens: Sequence[Token], tokenizer: GPT2Tokenizer) -> dict[str, Any]:
    """Chat's `logprobs` object for generated tokens."""
    def one(tok: Any) -> dict[str, Any]:
        return {"token": tok.text, "logprob": finite(tok.logprob), "bytes": list(tokenizer.token_bytes(tok.id))}

    return {"content": [one(t) | {"top_logprobs": [one(a) for a in t.top]} for t in tokens]}


class StreamedTokens:
    """A streamed choice's generated tokens, each with where its text starts and ends in the
    choice's text, until a chunk sends that text."""

    def __init__(self) -> None:
        self._pending: list[tuple[Token, int, int]] = []

    def push(self, token: Token, start: int, end: int) -> None:
        self._pending.append((token, start, end))

    def release(self, upto: int | None = None) -> list[tuple[Token, int]]:
        """(token, text offset) of the tokens whose text ends by `upto` (None: all of them)."""
        n = len(self._pending) if upto is None else next(
            (k for k, (_, _, end) in enumerate(self._pending) if end > upto), len(self._pending))
        out = [(tok, start) for tok, start, _ in self._pending[:n]]
        del self._pending[:n]
        return out
