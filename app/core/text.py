"""The one rule where text enters: every string in a JSON request body is valid Unicode.

JSON can carry what no UTF-8 text holds: a lone UTF-16 surrogate as an escape (`"a\\ud800b"`),
which Python's decoder turns into a `str` that the tokenizer, the response encoder and the log all
refuse later, as a 500 that dropped the connection (issue 20). Bytes that are not UTF-8 are the
same case. Both checks run below the routes, on the raw body, so every text field of every route,
today's and those added later, gets a 4xx that names the field, in the route's envelope:

- `lone_surrogate`: the request middleware (`app.main`) runs it on every body before any route sees
  it. A body without a `\\u` escape (nearly all) costs one `bytes.find`, one with escapes but no lone
  surrogate a regular expression; only one with a lone surrogate is decoded here to find the field.
- `not_utf8`: bytes that are not UTF-8 make the route's JSON parser fail; the error handler
  (`app.core.errors`) then runs this on the body the middleware kept, so valid bodies are not
  decoded twice.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

# A \u escape of a high surrogate not followed by one of a low surrogate, or of a low one not
# preceded by a high one. A pair (what `json.dumps` writes for an emoji) is one character once decoded.
_HIGH, _LOW = rb"\\u[dD][89abAB][0-9a-fA-F]{2}", rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_LONE_SURROGATE_ESCAPE = re.compile(_HIGH + b"(?!" + _LOW + b")|(?<!" + _HIGH + b")" + _LOW)
# A surrogate written as UTF-8 bytes (not UTF-8, but `json.loads` decodes bytes with "surrogatepass").
_ENCODED_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def suspect(body: bytes) -> bool:
    """Whether `body` may hold a lone surrogate (`lone_surrogate` then says where): a find of `\\u`
    and of byte 0xED and, only when there is one, a regular expression."""
    return ((b"\\u" in body and _LONE_SURROGATE_ESCAPE.search(body) is not None)
            or (b"\xed" in body and _ENCODED_SURROGATE.search(body) is not None))


def lone_surrogate(body: bytes) -> tuple[str, str] | None:
    """(field, message) for the first string of the JSON `body` (key or value) holding a lone
    surrogate, or None. The field is dotted with list indices (`parameters.stop[0]`, `prompt[1]`).
    A body that is not JSON is left to the route's parser (None)."""
    if not suspect(body):
        return None
    try:
        return _first_invalid(body.decode("utf-8", "surrogatepass"))
    except UnicodeDecodeError:
        return _first_invalid(body.decode("utf-8", "surrogateescape"), stray_bytes=True)


def not_utf8(body: bytes) -> tuple[str, str] | None:
    """(field, message) for the first string of the JSON `body` that holds bytes that are not
    UTF-8 (or a lone surrogate), or None."""
    try:
        body.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # each stray byte becomes a lone surrogate U+DC80..U+DCFF
        return _first_invalid(body.decode("utf-8", "surrogateescape"), stray_bytes=True)
    return lone_surrogate(body)


def _first_invalid(text: str, stray_bytes: bool = False) -> tuple[str, str] | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:  # iterative: JSON nesting can be deeper than Python's recursion limit
        value, where = stack.pop()
        if isinstance(value, str):
            m = _SURROGATE.search(value)
            if m:
                return where or "body", _describe(m, stray_bytes)
        elif isinstance(value, dict):
            items = []
            for key, item in value.items():
                m = _SURROGATE.search(key)
                if m:
                    return where or "body", "holds a field name that " + _describe(m, stray_bytes)
                items.append((item, f"{where}.{key}" if where else key))
            stack.extend(reversed(items))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in reversed(list(enumerate(value))))
    return None


def _describe(m: re.Match, stray_bytes: bool) -> str:
    code = ord(m.group())
    if stray_bytes and 0xDC80 <= code <= 0xDCFF:
        return f"is not valid Unicode text: byte 0x{code - 0xDC00:02X} at character {m.start()} is not UTF-8"
    return (f"is not valid Unicode text: a lone surrogate U+{code:04X} at character {m.start()} (half of a UTF-16 "
            f"pair, which is no character)")


# ---- how deep a body nests (issue 27) ----------------------------------------------------------
# JSON's parser takes about 1,000 levels; whatever walks the parsed value recursively (pydantic, a
# chat template's `tojson` of `tools`) can then die of a RecursionError: a 500 and thousands of log
# lines. No request of these APIs nests past a few dozen levels, so deeper bodies are refused here.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8


def json_depth(body: bytes) -> int:
    """How deeply the arrays and objects of the JSON `body` nest (brackets inside strings do not
    count): exact past MAX_JSON_DEPTH, and at most that below it, where its bracket count (two
    `bytes.count`, which decide nearly every body) is returned. Past it, a regular expression
    drops the strings and a cumulative sum over the brackets gives the depth, all in C."""
    opens = body.count(b"[") + body.count(b"{")
    if opens <= MAX_JSON_DEPTH:
        return opens  # never deeper than it has brackets
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = np.frombuffer(brackets.translate(_STEPS), dtype=np.int8)
    return int(np.cumsum(steps, dtype=np.int64).max())


def refused_body(body: bytes) -> tuple[str, str] | None:
    """(field, message) for a body that may not enter (a lone surrogate, nesting past
    MAX_JSON_DEPTH), or None: the middleware's one call, on or off the event loop."""
    bad = lone_surrogate(body)
    if bad is None and (depth := json_depth(body)) > MAX_JSON_DEPTH:
        bad = ("body", f"JSON nested {depth} levels deep, more than {MAX_JSON_DEPTH}")
    return bad
