"""Chat messages -> prompt text, rendered as Hugging Face's `apply_chat_template` renders it.

The same sandboxed Jinja environment as transformers (`ImmutableSandboxedEnvironment` with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and the `{% generation %}` tag; the
`tojson` filter without HTML escaping; `raise_exception`, `strftime_now`, a restricted `dict` and
`namespace`), the same variables (`messages`, `tools`, `documents`, `add_generation_prompt`, the
special tokens such as `eos_token`, then the request's `chat_template_kwargs`) and the same
`continue_final_message` handling. Templates are untrusted code (they come with checkpoints): the
sandbox keeps them from reaching Python internals.

Where the template comes from, first found wins: `CHAT_TEMPLATE` (a Jinja file, or the template
text itself), the checkpoint's `chat_template.jinja`, its `chat_template.json`, its
`tokenizer_config.json` `chat_template` (a string, or named templates of which "default" is used).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GPT2_SPECIAL_TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names transformers aliases to each other
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or a field it needs is missing)."""


class ChatTemplateLimitError(ChatTemplateError):
    """The render passed a limit (time, output size, memory) or its worker died (`template_sandbox`)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Dict:
    """`dict` inside templates, without attribute access to the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with nothing computed while compiling. Jinja folds constant
    expressions when it compiles a template (the optimizer, and every `{{ ... }}` output), so
    `[1] * 10**8` in a template was built, and written out as Python source (24 GB here), in the
    server itself. With the optimizer off and `*` and `**` intercepted (`call_binop` computes them
    as Python does), such an expression runs only when rendered: in a worker process, under its
    limits (`template_sandbox`)."""

    intercepted_binops = frozenset({"*", "**"})


def compile_template(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, optimized=False,
                   extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Only JSON types reach the template (as transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]  # AddedToken as tokenizer_config.json stores it
    return None


class ChatTemplate:
    def __init__(self, source: str, origin: str, special_tokens: dict[str, str] | None = None,
                 named: dict[str, str] | None = None) -> None:
        self.source = source
        self.origin = origin  # where it came from, for /info and the logs
        self.special_tokens = dict(GPT2_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        self.named = dict(named or {})  # tokenizer_config.json's named templates ("tool_use")
        self._template = compile_template(source)
        self._tool_template = compile_template(named["tool_use"]) if named and "tool_use" in named else None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list[dict] | None = None,
               documents: list[dict] | None = None, kwargs: dict[str, Any] | None = None,
               max_chars: int | None = None) -> str:
        """The prompt text, as `tokenizer.apply_chat_template(messages, tokenize=False, ...)` gives it.
        With `max_chars`, rendering stops with `ChatTemplateLimitError` once the text is longer."""
        chat = [_plain(m) for m in messages]
        for i, m in enumerate(chat):  # transformers fills `reasoning_content` / `thinking` from each other
            reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
            if reasoning is not None:
                chat[i] = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        final = None
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str):
                raise ChatTemplateError("continue_final_message needs a final message with text content")
            final = chat[-1]["content"]
            chat[-1] = {**chat[-1], "content": final + _CONTINUE_TAG}
        template = self._tool_template if tools and self._tool_template is not None else self._template
        variables = {**self.special_tokens, **_plain(kwargs or {})}
        try:
            text = _bounded(template, max_chars, messages=chat, tools=_plain(tools), documents=_plain(documents),
                            add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.TemplateError as e:  # raise_exception(), undefined fields, sandbox refusals
            raise ChatTemplateError(str(e) or type(e).__name__) from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # e.g. content of a wrong type
            raise ChatTemplateError(f"{type(e).__name__}: {e}") from e
        if final is not None:
            if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
                raise ChatTemplateError("continue_final_message: the template does not keep the final message")
            at = text.rindex(_CONTINUE_TAG.strip())
            text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
        return text


def _bounded(template: jinja2.Template, max_chars: int | None, **variables: Any) -> str:
    """`template.render(**variables)`, piece by piece when bounded: stops as soon as the text so far
    is longer than `max_chars`, before a loop of big strings has built all of them."""
    if max_chars is None:
        return template.render(**variables)
    pieces, total = [], 0
    for piece in template.generate(**variables):
        total += len(piece)
        if total > max_chars:
            raise ChatTemplateLimitError(f"the rendered text is longer than CHAT_TEMPLATE_MAX_CHARS ({max_chars})")
        pieces.append(piece)
    return "".join(pieces)


def special_tokens(folder: Path) -> dict[str, str]:
    """bos/eos/unk/... as the checkpoint's tokenizer files name them; GPT-2's when none do."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            for key in SPECIAL_TOKEN_NAMES:
                if (text := _token_text(data.get(key))) is not None:
                    found[key] = text
    return found or dict(GPT2_SPECIAL_TOKENS)


def _named(value: Any) -> tuple[str | None, dict[str, str]]:
    """tokenizer_config.json's `chat_template`: a string, or [{"name", "template"}] (use "default")."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, list):
        named = {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
        return named.get("default"), named
    if isinstance(value, dict):
        return value.get("default"), {k: v for k, v in value.items() if isinstance(v, str)}
    return None, {}


def load_chat_template(setting: str | None, checkpoint: Path | None) -> ChatTemplate | None:
    """The chat template to serve, or None. A template that does not compile raises ValueError
    naming where it came from (the server refuses to start rather than fail every chat request)."""
    special = special_tokens(checkpoint) if checkpoint and checkpoint.is_dir() else dict(GPT2_SPECIAL_TOKENS)
    source, origin, named = None, None, {}
    if setting:
        path = Path(setting).expanduser()
        if "{{" in setting or "{%" in setting:
            source, origin = setting, "CHAT_TEMPLATE (inline)"
        elif path.is_file():
            source, origin = path.read_text(encoding="utf-8"), f"CHAT_TEMPLATE={path}"
        else:
            raise ValueError(f"CHAT_TEMPLATE={setting!r}: no such file (give a Jinja file or the template text)")
    elif checkpoint and checkpoint.is_dir():
        if (checkpoint / "chat_template.jinja").is_file():
            source, origin = (checkpoint / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
        elif (checkpoint / "chat_template.json").is_file():
            data = json.loads((checkpoint / "chat_template.json").read_text(encoding="utf-8"))
            source, named = _named(data.get("chat_template"))
            origin = "chat_template.json"
        elif (checkpoint / "tokenizer_config.json").is_file():
            data = json.loads((checkpoint / "tokenizer_config.json").read_text(encoding="utf-8"))
            source, named = _named(data.get("chat_template"))
            origin = "tokenizer_config.json"
    if not source:
        return None
    try:
        template = ChatTemplate(source, origin or "?", special, named)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template from {origin} does not compile: {e}") from e
    logger.info("chat template from %s", origin)
    return template
