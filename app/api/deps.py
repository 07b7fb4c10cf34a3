"""Dependencies shared by the routes: the engine, admission control and the API key."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from app.core.config import Settings
from app.core.errors import OverloadedError, UnauthorizedError, UnavailableError
from app.core.metrics import Metrics
from app.engine.engine import Engine, InputError
from app.protocol.template_sandbox import TemplateRenderer


@dataclass
class ServiceState:
    """What the lifespan builds and the routes read (`app.state.service`)."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    chat_template: TemplateRenderer | None = None  # for /v1/chat/completions: renders in worker processes
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    in_flight: int = 0
    started: float = field(default_factory=time.time)
    route_paths: set[str] = field(default_factory=set)
    pending_body_bytes: int = 0  # bytes of request bodies being received (MAX_PENDING_BODY_BYTES)
    max_connections: int | None = None  # MAX_CONNECTIONS as served (after the open-file limit)

    def check_ready(self) -> None:
        """Raise `UnavailableError` (503) while loading, after a failed load, or while draining."""
        if self.draining:
            raise UnavailableError("server is shutting down")
        if not self.ready or self.engine is None:
            raise UnavailableError("model is loading" if self.load_error is None else
                                   f"model failed to load: {self.load_error}")

    def acquire(self, weight: int = 1, field: str = "n") -> None:
        """Admit a request of `weight` candidates (prompts x best_of: what it will run) or refuse at
        once: there is no unbounded queue. More than MAX_REQUEST_CANDIDATES (or than
        MAX_CONCURRENT_REQUESTS) in one request is a 400 naming `field`."""
        self.check_ready()
        cap = min(self.settings.max_request_candidates, self.settings.max_concurrent_requests)
        if weight > cap:
            raise InputError(field, f"{weight} candidates (prompts x best_of) in one request; at most {cap} "
                                    f"(MAX_REQUEST_CANDIDATES)")
        if self.in_flight + weight > self.settings.max_concurrent_requests:
            raise OverloadedError(f"more than MAX_CONCURRENT_REQUESTS ({self.settings.max_concurrent_requests}) "
                                  f"candidates in flight; retry later")
        self.in_flight += weight
        self.metrics.in_flight.set(self.in_flight)

    def release(self, weight: int = 1) -> None:
        self.in_flight -= weight
        self.metrics.in_flight.set(self.in_flight)


async def get_state(request: Request) -> ServiceState:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool, one thread hop
    # (and a GIL hand-over) per request for a lookup.
    return request.app.state.service


def check_api_key(authorization: str | None, key: str | None) -> None:
    """Raise `UnauthorizedError` unless `authorization` is `Bearer <key>` (no-op without a key)."""
    if not key:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")


StateDep = Annotated[ServiceState, Depends(get_state)]
