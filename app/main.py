"""`create_app()`: the FastAPI service. The lifespan loads and warms both models in the
background, so `/health` answers 503 while that runs and 200 once it is done."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.api.deps import ServiceState, check_api_key
from app.api.routes import classify, embeddings, generate, health, openai, playground, responses, tokenize
from app.api.routing import INLINE_JSON_BYTES, Route, off_loop
from app.core.config import Settings, get_settings
from app.core.errors import UnauthorizedError, error_response, error_type_for, install_error_handlers
from app.core.metrics import Metrics
from app.core.text import refused_body
from app.engine.engine import Engine
from app.loading.engine_loader import load_engine
from app.loading.loader import LoadCancelledError, one_line
from app.protocol.chat_template import load_chat_template
from app.protocol.template_sandbox import TemplateRenderer

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
    engine = load_engine(
        s.model_path, s.classifier_path, backend=s.backend, device=s.device, precision=s.precision,
        cache_dir=s.onnx_cache_dir, num_threads=s.num_threads, max_batch_size=s.max_batch_size,
        max_batch_total_tokens=s.max_batch_total_tokens, max_input_tokens=s.max_input_tokens,
        max_total_tokens=s.max_total_tokens, cancel=cancel, prefill_chunk_tokens=s.prefill_chunk_tokens,
        max_batch_prefill_tokens=s.max_batch_prefill_tokens, waiting_served_ratio=s.waiting_served_ratio,
        cuda_graphs=s.cuda_graphs, retry_failed_export=s.retry_failed_export,
        export_lock_stale_s=s.export_lock_stale_seconds, prefix_cache_bytes=s.prefix_cache_bytes,
        embedding_pooling=None if s.embedding_pooling == "off" else s.embedding_pooling,
        speculation=s.speculation, speculation_max_tokens=s.speculation_max_tokens,
        speculation_ngram=s.speculation_ngram, draft_model_path=s.draft_model_path, quant_kernel=s.quant_kernel,
        speculation_max_batch=s.speculation_max_batch,
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
            template = await asyncio.to_thread(load_chat_template, s.chat_template, s.model_path)
            if template is not None:
                renderer = TemplateRenderer(template, s.chat_template_workers, s.chat_template_timeout_seconds,
                                            s.chat_template_max_chars)
                await renderer.start()
                state.chat_template = renderer
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
        m.watch_prefix_cache(engine.prefix_stats)
        m.watch_speculation(engine.speculation_stats)
        on_step({"queue": 0, "batch": 0, "kv_bytes": engine.kv_bytes()})
        state.engine, state.ready = engine, True
        info = engine.info()
        logger.info("ready in %.1f s: %s", time.perf_counter() - t0, json.dumps(info))

    task = asyncio.create_task(load())
    watch = asyncio.create_task(watch_event_loop(state.metrics))
    try:
        yield
    finally:
        watch.cancel()
        state.ready = False
        if not task.done():
            cancel.set()  # stops a first-start export child; the loader thread then returns
            await asyncio.wait({task}, timeout=30)
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)
        if state.chat_template is not None:
            await state.chat_template.close()


async def watch_event_loop(metrics: Metrics, period: float = 0.1) -> None:
    """How late the loop runs a `period` timer: the time some callback held it (a blocking call on
    the loop stalls every stream). Observed in gpt2_event_loop_lag_seconds; over 0.25 s is logged."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(period)
        lag = max(0.0, loop.time() - t0 - period)
        metrics.loop_lag.observe(lag)
        if lag > 0.25:
            logger.warning("the event loop was blocked for %.2f s", lag)


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

        async def reply(code: int, error_type: str, msg: str, param: str | None = None, close: bool = False) -> None:
            # close: the body was not read to its end, so the connection cannot carry another request
            headers = {"Connection": "close"} if close else None
            await error_response(path, code, error_type, msg, headers, param)(scope, receive, send_with_id)

        try:
            public = path in PUBLIC_PATHS or (path in PUBLIC_GETS and scope.get("method") in ("GET", "HEAD"))
            if s.api_key and not public:
                try:
                    check_api_key(headers.get("authorization"), s.api_key)
                except UnauthorizedError as e:
                    return await reply(401, "unauthorized", e.message)
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                try:
                    body = await read_body(receive, self.state, headers.get("content-length"))
                except BodyRefusedError as e:
                    return await reply(e.status, e.error_type, e.message, close=True)
                except ClientGoneError:
                    status["code"] = 499  # nothing runs: counted apart from bad input, as nginx's 499
                    return
                # the rules where a body enters (app.core.text): Unicode, nesting depth
                bad = refused_body(body) if len(body) <= INLINE_JSON_BYTES else await off_loop(refused_body, body)
                if bad is not None:
                    return await reply(422, "validation", f"{bad[0]}: {bad[1]}", param=bad[0])
                scope["state"]["raw_body"] = body  # for the error handler's not-UTF-8 check
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


