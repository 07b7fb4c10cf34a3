"""Structured outputs (issue 29) end to end: a real server over loopback, the tiny random LM, the
real tokenizer and llguidance. Every output of a constrained request parses and validates
(`jsonschema`), matches its regex, is one of its choices, or is in its grammar's language, at
several seeds and temperatures; streaming, n > 1, logprobs, stop strings and the grammar's end
work with it; invalid constraints are a 4xx naming the field; the constrained greedy tokens and
their log-probabilities equal transformers' logits under llguidance's mask."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import numpy as np
import pytest
import torch

from tests.app.conftest import REPO, Server, base_env, start_server, stop_server

DEMO_TEMPLATE = REPO / "model" / "demo" / "chat_template.jinja"
PROMPT = "The record:"

OBJ = {"type": "object", "additionalProperties": False}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {**OBJ, "properties": props, "required": list(props) if required is None else required}


WORD = {"type": "string", "maxLength": 6}
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}

# Bounded strings and numbers: a random model given free text writes until its token limit.
SCHEMAS: list[dict] = [
    obj({"name": WORD, "age": SMALL}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"ok": {"type": "boolean"}, "none": {"type": "null"}}),
    obj({"ids": {"type": "array", "items": SMALL, "minItems": 1, "maxItems": 3}}),
    obj({"user": obj({"id": SMALL, "tag": WORD})}),
    obj({"rows": {"type": "array", "items": obj({"k": WORD}), "maxItems": 2}}),
    obj({"x": {"type": "number", "enum": [0.5, 1.25, 10]}}),  # a free float's digits go on: see the regex test
    obj({"a": SMALL, "b": WORD}, required=["a"]),
    obj({"a": WORD, "b": SMALL, "c": {"type": "boolean"}}, required=[]),
    obj({"kind": {"const": "point"}, "xy": {"type": "array", "items": SMALL, "minItems": 2, "maxItems": 2}}),
    obj({"level": {"enum": [1, 2, 3]}, "label": {"enum": ["lo", "hi"]}}),
    obj({"deep": obj({"deeper": obj({"deepest": {"type": "boolean"}})})}),
    obj({"v": {"anyOf": [SMALL, {"type": "null"}]}}),
    obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}),
    {"type": "array", "items": SMALL, "minItems": 1, "maxItems": 4},
    {"enum": ["yes", "no", "maybe"]},
    obj({"n": {"type": "integer", "minimum": -5, "maximum": 5}, "f": {"type": "boolean"}}),
    obj({"pair": obj({"left": SMALL, "right": SMALL}), "ok": {"type": "boolean"}}),
    obj({"id": {"type": "string", "format": "date"}}),
    obj({"items": {"type": "array", "items": obj({"n": SMALL, "on": {"type": "boolean"}}), "minItems": 1,
                   "maxItems": 2}}),
]
SETTINGS = [(0.0, None), (0.7, 1), (1.0, 2), (1.0, 3)]  # (temperature, seed)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_lm_dir, onnx_cache) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("structured"), base_env(
        tiny_lm_dir, tiny_lm_dir, onnx_cache, CLASSIFIER_PATH="", CHAT_TEMPLATE=str(DEMO_TEMPLATE),
        MAX_TOTAL_TOKENS="128", MAX_CONCURRENT_REQUESTS="64", MAX_BATCH_SIZE="16"))
    yield s
    stop_server(s)


def post(srv: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120)


def complete(srv: Server, **body) -> dict:
    r = post(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 100, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_twenty_json_schemas_parse_and_validate_at_several_seeds_and_temperatures(srv) -> None:
    async def run() -> list[tuple[int, dict, dict]]:
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=srv.url, timeout=300) as c:
            async def one(i: int, schema: dict, t: float, seed: int | None) -> tuple[int, dict, dict]:
                body = {"prompt": PROMPT, "max_tokens": 100, "temperature": t, "seed": seed,
                        "response_format": {"type": "json_schema",
                                            "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}}
                async with sem:
                    r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return i, schema, r.json()["choices"][0]
            return await asyncio.gather(*(one(i, s, t, seed) for i, s in enumerate(SCHEMAS) for t, seed in SETTINGS))

    results = asyncio.run(run())
    assert len(results) == len(SCHEMAS) * len(SETTINGS) >= 80
    for i, schema, choice in results:
        assert choice["finish_reason"] == "stop", (i, choice)
        jsonschema.validate(json.loads(choice["text"]), schema)
    # Sampling makes different valid outputs, not one forced string.
    assert len({c["text"] for i, _, c in results if i == 0}) > 1


def test_constrained_rows_leave_the_other_rows_of_their_batch_alone(srv) -> None:
    plain = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    alone = complete(srv, **plain)["choices"][0]

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            bodies = [plain] + [{"prompt": PROMPT, "max_tokens": 60, "temperature": 0.8, "seed": i,
                                 "guided_json": SCHEMAS[0]} for i in range(6)]
            return [r.json() for r in await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))]
    outs = asyncio.run(burst())
    mixed = outs[0]["choices"][0]
    assert mixed["text"] == alone["text"]
    np.testing.assert_allclose(mixed["logprobs"]["token_logprobs"], alone["logprobs"]["token_logprobs"], atol=1e-4)
    for o in outs[1:]:
        jsonschema.validate(json.loads(o["choices"][0]["text"]), SCHEMAS[0])


def test_json_object_chat_and_the_grammar_end_stops_the_request(srv) -> None:
    r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "JSON please"}],
                                           "response_format": {"type": "json_object"}, "max_tokens": 100,
                                           "temperature": 0.8, "seed": 4})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":  # an open object can go on to the token limit
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["message"]["content"].startswith("{")
    # A complete value ends the request at once: no EOS step, finish_reason stop, usage counts it.
    out = complete(srv, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema":
                                                                                 {"enum": ["yes", "no"]}}},
                   logprobs=0)
    choice = out["choices"][0]
    assert choice["text"] in ('"yes"', '"no"') and choice["finish_reason"] == "stop"
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]  # no EOS token
    assert out["usage"]["completion_tokens"] == len(choice["logprobs"]["tokens"])


@pytest.mark.parametrize(("field", "value", "check"), [
    ("guided_regex", r"[a-z]{3}-[0-9]{2}", lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t)),
    ("guided_regex", r"-?[0-9]\.[0-9]{1,3}", lambda t: re.fullmatch(r"-?[0-9]\.[0-9]{1,3}", t)),
    ("guided_choice", ["alpha", "beta", "gamma delta"], lambda t: t in ("alpha", "beta", "gamma delta")),
    ("guided_grammar", 'start: "(" num ("+" num)* ")"\nnum: /[0-9]/', lambda t: re.fullmatch(r"\(\d(\+\d)*\)", t)),
    ("guided_grammar", 'root ::= "x" ("y" | "z") ("y" | "z")?', lambda t: re.fullmatch(r"x[yz]{1,2}", t)),  # GBNF
    ("guided_json", obj({"a": SMALL}), lambda t: jsonschema.validate(json.loads(t), obj({"a": SMALL})) is None),
    ("structured_outputs", {"regex": "(yes|no)!"}, lambda t: t in ("yes!", "no!")),
    ("structured_outputs", {"choice": ["one", "two"]}, lambda t: t in ("one", "two")),
    ("structured_outputs", {"json": {"enum": [1, 2]}}, lambda t: t in ("1", "2")),
])
def test_vllm_fields(srv, field, value, check) -> None:
    for t, seed in SETTINGS:
        out = complete(srv, **{field: value}, temperature=t, seed=seed, max_tokens=60)["choices"][0]
        assert out["finish_reason"] == "stop" and check(out["text"]), (field, t, out)


def test_tgi_grammar_json_and_regex(srv) -> None:
    schema = obj({"name": WORD, "age": SMALL})
    for grammar, check in (({"type": "json", "value": schema}, lambda t: jsonschema.validate(json.loads(t), schema)),
                           ({"type": "json_schema", "value": {"name": "x", "schema": schema}},
                            lambda t: jsonschema.validate(json.loads(t), schema)),
                           ({"type": "regex", "value": "[0-9]{4}"}, lambda t: re.fullmatch("[0-9]{4}", t) or 1 / 0)):
        for params in ({}, {"do_sample": True, "seed": 3, "temperature": 0.9}):
            r = post(srv, "/generate", {"inputs": PROMPT, "parameters": {"grammar": grammar, "max_new_tokens": 100,
                                                                         "details": True, **params}})
            assert r.status_code == 200, r.text
            assert r.json()["details"]["finish_reason"] == "eos_token"
            check(r.json()["generated_text"])


def test_streaming_n_and_logprobs_with_a_schema(srv) -> None:
    schema = obj({"ids": {"type": "array", "items": SMALL, "maxItems": 3}, "ok": {"type": "boolean"}})
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    whole = complete(srv, response_format=rf, temperature=0.9, seed=11, n=3, logprobs=3)
    texts = [c["text"] for c in sorted(whole["choices"], key=lambda c: c["index"])]
    for text, choice in zip(texts, sorted(whole["choices"], key=lambda c: c["index"]), strict=True):
        jsonschema.validate(json.loads(text), schema)
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == text
        for tops in lp["top_logprobs"]:  # the masked distribution: its alternatives sum to at most 1
            assert 1 <= len(tops) <= 4 and sum(np.exp(v) for v in tops.values()) <= 1 + 1e-5
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=120, json={
            "prompt": PROMPT, "max_tokens": 100, "response_format": rf, "temperature": 0.9, "seed": 11, "n": 3,
            "logprobs": 3, "stream": True}) as r:
        parts: dict[int, str] = {}
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    parts[c["index"]] = parts.get(c["index"], "") + c["text"]
    assert [parts[i] for i in range(3)] == texts


def test_stop_strings_and_the_token_limit_end_a_constrained_output(srv) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": obj({"name": WORD, "age": SMALL})}}
    out = complete(srv, response_format=rf, stop=['"age"'])["choices"][0]
    assert out["finish_reason"] == "stop" and out["text"].startswith('{"name":') and '"age"' not in out["text"]
    out = complete(srv, response_format=rf, max_tokens=2)["choices"][0]
    assert out["finish_reason"] == "length" and out["text"].startswith("{")


@pytest.mark.parametrize(("path", "body", "status", "field"), [
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema":
                                                                                   {"type": "foo"}}}},
     400, "response_format.json_schema.schema"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format.json_schema.schema"),
    ("/v1/completions", {"response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("/v1/completions", {"guided_regex": "a(b"}, 400, "guided_regex"),
    ("/v1/completions", {"guided_choice": []}, 400, "guided_choice"),
    ("/v1/completions", {"guided_grammar": "start: undefined_rule"}, 400, "guided_grammar"),
    ("/v1/completions", {"guided_json": "{not json"}, 400, "guided_json"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["b"]}, 400, "guided_choice"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": "x"}}, 400, "structured_outputs.structural_tag"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
     400, "response_format.json_schema.schema"),
    ("/generate", {"inputs": PROMPT, "parameters": {"grammar": {"type": "regex", "value": "(("}}}, 422,
     "parameters.grammar.value"),
    ("/generate", {"inputs": PROMPT, "parameters": {"grammar": {"type": "xml", "value": "x"}}}, 422,
     "parameters.grammar.type"),
])
def test_invalid_constraints_are_a_4xx_naming_the_field(srv, path, body, status, field) -> None:
    if path == "/v1/completions":
        body = {"prompt": PROMPT, "max_tokens": 5, **body}
    r = post(srv, path, body)
    assert r.status_code == status, r.text
    if path == "/generate":
        assert r.json()["error"].startswith(field + ":"), r.text
    else:
        err = r.json()["error"]
        assert err["param"] == field and "Traceback" not in err["message"], r.text
    assert post(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).status_code == 200  # still serving


def test_constrained_greedy_equals_transformers_under_the_mask(srv, tok, hf, tiny_lm_dir) -> None:
    """The tokens and log-probabilities of a constrained greedy request are transformers' under
    llguidance's mask (built here independently): argmax over the allowed tokens, and
    log_softmax(masked logits) at the chosen token, step by step."""
    import llguidance
    import llguidance.numpy as llnp

    schema = obj({"name": WORD, "age": SMALL})
    out = complete(srv, guided_json=schema, temperature=0, logprobs=2, max_tokens=40)["choices"][0]
    lp = out["logprobs"]
    ll = llguidance.LLTokenizer(tok.backend_json(), n_vocab=hf.config.vocab_size, eos_token=tok.eos_token_id)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(ll, grammar)
    bits = llnp.allocate_token_bitmask(1, hf.config.vocab_size)
    ids = tok.encode(PROMPT)
    for step, text in enumerate(lp["tokens"]):
        llnp.fill_next_token_bitmask(matcher, bits)
        allowed = np.unpackbits(bits[0].view(np.uint8), bitorder="little")[: hf.config.vocab_size].astype(bool)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double().numpy()
        masked = np.where(allowed, logits, -np.inf)
        logprobs = masked - masked.max() - np.log(np.exp(masked - masked.max()).sum())
        best = int(np.argmax(masked))
        assert tok.decode([best]) == text, step
        assert abs(logprobs[best] - lp["token_logprobs"][step]) < 1e-4, step
        assert matcher.consume_token(best)
        ids.append(best)
    assert matcher.is_stopped() and out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), schema)


# ---- the clients people use, unchanged ---------------------------------------------------------------

def test_openai_sdk_parse_with_a_pydantic_model(srv) -> None:
    import openai
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=6)
        age: int = Field(ge=0, le=99)

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    for seed in (1, 2, 3):
        done = client.chat.completions.parse(model="lm", messages=[{"role": "user", "content": "Who?"}],
                                             response_format=Person, temperature=0.9, seed=seed, max_tokens=60)
        person = done.choices[0].message.parsed
        assert isinstance(person, Person) and 0 <= person.age <= 99, done


def test_tgi_client_grammar(srv) -> None:
    import text_generation
    from text_generation.types import Grammar, GrammarType

    client = text_generation.Client(srv.url, timeout=60)
    schema = obj({"name": WORD, "age": SMALL})
    out = client.generate(PROMPT, max_new_tokens=60, grammar=Grammar(type=GrammarType.Json, value=schema))
    jsonschema.validate(json.loads(out.generated_text), schema)
    text = "".join(r.token.text for r in client.generate_stream(
        PROMPT, max_new_tokens=20, grammar=Grammar(type=GrammarType.Regex, value="[a-c]{2}-[0-9]"))
        if not r.token.special)
    assert re.fullmatch("[a-c]{2}-[0-9]", text), text


def test_llm_cli_json_object(srv, tmp_path) -> None:
    import shutil
    import subprocess
    import sys

    cli = shutil.which("llm") or str(REPO / ".venv" / "bin" / "llm")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: gpt2-local\n  model_name: lm\n  api_base: {srv.url}/v1\n  api_key_name: local\n")
    env = {"LLM_USER_PATH": str(tmp_path), "PATH": str(REPO / ".venv" / "bin") + ":" + sys.exec_prefix + "/bin",
           "LLM_LOCAL_KEY": "x", "HOME": str(tmp_path)}
    subprocess.run([cli, "keys", "set", "local", "--value", "x"], env=env, check=True, timeout=60)
    out = subprocess.run([cli, "-m", "gpt2-local", "-o", "json_object", "1", "-o", "max_tokens", "60",
                          "-o", "temperature", "0", "Reply in JSON"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("{"), out.stdout


def test_langchain_with_structured_output_json_schema(srv) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        verdict: str = Field(json_schema_extra={"enum": ["yes", "no"]})
        score: int = Field(ge=0, le=9)

    chat = ChatOpenAI(base_url=srv.url + "/v1", api_key="x", model="lm", temperature=0.7, max_tokens=40, seed=5)
    answer = chat.with_structured_output(Answer, method="json_schema").invoke("Is it?")
    assert isinstance(answer, Answer) and answer.verdict in ("yes", "no") and 0 <= answer.score <= 9
