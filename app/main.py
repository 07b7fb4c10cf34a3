"""`create_app()`: the FastAPI service. The lifespan loads and warms both models in the
background, so `/health` answers 503 while that runs and 200 once it is done."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.api.deps import ServiceState, check_api_key
from app.api.routes import classify, generate, health, openai, playground, tokenize
from app.core.config import Settings, get_settings
from app.core.errors import UnauthorizedError, error_response, error_type_for, install_error_handlers
from app.engine.engine import Engine
from app.engine.loader import LoadCancelledError, one_line
from app.protocol.chat_template import load_chat_template

logger = logging.getLogger(__name__)
access_log = logging.getLogger("app.access")

PUBLIC_PATHS = {"/health", "/metrics"}
# The playground page itself is public (it asks for the key and sends it); `POST /` is not.
PUBLIC_GETS = {"/"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("app").setLevel(level.upper())
    logging.getLogger("model").setLevel(level.upper())
    logging.getLogger("export").setLevel(level.upper())


def _load_engine(s: Settings, cancel: threading.Event) -> Engine:
    engine = Engine.load(
        s.model_path, s.classifier_path, backend=s.backend, device=s.device, precision=s.precision,
        cache_dir=s.onnx_cache_dir, num_threads=s.num_threads, max_batch_size=s.max_batch_size,
        max_batch_total_tokens=s.max_batch_total_tokens, max_input_tokens=s.max_input_tokens,
        max_total_tokens=s.max_total_tokens, cancel=cancel, prefill_chunk_tokens=s.prefill_chunk_tokens,
        max_batch_prefill_tokens=s.max_batch_prefill_tokens, waiting_served_ratio=s.waiting_served_ratio,
        cuda_graphs=s.cuda_graphs, retry_failed_export=s.retry_failed_export,
    )
    engine.start()
    return engine


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    on_failure: Callable[[], None] | None = getattr(app.state, "on_load_failure", None)

    cancel = threading.Event()

    async def load() -> None:
        t0 = time.perf_counter()
        try:
            s = state.settings
            state.chat_template = await asyncio.to_thread(load_chat_template, s.chat_template, s.model_path)
            engine = await asyncio.to_thread(_load_engine, state.settings, cancel)
        except LoadCancelledError:
            logger.info("loading cancelled by shutdown")
            return
        except Exception as e:
            state.load_error = one_line(e)
            logger.error("loading the models failed: %s", state.load_error, exc_info=e)
            if on_failure:
                on_failure()
            return
        m = state.metrics
        def on_step(st: dict[str, Any]) -> None:
            m.queue.set(st["queue"])
            m.batch.set(st["batch"])
            for kind, n in st.get("kv_bytes", {}).items():
                m.kv_bytes.labels(kind).set(n)

        engine.scheduler.on_step = on_step
        on_step({"queue": 0, "batch": 0, "kv_bytes": engine.kv_bytes()})
        state.engine, state.ready = engine, True
        info = engine.info()
        logger.info("ready in %.1f s: %s", time.perf_counter() - t0, json.dumps(info))

    task = asyncio.create_task(load())
    try:
        yield
    finally:
        state.ready = False
        if not task.done():
            cancel.set()  # stops a first-start export child; the loader thread then returns
            await asyncio.wait({task}, timeout=30)
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)


class RequestContextMiddleware:
    """Request id, API key, body-size limit, metrics and one structured access-log line.

    Pure ASGI (not BaseHTTPMiddleware) so streaming responses and disconnects pass through.
    """

    def __init__(self, app: Any, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.state.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        async def reply(code: int, error_type: str, msg: str) -> None:
            await error_response(path, code, error_type, msg)(scope, receive, send_with_id)

        try:
            public = path in PUBLIC_PATHS or (path in PUBLIC_GETS and scope.get("method") in ("GET", "HEAD"))
            if s.api_key and not public:
                try:
                    check_api_key(headers.get("authorization"), s.api_key)
                except UnauthorizedError as e:
                    return await reply(401, "unauthorized", e.message)
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body, too_large = await _read_body(receive, s.max_body_bytes, headers.get("content-length"))
                if too_large:
                    return await reply(413, "validation", f"request body exceeds {s.max_body_bytes} bytes")
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        finally:
            route = path if path in self.state.route_paths else "other"  # bounded label values
            dt = time.perf_counter() - t0
            m = self.state.metrics
            m.requests.labels(route, str(status["code"])).inc()
            m.duration.labels(route).observe(dt)
            if status["code"] >= 400:
                m.failures.labels(error_type_for(status["code"])).inc()
            st = scope.get("state", {})
            if access_log.isEnabledFor(logging.INFO):  # skip building the line when it is not logged
                access_log.info(json.dumps({
                    "request_id": rid, "method": scope.get("method"), "path": path, "status": status["code"],
                    "duration_ms": round(dt * 1000, 2), "input_tokens": st.get("input_tokens"),
                    "generated_tokens": st.get("generated_tokens"), "finish_reason": st.get("finish_reason"),
                }))


async def _read_body(receive: Callable, limit: int, content_length: str | None) -> tuple[bytes, bool]:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        return b"", True
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls: disconnect detection

    return replay


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="gpt2-serve",
        description="GPT-2 with fused residual-add + LayerNorm on ONNX Runtime: TGI-compatible generation, "
                    "classification and OpenAI-style completions.",
        version=health.version(),
        lifespan=lifespan,
    )
    state = ServiceState(settings=settings)
    app.state.service = state
    install_error_handlers(app)
    for module in (generate, classify, openai, tokenize, health, playground):
        app.include_router(module.router)
    # Metric labels use known paths only; the OpenAPI schema is the public list of them.
    state.route_paths = set(app.openapi()["paths"]) | {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}
    app.add_middleware(RequestContextMiddleware, state=state)
    return app
