"""Every error the service returns, mapped to a status code and the one envelope, in one place.

    {"error": str, "error_type": "validation" | "overloaded" | "generation" | "unavailable" |
                                 "not_found" | "unauthorized"}
A 500 never carries a traceback: it names the request id, and the log holds the rest.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.engine import EngineUnavailableError, InputError

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500
    error_type = "generation"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class OverloadedError(ServiceError):
    status_code = 429
    error_type = "overloaded"


class UnavailableError(ServiceError):
    status_code = 503
    error_type = "unavailable"


class NotFoundError(ServiceError):
    status_code = 404
    error_type = "not_found"


class UnauthorizedError(ServiceError):
    status_code = 401
    error_type = "unauthorized"


class ClientDisconnectedError(ServiceError):
    """The client went away mid-request; its engine work was cancelled. Never reaches a client."""

    status_code = 499
    error_type = "generation"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    error_type = "validation"


_HTTP_TYPES = {404: "not_found", 405: "not_found", 401: "unauthorized", 413: "validation", 429: "overloaded",
               503: "unavailable"}


def error_type_for(status: int) -> str:
    return _HTTP_TYPES.get(status, "validation" if status < 500 else "generation")


def envelope(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def classify_exception(exc: BaseException) -> tuple[int, str, str]:
    """(status, error_type, message) for any exception; used by handlers and the SSE stream."""
    if isinstance(exc, ServiceError):
        return exc.status_code, exc.error_type, exc.message
    if isinstance(exc, InputError):
        return 422, "validation", str(exc)
    if isinstance(exc, EngineUnavailableError):
        return 503, "unavailable", str(exc)
    return 500, "generation", "internal error"


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            field, msg = "body", "malformed JSON"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "missing":
            msg = "field required"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(422, "validation", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = error_type_for(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} not allowed on {request.url.path}"
        return envelope(exc.status_code, error_type, detail, getattr(exc, "headers", None))

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        status, error_type, message = classify_exception(exc)
        rid = getattr(request.state, "request_id", "-")
        if status == 500:
            logger.error("request %s failed", rid, exc_info=exc)
            message = f"{message} (request id {rid})"
        # A 429 is immediate (no queue): tell well-behaved clients when to come back.
        return envelope(status, error_type, message, {"Retry-After": "1"} if status == 429 else None)

    for cls in (ServiceError, InputError, EngineUnavailableError, Exception):
        app.add_exception_handler(cls, _known)
