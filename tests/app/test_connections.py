"""Hostile connections against the real server (issue 20, items 1-3), over raw loopback sockets:
huge headers are cut with 431 as soon as they cross MAX_HEADER_BYTES, a head or body that stalls is
closed (408 where an answer can be sent), so is a body trickled too slowly to be whole within
BODY_TOTAL_TIMEOUT_SECONDS (issue 27), connections past MAX_CONNECTIONS and bodies past
MAX_PENDING_BODY_BYTES get 503, and a body shorter than its Content-Length runs nothing and is
counted as 499, apart from bad input. Everyone else keeps being served meanwhile."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.app.conftest import Server, base_env, metric, start_server, stop_server

HEADER_LIMIT = 16384
HEAD_TIMEOUT = BODY_TIMEOUT = 1.5
BODY_TOTAL = 3.0
MAX_CONNECTIONS = 24
PENDING_LIMIT = 200_000


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Iterator[Server]:
    env = base_env(tiny_lm_dir, tiny_classifier_dir, onnx_cache, MAX_HEADER_BYTES=str(HEADER_LIMIT),
                   HEADER_TIMEOUT_SECONDS=str(HEAD_TIMEOUT), BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
                   BODY_TOTAL_TIMEOUT_SECONDS=str(BODY_TOTAL), MAX_CONNECTIONS=str(MAX_CONNECTIONS),
                   MAX_PENDING_BODY_BYTES=str(PENDING_LIMIT))
    srv = start_server(tmp_path_factory.mktemp("guarded"), env)
    yield srv
    stop_server(srv)


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (s)."""
    t0, data = time.monotonic(), b""
    s.settimeout(timeout)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):  # reset, or still open at the timeout
        pass
    return data, time.monotonic() - t0


def status_of(raw: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    return int(m.group(1)) if m else None


def json_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


class HealthProbe:
    """/health, over and over on fresh connections, in a thread: the slowest answer while it ran."""

    def __init__(self, server: Server) -> None:
        self.server, self.worst, self.count, self._stop = server, 0.0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            r = httpx.get(self.server.url + "/health", timeout=30)
            assert r.status_code == 200
            self.worst, self.count = max(self.worst, time.monotonic() - t0), self.count + 1
            time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(35)


# ---- 1. header size ---------------------------------------------------------------------------

def test_a_header_over_the_limit_gets_431_as_soon_as_it_crosses_it(guarded) -> None:
    s = connect(guarded)
    sent, answer = 0, b""
    with HealthProbe(guarded) as probe:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 4096
        s.setblocking(False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sent < 10 * 2**20:  # up to a 10 MB header, 4 KB at a time
            try:
                answer += s.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
            except ConnectionResetError:
                break
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                sent += s.send(chunk)
            time.sleep(0.005)
        s.setblocking(True)
        rest, _ = read_until_closed(s, 5)
    raw = answer + rest
    assert status_of(raw) == 431, raw[:300]
    assert b"connection: close" in raw.lower()
    body = json_body(raw)
    assert body["error_type"] == "validation" and "MAX_HEADER_BYTES" in body["error"], body
    # cut right after the limit, not after reading the rest of a 10 MB header
    assert sent < HEADER_LIMIT + 64 * 1024, sent
    assert probe.count > 0 and probe.worst < 1.0, (probe.count, probe.worst)


def test_a_header_under_the_limit_is_served(guarded) -> None:
    r = httpx.get(guarded.url + "/health", headers={"X-Padding": "p" * (HEADER_LIMIT - 1024)}, timeout=10)
    assert r.status_code == 200


def test_431_in_one_write_on_v1_is_openai_shaped(guarded) -> None:
    s = connect(guarded)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (HEADER_LIMIT * 2) + b"\r\n\r\n")
    raw, _ = read_until_closed(s, 5)
    assert status_of(raw) == 431, raw[:300]
    err = json_body(raw)["error"]
    assert err["code"] == "request_header_fields_too_large" and "MAX_HEADER_BYTES" in err["message"], err


# ---- 2. timeouts, connection and buffered-body limits ----------------------------------------

def test_an_idle_connection_is_closed_after_the_header_timeout(guarded) -> None:
    s = connect(guarded)
    raw, waited = read_until_closed(s, HEAD_TIMEOUT + 5)
    assert raw == b"" and HEAD_TIMEOUT * 0.8 <= waited <= HEAD_TIMEOUT + 2, (raw, waited)


def test_a_half_sent_head_gets_408_at_the_header_timeout(guarded) -> None:
    s = connect(guarded)
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
    raw, waited = read_until_closed(s, HEAD_TIMEOUT + 5)
    assert status_of(raw) == 408, raw[:300]
    assert json_body(raw)["error_type"] == "validation"
    assert waited <= HEAD_TIMEOUT + 2


def test_a_slow_drip_head_is_cut_at_the_header_timeout_not_at_each_byte(guarded) -> None:
    s = connect(guarded)
    t0 = time.monotonic()
    s.sendall(b"GET /health HTTP/1.1\r\n")
    answer = b""
    for _ in range(40):  # one header byte every 0.25 s would keep a per-read timer alive forever
        try:
            s.sendall(b"X")
        except (BrokenPipeError, ConnectionResetError):
            break
        s.settimeout(0.25)
        try:
            got = s.recv(65536)
        except TimeoutError:
            continue
        answer += got
        if not got or b"\r\n\r\n" in answer:
            break
    assert status_of(answer) == 408, answer[:300]
    assert time.monotonic() - t0 <= HEAD_TIMEOUT + 2


def test_a_stalled_body_gets_408_and_runs_nothing(guarded) -> None:
    before = metric(guarded, "gpt2_generated_tokens_total")
    s = connect(guarded)
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
              b'{"inputs":')
    raw, waited = read_until_closed(s, BODY_TIMEOUT + 5)
    assert status_of(raw) == 408, raw[:300]
    assert b"connection: close" in raw.lower() and "BODY_TIMEOUT_SECONDS" in json_body(raw)["error"]
    assert waited <= BODY_TIMEOUT + 2
    assert metric(guarded, "gpt2_requests_total", route="/generate", status="408") >= 1
    assert metric(guarded, "gpt2_generated_tokens_total") == before


