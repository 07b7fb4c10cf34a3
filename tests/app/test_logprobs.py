"""Log-probabilities through the real clients, unchanged, against the real server: the `openai` SDK
(completions' `echo`/`logprobs`, score-only `max_tokens: 0`, streamed; chat's `logprobs` /
`top_logprobs`) and `text-generation` (TGI's `decoder_input_details` and `top_n_tokens`). Every
value is checked against `log_softmax` of transformers' `GPT2LMHeadModel` logits (float64 over
its fp32 logits) to 1e-4, for prompts up to the model's whole context, sent concurrently."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest
import text_generation
import torch
import transformers

from tests.app.conftest import REPO, Server

DEMO_TEMPLATE = REPO / "model" / "demo" / "chat_template.jinja"

TOL = 1e-4
CONTEXT = 128  # the tiny model's n_positions, and the scoring server's limits
TEXT = ("The café on the corner opens at seven. Its owner, Zoë, bakes bread before dawn and sells it warm; the "
        "queue reaches the bridge by eight. Tourists photograph the sign (it says 日本茶 in gold letters) and ask "
        "what it means. She answers that her grandmother brought the tea from Kyoto in 1962, along with a kettle, "
        "two cups and a book of poems that nobody in the family can read. On Sundays the café stays closed and "
        "she walks along the river to the old mill, where the water is slow and green. In winter the path floods, "
        "and she takes the long way round, past the school and the church with the broken clock.")


@pytest.fixture(scope="module")
def by_text(tok) -> dict[str, set[int]]:
    """Token text -> the ids with that text (several ids can decode to U+FFFD)."""
    out: dict[str, set[int]] = {}
    for i in range(tok.vocab_size):
        out.setdefault(tok.id_to_token_text(i), set()).add(i)
    return out


@pytest.fixture(scope="module")
def oai(scoring_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=scoring_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def name(oai) -> str:
    return oai.models.list().data[0].id


def ref_logprobs(hf, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(len(ids), V) float64: row i is log p(. | ids[:i + 1]), from transformers' logits."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits / temperature, -1)


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def offsets(tok, ids: list[int], start: int = 0) -> list[int]:
    """Where each token's text starts: the characters of the bytes before it (an unfinished
    character at the end does not count yet)."""
    return [start + len(b"".join(tok.token_bytes(i) for i in ids[:j]).decode("utf-8", "ignore"))
            for j in range(len(ids))]


def check_completion_logprobs(lp, ids: list[int], ref: torch.Tensor, k: int, tok, by_text, scored_from: int = 1,
                              start: int = 0) -> None:
    """A completions `logprobs` object for `ids` (prompt then generated): entry j is about ids[j]
    given ids[:j], ref[j - 1] the reference distribution there. Entries before `scored_from` are the
    unscored first prompt token (null)."""
    assert lp.tokens == [tok.id_to_token_text(i) for i in ids]
    assert lp.text_offset == offsets(tok, ids, start)
    for j, i in enumerate(ids):
        if j < scored_from:
            assert lp.token_logprobs[j] is None and lp.top_logprobs[j] is None
            continue
        row = ref[j - 1]
        assert abs(lp.token_logprobs[j] - row[i].item()) < TOL, (j, lp.token_logprobs[j], row[i].item())
        top = lp.top_logprobs[j]
        assert abs(top[tok.id_to_token_text(i)] - row[i].item()) < TOL
        # the token itself and the k most likely others (up to k + 1 entries, as OpenAI and vLLM), keyed
        # by text: an alternative whose text is already a key (two ids that decode to U+FFFD) adds nothing
        values, best = row.topk(k)
        want = {tok.id_to_token_text(i): row[i].item()}
        for v, b in zip(values.tolist(), best.tolist(), strict=True):
            if b != i:
                want.setdefault(tok.id_to_token_text(b), v)
        assert len(top) == len(want) and max(abs(a - b) for a, b in zip(sorted(top.values()), sorted(want.values()),
                                                                        strict=True)) < TOL, (j, top, want)
        for text, value in top.items():  # every alternative is a token with that log-probability
            assert any(abs(row[c].item() - value) < TOL for c in by_text[text]), (j, text, value)


# ---- OpenAI completions ---------------------------------------------------------------------------

def test_echo_scores_prompts_up_to_the_whole_context_sent_together(scoring_server, name, tok, hf, by_text) -> None:
    """Score only (`echo`, `logprobs: 5`, `max_tokens: 0`): a prompt that fills the model's context
    (token ids), one of one token, and strings of other lengths with multi-byte characters, all at
    once through the SDK's async client."""
    full = tok.encode(TEXT)[:CONTEXT]
    assert len(full) == CONTEXT
    prompts: list[str | list[int]] = [full, "Hello", TEXT[:40], TEXT[100:330], tok.decode(full[:97]), full[:64]]

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=scoring_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*[client.completions.create(
                model=name, prompt=p, echo=True, logprobs=5, max_tokens=0) for p in prompts])
        finally:
            await client.close()

    for prompt, c in zip(prompts, asyncio.run(run()), strict=True):
        ids = prompt if isinstance(prompt, list) else tok.encode(prompt)
        choice = c.choices[0]
        assert choice.text == tok.decode(ids) and choice.finish_reason == "length"
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(ids), 0)
        check_completion_logprobs(choice.logprobs, ids, ref_logprobs(hf, ids), 5, tok, by_text)
    assert len(tok.encode("Hello")) == 1  # that prompt has only the unscored first token


