"""The official clients, unchanged, against the real server (`python -m app` on a loopback port):
Hugging Face's `text-generation` (TGI's client, which posts to `POST /`) and OpenAI's `openai` SDK
(on `/v1/*`). Each error must surface as the client's own exception class."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest
import text_generation
from text_generation.errors import NotFoundError as TGINotFoundError
from text_generation.errors import OverloadedError, UnknownError, ValidationError
from text_generation.types import FinishReason

from tests.app.conftest import API_KEY, Server, base_env, start_server, stop_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The weather today is"
LONG = "word" + " word" * 70  # 71 tokens > MAX_INPUT_TOKENS=64


def ours(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def tgi(keyed_server: Server) -> text_generation.Client:
    return text_generation.Client(keyed_server.url, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def oai(keyed_server: Server) -> openai.OpenAI:
    # max_retries=0: the SDK retries 429 and 5xx by itself; these tests want to see the first answer.
    return openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(oai: openai.OpenAI) -> str:
    return oai.models.list().data[0].id


# ---- TGI: text-generation -----------------------------------------------------------------------

def test_tgi_generate_with_decoder_input_details(tgi, keyed_server) -> None:
    r = tgi.generate(PROMPT, max_new_tokens=7, decoder_input_details=True)
    raw = ours(keyed_server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 7, "details": True,
                                                                            "decoder_input_details": True}})
    want = raw.json()
    assert r.generated_text == want["generated_text"] != ""
    d = r.details
    assert d.finish_reason == FinishReason.Length and d.generated_tokens == 7 and d.seed is None
    assert [(t.id, t.text, t.logprob) for t in d.prefill] == [(t["id"], t["text"], t["logprob"])
                                                              for t in want["details"]["prefill"]]
    assert d.prefill[0].logprob is None and all(t.logprob < 0 for t in d.prefill[1:])  # values: test_logprobs.py
    assert [t.text for t in d.prefill] == ["The", " weather", " today", " is"]
    assert [t.id for t in d.tokens] == [t["id"] for t in want["details"]["tokens"]]
    assert "".join(t.text for t in d.tokens) == r.generated_text
    assert all(t.logprob <= 0 and t.special is False for t in d.tokens)


def test_tgi_generate_stream_gives_the_same_text(tgi) -> None:
    plain = tgi.generate(PROMPT, max_new_tokens=12)
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=12))
    assert len(events) == 12
    assert [e.token.id for e in events] == [t.id for t in plain.details.tokens]
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == plain.generated_text
    assert events[-1].details.finish_reason == FinishReason.Length and events[-1].details.generated_tokens == 12


def test_tgi_seeded_sampling_repeats(tgi) -> None:
    kw = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.9, "top_k": 50, "seed": 1234}
    a, b = tgi.generate("Once upon a time", **kw), tgi.generate("Once upon a time", **kw)
    assert a.generated_text == b.generated_text and a.details.seed == b.details.seed == 1234
    assert [t.id for t in a.details.tokens] == [t.id for t in b.details.tokens]
    streamed = list(tgi.generate_stream("Once upon a time", **kw))
    assert streamed[-1].generated_text == a.generated_text


def test_tgi_stop_sequence_and_full_text(tgi) -> None:
    plain = tgi.generate(PROMPT, max_new_tokens=12).generated_text
    stop = plain[3:6]
    cut = tgi.generate(PROMPT, max_new_tokens=12, stop_sequences=[stop])
    assert cut.details.finish_reason == FinishReason.StopSequence and cut.generated_text.endswith(stop)
    assert plain.startswith(cut.generated_text)
    assert tgi.generate(PROMPT, max_new_tokens=12, return_full_text=True).generated_text == PROMPT + plain


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"watermark": True}, "watermark"),
])
def test_tgi_unsupported_parameters_are_a_422_naming_them(tgi, keyed_server, kwargs, name) -> None:
    with pytest.raises(ValidationError, match=f"parameters.{name}: .*TGI parameter {name} is not supported"):
        tgi.generate(PROMPT, max_new_tokens=3, **kwargs)
    with pytest.raises(ValidationError, match=f"parameters.{name}"):
        next(iter(tgi.generate_stream(PROMPT, max_new_tokens=3, **kwargs)))
    r = ours(keyed_server, "/generate", {"inputs": PROMPT, "parameters": {name: 2}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and name in r.json()["error"]


def test_tgi_errors_map_to_the_client_classes(tgi, keyed_server) -> None:
    with pytest.raises(ValidationError, match="inputs: 71 tokens exceed MAX_INPUT_TOKENS"):
        tgi.generate(LONG)
    with pytest.raises(ValidationError, match="inputs: 71 tokens exceed MAX_INPUT_TOKENS"):
        next(iter(tgi.generate_stream(LONG)))
    with pytest.raises(ValidationError, match=r"max_new_tokens: inputs \(4 tokens\) \+ max_new_tokens \(500\)"):
        tgi.generate(PROMPT, max_new_tokens=500)
    with pytest.raises(TGINotFoundError, match="no route POST /nope"):
        text_generation.Client(keyed_server.url + "/nope", headers=AUTH).generate(PROMPT)
    with pytest.raises(UnknownError, match="API key"):  # TGI has no auth; its client has no class for 401
        text_generation.Client(keyed_server.url).generate(PROMPT)


def test_tgi_overloaded(keyed_server) -> None:
    async def flood() -> list:
        client = text_generation.AsyncClient(keyed_server.url, headers=AUTH, timeout=120)
        calls = [client.generate("Flood", max_new_tokens=100) for _ in range(16)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(flood())
    over = [r for r in results if isinstance(r, OverloadedError)]
    assert over and "MAX_CONCURRENT_REQUESTS" in str(over[0])
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) + len(over) == 16 and len({r.generated_text for r in ok}) == 1


def test_compat_route_raw(keyed_server) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}
    one = ours(keyed_server, "/", body).json()
    assert isinstance(one, list) and one == [ours(keyed_server, "/generate", body).json()]
    streamed = ours(keyed_server, "/", body | {"stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.count("data:") == 5
    r = ours(keyed_server, "/", {"inputs": PROMPT, "stream": True, "parameters": {"decoder_input_details": True}})
    assert r.status_code == 422 and "parameters.decoder_input_details" in r.json()["error"]
    assert httpx.post(keyed_server.url + "/", json=body).status_code == 401  # POST / needs the key
    assert httpx.put(keyed_server.url + "/", json=body, headers=AUTH).status_code == 405


# ---- OpenAI: openai -----------------------------------------------------------------------------

def test_openai_completion_and_stream_give_the_same_text(oai, keyed_server, model_name) -> None:
    c = oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0)
    greedy = ours(keyed_server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}).json()
    assert c.choices[0].text == greedy["generated_text"] and c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (4, 12)
    chunks = list(oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.choices[0].text  # every chunk has a choice
    assert all(ch.usage is None for ch in chunks)  # no usage chunk unless include_usage
    with_usage = list(oai.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in with_usage if ch.choices) == c.choices[0].text
    assert with_usage[-1].choices == [] and with_usage[-1].usage == c.usage
    seeded = {"model": model_name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 7}
    a = oai.completions.create(**seeded).choices[0].text
    s = "".join(ch.choices[0].text for ch in oai.completions.create(**seeded, stream=True) if ch.choices)
    assert a == s


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    ({"max_tokens": -1}, "max_tokens", "max_tokens: Input should be greater than or equal to 0"),
    ({"max_tokens": 500}, "max_tokens", "max_tokens: prompt (4 tokens) + max_tokens (500) exceed MAX_TOTAL_TOKENS"),
    ({"temperature": 3}, "temperature", "temperature: Input should be less than or equal to 2"),
    ({"n": 0}, "n", "n: Input should be greater than or equal to 1"),
    ({"logit_bias": {"x1": 1}}, "logit_bias", "logit_bias: Value error, key 'x1' is not a token id"),
    ({"prompt": LONG}, "prompt", "prompt: 71 tokens exceed MAX_INPUT_TOKENS"),
])
def test_openai_invalid_request_is_bad_request(oai, model_name, kwargs, param, message) -> None:
    kw = {"model": model_name, "prompt": PROMPT, "max_tokens": 4} | kwargs
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(**kw, stream=stream)
        assert e.value.status_code == 400
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param
        assert e.value.body["message"].startswith(message), e.value.body


def test_openai_stream_options_are_checked(oai, model_name) -> None:
    kw = {"model": model_name, "prompt": PROMPT, "max_tokens": 2}
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(**kw, stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"
    assert e.value.body["message"] == "stream_options: Value error, only allowed when stream is true"
    chunks = list(oai.completions.create(**kw, stream=True, stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in chunks)  # vLLM: continuous usage only together with include_usage


def test_openai_errors_map_to_the_sdk_classes(oai, keyed_server, model_name) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("no-such-model")
    assert e.value.body == {"message": f"model: 'no-such-model' does not exist; this server serves "
                                       f"{model_name!r}", "type": "invalid_request_error", "param": "model",
                            "code": "model_not_found"}
    with pytest.raises(openai.BadRequestError, match="this model has no chat template: set CHAT_TEMPLATE"):
        oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}])
    anon = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        anon.completions.create(model=model_name, prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.APIStatusError) as e:
        oai.completions.create(model=model_name, prompt="x" * 70_000, max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    # Outside /v1 the TGI envelope stays.
    r = httpx.get(keyed_server.url + "/v1/nope", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/nope"
    assert httpx.get(keyed_server.url + "/nope", headers=AUTH).json() == {"error": "no route GET /nope",
                                                                          "error_type": "not_found"}


def test_openai_rate_limit(keyed_server, model_name) -> None:
    async def flood() -> list:
        client = openai.AsyncOpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        calls = [client.completions.create(model=model_name, prompt="Flood", max_tokens=100, temperature=0)
                 for _ in range(16)]
        try:
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.close()

    results = asyncio.run(flood())
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert limited and limited[0].status_code == 429 and limited[0].body["code"] == "rate_limit_exceeded"
    assert limited[0].response.headers["retry-after"] == "1"
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) + len(limited) == 16 and len({r.choices[0].text for r in ok}) == 1


def test_openai_unavailable_while_loading(tmp_path, tiny_lm_dir) -> None:
    name = tiny_lm_dir.name
    cache = tmp_path / "fresh-cache"  # a first start: the export runs, /health is 503 meanwhile
    srv = start_server(tmp_path, base_env(tiny_lm_dir, tmp_path / "none", cache, CLASSIFIER_PATH=""), wait=False)
    try:
        deadline = time.monotonic() + 60
        while not (cache.exists() and any(p.name.startswith(".tmp-") for p in cache.iterdir())):
            assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log_text()[-2000:]
            time.sleep(0.05)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        while True:  # the port opens a moment after the export starts
            try:
                client.completions.create(model=name, prompt=PROMPT, max_tokens=2)
            except openai.APIConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
                continue
            except openai.InternalServerError as e:
                assert e.status_code == 503 and e.body["type"] == "server_error"
                assert e.body["code"] == "service_unavailable" and e.body["message"] == "model is loading"
                break
            raise AssertionError("served before the export finished")
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        stop_server(srv)
