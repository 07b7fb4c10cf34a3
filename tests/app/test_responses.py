"""`POST /v1/responses` (OpenAI's Responses API, issue 29) against the real server, through the
official `openai` SDK and Haystack's `OpenAIResponsesChatGenerator`, unchanged: a Response is the
chat completion of the same messages (greedy tokens, usage, finish), streamed as the typed events
in order with their sequence numbers, deltas joining to the final text; bad input and the features
this server does not have are a 400 naming the field; nothing is stored.

The `text.format` json tests (`test_text_format_*`) need the chat route's `response_format`
(structured outputs)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from tests.app.conftest import REPO, Server, base_env, start_server, stop_server

DEMO_TEMPLATE = REPO / "model" / "demo" / "chat_template.jinja"
SYSTEM, USER = "Be brief.", "What is the weather?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
ENDS = ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_lm_dir, onnx_cache) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("responses"), base_env(
        tiny_lm_dir, tiny_lm_dir, onnx_cache, CLASSIFIER_PATH="", CHAT_TEMPLATE=str(DEMO_TEMPLATE),
        MAX_TOTAL_TOKENS="128", MAX_CONCURRENT_REQUESTS="16"))
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def oai(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def name(oai) -> str:
    return oai.models.list().data[0].id


def chat(oai, name, messages=MESSAGES, **kw):  # noqa: ANN001, ANN201 - the SDK's types
    return oai.chat.completions.create(model=name, messages=messages, temperature=0, **kw)


def test_greedy_response_is_the_chat_completion_of_the_same_messages(oai, name) -> None:
    want = chat(oai, name, max_tokens=8)
    r = oai.responses.create(model=name, instructions=SYSTEM, input=USER, max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == name
    assert r.output_text == want.choices[0].message.content and len(r.output) == 1
    item = r.output[0]
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [c.type for c in item.content] == ["output_text"] and item.content[0].annotations == []
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
        want.usage.prompt_tokens, want.usage.completion_tokens, want.usage.total_tokens)
    assert want.choices[0].finish_reason == "length"  # cut by the limit: incomplete, as vLLM and OpenAI say it
    assert r.status == item.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.max_output_tokens == 8 and r.temperature == 0 and r.instructions == SYSTEM and r.store is False
    # the same conversation as message items, the user's content as input_text parts (joined as chat joins parts)
    items = [{"role": "system", "content": SYSTEM},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is"},
                                                             {"type": "input_text", "text": "the weather?"}]}]
    parts = oai.responses.create(model=name, input=items, max_output_tokens=8, temperature=0)
    joined = chat(oai, name, [MESSAGES[0], {"role": "user", "content": "What is\nthe weather?"}], max_tokens=8)
    assert parts.output_text == joined.choices[0].message.content


def test_a_response_that_stops_is_completed(oai, name) -> None:
    text = chat(oai, name, max_tokens=8).choices[0].message.content
    assert len(text) >= 3, text
    stop = text[1:3]
    want = chat(oai, name, max_tokens=8, stop=[stop])
    assert want.choices[0].finish_reason == "stop"
    r = oai.responses.create(model=name, input=MESSAGES, max_output_tokens=8, temperature=0,
                             extra_body={"stop": [stop]})
    assert r.status == "completed" and r.incomplete_details is None and r.output[0].status == "completed"
    assert r.output_text == want.choices[0].message.content


def test_stream_events_in_order_and_deltas_join_to_the_text(oai, name) -> None:
    want = oai.responses.create(model=name, input=MESSAGES, max_output_tokens=10, temperature=0)
    events = list(oai.responses.create(model=name, input=MESSAGES, max_output_tokens=10, temperature=0, stream=True))
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types == EVENTS + ["response.output_text.delta"] * len(deltas) + ENDS and deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, done, part, item, completed = events[0], events[-4], events[-3], events[-2], events[-1]
    assert created.response.status == "in_progress" and created.response.output == []
    assert created.response.id == completed.response.id and created.response.usage is None
    text = "".join(d.delta for d in deltas)
    assert text == done.text == part.part.text == item.item.content[0].text == completed.response.output_text
    assert text == want.output_text
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in [events[3], *deltas, done, part]) and item.item.id == item_id
    assert completed.response.status == "incomplete" and completed.response.usage == want.usage
    # the SDK's stream helper finds its final response (it waits for response.completed, also when incomplete)
    with oai.responses.stream(model=name, input=MESSAGES, max_output_tokens=10, temperature=0) as stream:
        assert stream.get_final_response().output_text == text


def test_raw_events_and_response_validate_against_the_sdk_types(srv, name) -> None:
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    body = {"model": name, "input": MESSAGES, "max_output_tokens": 6, "temperature": 0,
            "include": ["message.output_text.logprobs"], "top_logprobs": 1}
    r = httpx.post(srv.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    Response.model_validate(r.json(), strict=False)
    with httpx.stream("POST", srv.url + "/v1/responses", json=body | {"stream": True}, timeout=60) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        blocks = s.read().decode().strip().split("\n\n")
    adapter = TypeAdapter(ResponseStreamEvent)
    for block in blocks:  # `event: <type>` then `data: <json>`, as OpenAI sends them (no [DONE])
        event, data = block.split("\n")
        parsed = adapter.validate_python(json.loads(data.removeprefix("data: ")))
        assert event == f"event: {parsed.type}"
    assert parsed.type == "response.completed" and parsed.response.output[0].content[0].text == \
        r.json()["output"][0]["content"][0]["text"]


def test_an_error_in_the_stream_is_the_error_event_and_ends_it() -> None:
    from openai.types.responses import ResponseErrorEvent

    from app.protocol.responses import EventStream, ResponsesRequest

    events = EventStream(ResponsesRequest(input="x"), "resp_1", "msg_1", 0, "lm")
    assert len(events.start()) == 2
    assert len(events.feed({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})) == 2
    error = {"error": {"message": "the server is shutting down", "type": "server_error", "param": None,
                       "code": "service_unavailable"}}
    [out] = events.feed(error)
    kind, data = out.strip().split("\n")
    parsed = ResponseErrorEvent.model_validate(json.loads(data.removeprefix("data: ")))
    assert kind == "event: error" and parsed.message == "the server is shutting down" and parsed.sequence_number == 4
    assert parsed.code == "service_unavailable"
    assert events.feed({"choices": [{"index": 0, "delta": {"content": "more"}}]}) == [] and events.done() == []


def test_logprobs_are_the_chat_logprobs(oai, name) -> None:
    want = chat(oai, name, max_tokens=6, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    kw = dict(model=name, input=MESSAGES, max_output_tokens=6, temperature=0, top_logprobs=2,
              include=["message.output_text.logprobs"])
    got = oai.responses.create(**kw).output[0].content[0].logprobs
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in got] == \
        [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in want]
    streamed = [lp for e in oai.responses.create(**kw, stream=True) if e.type == "response.output_text.delta"
                for lp in e.logprobs]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in want]
    plain = oai.responses.create(model=name, input=MESSAGES, max_output_tokens=2, temperature=0)
    assert plain.output[0].content[0].logprobs is None


def test_an_incomplete_assistant_message_last_is_continued(oai, name) -> None:
    msgs = [*MESSAGES, {"role": "assistant", "content": "It is"}]
    want = chat(oai, name, msgs, max_tokens=5, extra_body={"add_generation_prompt": False,
                                                          "continue_final_message": True})
    items = [*MESSAGES, {"type": "message", "role": "assistant", "status": "incomplete",
                         "content": [{"type": "output_text", "text": "It is", "annotations": []}]}]
    r = oai.responses.create(model=name, input=items, max_output_tokens=5, temperature=0)
    assert r.output_text == want.choices[0].message.content


def test_truncation_auto_keeps_the_last_tokens(oai, name, srv) -> None:
    long = "word " * 200  # past MAX_INPUT_TOKENS (64)
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=name, input=long, max_output_tokens=2)
    assert e.value.body["param"] == "input", e.value.body
    r = oai.responses.create(model=name, input=long, max_output_tokens=2, truncation="auto")
    assert r.usage.input_tokens == 64 and r.truncation == "auto"


def test_store_is_accepted_and_nothing_is_stored(oai, name, srv) -> None:
    r = oai.responses.create(model=name, input=USER, max_output_tokens=2, store=True, metadata={"k": "v"})
    assert r.store is False and r.metadata == {"k": "v"}
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=name, input=USER, max_output_tokens=2, previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id" and "nothing is stored" in e.value.body["message"]
    assert httpx.get(f"{srv.url}/v1/responses/{r.id}").status_code in (404, 405)  # no retrieval route


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "tools: Value error, tools is not "
                                                                                "supported"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice: Value error, tool_choice is not supported"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning: Value error, reasoning is not supported"),
    ({"background": True}, "background", "background: Value error, background is not supported"),
    ({"conversation": "conv_1"}, "conversation", "conversation: Value error, conversation is not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]}]},
     "input[0].content[0].type", "input[0].content[0].type: 'input_image' content is not supported"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].type",
     "input[0].type: 'function_call_output' items are not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text",
     "input[0].content[0].text: is required"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input", "input: the chat template refused the messages"),
    ({"input": []}, "input", "input: Value error, must be a string or a non-empty list"),
    ({"text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema", "text.format.schema: is "
                                                                                        "required"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type", "text.format.type: must be \"text\""),
    ({"max_output_tokens": 500}, "max_output_tokens", "max_output_tokens: input ("),
    ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens: Input should be greater than or equal to 1"),
    ({"temperature": 3}, "temperature", "temperature: Input should be less than or equal to 2"),
    ({"top_logprobs": 21}, "top_logprobs", "top_logprobs: Input should be less than or equal to 20"),
    ({"extra_body": {"top_k": -5}}, "top_k", "top_k: Input should be greater than or equal to -1"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_is_400_naming_the_field(oai, name, kwargs, param, message, stream) -> None:
    kw = {"model": name, "input": MESSAGES, "max_output_tokens": 3, "stream": stream} | kwargs
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(**kw)
    assert e.value.body["param"] == param and e.value.body["message"].startswith(message), e.value.body
    assert e.value.body["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored_and_named_in_the_log(oai, name, srv) -> None:
    r = oai.responses.create(model=name, input=USER, max_output_tokens=2, extra_body={"frobnicate": 1})
    assert r.status == "incomplete"
    assert "ignored fields that are in neither OpenAI's nor vLLM's API: frobnicate" in srv.log_text()


def test_without_a_chat_template_it_is_chat_s_400(keyed_server) -> None:
    from tests.app.conftest import API_KEY

    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0)
    name = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as chat_error:
        client.chat.completions.create(model=name, messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=name, input=USER)
    assert e.value.body == chat_error.value.body and "set CHAT_TEMPLATE" in e.value.body["message"]


# ---- text.format: needs response_format (structured outputs) on the chat route -------------------

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "n"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 99}}}


@pytest.mark.parametrize("stream", [False, True])
def test_text_format_json_schema_output_follows_the_schema(oai, name, stream) -> None:
    fmt = {"format": {"type": "json_schema", "name": "pick", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2, 3):
        kw = dict(model=name, input=MESSAGES, max_output_tokens=40, temperature=1.0, text=fmt,
                  extra_body={"seed": seed})
        if stream:
            events = list(oai.responses.create(**kw, stream=True))
            text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert events[-1].response.output_text == text and events[-1].response.text.format.type == "json_schema"
        else:
            text = oai.responses.create(**kw).output_text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_text_format_through_the_sdk_parse_helper(oai, name) -> None:
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pick(BaseModel):
        color: Literal["red", "green", "blue"]
        n: int = Field(ge=0, le=9)

    r = oai.responses.parse(model=name, input=MESSAGES, max_output_tokens=40, temperature=0, text_format=Pick)
    assert isinstance(r.output_parsed, Pick) and r.status == "completed"


def test_text_format_json_object(oai, name) -> None:
    r = oai.responses.create(model=name, input=MESSAGES, max_output_tokens=60, temperature=0.8,
                             text={"format": {"type": "json_object"}}, extra_body={"seed": 4})
    if r.status == "completed":  # an open object can go on to the token limit
        assert isinstance(json.loads(r.output_text), dict)
    else:
        assert r.output_text.startswith("{"), r.output_text


# ---- Haystack ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def haystack_generator(srv, name):  # noqa: ANN201 - haystack is imported only here
    os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"  # before the import: no posthog calls
    from haystack.components.generators.chat import OpenAIResponsesChatGenerator
    from haystack.utils import Secret

    return OpenAIResponsesChatGenerator(api_key=Secret.from_token("unused"), model=name,
                                        api_base_url=srv.url + "/v1", max_retries=0,
                                        generation_kwargs={"max_output_tokens": 8, "temperature": 0})


def test_haystack_responses_chat_generator(haystack_generator, oai, name) -> None:
    from haystack.dataclasses import ChatMessage

    want = chat(oai, name, max_tokens=8).choices[0].message.content
    messages = [ChatMessage.from_system(SYSTEM), ChatMessage.from_user(USER)]
    reply = haystack_generator.run(messages=messages)["replies"][0]
    assert reply.text == want and reply.meta["finish_reason"] == "length"
    assert reply.meta["usage"]["output_tokens"] == 8
    chunks: list = []
    streamed = haystack_generator.run(messages=messages, streaming_callback=chunks.append)["replies"][0]
    assert streamed.text == want == "".join(c.content for c in chunks)
    assert streamed.meta["finish_reason"] == "length"