def trickle(s: socket.socket, piece: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send `piece` every `every` s (each well inside BODY_TIMEOUT_SECONDS) until the server answers
    or `limit` s pass: the answer and when it came (s after the first piece)."""
    t0, raw = time.monotonic(), b""
    s.settimeout(every)
    while not raw and time.monotonic() - t0 < limit:
        try:
            s.sendall(piece)
            raw = s.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    return raw, time.monotonic() - t0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_trickled_body_is_cut_at_the_total_deadline(guarded, framing) -> None:
    """One byte every 0.5 s never trips the pause limit (1.5 s); the total one cuts it (issue 27)."""
    before = metric(guarded, "gpt2_requests_total", route="/generate", status="408")
    tokens = metric(guarded, "gpt2_generated_tokens_total")
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: 1000\r\n\r\n" if framing == "content-length" else b"Transfer-Encoding: chunked\r\n\r\n"
    piece = b" " if framing == "content-length" else b"1\r\n \r\n"  # a chunk of one byte
    s = connect(guarded)
    s.sendall(head)
    first, waited = trickle(s, piece, 0.5, BODY_TOTAL + 6)
    rest, closing = read_until_closed(s, 5)
    raw = first + rest
    assert status_of(raw) == 408, (waited, raw[:300])
    assert BODY_TOTAL - 0.5 <= waited <= BODY_TOTAL + 2, waited
    assert closing < 4, "the connection is closed after the 408"
    body = json_body(raw)
    assert b"connection: close" in raw.lower()
    assert body["error_type"] == "validation" and "BODY_TOTAL_TIMEOUT_SECONDS" in body["error"], body
    assert metric(guarded, "gpt2_requests_total", route="/generate", status="408") == before + 1
    assert metric(guarded, "gpt2_generated_tokens_total") == tokens
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200


def test_a_big_body_sent_at_a_steady_pace_is_not_cut_by_the_total_deadline() -> None:
    """2 MB in 64 KB pieces over about a second, under a 2 s total: read whole (in-process)."""
    import asyncio

    from app.api.deps import ServiceState
    from app.core.config import Settings
    from app.main import read_body

    data = bytes(range(256)) * (2 * 2**20 // 256)
    pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    state = ServiceState(settings=Settings(max_body_bytes=3 * 2**20, max_pending_body_bytes=4 * 2**20,
                                           body_timeout_seconds=1, body_total_timeout_seconds=2))

    async def run() -> bytes:
        sent = iter(range(len(pieces)))

        async def receive() -> dict:
            i = next(sent)
            await asyncio.sleep(0.03)
            return {"type": "http.request", "body": pieces[i], "more_body": i < len(pieces) - 1}

        return await read_body(receive, state, str(len(data)))

    assert asyncio.run(run()) == data
    assert state.pending_body_bytes == 0


def test_connections_past_the_limit_get_503_at_once_and_the_rest_are_served(guarded) -> None:
    held = [connect(guarded) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        extra = connect(guarded)
        raw, waited = read_until_closed(extra, 5)
        assert status_of(raw) == 503, raw[:300]
        assert "MAX_CONNECTIONS" in json_body(raw)["error"] and waited < 1.0
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
    assert metric(guarded, "gpt2_connections_closed_total", reason="max_connections") >= 1


def test_bodies_past_the_buffered_byte_limit_get_503(guarded) -> None:
    """Four uploads that stall near their end: the one that takes the bytes held in unfinished
    bodies past MAX_PENDING_BODY_BYTES is refused (503, closed); the others time out (408)."""
    socks, head = [], (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 60000\r\n\r\n")
    for _ in range(4):
        s = connect(guarded)
        s.sendall(head + b" " * 55_000)
        socks.append(s)
        time.sleep(0.15)
    answers = [read_until_closed(s, BODY_TIMEOUT + 5)[0] for s in socks]
    codes = [status_of(a) for a in answers]
    assert codes.count(503) == 1 and codes.count(408) == 3, codes
    assert "MAX_PENDING_BODY_BYTES" in json_body(answers[codes.index(503)])["error"]
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200


# ---- 3. a body shorter than its Content-Length ------------------------------------------------

def test_a_truncated_body_runs_nothing_and_is_counted_as_499(guarded) -> None:
    body = b'{"inputs": "The weather today is", "parameters": {"max_new_tokens": 5}}'
    tokens = metric(guarded, "gpt2_generated_tokens_total")
    ok = metric(guarded, "gpt2_requests_total", route="/generate", status="200")
    bad = metric(guarded, "gpt2_requests_total", route="/generate", status="422")
    for _ in range(5):
        s = connect(guarded)
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + body)
        time.sleep(0.1)
        s.close()  # the client is gone, 937 bytes short
    time.sleep(0.5)
    assert metric(guarded, "gpt2_requests_total", route="/generate", status="499") >= 5
    assert metric(guarded, "gpt2_requests_total", route="/generate", status="200") == ok
    assert metric(guarded, "gpt2_requests_total", route="/generate", status="422") == bad
    assert metric(guarded, "gpt2_generated_tokens_total") == tokens
    assert guarded.log_text().count('"status": 499') >= 5  # in the access log too
