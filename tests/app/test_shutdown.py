"""SIGTERM while requests outlive the grace period (issue 27, item 10): each is answered, none is cut off."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from tests.app.conftest import metric, start_server, stop_server
from tests.conftest import make_hf_checkpoint

GRACE = 1.0
LONG_GEN = {"inputs": "Hello", "parameters": {"max_new_tokens": 1800}}
LONG_V1 = {"prompt": "Hello", "max_tokens": 1800, "ignore_eos": True}


async def _plain(client: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
    return await client.post(path, json=body)


async def _stream(client: httpx.AsyncClient, path: str, body: dict, started: asyncio.Event) -> tuple[int, list[str]]:
    """The status and every `data:` payload of a stream; raises if the response is cut off."""
    async with client.stream("POST", path, json=body) as resp:
        started.set()
        return resp.status_code, [line[5:].strip() async for line in resp.aiter_lines() if line.startswith("data:")]


@pytest.mark.slow
def test_sigterm_answers_what_outlives_the_grace_with_503_and_error_events(tmp_path, onnx_cache) -> None:
    # A model slow enough that 1800 tokens take seconds; 4 rows, so of 7 requests 3 wait in the queue.
    ckpt = make_hf_checkpoint(tmp_path / "slow", "generate", seed=5, n_positions=2048, n_embd=128, n_layer=4)
    srv = start_server(tmp_path, {"MODEL_PATH": str(ckpt), "CLASSIFIER_PATH": "", "ONNX_CACHE_DIR": str(onnx_cache),
                                  "MAX_TOTAL_TOKENS": "2048", "MAX_BATCH_SIZE": "4", "MAX_CONCURRENT_REQUESTS": "16",
                                  "SHUTDOWN_GRACE_SECONDS": str(GRACE), "NUM_THREADS": "1"})

    async def scenario() -> tuple[list, list, float]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            plain = [asyncio.create_task(_plain(client, "/generate", LONG_GEN)),
                     asyncio.create_task(_plain(client, "/v1/completions", LONG_V1))]
            await asyncio.sleep(0.3)  # the two non-streamed requests take their rows first
            streams = []
            v1_stream = LONG_V1 | {"stream": True}
            for path, body in [("/generate_stream", LONG_GEN)] * 3 + [("/v1/completions", v1_stream)] * 2:
                started = asyncio.Event()
                streams.append(asyncio.create_task(_stream(client, path, body, started)))
                await asyncio.wait_for(started.wait(), 30)
            deadline = time.monotonic() + 30
            while metric(srv, "gpt2_requests_in_flight") < 7:
                assert time.monotonic() < deadline, srv.log_text()[-3000:]
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*plain, return_exceptions=True)
            streamed = await asyncio.gather(*streams, return_exceptions=True)
            return answers, streamed, t0

    try:
        answers, streamed, t0 = asyncio.run(scenario())
        assert srv.proc.wait(30) == 0
        elapsed = time.monotonic() - t0
        log = srv.log_text()[-3000:]
        gen, v1 = answers
        assert isinstance(gen, httpx.Response) and gen.status_code == 503, (gen, log)
        assert gen.json() == {"error": "the server is shutting down", "error_type": "unavailable"}
        assert isinstance(v1, httpx.Response) and v1.status_code == 503, (v1, log)
        assert v1.json() == {"error": {"message": "the server is shutting down", "type": "server_error",
                                       "param": None, "code": "service_unavailable"}}
        for i, got in enumerate(streamed):
            assert not isinstance(got, BaseException), (i, repr(got), log)  # a whole HTTP response
            status, data = got
            assert status == 200
            if i < 3:  # /generate_stream: TGI's error event last
                assert json.loads(data[-1]) == {"error": "the server is shutting down", "error_type": "unavailable"}
            else:  # /v1/completions: OpenAI's error event, then [DONE]
                assert data[-1] == "[DONE]"
                assert json.loads(data[-2])["error"]["code"] == "service_unavailable"
        assert elapsed < GRACE + 4, elapsed  # not after uvicorn's own 5 s graceful-shutdown timeout
    finally:
        stop_server(srv)
