"""Every error the service returns, mapped to a status code and its envelope, in one place.

Everywhere but `/v1/*` (TGI's envelope, which the `text-generation` client parses):

    {"error": str, "error_type": "validation" | "overloaded" | "generation" | "unavailable" |
                                 "not_found" | "unauthorized"}

On `/v1/*` (OpenAI's envelope and status codes, which the `openai` SDK maps to its exceptions):

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

where bad input is 400 `invalid_request_error` (not 422), and 401, 404, 413, 429, 500 and 503 keep
their status. A 500 never carries a traceback: it names the request id, and the log holds the rest.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.text import not_utf8
from app.engine.engine import EngineUnavailableError, InputError, ShuttingDownError

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500
    error_type = "generation"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when there is one (OpenAI's `param`)


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


class BadRequestError(ServiceError):
    """A request this server cannot serve as configured (e.g. chat without a chat template): 422,
    OpenAI's 400 on /v1/*."""

    status_code = 422
    error_type = "validation"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    error_type = "validation"


# 499 (nginx's "client closed request"): the client left before its request was whole; no answer is
# sent, the label keeps it apart from bad input in gpt2_failures_total.
_HTTP_TYPES = {404: "not_found", 405: "not_found", 401: "unauthorized", 413: "validation", 429: "overloaded",
               499: "client_closed", 503: "unavailable"}


def error_type_for(status: int) -> str:
    return _HTTP_TYPES.get(status, "validation" if status < 500 else "generation")


def envelope(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


# ---- OpenAI's envelope on /v1/* ---------------------------------------------------------------

def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


# Our status -> (OpenAI status, type, code). 422 (bad input) is OpenAI's and vLLM's 400.
_OPENAI: dict[int, tuple[int, str, str | None]] = {
    401: (401, "invalid_request_error", "invalid_api_key"),
    404: (404, "invalid_request_error", None),
    405: (405, "invalid_request_error", None),
    408: (408, "invalid_request_error", "request_timeout"),
    413: (413, "invalid_request_error", "request_too_large"),
    422: (400, "invalid_request_error", None),
    429: (429, "requests", "rate_limit_exceeded"),
    431: (431, "invalid_request_error", "request_header_fields_too_large"),
    503: (503, "server_error", "service_unavailable"),
}


def openai_error(status: int, message: str, param: str | None = None) -> tuple[int, dict]:
    """(status, body) of OpenAI's error envelope for one of our (TGI-side) statuses."""
    out_status, type_, code = _OPENAI.get(status, (status, "invalid_request_error" if status < 500 else "server_error",
                                                   None))
    if status == 404 and param == "model":
        code = "model_not_found"
    return out_status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(path: str, status: int, error_type: str, message: str, headers: dict[str, str] | None = None,
                   param: str | None = None) -> JSONResponse:
    """The error response for `path`: OpenAI's envelope on /v1/*, TGI's everywhere else."""
    if status == 429:  # immediate (no queue): tell well-behaved clients when to come back
        headers = {"Retry-After": "1", **(headers or {})}
    if is_openai_path(path):
        out_status, body = openai_error(status, message, param)
        return JSONResponse(body, status_code=out_status, headers=headers)
    return envelope(status, error_type, message, headers)


def stream_error(path: str, exc: BaseException) -> dict:
    """The in-band error event of a stream that has started (status 200 already sent)."""
    status, error_type, message = classify_exception(exc)
    if is_openai_path(path):
        return openai_error(status, message, exception_param(exc))[1]
    return {"error": message, "error_type": error_type}


def classify_exception(exc: BaseException) -> tuple[int, str, str]:
    """(status, error_type, message) for any exception; used by handlers and the SSE stream."""
    if isinstance(exc, ServiceError):
        return exc.status_code, exc.error_type, exc.message
    if isinstance(exc, InputError):
        return 422, "validation", str(exc)
    if isinstance(exc, EngineUnavailableError | ShuttingDownError):  # ShuttingDownError: SIGTERM's grace ran out
        return 503, "unavailable", str(exc)
    return 500, "generation", "internal error"


def exception_param(exc: BaseException) -> str | None:
    """The request field an exception names, if any."""
    if isinstance(exc, InputError):
        return exc.field
    return getattr(exc, "param", None) if isinstance(exc, ServiceError) else None


# pydantic names the member of a union that failed in the error's location (`input.str`,
# `input.list[int].1`); a client sent `input`, so those tags are left out of the field's name.
_UNION_TAG = re.compile(r"^(str|int|float|bool|bytes|none|[a-z-]+\[.*\])$")


def validation_errors(exc: RequestValidationError) -> list[tuple[str, str]]:
    """(field, message) per validation error; field is dotted (`parameters.top_k`) or `body`."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not (isinstance(x, str) and _UNION_TAG.match(x))]
        field = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            field, msg = "body", "malformed JSON"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "missing":
            msg = "field required"
        parts.append((field, msg))
    return parts


def validation_message(exc: RequestValidationError) -> str:
    return "; ".join(f"{field}: {msg}" for field, msg in validation_errors(exc)) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        param = errors[0][0] if errors and errors[0][0] != "body" else None
        return error_response(request.url.path, 422, "validation", validation_message(exc), param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI's JSON parser met bytes that are not UTF-8: name the field (app.core.text)
            bad = not_utf8(getattr(request.state, "raw_body", b""))
            if bad is not None:
                return error_response(request.url.path, 422, "validation", f"{bad[0]}: {bad[1]}", param=bad[0])
            return error_response(request.url.path, 422, "validation", "body: is not UTF-8 JSON", param="body")
        error_type = error_type_for(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} not allowed on {request.url.path}"
        return error_response(request.url.path, exc.status_code, error_type, detail, getattr(exc, "headers", None))

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        status, error_type, message = classify_exception(exc)
        rid = getattr(request.state, "request_id", "-")
        if status == 500:
            logger.error("request %s failed", rid, exc_info=exc)
            message = f"{message} (request id {rid})"
        return error_response(request.url.path, status, error_type, message, param=exception_param(exc))

    for cls in (ServiceError, InputError, EngineUnavailableError, ShuttingDownError, Exception):
        app.add_exception_handler(cls, _known)