class BodyRefusedError(Exception):
    """A request body the server will not take; answered with `status` and the connection closed."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


class ClientGoneError(Exception):
    """The client closed the connection before its body was whole: nothing is run or answered."""


if sys.version_info >= (3, 11):
    async def _receive_within(receive: Callable, seconds: float) -> dict:
        async with asyncio.timeout(seconds):
            return await receive()
else:  # pragma: no cover
    async def _receive_within(receive: Callable, seconds: float) -> dict:
        return await asyncio.wait_for(receive(), seconds)


async def read_body(receive: Callable, state: ServiceState, content_length: str | None) -> bytes:
    """The whole request body, or `BodyRefusedError` (413 over MAX_BODY_BYTES, 408 when it stalls for
    BODY_TIMEOUT_SECONDS or is not whole BODY_TOTAL_TIMEOUT_SECONDS after the app starts reading it,
    503 when the bodies being received on all connections together would pass MAX_PENDING_BODY_BYTES)
    or `ClientGoneError` (the client closed before its Content-Length was sent)."""
    s = state.settings
    limit = s.max_body_bytes
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise BodyRefusedError(413, "validation", f"request body exceeds MAX_BODY_BYTES ({limit} bytes)")
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    # a total, not only a pause: a byte every few seconds must not hold the connection for ever
    deadline = loop.time() + s.body_total_timeout_seconds
    too_slow = BodyRefusedError(408, "validation", f"the request body was not whole within "
                                                   f"BODY_TOTAL_TIMEOUT_SECONDS ({s.body_total_timeout_seconds:g} s)")
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise too_slow
            try:
                message = await _receive_within(receive, min(s.body_timeout_seconds, left))
            except TimeoutError:
                if left <= s.body_timeout_seconds:
                    raise too_slow from None
                raise BodyRefusedError(408, "validation", f"the request body stalled: nothing arrived for "
                                                     f"BODY_TIMEOUT_SECONDS ({s.body_timeout_seconds:g} s)") from None
            if message["type"] != "http.request":  # http.disconnect before the last chunk
                raise ClientGoneError
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise BodyRefusedError(413, "validation", f"request body exceeds MAX_BODY_BYTES ({limit} bytes)")
                chunks.append(chunk)
                state.pending_body_bytes += len(chunk)
                if state.pending_body_bytes > s.max_pending_body_bytes:
                    raise BodyRefusedError(503, "unavailable", f"the server holds MAX_PENDING_BODY_BYTES "
                                                          f"({s.max_pending_body_bytes}) of request bodies being "
                                                          f"received; retry later")
            if not message.get("more_body", False):
                return b"".join(chunks)
    finally:
        state.pending_body_bytes -= sum(len(c) for c in chunks)


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
    for module in (generate, classify, openai, responses, embeddings, tokenize, health, playground):
        if module.router.route_class is not Route:  # big JSON bodies are parsed off the event loop there
            raise TypeError(f"{module.__name__}.router must be made with app.api.routing.api_router")
        app.include_router(module.router)
    # Metric labels use known paths only; the OpenAPI schema is the public list of them.
    state.route_paths = set(app.openapi()["paths"]) | {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}
    app.add_middleware(RequestContextMiddleware, state=state)
    return app
