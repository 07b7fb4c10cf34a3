"""`python -m app`: serve with uvicorn on HOST:PORT, with a graceful drain on SIGTERM.

On SIGTERM (or the first Ctrl-C) the server stops admitting (new requests and /health get 503),
waits up to SHUTDOWN_GRACE_SECONDS for in-flight requests to finish, then shuts down and exits 0.
Requests still running (or queued in the engine) when the grace ends are failed with
`ShuttingDownError` (`Engine.shutdown`): a non-streamed one answers 503 in its route's envelope, a
stream sends its final error event (then `[DONE]` on /v1); the server exits once they are answered
(at most ANSWER_SECONDS later), so none is cut off by uvicorn's cancellation.
A second signal shuts down at once. If loading the models fails, it exits 1.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from types import FrameType

import uvicorn

from app.core.config import Settings, get_settings
from app.core.connections import ConnectionLimits, connection_limit, protocol_class
from app.main import create_app

logger = logging.getLogger("app")

# After the grace period: how long the handlers of the requests it failed have to send their 503 or
# final error event before uvicorn is told to exit.
ANSWER_SECONDS = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app) -> None:  # noqa: ANN001
        super().__init__(config)
        self.service = app.state.service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.service.draining or not self.service.ready:
            # Second signal, or nothing to drain: stop now (uvicorn still closes connections cleanly).
            self.should_exit = True
            if self.service.draining and sig == signal.SIGINT:
                self.force_exit = True
            return
        self.service.draining = True
        grace = self.service.settings.shutdown_grace_seconds
        logger.info("signal %s: draining %d in-flight request(s), up to %.0f s", sig, self.service.in_flight, grace)
        threading.Thread(target=self._drain, args=(grace,), name="drain", daemon=True).start()

    def _drain(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self.service.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        engine = self.service.engine
        if engine is not None:  # refuse new engine work; fail what is left, queued requests included
            failed = engine.shutdown()
            if self.service.in_flight:
                logger.warning("grace period over with %d request(s) still in flight: %d engine request(s) "
                               "answered 503 (the server is shutting down)", self.service.in_flight, failed)
        deadline = time.monotonic() + ANSWER_SECONDS
        while self.service.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        self.should_exit = True


def server_config(app, settings: Settings, **overrides: object) -> uvicorn.Config:  # noqa: ANN001
    """uvicorn's configuration as `python -m app` serves: httptools with the connection limits of
    `app.core.connections` (header size and time, MAX_CONNECTIONS), uvloop where installed."""
    limits = ConnectionLimits(settings.max_header_bytes, settings.header_timeout_seconds,
                              connection_limit(settings.max_connections), app.state.service.metrics)
    if limits.max_connections <= settings.max_concurrent_requests:
        logger.warning("MAX_CONNECTIONS (%d after the open-file limit) leaves no room above MAX_CONCURRENT_REQUESTS "
                       "(%d)", limits.max_connections, settings.max_concurrent_requests)
    app.state.service.max_connections = limits.max_connections
    kw: dict = dict(host=settings.host, port=settings.port, log_level=settings.log_level.lower(), access_log=False,
                    timeout_graceful_shutdown=5, http=protocol_class(limits))
    return uvicorn.Config(app, **(kw | overrides))


def main() -> int:
    settings = get_settings()
    app = create_app(settings)
    config = server_config(app, settings)
    server = DrainingServer(config, app)
    app.state.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.service.load_error:
        logger.error("exiting: %s", app.state.service.load_error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
