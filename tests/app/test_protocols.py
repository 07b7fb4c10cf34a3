"""Issue 19's protocol fields through the real clients, unchanged, against the real server: the
`openai` SDK (completions and chat), `text-generation` (TGI's parameters), LangChain's `OpenAI`
and `HuggingFaceEndpoint`. Where a field changes the tokens, they are checked against
transformers' `generate` with the field's processor written out (OpenAI's, TGI's or
transformers' own definition)."""

from __future__ import annotations

import httpx
import openai
import pytest
import text_generation
import torch
import transformers
from text_generation.errors import ValidationError
from transformers import LogitsProcessor, LogitsProcessorList, TypicalLogitsWarper

from tests.app.conftest import REPO, Server, base_env, start_server, stop_server

PROMPT = "The weather today is"
EOS = 50256
DEMO_TEMPLATE = REPO / "model" / "demo" / "chat_template.jinja"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache):
    s = start_server(tmp_path_factory.mktemp("proto"), base_env(
        tiny_lm_dir, tiny_classifier_dir, onnx_cache, CHAT_TEMPLATE=str(DEMO_TEMPLATE), MAX_CONCURRENT_REQUESTS="16"))
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def oai(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tgi(srv: Server) -> text_generation.Client:
    return text_generation.Client(srv.url, timeout=60)


@pytest.fixture(scope="module")
def name(oai) -> str:
    return oai.models.list().data[0].id


def hf_greedy(hf, ids: list[int], n: int, *processors: LogitsProcessor) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
                      do_sample=False, eos_token_id=None, pad_token_id=0,
                      logits_processor=LogitsProcessorList(list(processors)))
    return out[0, len(ids):].tolist()


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's definition (vLLM's _apply_penalties): over the generated tokens only,
    logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class TGIFrequencyPenalty(LogitsProcessor):
    """TGI's HeterogeneousFrequencyPenaltyLogitsProcessor: each token's frequency in the whole
    sequence so far (prompt included) times the penalty, off its logit."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        freq = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - freq / input_ids.shape[1] * self.penalty


class Bias(LogitsProcessor):
    def __init__(self, bias: dict[int, float]) -> None:
        self.bias = bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for k, v in self.bias.items():
            scores[:, k] += v
        return scores


# ---- OpenAI completions ---------------------------------------------------------------------------

def test_null_means_the_default(oai, name) -> None:
    """What LangChain and others send: every field, most of them null."""
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, max_tokens=None, presence_penalty=None,
                 frequency_penalty=None, logprobs=None, echo=None, logit_bias=None, seed=None, stop=None, suffix=None,
                 user=None, best_of=None)
    c = oai.completions.create(model=name, prompt=PROMPT, extra_body={"ignore_eos": True}, **nulls)
    assert len(c.choices) == 1 and c.usage.completion_tokens == 16 and c.choices[0].finish_reason == "length"
    greedy = oai.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0, frequency_penalty=0,
                                    presence_penalty=0, logprobs=None, best_of=1, n=1, user="u1")
    assert greedy.choices[0].text == oai.completions.create(model=name, prompt=PROMPT, temperature=0).choices[0].text


def test_n_and_best_of(oai, srv, name) -> None:
    kw = dict(model=name, prompt=PROMPT, max_tokens=6, temperature=1.0)
    three = oai.completions.create(**kw, n=3, seed=5)
    assert [c.index for c in three.choices] == [0, 1, 2] and three.usage.completion_tokens == 18
    alone = [oai.completions.create(**kw, seed=5 + j).choices[0].text for j in range(3)]
    assert [c.text for c in three.choices] == alone  # candidate j is seeded with seed + j, as vLLM
    # best_of: the candidate with the highest mean log-probability per token (OpenAI's definition)
    details = [httpx.post(srv.url + "/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 6, "do_sample": True, "seed": 5 + j, "details": True}}, timeout=60).json() for j in range(3)]
    assert [d["generated_text"] for d in details] == alone
    mean = [sum(t["logprob"] for t in d["details"]["tokens"]) / len(d["details"]["tokens"]) for d in details]
    best = oai.completions.create(**kw, best_of=3, seed=5)
    assert len(best.choices) == 1 and best.choices[0].text == alone[mean.index(max(mean))]
    two = oai.completions.create(**kw, best_of=3, n=2, seed=5)
    order = sorted(range(3), key=lambda j: -mean[j])
    assert [c.text for c in two.choices] == [alone[j] for j in order[:2]]
    prompts = oai.completions.create(**{**kw, "prompt": [PROMPT, "Hello"]}, n=2, seed=1)
    assert [c.index for c in prompts.choices] == [0, 1, 2, 3]


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    ({"best_of": 2, "n": 3}, "best_of", "best_of: best_of must be greater than or equal to n"),
    ({"n": 9}, "n", "n: at most 8 completions per prompt (MAX_BEST_OF)"),
    ({"suffix": "x"}, "suffix", "suffix: Value error, suffix is not supported"),
    ({"logprobs": 21}, "logprobs", "logprobs: Input should be less than or equal to 20"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "logit_bias: Value error, key 'abc' is not a token id"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "logit_bias: Value error, bias 101"),
    ({"logit_bias": {"50257": 1}}, "logit_bias", "logit_bias: token id 50257 is out of the vocabulary"),
    # Python's int() refuses a string past 4,300 digits: this key was a 500 (issue 27)
    ({"logit_bias": {"7" * 5000: 1}}, "logit_bias", "logit_bias: Value error, key '77777777777777777777' is not a"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias",
     "logit_bias: Value error, at most 1024 token ids, not 1025"),
    ({"extra_body": {"stop_token_ids": list(range(1025))}}, "stop_token_ids",
     "stop_token_ids: Value error, at most 1024 token ids, not 1025"),
    ({"extra_body": {"min_tokens": 5}}, "min_tokens", "min_tokens: min_tokens (5) must be less than or equal"),
    ({"extra_body": {"stop_token_ids": [60000]}}, "stop_token_ids", "stop_token_ids: token ids must be in"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search", "use_beam_search: Value error, use_beam_search is "
                                                                   "not supported"),
    ({"prompt": [50257]}, "prompt", "prompt: token id out of the vocabulary"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "frequency_penalty: Input should be less than or equal to 2"),
])
def test_bad_fields_are_400_naming_them(oai, name, kwargs, param, message) -> None:
    kw = {"model": name, "prompt": PROMPT, "max_tokens": 4} | kwargs
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(**kw)
    assert e.value.body["param"] == param and e.value.body["message"].startswith(message), e.value.body


def test_streaming_best_of_above_n_is_refused(oai, name) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=name, prompt=PROMPT, max_tokens=4, best_of=2, stream=True)
    assert e.value.body["param"] == "best_of" and "cannot be streamed" in e.value.body["message"]


def test_penalties_and_logit_bias_equal_transformers_with_their_definitions(oai, name, tok, hf) -> None:
    ids = tok.encode(PROMPT)
    kw = dict(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
    got = oai.completions.create(**kw, presence_penalty=1.5, frequency_penalty=0.7).choices[0].text
    assert got == tok.decode(hf_greedy(hf, ids, 12, OpenAIPenalties(len(ids), 1.5, 0.7)))
    assert got != oai.completions.create(**kw).choices[0].text
    plain = hf_greedy(hf, ids, 12)
    bias = {plain[0]: -100.0, 11: 3.0}
    got = oai.completions.create(**kw, logit_bias={str(k): v for k, v in bias.items()}).choices[0].text
    assert got == tok.decode(hf_greedy(hf, ids, 12, Bias(bias)))
    forced = oai.completions.create(**kw, logit_bias={"11": 100})
    assert forced.choices[0].text == "," * 12  # +100 forces the token (OpenAI's description)
    rep = oai.completions.create(**kw, extra_body={"repetition_penalty": 1.8}).choices[0].text
    assert rep == tok.decode(hf_greedy(hf, ids, 12, transformers.RepetitionPenaltyLogitsProcessor(1.8)))


def test_stop_controls(oai, name, tok, hf) -> None:
    kw = dict(model=name, prompt=PROMPT, temperature=0)
    eos_forced = {"logit_bias": {str(EOS): 100}}
    c = oai.completions.create(**kw, max_tokens=5, **eos_forced)
    assert c.usage.completion_tokens == 1 and c.choices[0].finish_reason == "stop" and c.choices[0].text == ""
    c = oai.completions.create(**kw, max_tokens=5, **eos_forced, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 5 and c.choices[0].finish_reason == "length" and c.choices[0].text == ""
    c = oai.completions.create(**kw, max_tokens=3, **eos_forced,
                               extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert c.choices[0].text == "<|endoftext|>" * 3
    # min_tokens: no EOS before it (vLLM), then the forced EOS
    ids = tok.encode(PROMPT)
    c = oai.completions.create(**kw, max_tokens=8, **eos_forced, extra_body={"min_tokens": 3})
    first3 = hf_greedy(hf, ids, 3, Bias({EOS: 100.0}), transformers.MinNewTokensLengthLogitsProcessor(
        len(ids), 3, EOS))
    assert c.usage.completion_tokens == 4 and c.choices[0].text == tok.decode(first3)
    # stop_token_ids: the token ends the text and is cut unless include_stop_str_in_output
    plain = hf_greedy(hf, ids, 10)
    k = next(i for i in range(2, 10) if plain[i] not in plain[:i])
    stop_id = plain[k]
    c = oai.completions.create(**kw, max_tokens=10, extra_body={"stop_token_ids": [stop_id]})
    assert c.usage.completion_tokens == k + 1 and c.choices[0].finish_reason == "stop"
    assert c.choices[0].model_extra["stop_reason"] == stop_id
    incl = oai.completions.create(**kw, max_tokens=10, extra_body={"stop_token_ids": [stop_id],
                                                                   "include_stop_str_in_output": True})
    assert incl.choices[0].text == tok.decode(plain[:k + 1]) and incl.choices[0].text.startswith(c.choices[0].text)
    # a stop string, kept with include_stop_str_in_output
    full = tok.decode(plain)
    stop = full[3:6]
    cut = oai.completions.create(**kw, max_tokens=10, stop=[stop]).choices[0]
    kept = oai.completions.create(**kw, max_tokens=10, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert cut.text + stop == kept.choices[0].text and cut.model_extra["stop_reason"] == stop


def test_token_id_prompts_and_truncation(oai, name, tok) -> None:
    ids = tok.encode(PROMPT)
    kw = dict(model=name, max_tokens=6, temperature=0)
    text = oai.completions.create(**kw, prompt=PROMPT).choices[0].text
    assert oai.completions.create(**kw, prompt=ids).choices[0].text == text
    both = oai.completions.create(**kw, prompt=[ids, ids])
    assert [c.text for c in both.choices] == [text, text] and both.usage.prompt_tokens == 2 * len(ids)
    long = tok.encode("word" + " word" * 70)  # 71 tokens, over MAX_INPUT_TOKENS=64
    c = oai.completions.create(**kw, prompt=long, extra_body={"truncate_prompt_tokens": 3})
    assert c.usage.prompt_tokens == 3 and c.choices[0].text == oai.completions.create(**kw, prompt=long[-3:]).choices[
        0].text
    c = oai.completions.create(**kw, prompt=long, extra_body={"truncate_prompt_tokens": -1})
    assert c.usage.prompt_tokens == 64


def test_fields_in_neither_api_are_ignored_and_named_in_one_warning(oai, srv, name) -> None:
    c = oai.completions.create(model=name, prompt=PROMPT, max_tokens=2, stream=False,
                               extra_body={"not_a_field": 1, "also_not": {"x": 1}})
    assert c.choices[0].text is not None
    s = oai.completions.create(model=name, prompt=PROMPT, max_tokens=2, stream=True,
                               stream_options={"include_usage": True, "zz_sub": 1})
    list(s)
    lines = [x for x in srv.log_text().splitlines() if "ignored fields" in x]
    assert any("WARNING" in x and x.endswith("not_a_field, also_not") for x in lines), lines
    assert any(x.endswith("stream_options.zz_sub") for x in lines), lines


def test_usage_chunks_and_the_sdks_documented_loop(oai, name) -> None:
    kw = dict(model=name, prompt=PROMPT, max_tokens=5, temperature=0, stream=True)
    text = "".join(chunk.choices[0].text for chunk in oai.completions.create(**kw))  # no IndexError at the end
    assert text == oai.completions.create(**{**kw, "stream": False}).choices[0].text
    chunks = list(oai.completions.create(**kw, stream_options={"include_usage": True,
                                                               "continuous_usage_stats": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    made = [c.usage.completion_tokens for c in chunks[:-1]]
    assert made == sorted(made) and made[-1] == 5 and all(c.usage.prompt_tokens == 4 for c in chunks[:-1])


def test_models_show_the_enforced_limit(oai, srv) -> None:
    card = oai.models.list().data[0]
    assert card.model_extra["max_model_len"] == 120  # MAX_TOTAL_TOKENS, under the model's 128
    info = httpx.get(srv.url + "/info").json()
    assert info["limits"]["max_total_tokens"] == 120 and info["limits"]["max_input_tokens"] == 64
    assert info["chat_template"].startswith("CHAT_TEMPLATE=")


# ---- chat -----------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather?"}]


def test_chat_renders_the_template_as_transformers_does(oai, name, tiny_lm_dir) -> None:
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_lm_dir)
    prompt = hf_tok.apply_chat_template(MESSAGES, chat_template=DEMO_TEMPLATE.read_text(), tokenize=False,
                                        add_generation_prompt=True)
    want = oai.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
    chat = oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == want.choices[0].text and chat.choices[0].message.role == "assistant"
    assert chat.usage == want.usage and chat.object == "chat.completion"
    stream = list(oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.choices[0].text
    assert stream[-2].choices[0].finish_reason == "length" and stream[-1].usage.completion_tokens == 8
    n2 = oai.chat.completions.create(model=name, messages=MESSAGES, max_completion_tokens=4, n=2, seed=3)
    assert [c.index for c in n2.choices] == [0, 1] and n2.usage.completion_tokens == 8


def test_chat_vllm_fields(oai, name) -> None:
    msgs = [*MESSAGES, {"role": "assistant", "content": "It is"}]
    kw = dict(model=name, max_tokens=5, temperature=0)
    cont = oai.chat.completions.create(messages=msgs, **kw, extra_body={"add_generation_prompt": False,
                                                                       "continue_final_message": True})
    raw = oai.completions.create(prompt="Be brief.\n\nUser: What is the weather?\nAssistant: It is", **kw)
    assert cont.choices[0].message.content == raw.choices[0].text
    echo = oai.chat.completions.create(messages=msgs, **kw, extra_body={
        "add_generation_prompt": False, "continue_final_message": True, "echo": True})
    assert echo.choices[0].message.content == "It is" + raw.choices[0].text


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages",
     "messages: the chat template refused the messages: roles must be system, user or assistant, not robot"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "messages[0].content[0].type: 'image_url' content is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools: tool calls are not supported"),
    ({"top_logprobs": 3}, "top_logprobs", "top_logprobs: Value error, needs logprobs: true"),
    ({"extra_body": {"chat_template": "{{ 1 }}"}}, "chat_template", "chat_template: Value error, chat_template is "
                                                                   "not accepted in a request"),
])
def test_chat_bad_input_is_400_naming_the_field(oai, name, kwargs, param, message) -> None:
    kw = {"model": name, "messages": MESSAGES, "max_tokens": 3} | kwargs
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**kw)
    assert e.value.body["param"] == param and e.value.body["message"].startswith(message), e.value.body


def test_chat_with_content_parts_and_tools_rendered_with_tool_choice_none(oai, name) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "it?"}]}]
    a = oai.chat.completions.create(model=name, messages=parts, max_tokens=4, temperature=0)
    b = oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is\nit?"}], max_tokens=4,
                                    temperature=0, tools=[{"type": "function", "function": {"name": "f"}}],
                                    tool_choice="none")
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_without_a_template_is_400_naming_the_setting(keyed_server) -> None:
    from tests.app.conftest import API_KEY

    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES)
    assert e.value.status_code == 400 and "set CHAT_TEMPLATE" in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"


# ---- TGI ------------------------------------------------------------------------------------------

def test_tgi_typical_p(tgi, tok, hf) -> None:
    kw = dict(max_new_tokens=8, typical_p=0.5, seed=11)
    a, b = tgi.generate(PROMPT, **kw), tgi.generate(PROMPT, **kw)
    assert a.generated_text == b.generated_text and a.details.seed == 11  # typical_p turns sampling on (TGI)
    assert [e.token.id for e in tgi.generate_stream(PROMPT, **kw)] == [t.id for t in a.details.tokens]
    # A tiny mass keeps one token whatever the seed: the one transformers' TypicalLogitsWarper keeps,
    # the token whose information is closest to the entropy. The tiny random model's distributions
    # are nearly flat, so that minimum can be a near-tie: checked on transformers' own logits
    # (teacher-forced on our tokens) to 1e-4, with TypicalLogitsWarper keeping it at mass 1e-6.
    ids = tok.encode(PROMPT)
    got = [t.id for t in tgi.generate(PROMPT, max_new_tokens=8, typical_p=1e-6, seed=1).details.tokens]
    assert [t.id for t in tgi.generate(PROMPT, max_new_tokens=8, typical_p=1e-6, seed=2).details.tokens] == got
    with torch.no_grad():
        logits = hf(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].double()
    logp = torch.log_softmax(logits, -1)
    shifted = (-logp - (-(logp.exp() * logp).sum(-1, keepdim=True))).abs()
    assert (shifted[torch.arange(8), got] - shifted.min(-1).values).max() < 1e-4
    first = TypicalLogitsWarper(1e-6)(None, logits[:1])[0]
    assert torch.isfinite(first).sum() == 1 and int(first.argmax()) == got[0]
    with pytest.raises(ValidationError, match="typical_p"):  # the client checks it too
        tgi.generate(PROMPT, typical_p=1.0)
    r = httpx.post(tgi.base_url + "/generate", json={"inputs": PROMPT, "parameters": {"typical_p": 1.0}})
    assert r.status_code == 422 and r.json()["error"].startswith("parameters.typical_p: Input should be less than 1")


def test_tgi_frequency_penalty_equals_tgis_processor(tgi, tok, hf) -> None:
    ids = tok.encode(PROMPT)
    r = tgi.generate(PROMPT, max_new_tokens=12, frequency_penalty=1.9)
    assert [t.id for t in r.details.tokens] == hf_greedy(hf, ids, 12, TGIFrequencyPenalty(1.9))
    with pytest.raises(ValidationError, match="parameters.frequency_penalty"):
        tgi.generate(PROMPT, frequency_penalty=2.5)


def test_tgi_truncate(tgi, srv, tok) -> None:
    long = "word" + " word" * 70  # 71 tokens, over MAX_INPUT_TOKENS=64
    r = tgi.generate(long, max_new_tokens=5, truncate=6, decoder_input_details=True)
    ids = tok.encode(long)
    assert [t.id for t in r.details.prefill] == ids[-6:]
    c = httpx.post(srv.url + "/v1/completions", json={"prompt": ids[-6:], "max_tokens": 5, "temperature": 0}).json()
    assert r.generated_text == c["choices"][0]["text"]
    with pytest.raises(ValidationError, match="parameters.truncate: `truncate` must be strictly positive and at most"):
        tgi.generate(long, truncate=65)
    streamed = list(tgi.generate_stream(long, max_new_tokens=5, truncate=6))
    assert streamed[-1].generated_text == r.generated_text


def test_tgi_best_of(tgi, srv) -> None:
    r = tgi.generate(PROMPT, max_new_tokens=6, best_of=2, do_sample=True)
    others = r.details.best_of_sequences
    assert len(others) == 1 and others[0].generated_tokens == 6 and others[0].seed is not None
    mean = [sum(t.logprob for t in seq.tokens) / len(seq.tokens) for seq in (r.details, others[0])]
    assert mean[0] >= mean[1]
    assert [p.id for p in others[0].prefill] == [p.id for p in r.details.prefill]

    def post(params: dict, path: str = "/generate") -> httpx.Response:
        return httpx.post(srv.url + path, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3} | params},
                          timeout=60)

    plain = post({"best_of": 2, "do_sample": True}).json()
    assert set(plain) == {"generated_text"}  # no details unless asked for, as TGI
    for params, path, message in [
        ({"best_of": 2}, "/generate", "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "/generate", "`seed` must not be set when `best_of` > 1"),
        ({"best_of": 9, "do_sample": True}, "/generate", "`best_of` must be > 0 and <= 8"),
        ({"best_of": 2, "do_sample": True}, "/generate_stream", "`best_of` != 1 is not supported when streaming"),
    ]:
        resp = post(params, path)
        assert resp.status_code == 422 and message in resp.json()["error"], resp.text


# ---- LangChain ------------------------------------------------------------------------------------

def test_langchain_openai_invoke_stream_batch(srv, oai, name) -> None:
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=srv.url + "/v1", api_key="unused", model=name, max_tokens=8, temperature=0, max_retries=0)
    want = oai.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert llm.invoke(PROMPT) == want
    assert "".join(llm.stream(PROMPT)) == want
    assert llm.batch([PROMPT, PROMPT]) == [want, want]


def test_langchain_huggingface_endpoint_at_its_defaults(srv) -> None:
    """Its defaults send typical_p=0.95, top_p=0.95, temperature=0.8, watermark=false, ... to POST /.
    Only max_new_tokens is set: its default (512) is over this server's MAX_TOTAL_TOKENS (as over a
    TGI launched with a small context)."""
    from langchain_huggingface import HuggingFaceEndpoint

    llm = HuggingFaceEndpoint(endpoint_url=srv.url, max_new_tokens=8, seed=3)
    want = httpx.post(srv.url + "/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 8, "typical_p": 0.95, "top_p": 0.95, "temperature": 0.8, "seed": 3}}).json()
    assert llm.invoke(PROMPT) == want["generated_text"]
    assert "".join(llm.stream(PROMPT)) == want["generated_text"]
    assert llm.batch([PROMPT, PROMPT]) == [want["generated_text"]] * 2
    unseeded = HuggingFaceEndpoint(endpoint_url=srv.url, max_new_tokens=8)
    assert isinstance(unseeded.invoke(PROMPT), str)
