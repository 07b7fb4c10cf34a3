"""Issue 29's small API gaps, each through the real server on loopback and, where there is one, the
real client: `GET /v1/models/{id}` (the openai SDK's `models.retrieve`), another model name served
by the one model (Hugging Face's `InferenceClient.chat_completion`, which sends `model: "dummy"`)
or refused under `STRICT_MODEL_NAME`, vLLM's `return_token_ids`, `GET /tokenizer_info` (what
lm-evaluation-harness's remote tokenizer reads), `input_length` in streamed TGI details, and the
real `finish_reason` of streamed `/v1` requests in the access log."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import text_generation
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from tests.app.conftest import REPO, Server, base_env, start_server, stop_server

PROMPT = "The weather today is"
TEMPLATE = REPO / "model" / "demo" / "chat_template.jinja"
MESSAGES = [{"role": "user", "content": "What is the weather?"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_lm_dir, onnx_cache):
    s = start_server(tmp_path_factory.mktemp("gaps"), base_env(
        tiny_lm_dir, tiny_lm_dir, onnx_cache, CLASSIFIER_PATH="", CHAT_TEMPLATE=str(TEMPLATE),
        MAX_CONCURRENT_REQUESTS="16"))
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def oai(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def name(oai) -> str:
    return oai.models.list().data[0].id


def access_lines(server: Server, request_id: str) -> list[dict]:
    time.sleep(0.2)  # the line is written when the response ends
    lines = [json.loads(x.split(": ", 1)[1]) for x in server.log_text().splitlines() if "app.access:" in x]
    return [x for x in lines if x["request_id"] == request_id]


def test_models_retrieve_gives_the_card_and_404_for_another_id(oai, name) -> None:
    card = oai.models.retrieve(name)
    assert card.id == name and card.object == "model" and card.model_extra["max_model_len"] == 120
    assert card == oai.models.list().data[0]
    for other in ("no-such-model", "org/no-such-model"):  # an id with a slash is still the model route's 404
        with pytest.raises(openai.NotFoundError) as e:
            oai.models.retrieve(other)
        assert e.value.body == {"message": f"model: {other!r} does not exist; this server serves {name!r}",
                                "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def test_another_model_name_is_served_by_the_one_model(oai, srv, name) -> None:
    c = oai.completions.create(model="dummy", prompt=PROMPT, max_tokens=5, temperature=0)
    assert c.model == name
    assert c.choices[0].text == oai.completions.create(model=name, prompt=PROMPT, max_tokens=5,
                                                       temperature=0).choices[0].text
    # Hugging Face's InferenceClient at its defaults: base_url, no model (it sends "dummy")
    hf = InferenceClient(base_url=srv.url)
    out = hf.chat_completion(MESSAGES, max_tokens=6, temperature=0)
    want = oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=6, temperature=0)
    assert out.model == name and out.choices[0].message.content == want.choices[0].message.content
    assert out.usage.completion_tokens == want.usage.completion_tokens == 6
    streamed = list(hf.chat_completion(MESSAGES, max_tokens=6, temperature=0, stream=True))
    assert {c.model for c in streamed} == {name}
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == out.choices[0].message.content
    assert "ignored fields" not in srv.log_text()  # nothing the client sends is outside the two APIs


def test_strict_model_name_restores_the_404(tmp_path, tiny_lm_dir, onnx_cache) -> None:
    strict = start_server(tmp_path, base_env(tiny_lm_dir, tiny_lm_dir, onnx_cache, CLASSIFIER_PATH="",
                                             STRICT_MODEL_NAME="true"))
    try:
        client = openai.OpenAI(base_url=strict.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="dummy", prompt=PROMPT, max_tokens=2)
        assert e.value.body == {"message": f"model: 'dummy' is not served here; this server serves {name!r}",
                                "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
        assert client.completions.create(model=name, prompt=PROMPT, max_tokens=2).model == name
        assert client.completions.create(model=None, prompt=PROMPT, max_tokens=2).model == name  # no name: served
        with pytest.raises(HfHubHTTPError) as hf_error:  # the client's "dummy" (no chat template checked first)
            InferenceClient(base_url=strict.url).chat_completion(MESSAGES, max_tokens=2)
        assert hf_error.value.response.status_code == 404
        assert hf_error.value.response.json()["error"]["code"] == "model_not_found"
    finally:
        stop_server(strict)


def test_return_token_ids_completions(oai, srv, name, tok) -> None:
    kw = dict(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
    plain = oai.completions.create(**kw).choices[0]
    assert plain.model_extra["token_ids"] is None and plain.model_extra["prompt_token_ids"] is None
    c = oai.completions.create(**kw, extra_body={"return_token_ids": True})
    choice = c.choices[0]
    ids, prompt_ids = choice.model_extra["token_ids"], choice.model_extra["prompt_token_ids"]
    assert prompt_ids == tok.encode(PROMPT) and len(ids) == c.usage.completion_tokens == 8
    assert tok.decode(ids) == choice.text == plain.text
    # they are the tokens the model chose: continuing from the prompt and the first 5 gives the last 3
    rest = oai.completions.create(model=name, prompt=prompt_ids + ids[:5], max_tokens=3, temperature=0,
                                  extra_body={"return_token_ids": True}).choices[0]
    assert rest.model_extra["token_ids"] == ids[5:]
    # with echo and two prompts: each choice its own prompt's ids
    two = oai.completions.create(**{**kw, "prompt": [PROMPT, "A cat"]}, echo=True,
                                 extra_body={"return_token_ids": True})
    assert [x.model_extra["prompt_token_ids"] for x in two.choices] == [prompt_ids, tok.encode("A cat")]
    assert two.choices[0].model_extra["token_ids"] == ids
    # streamed: each chunk the ids of the text it carries, the prompt's ids in the first only
    chunks = list(oai.completions.create(**kw, stream=True, extra_body={"return_token_ids": True}))
    assert chunks[0].choices[0].model_extra["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in x.choices[0].model_extra for x in chunks[1:])
    assert [t for x in chunks for t in x.choices[0].model_extra["token_ids"]] == ids
    assert all(tok.decode(x.choices[0].model_extra["token_ids"]) == x.choices[0].text for x in chunks)
    assert all("token_ids" not in x.choices[0].model_extra for x in oai.completions.create(**kw, stream=True))
    assert "return_token_ids" not in srv.log_text()  # in vLLM's API: no "ignored fields" warning names it
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(**kw, extra_body={"return_token_ids": "yes"})
    assert e.value.body["param"] == "return_token_ids"


def test_return_token_ids_chat(oai, name, tok) -> None:
    kw = dict(model=name, messages=MESSAGES, max_tokens=6, temperature=0)
    c = oai.chat.completions.create(**kw, extra_body={"return_token_ids": True})
    prompt_ids, ids = c.model_extra["prompt_token_ids"], c.choices[0].model_extra["token_ids"]
    rendered = "User: What is the weather?\nAssistant:"  # the demo template
    assert prompt_ids == tok.encode(rendered) and len(prompt_ids) == c.usage.prompt_tokens
    assert tok.decode(ids) == c.choices[0].message.content and len(ids) == c.usage.completion_tokens == 6
    chunks = list(oai.chat.completions.create(**kw, stream=True, extra_body={"return_token_ids": True}))
    assert chunks[0].model_extra["prompt_token_ids"] == prompt_ids  # on the first chunk (the role's) only
    assert all("prompt_token_ids" not in x.model_extra for x in chunks[1:])
    assert [t for x in chunks for t in x.choices[0].model_extra.get("token_ids") or []] == ids
    plain = oai.chat.completions.create(**kw)
    assert plain.model_extra["prompt_token_ids"] is None and plain.choices[0].model_extra["token_ids"] is None


def test_tokenizer_info_as_vllm_serves_it(srv, name) -> None:
    from lm_eval.utils import RemoteTokenizer

    info = httpx.get(srv.url + "/tokenizer_info").json()
    assert info["eos_token"] == info["bos_token"] == info["unk_token"] == "<|endoftext|>"
    assert info["tokenizer_class"] == "GPT2Tokenizer" and info["name_or_path"] == name
    assert info["chat_template"] == TEMPLATE.read_text(encoding="utf-8")
    assert info["added_tokens_decoder"] == {"50256": "<|endoftext|>"} and info["add_bos_token"] is False
    assert not {"vocab_file", "merges_file"} & set(info)
    # lm-evaluation-harness's remote tokenizer reads it (and renders the chat template itself)
    remote = RemoteTokenizer(srv.url + "/v1/completions")
    assert (remote.eos_token, remote.bos_token, remote.pad_token) == ("<|endoftext|>", "<|endoftext|>", None)
    # (its Jinja environment keeps the file's trailing newline, which transformers' and ours trim)
    assert remote.apply_chat_template(MESSAGES) == "User: What is the weather?\nAssistant:\n"


def test_streamed_tgi_details_carry_input_length(srv, tok) -> None:
    client = text_generation.Client(srv.url, timeout=60)
    events = list(client.generate_stream(PROMPT, max_new_tokens=4))
    assert events[-1].details.generated_tokens == 4
    raw = [json.loads(x[5:]) for x in httpx.post(srv.url + "/generate_stream", timeout=60, json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 4}}).text.splitlines() if x.startswith("data:")]
    assert raw[-1]["details"] == {"finish_reason": "length", "generated_tokens": 4, "seed": None,
                                  "input_length": len(tok.encode(PROMPT))}
    assert all(ev["details"] is None for ev in raw[:-1])
    long = "word" + " word" * 20
    cut = [json.loads(x[5:]) for x in httpx.post(srv.url + "/generate_stream", timeout=60, json={
        "inputs": long, "parameters": {"max_new_tokens": 2, "truncate": 5}}).text.splitlines() if x.startswith("data:")]
    assert cut[-1]["details"]["input_length"] == 5  # after truncation, as TGI


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_v1_requests_log_their_finish_reason(srv, path) -> None:
    """The access log's finish_reason is the engine's, streamed or not: "length", or "eos_token" for
    a stop token id (here the 2nd greedy token)."""
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}
    body |= {"temperature": 0, "max_tokens": 3}
    second = httpx.post(srv.url + path, timeout=60, json=body | {"return_token_ids": True}).json()
    stop_id = second["choices"][0]["token_ids"][1]
    for tag, extra, reason in (("len", {}, "length"), ("eos", {"max_tokens": 30, "stop_token_ids": [stop_id]},
                                                        "eos_token")):
        rid = f"{tag}-{path.replace('/', '-')}"
        r = httpx.post(srv.url + path, timeout=60, headers={"X-Request-ID": rid}, json=body | extra | {"stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert httpx.post(srv.url + path, timeout=60, headers={"X-Request-ID": rid + "-plain"},
                          json=body | extra).status_code == 200
        [streamed], [plain] = access_lines(srv, rid), access_lines(srv, rid + "-plain")
        assert streamed["status"] == 200 and streamed["finish_reason"] == plain["finish_reason"] == reason, streamed
        assert streamed["generated_tokens"] == plain["generated_tokens"]
