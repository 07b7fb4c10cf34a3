"""The route class every API router uses: a big JSON body is parsed in a worker thread.

FastAPI parses a request's JSON with `json.loads` inside the route handler, on the event loop: a
2 MB body is 25 ms there, and 8 of them arriving together stalled every stream for their sum
(issue 20). `Route` hands the handler a `Request` whose `json()` parses a body over
`INLINE_JSON_BYTES` in a worker thread. The parser still holds the GIL while it runs, but big
bodies no longer queue up inside one turn of the loop: between two of them, the loop runs.
Build routers with `api_router(...)`; `create_app` refuses a router that does not use `Route`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

T = TypeVar("T")
INLINE_JSON_BYTES = 64 * 1024  # parsed on the loop below this: about half a millisecond
# One thread: the parser holds the GIL, so parsers in parallel would only queue the loop behind all
# of them (6 bodies of 2 MB in the default pool's threads delayed the loop 0.3 s; one at a time, one parse).
_JSON_THREAD = ThreadPoolExecutor(1, thread_name_prefix="json")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the JSON thread: for parsing a big body (or checking it) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_JSON_THREAD, fn, *args)


def _dump(model: BaseModel) -> bytes:
    """A response model's JSON as FastAPI writes it, a list of `choices` item by item: the thread
    can hand the GIL to the event loop between two items instead of holding it for all of them."""
    items = getattr(model, "choices", None)
    if not isinstance(items, list) or len(items) < 2:
        return model.__pydantic_serializer__.to_json(model)
    rest = model.__pydantic_serializer__.to_json(model, exclude={"choices"})
    body = b",".join(item.__pydantic_serializer__.to_json(item) for item in items)
    return b'{"choices":[' + body + b"]" + (b"," + rest[1:] if rest != b"{}" else b"}")


async def json_response(build: Callable[..., BaseModel], *args: Any) -> Response:
    """`build(*args)` and its JSON, both in the JSON thread: an answer of tens of MB (many
    candidates with log-probabilities) took 2 s to build and write on the event loop (issue 27)."""
    return Response(await off_loop(lambda: _dump(build(*args))), media_type="application/json")


class OffloadedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = json.loads(body) if len(body) <= INLINE_JSON_BYTES else await off_loop(json.loads, body)
        return self._json


class Route(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(OffloadedJSONRequest(request.scope, request.receive))

        return route_handler


def api_router(**kwargs: Any) -> APIRouter:
    """`APIRouter(**kwargs)` with `route_class=Route`."""
    return APIRouter(route_class=Route, **kwargs)
