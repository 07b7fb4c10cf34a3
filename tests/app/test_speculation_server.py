"""SPECULATION=ngram and SPECULATION=draft over HTTP: the same greedy completion as a server without it, streamed and
not, and the proposals counted in /metrics and /info."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import Server, base_env, start_server, stop_server

PROMPT = "one two three four one two three four one two three"


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_lm_dir: Path, onnx_cache: Path) -> Iterator[tuple[Server, Server]]:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("spec")
    env = base_env(tiny_lm_dir, tiny_lm_dir, onnx_cache, CLASSIFIER_PATH="", EMBEDDING_POOLING="off")
    on = start_server(tmp, env | {"SPECULATION": "ngram", "SPECULATION_MAX_TOKENS": "3",
                                  "SPECULATION_MAX_BATCH": "4"})
    off = start_server(tmp, env)
    # the model as its own draft: a checkpoint the loader exports and serves a second time
    draft = start_server(tmp, env | {"SPECULATION": "draft", "DRAFT_MODEL_PATH": str(tiny_lm_dir)})
    yield on, off, draft
    for s in (on, off, draft):
        stop_server(s)


def complete(srv: Server, stream: bool) -> tuple[str, list[float]]:
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "logprobs": 2, "stream": stream}
    if not stream:
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"]
    text, lps = "", []
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])["choices"][0]
                text += c["text"]
                lps += (c.get("logprobs") or {}).get("token_logprobs") or []
    return text, lps


def counter(srv: Server, name: str) -> float:
    m = re.search(rf"^gpt2_spec_decode_{name}_total (\S+)$", httpx.get(srv.url + "/metrics", timeout=10).text, re.M)
    assert m, name
    return float(m.group(1))


@pytest.mark.parametrize(("mode", "stream"), [("ngram", False), ("ngram", True), ("draft", False), ("draft", True)])
def test_same_completion_as_without_and_counted(servers, mode: str, stream: bool) -> None:  # noqa: ANN001
    on, off = servers[2] if mode == "draft" else servers[0], servers[1]
    before = counter(on, "num_accepted_tokens")
    (text, lps), (want_text, want_lps) = complete(on, stream), complete(off, stream)
    assert text == want_text and len(lps) == len(want_lps) == 40
    assert max(abs(a - b) for a, b in zip(lps, want_lps, strict=True)) < 1e-4
    assert counter(on, "num_accepted_tokens") > before and counter(on, "num_draft_tokens") > 0


def test_info_shows_the_settings(servers, tiny_lm_dir: Path) -> None:  # noqa: ANN001
    on, off, draft = servers
    spec = httpx.get(on.url + "/info", timeout=10).json()["generation"]["speculation"]
    assert spec["enabled"] and (spec["mode"], spec["max_tokens"], spec["ngram"]) == ("ngram", 3, 3)
    assert spec["max_batch"] == 4
    assert httpx.get(on.url + "/info", timeout=10).json()["settings"]["speculation_max_batch"] == 4
    spec = httpx.get(draft.url + "/info", timeout=10).json()["generation"]["speculation"]
    assert spec["enabled"] and spec["mode"] == "draft" and spec["draft_model"] == str(tiny_lm_dir)
    assert httpx.get(off.url + "/info", timeout=10).json()["settings"]["speculation"] == "off"
    assert "gpt2_spec_decode" not in httpx.get(off.url + "/metrics", timeout=10).text
