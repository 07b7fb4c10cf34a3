"""`POST /v1/embeddings` on the real server (`python -m app` on a loopback port, real ONNX Runtime):
float and base64, texts and token ids, padding invariance, the 4xx cases in OpenAI's envelope, the
`openai` SDK's `embeddings.create` and LangChain's `OpenAIEmbeddings`, and the pooling settings
(`EMBEDDING_POOLING=mean`, `off`), all against transformers' `GPT2Model` hidden states."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from model.tokenizer import GPT2Tokenizer
from tests.app.conftest import Server, base_env, start_server, stop_server

TOL = 1e-5
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Padding must not change a vector, "
         "whatever the other inputs of the batch are.", "Hi there"]


def post(server: Server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)


def vectors(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data))) and {d["object"] for d in data} == {"embedding"}
    return np.array([d["embedding"] if isinstance(d["embedding"], list) else
                     np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data], np.float32)


@pytest.fixture(scope="module")
def reference(tiny_lm_dir: Path, tok: GPT2Tokenizer):  # noqa: ANN201
    """transformers' vectors: each input alone, the last token's or the mean hidden state, F.normalize."""
    import transformers

    trunk = transformers.GPT2Model.from_pretrained(tiny_lm_dir).eval()

    def ref(inputs: list[str | list[int]], pooling: str = "last") -> np.ndarray:
        out = []
        with torch.no_grad():
            for item in inputs:
                ids = tok.encode(item) if isinstance(item, str) else item
                h = trunk(torch.tensor([ids])).last_hidden_state[0]
                out.append(h[-1] if pooling == "last" else h.mean(0))
        return torch.nn.functional.normalize(torch.stack(out), dim=-1).numpy()

    return ref


@pytest.fixture(scope="module")
def model_name(server: Server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def test_a_text_gives_transformers_vector(server: Server, reference, tok: GPT2Tokenizer,  # noqa: ANN001
                                          model_name: str) -> None:
    resp = post(server, {"input": TEXTS[1], "model": "another-model", "user": "u-1"})
    body = resp.json()
    # another model name is served by the one model and the answer names it, as on the other /v1 routes
    assert body["object"] == "list" and body["id"].startswith("embd-") and body["model"] == model_name
    n = len(tok.encode(TEXTS[1]))
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    got = vectors(resp)
    assert got.shape == (1, 32)
    np.testing.assert_allclose(got, reference([TEXTS[1]]), atol=TOL, rtol=0)


def test_base64_is_the_float_vector_as_little_endian_float32(server: Server) -> None:
    floats = post(server, {"input": TEXTS, "encoding_format": "float"})
    b64 = post(server, {"input": TEXTS, "encoding_format": "base64"})
    assert all(isinstance(d["embedding"], str) for d in b64.json()["data"])
    np.testing.assert_array_equal(vectors(b64), vectors(floats))  # float32 -> JSON -> float32 is exact


def test_a_batch_equals_each_input_alone_and_transformers(server: Server, reference) -> None:  # noqa: ANN001
    batch = vectors(post(server, {"input": TEXTS}))  # 1 to 17 tokens in one padded call
    alone = np.concatenate([vectors(post(server, {"input": t})) for t in TEXTS])
    np.testing.assert_allclose(batch, alone, atol=1e-6, rtol=0)
    np.testing.assert_allclose(batch, reference(TEXTS), atol=TOL, rtol=0)


def test_token_ids_and_lists_of_them_equal_the_texts(server: Server, tok: GPT2Tokenizer) -> None:
    ids = [tok.encode(t) for t in TEXTS]
    texts = vectors(post(server, {"input": TEXTS}))
    np.testing.assert_array_equal(vectors(post(server, {"input": ids})), texts)
    np.testing.assert_allclose(vectors(post(server, {"input": ids[1]})), texts[1:2], atol=1e-6, rtol=0)  # alone


def test_truncate_prompt_tokens_keeps_the_last_tokens(server: Server) -> None:
    ids = list(range(1, 301))  # past the tiny model's 128-token context
    got = vectors(post(server, {"input": ids, "truncate_prompt_tokens": -1}))
    np.testing.assert_array_equal(got, vectors(post(server, {"input": ids[-128:]})))
    np.testing.assert_array_equal(vectors(post(server, {"input": ids, "truncate_prompt_tokens": 5})),
                                  vectors(post(server, {"input": ids[-5:]})))


def test_normalize_false_returns_the_raw_pooled_state(server: Server) -> None:
    raw = vectors(post(server, {"input": TEXTS[0], "normalize": False}))
    unit = vectors(post(server, {"input": TEXTS[0]}))
    assert abs(np.linalg.norm(raw) - 1) > 1e-3
    np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-6)


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"input": []}, "input", "must not be empty"),
    ({"input": ""}, "input", "must not be empty"),
    ({"input": ["a", ""]}, "input", "item 1 is empty"),
    ({"input": [[1, 2], []]}, "input", "item 1 is empty"),
    ({"input": [1] * 129}, "input", "129 tokens exceed the model's context of 128 tokens"),
    ({"input": ["ok", "word " * 200]}, "input[1]", "201 tokens exceed the model's context of 128 tokens"),
    ({"input": "x" * 20000}, "input", "20000 characters cannot fit in the model's context (128 tokens)"),
    ({"input": [[50257]]}, "input", "token id out of the vocabulary"),
    ({"input": "a", "dimensions": 16}, "dimensions", "dimensions: Value error, is not supported"),
    ({"input": "a", "encoding_format": "bits"}, "encoding_format", "encoding_format"),
    ({"input": [1, "a"]}, "input", "input"),
    ({"input": ["a"] * 2049}, "input", "at most 2048 inputs"),
    ({}, "input", "field required"),
])
def test_bad_input_is_a_400_in_openais_envelope(server: Server, body: dict, param: str, message: str) -> None:
    resp = post(server, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert message in err["message"]


def test_info_says_the_endpoint_is_available_and_its_pooling(server: Server) -> None:
    emb = httpx.get(server.url + "/info", timeout=10).json()["embeddings"]
    assert emb["available"] and emb["endpoint"] == "/v1/embeddings"
    assert (emb["pooling"], emb["normalized"], emb["dimensions"]) == ("last", True, 32)
    assert emb["backend"] == "onnxruntime" and emb["onnx_path"].endswith("model.onnx")
    assert "/embed-fp32-" in emb["onnx_path"]


# ---- the official clients -----------------------------------------------------------------------

def test_openai_sdk_embeddings_create(server: Server, reference, model_name: str) -> None:  # noqa: ANN001
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    by_default = client.embeddings.create(model=model_name, input=TEXTS)  # the SDK asks for base64 and decodes it
    as_floats = client.embeddings.create(model=model_name, input=TEXTS[:2], encoding_format="float")
    assert by_default.model == model_name and by_default.usage.prompt_tokens > 0
    np.testing.assert_allclose([d.embedding for d in by_default.data], reference(TEXTS), atol=TOL, rtol=0)
    # another batch (2 rows, not 3) pads differently: equal to float32 rounding, not bit for bit
    np.testing.assert_allclose([d.embedding for d in as_floats.data], [d.embedding for d in by_default.data[:2]],
                               atol=1e-6, rtol=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=model_name, input="a", dimensions=8)
    assert e.value.body["param"] == "dimensions"


def test_langchain_openai_embeddings(server: Server, reference, model_name: str) -> None:  # noqa: ANN001
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: LangChain sends the texts themselves; with True it would first
    # tokenize them with tiktoken (a download) and send OpenAI's token ids, which are not GPT-2's here.
    emb = OpenAIEmbeddings(model=model_name, base_url=server.url + "/v1", api_key="unused",
                           check_embedding_ctx_length=False, max_retries=0)
    docs = emb.embed_documents(TEXTS)
    query = emb.embed_query(TEXTS[2])
    np.testing.assert_allclose(docs, reference(TEXTS), atol=TOL, rtol=0)
    np.testing.assert_allclose(query, reference([TEXTS[2]])[0], atol=TOL, rtol=0)


# ---- the pooling settings ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mean_server(tmp_path_factory, tiny_lm_dir, onnx_cache) -> Iterator[Server]:  # noqa: ANN001
    srv = start_server(tmp_path_factory.mktemp("mean"), base_env(tiny_lm_dir, tiny_lm_dir, onnx_cache,
                                                                 CLASSIFIER_PATH="", EMBEDDING_POOLING="mean"))
    yield srv
    stop_server(srv)


def test_mean_pooling(mean_server: Server, reference) -> None:  # noqa: ANN001
    assert httpx.get(mean_server.url + "/info", timeout=10).json()["embeddings"]["pooling"] == "mean"
    batch = vectors(post(mean_server, {"input": TEXTS}))
    np.testing.assert_allclose(batch, reference(TEXTS, "mean"), atol=TOL, rtol=0)
    np.testing.assert_allclose(batch, np.concatenate([vectors(post(mean_server, {"input": t})) for t in TEXTS]),
                               atol=1e-6, rtol=0)


def test_pooling_off_loads_no_embedding_graph(tmp_path: Path, tiny_lm_dir: Path, onnx_cache: Path) -> None:
    srv = start_server(tmp_path, base_env(tiny_lm_dir, tiny_lm_dir, onnx_cache, CLASSIFIER_PATH="",
                                          EMBEDDING_POOLING="off"))
    try:
        assert httpx.get(srv.url + "/info", timeout=10).json()["embeddings"] == {
            "available": False, "endpoint": "/v1/embeddings"}
        resp = post(srv, {"input": "a"})
        assert resp.status_code == 400 and "EMBEDDING_POOLING is off" in resp.json()["error"]["message"]
        assert "embed-fp32" not in srv.log_text()  # no embedding export was looked up or made
    finally:
        stop_server(srv)
