"""Issue 28 (part): a chat stream's first chunk (the `role`) is sent once the engine has processed
the prompt, not when the request arrives, so a client that times the first chunk (llama-benchy,
guidellm) times the real first token. Real server, one batch row kept busy by another request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.app.conftest import REPO, Server, base_env, start_server, stop_server


@pytest.fixture(scope="module")
def one_row_server(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    env = base_env(tiny_lm_dir, tiny_classifier_dir, onnx_cache, MAX_BATCH_SIZE="1",
                   CHAT_TEMPLATE=str(REPO / "model" / "demo" / "chat_template.jinja"))
    srv = start_server(tmp_path_factory.mktemp("one_row"), env)
    yield srv
    stop_server(srv)


def test_the_role_chunk_waits_for_the_prompt_to_be_processed(one_row_server) -> None:
    # host-side sampling with penalties and 20 alternatives a token: slower steps, so the request
    # keeps the row for a few tenths of a second
    long = {"prompt": "Busy", "max_tokens": 115, "ignore_eos": True, "temperature": 1.0, "top_p": 0.9,
            "presence_penalty": 0.5, "frequency_penalty": 0.5, "logprobs": 20, "seed": 1}
    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "stream": True}
    with httpx.Client(base_url=one_row_server.url, timeout=60) as c, ThreadPoolExecutor(1) as pool:
        for _ in range(3):
            t0 = time.monotonic()
            busy = pool.submit(lambda: (c.post("/v1/completions", json=long), time.monotonic()))
            time.sleep(0.05)  # the long request holds the only row; the chat request queues behind it
            chunks = []
            with c.stream("POST", "/v1/chat/completions", json=chat) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append((time.monotonic(), line))
            answer, busy_done = busy.result()
            assert answer.status_code == 200 and r.status_code == 200
            assert '"role": "assistant"' in chunks[0][1] and len(chunks) >= 2
            # the role came after the busy request left the batch (before: at once, while queued)
            assert busy_done - t0 > 0.2, busy_done - t0  # it was still running when the chat request came
            assert chunks[0][0] >= busy_done - 0.05, (chunks[0][0] - busy_done)