def test_echo_with_generation_streamed_and_not(oai, name, tok, hf, by_text) -> None:
    """`echo` + `logprobs: 3` + 6 greedy tokens: the prompt's entries, then the generated tokens',
    offsets running on through the completion. Streamed, the same entries arrive in the chunks
    whose text completes each token, also while a stop string holds text back."""
    prompt = "Zoë said the café"
    ids = tok.encode(prompt)
    gen = hf_greedy(hf, ids, 6)
    kw = dict(model=name, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=3)
    c = oai.completions.create(**kw)
    assert c.choices[0].text == prompt + tok.decode(gen)
    check_completion_logprobs(c.choices[0].logprobs, ids + gen, ref_logprobs(hf, ids + gen), 3, tok, by_text)
    # without echo: only the generated tokens, offsets from 0 (vLLM)
    plain = oai.completions.create(**{**kw, "echo": False}).choices[0].logprobs
    whole = c.choices[0].logprobs
    assert plain.tokens == whole.tokens[len(ids):] and plain.text_offset == offsets(tok, gen)
    assert all(abs(a - b) < 1e-5 for a, b in zip(plain.token_logprobs, whole.token_logprobs[len(ids):], strict=True))

    text = tok.decode(gen)
    stop = next(text[k:k + 3] for k in range(3, len(text) - 3) if text[k:k + 3].strip() == text[k:k + 3])
    for extra in ({}, {"stop": [stop]}):
        whole = oai.completions.create(**kw, **extra).choices[0]
        chunks = list(oai.completions.create(**kw, **extra, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == whole.text
        got = {f: [x for ch in chunks for x in getattr(ch.choices[0].logprobs, f)] for f in
               ("tokens", "text_offset", "token_logprobs", "top_logprobs")}
        assert got["tokens"] == whole.logprobs.tokens and got["text_offset"] == whole.logprobs.text_offset
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        assert max(abs(a - b) for a, b in zip(got["token_logprobs"][1:], whole.logprobs.token_logprobs[1:],
                                              strict=True)) < 1e-5
        assert [set(t) for t in got["top_logprobs"][1:]] == [set(t) for t in whole.logprobs.top_logprobs[1:]]
        # the prompt and its entries lead the first chunk; a token's entry comes with (or after) its text
        assert chunks[0].choices[0].text.startswith(prompt) and chunks[0].choices[0].logprobs.tokens[:len(ids)] == [
            tok.id_to_token_text(i) for i in ids]
        sent = ""
        for ch in chunks[:-1]:
            sent += ch.choices[0].text
            for t, o in zip(ch.choices[0].logprobs.tokens, ch.choices[0].logprobs.text_offset, strict=True):
                assert o + len(t) <= len(sent), (t, o, sent)
        if extra:
            assert whole.text == prompt + text[:text.index(stop)] and whole.finish_reason == "stop"
            assert len(whole.logprobs.tokens) > len(tok.encode(whole.text))  # the stop's tokens keep their entries


def generated_total(server: Server) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    return float(next(x.split()[-1] for x in metrics.splitlines() if x.startswith("gpt2_generated_tokens_total")))


def test_score_only_streams_one_chunk_and_n_copies(scoring_server, oai, name, tok, hf, by_text) -> None:
    prompt = "The owner bakes bread"
    ids = tok.encode(prompt)
    before = generated_total(scoring_server)
    chunks = list(oai.completions.create(model=name, prompt=prompt, echo=True, logprobs=2, max_tokens=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert len(chunks) == 2 and chunks[1].choices == [] and chunks[1].usage.completion_tokens == 0
    choice = chunks[0].choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    check_completion_logprobs(choice.logprobs, ids, ref_logprobs(hf, ids), 2, tok, by_text)
    two = oai.completions.create(model=name, prompt=[prompt, "A"], echo=True, logprobs=0, max_tokens=0, n=2)
    assert [c.text for c in two.choices] == [prompt, prompt, "A", "A"]
    assert two.choices[0].logprobs == two.choices[1].logprobs
    assert all(len(t) == 1 for t in two.choices[0].logprobs.top_logprobs[1:])  # logprobs 0: the token alone
    bare = oai.completions.create(model=name, prompt=prompt, echo=True, max_tokens=0)  # echo alone: no logprobs
    assert bare.choices[0].text == prompt and bare.choices[0].logprobs is None
    assert generated_total(scoring_server) == before  # scoring generates no token


def test_sampled_tokens_logprobs_are_after_temperature(scoring_server, tok, hf) -> None:
    """A sampled token's log-probability and its alternatives are those of the distribution it was
    drawn from: log_softmax(logits / temperature) (TGI's `top_n_tokens`, ids given)."""
    prompt = "The river is slow and"
    ids = tok.encode(prompt)
    r = httpx.post(scoring_server.url + "/generate", timeout=60, json={"inputs": prompt, "parameters": {
        "max_new_tokens": 6, "do_sample": True, "temperature": 0.7, "seed": 3, "details": True, "top_n_tokens": 4}})
    details = r.json()["details"]
    gen = [t["id"] for t in details["tokens"]]
    ref = ref_logprobs(hf, ids + gen, 0.7)
    for j, (t, top) in enumerate(zip(details["tokens"], details["top_tokens"], strict=True)):
        row = ref[len(ids) - 1 + j]
        assert abs(t["logprob"] - row[t["id"]].item()) < TOL
        assert [abs(a["logprob"] - row[a["id"]].item()) < TOL for a in top] == [True] * 4
        assert max(abs(a["logprob"] - v.item()) for a, v in zip(top, row.topk(4).values, strict=True)) < TOL
    # a greedy row with a penalty: the chosen token is the best of the penalized distribution, and so
    # are its alternatives (the host chose from the logits; the runner's top-N are unpenalized)
    r = httpx.post(scoring_server.url + "/generate", timeout=60, json={"inputs": prompt * 3, "parameters": {
        "max_new_tokens": 8, "repetition_penalty": 3.0, "details": True, "top_n_tokens": 2}}).json()["details"]
    assert [t["id"] for t in r["tokens"]] == [top[0]["id"] for top in r["top_tokens"]]
    assert [t["logprob"] for t in r["tokens"]] == [top[0]["logprob"] for top in r["top_tokens"]]


# ---- chat -----------------------------------------------------------------------------------------

def test_chat_logprobs_streamed_and_not(oai, name, tok, hf, tiny_lm_dir) -> None:
    messages = [{"role": "user", "content": "Where does the café owner walk on Sundays?"}]
    kw = dict(model=name, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    c = oai.chat.completions.create(**kw)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_lm_dir)
    ids = tok.encode(hf_tok.apply_chat_template(messages, chat_template=DEMO_TEMPLATE.read_text(), tokenize=False,
                                                add_generation_prompt=True))
    gen = hf_greedy(hf, ids, 5)
    ref = ref_logprobs(hf, ids + gen)
    content = c.choices[0].logprobs.content
    assert [x.token for x in content] == [tok.id_to_token_text(i) for i in gen]
    assert c.choices[0].message.content == tok.decode(gen)
    for j, (x, i) in enumerate(zip(content, gen, strict=True)):
        row = ref[len(ids) - 1 + j]
        assert bytes(x.bytes) == tok.token_bytes(i) and abs(x.logprob - row[i].item()) < TOL
        assert len(x.top_logprobs) == 3 and [a.logprob for a in x.top_logprobs] == sorted(
            (a.logprob for a in x.top_logprobs), reverse=True)
        assert max(abs(a.logprob - v.item()) for a, v in zip(x.top_logprobs, row.topk(3).values, strict=True)) < TOL
        assert all(bytes(a.bytes) == a.token.encode() for a in x.top_logprobs if "\ufffd" not in a.token)
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    streamed = [x for ch in chunks[1:] for x in ch.choices[0].logprobs.content]
    assert [x.token for x in streamed] == [x.token for x in content]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, content, strict=True)) < 1e-5
    plain = oai.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == c.choices[0].message.content


# ---- TGI ------------------------------------------------------------------------------------------

def test_tgi_decoder_input_details_and_top_n_tokens(scoring_server, tok, hf) -> None:
    client = text_generation.Client(scoring_server.url, timeout=60)
    prompt = "Tourists photograph the sign"
    ids = tok.encode(prompt)
    r = client.generate(prompt, max_new_tokens=5, decoder_input_details=True, top_n_tokens=3)
    gen = [t.id for t in r.details.tokens]
    assert gen == hf_greedy(hf, ids, 5)
    ref = ref_logprobs(hf, ids + gen)
    prefill = r.details.prefill
    assert [(p.id, p.text) for p in prefill] == [(i, tok.id_to_token_text(i)) for i in ids]
    assert prefill[0].logprob is None  # nothing before it, as TGI
    for j, p in enumerate(prefill[1:], 1):
        assert abs(p.logprob - ref[j - 1][p.id].item()) < TOL
    assert len(r.details.top_tokens) == 5
    for j, (t, top) in enumerate(zip(r.details.tokens, r.details.top_tokens, strict=True)):
        row = ref[len(ids) - 1 + j]
        assert abs(t.logprob - row[t.id].item()) < TOL and top[0].id == t.id  # greedy: the best one
        assert all(abs(a.logprob - row[a.id].item()) < TOL and a.special is False for a in top)
        assert max(abs(a.logprob - v.item()) for a, v in zip(top, row.topk(3).values, strict=True)) < TOL
    events = list(client.generate_stream(prompt, max_new_tokens=5, top_n_tokens=3))
    assert [[a.id for a in e.top_tokens] for e in events] == [[a.id for a in top] for top in r.details.top_tokens]
    # best_of: every sequence has the prompt's scores and its own top tokens
    b = client.generate(prompt, max_new_tokens=4, best_of=2, do_sample=True, decoder_input_details=True,
                        top_n_tokens=2)
    other = b.details.best_of_sequences[0]
    assert [p.logprob for p in other.prefill] == [p.logprob for p in b.details.prefill]
    assert b.details.prefill[0].logprob is None and all(math.isfinite(p.logprob) for p in b.details.prefill[1:])
    assert len(other.top_tokens) == other.generated_tokens and all(len(t) == 2 for t in other.top_tokens)
    # without them, TGI's fields stay out (and the prompt is not scored)
    raw = httpx.post(scoring_server.url + "/generate", json={"inputs": prompt, "parameters": {
        "max_new_tokens": 2, "details": True}}).json()["details"]
    assert raw["prefill"] == [] and "top_tokens" not in raw
    line = httpx.post(scoring_server.url + "/generate_stream", json={"inputs": prompt, "parameters": {
        "max_new_tokens": 1}}).text
    assert '"top_tokens"' not in line


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "status", "field", "message"), [
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs",
     "logprobs: Input should be less than or equal to 20"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, 400, "logprobs",
     "logprobs: Input should be greater than or equal to 0"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens",
     "max_tokens: Value error, 0 is only allowed with echo: true"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1, "echo": True}, 400, "max_tokens",
     "max_tokens: Input should be greater than or equal to 0"),
    ("/v1/completions", {"prompt": "a", "echo": "yes"}, 400, "echo", "echo: Input should be a valid boolean"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs", "top_logprobs: Input should be less than or equal to 20"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400,
     "top_logprobs", "top_logprobs: Value error, needs logprobs: true"),
    ("/generate", {"inputs": "a", "parameters": {"top_n_tokens": 21}}, 422, None,
     "parameters.top_n_tokens: `top_n_tokens` must be >= 0 and <= 20. Given: 21"),
    ("/generate", {"inputs": "a", "parameters": {"top_n_tokens": -1}}, 422, None,
     "parameters.top_n_tokens: Input should be greater than or equal to 0"),
    ("/generate_stream", {"inputs": "a", "parameters": {"decoder_input_details": True}}, 422, None,
     "parameters.decoder_input_details: true is not supported when streaming tokens"),
])
def test_bad_logprob_fields_are_4xx_naming_them(scoring_server, path, body, status, field, message) -> None:
    r = httpx.post(scoring_server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    if path.startswith("/v1/"):
        err = r.json()["error"]
        assert err["param"] == field and err["message"].startswith(message) and err["type"] == "invalid_request_error"
    else:
        assert r.json()["error"].startswith(message) and r.json()["error_type"] == "validation"
    assert httpx.get(scoring_server.url + "/health").status_code == 200
