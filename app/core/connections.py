"""Connection limits below the app: what uvicorn's httptools protocol does not bound by itself.

uvicorn's `HttpToolsProtocol` buffers a request head of any size (httptools grows the header by
concatenation, so a 120 MB header took quadratic time and stalled every other client) and has no
timeout before a request is whole. `GuardedHttpToolsProtocol` adds, per connection:

- `MAX_HEADER_BYTES`: the request line and headers may take at most this many bytes. The parser is
  fed only up to the limit; a head that is not complete by then is answered 431 and the connection
  closed, without reading the rest. (Pipelined requests share a read buffer: a head that starts in
  the same read as the end of the previous request can overshoot by at most one limit.)
- `HEADER_TIMEOUT_SECONDS`: the whole head must arrive within this time, counted from the
  connection's start or from the first byte of a later request on it (a total, not a per-read
  timer, so a byte every few seconds does not keep it open). Then 408 and close, or a plain close
  for a connection that sent nothing (as for an idle keep-alive connection).
- `MAX_CONNECTIONS`: a connection beyond it gets 503 at once and is closed, so idle sockets cannot
  use up the file descriptors (the limit is clamped below RLIMIT_NOFILE, see `connection_limit`).

The body is the app's side (`app.main`): BODY_TIMEOUT_SECONDS (the pause between reads),
BODY_TOTAL_TIMEOUT_SECONDS (the whole body, a total like the head's), MAX_PENDING_BODY_BYTES and
bodies cut short by the client. `python -m app` passes the class to `uvicorn.Config(http=...)`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.core.errors import error_response
from app.core.metrics import Metrics

logger = logging.getLogger(__name__)

# File descriptors the server needs besides client sockets: the event loop, its self-pipe and
# signals, the export child's pipes, log files, ONNX Runtime. An idle server held 19 here.
FD_RESERVE = 128


@dataclass
class ConnectionLimits:
    max_header_bytes: int
    header_timeout: float
    max_connections: int
    metrics: Metrics | None = None


def connection_limit(wanted: int) -> int:
    """`wanted` (MAX_CONNECTIONS), lowered to fit the open-file limit. The soft RLIMIT_NOFILE is
    first raised to the hard one (the process's own business, as nginx's worker_rlimit_nofile)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            logger.debug("could not raise RLIMIT_NOFILE to %s: %s", target, e)
    fit = max(1, soft - FD_RESERVE)
    if fit < wanted:
        logger.warning("MAX_CONNECTIONS=%d does not fit the open-file limit (ulimit -n %d): serving at most %d "
                       "connections; raise the limit (docs/DEPLOY.md)", wanted, soft, fit)
    return min(wanted, fit)


def _raw_error(url: bytes, status: int, error_type: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response with `connection: close`, in the envelope of `url`'s route
    (OpenAI's on /v1/*), for answers sent before the app has a request."""
    path = url.split(b"?", 1)[0].decode("latin-1")
    response = error_response(path, status, error_type, message)
    head = [STATUS_LINE[response.status_code]]
    for name, value in response.raw_headers:
        head += [name, b": ", value, b"\r\n"]
    return b"".join([*head, b"connection: close\r\n\r\n", response.body])


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded, timed request head and a connection limit.
    Build it with `protocol_class`, which binds the limits."""

    limits: ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # bytes fed to the parser for the head being read
        self._in_head = True  # the next bytes belong to a request head
        self._heads_done = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self.url = b""

    # ---- connection ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        lim = self.limits
        if lim.metrics is not None:
            lim.metrics.connections.inc()
        if len(self.connections) > lim.max_connections:
            self._refuse(503, "unavailable", "max_connections",
                         f"more than MAX_CONNECTIONS ({lim.max_connections}) connections are open; retry later")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self.limits.metrics is not None:
            self.limits.metrics.connections.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        if self._head_timer is None:  # the first byte of a later request on a kept-alive connection
            self._arm_head_timer()
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed only what the limit allows: either the head ends inside it, or it is too large.
        done = self._heads_done
        self._head_bytes += room
        if room > 0:
            super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self._heads_done == done:
            self._refuse(431, "validation", "header_too_large",
                         f"the request line and headers exceed MAX_HEADER_BYTES ({self.limits.max_header_bytes} "
                         f"bytes)")
            return
        self.data_received(data[room:])

    # ---- parser callbacks ----------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads_done += 1
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0

    # ---- the head timer ------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head waits for the response being written
            return
        if self._head_bytes == 0:  # nothing sent: close as an idle keep-alive connection
            self._count("idle_timeout")
            self.transport.close()
            return
        self._refuse(408, "validation", "header_timeout",
                     f"the request head was not complete within HEADER_TIMEOUT_SECONDS "
                     f"({self.limits.header_timeout:g} s)")

    # ---- answers without the app ---------------------------------------------------------------
    def _count(self, reason: str) -> None:
        if self.limits.metrics is not None:
            self.limits.metrics.connections_closed.labels(reason).inc()
        logger.debug("closing a connection from %s: %s", self.client, reason)

    def _refuse(self, status: int, error_type: str, reason: str, message: str) -> None:
        self._count(reason)
        self._cancel_head_timer()
        self.transport.write(_raw_error(self.url, status, error_type, message))
        self.transport.close()  # stops reading: nothing more of this connection is parsed


def protocol_class(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, bound to `limits`."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
