"""The structured-output fields of each API, read into one `GrammarSpec` (issue 29).

- OpenAI: `response_format` `{"type": "json_object"}` and `{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}` (`strict` is accepted: the schema is always enforced); TGI's chat
  form `{"type": "json_object" | "json", "value": schema}` too.
- vLLM: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, and `structured_outputs`
  with the keys `json`, `regex`, `choice`, `grammar`, `json_object`.
- TGI: `parameters.grammar` `{"type": "json" | "json_object", "value": schema}`, `{"type": "regex",
  "value": regex}`, `{"type": "json_schema", "value": {"name", "schema"}}`.
A request may carry one constraint; two are a 4xx naming the second field.
"""

from __future__ import annotations

import json
from typing import Any

from app.engine.engine import InputError
from app.engine.grammar import GrammarSpec

# `json_object`: any JSON object (OpenAI's JSON mode).
ANY_OBJECT = json.dumps({"type": "object"})


def _schema(value: Any, field: str) -> GrammarSpec:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InputError(field, "must be a JSON schema (an object, or a string holding one)") from None
    if isinstance(value, bool):  # JSON Schema allows true/false; true is any JSON value
        raise InputError(field, "must be a JSON schema object")
    if not isinstance(value, dict):
        raise InputError(field, "must be a JSON schema (an object, or a string holding one)")
    # Key order is kept: it is the order the properties are written in.
    return GrammarSpec("json", json.dumps(value, separators=(",", ":")), field)


def _text(value: Any, field: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(field, f"must be a non-empty string ({what})")
    return value


def _choice(value: Any, field: str) -> GrammarSpec:
    if (not isinstance(value, list) or not value
            or not all(isinstance(c, str) and c for c in value)):
        raise InputError(field, "must be a non-empty list of non-empty strings")
    return GrammarSpec("choice", json.dumps(value), field)


def response_format(value: Any, field: str = "response_format") -> GrammarSpec | None:
    """OpenAI's `response_format` (and TGI's chat form of it); None for plain text."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InputError(field, 'must be an object with a "type": "text", "json_object" or "json_schema"')
    kind = value["type"]
    if kind == "text":
        return None
    if kind in ("json_object", "json"):
        return _schema(value["value"], f"{field}.value") if value.get("value") is not None else \
            GrammarSpec("json", ANY_OBJECT, field)
    if kind == "json_schema":
        spec = value.get("json_schema", value.get("value"))
        name = f"{field}.json_schema"
        if not isinstance(spec, dict):
            raise InputError(name, 'is required with "type": "json_schema": {"name": ..., "schema": {...}}')
        if "schema" not in spec:
            raise InputError(f"{name}.schema", "is required")
        return _schema(spec["schema"], f"{name}.schema")
    if kind == "regex" and value.get("value") is not None:  # TGI's chat grammar form
        return GrammarSpec("regex", _text(value["value"], f"{field}.value", "a regular expression"), f"{field}.value")
    raise InputError(f"{field}.type", f'must be "text", "json_object" or "json_schema", got {kind!r}')


STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def vllm_fields(guided_json: Any = None, guided_regex: Any = None, guided_choice: Any = None,
                guided_grammar: Any = None, structured_outputs: Any = None) -> list[GrammarSpec]:
    """vLLM's guided_* fields and `structured_outputs` (each key one constraint)."""
    out: list[GrammarSpec] = []
    if guided_json is not None:
        out.append(_schema(guided_json, "guided_json"))
    if guided_regex is not None:
        out.append(GrammarSpec("regex", _text(guided_regex, "guided_regex", "a regular expression"), "guided_regex"))
    if guided_choice is not None:
        out.append(_choice(guided_choice, "guided_choice"))
    if guided_grammar is not None:
        out.append(GrammarSpec("lark", _text(guided_grammar, "guided_grammar", "a Lark or GBNF grammar"),
                               "guided_grammar"))
    if structured_outputs is not None:
        if not isinstance(structured_outputs, dict):
            raise InputError("structured_outputs", f"must be an object with one of {', '.join(STRUCTURED_KEYS)}")
        for key, value in structured_outputs.items():
            name = f"structured_outputs.{key}"
            if value is None or value is False:
                continue
            if key == "json":
                out.append(_schema(value, name))
            elif key == "regex":
                out.append(GrammarSpec("regex", _text(value, name, "a regular expression"), name))
            elif key == "choice":
                out.append(_choice(value, name))
            elif key == "grammar":
                out.append(GrammarSpec("lark", _text(value, name, "a Lark or GBNF grammar"), name))
            elif key == "json_object" and value is True:
                out.append(GrammarSpec("json", ANY_OBJECT, name))
            elif key in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                         "whitespace_pattern") and not value:
                continue
            else:
                raise InputError(name, f"is not supported (use one of {', '.join(STRUCTURED_KEYS)})")
    return out


def one(specs: list[GrammarSpec | None]) -> GrammarSpec | None:
    """The request's constraint: at most one of its fields may set one."""
    found = [s for s in specs if s is not None]
    if len(found) > 1:
        raise InputError(found[1].field, f"only one structured output constraint per request ({found[0].field} "
                                         "is already set)")
    return found[0] if found else None


def openai_spec(body: Any) -> GrammarSpec | None:
    """The constraint of an OpenAI-style request (completions or chat)."""
    return one([response_format(getattr(body, "response_format", None)),
                *vllm_fields(body.guided_json, body.guided_regex, body.guided_choice, body.guided_grammar,
                             body.structured_outputs)])


def tgi_spec(value: Any, field: str = "parameters.grammar") -> GrammarSpec | None:
    """TGI's `grammar`: {"type": "json" | "json_object" | "regex" | "json_schema", "value": ...}."""
    if value is None:
        return None
    if not isinstance(value, dict) or "type" not in value or "value" not in value:
        raise InputError(field, 'must be {"type": "json" | "regex" | "json_schema", "value": ...}')
    kind, v = value["type"], value["value"]
    if kind in ("json", "json_object"):
        return _schema(v, f"{field}.value")
    if kind == "regex":
        return GrammarSpec("regex", _text(v, f"{field}.value", "a regular expression"), f"{field}.value")
    if kind == "json_schema":
        if not isinstance(v, dict) or "schema" not in v:
            raise InputError(f"{field}.value", 'must be {"name": ..., "schema": {...}}')
        return _schema(v["schema"], f"{field}.value.schema")
    raise InputError(f"{field}.type", f'must be "json", "regex" or "json_schema", got {kind!r}')
