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

T = TypeVar("T")
INLINE_JSON_BYTES = 64 * 1024  # parsed on the loop below this: about half a millisecond
# One thread: the parser holds the GIL, so parsers in parallel would only queue the loop behind all
# of them (6 bodies of 2 MB in the default pool's threads delayed the loop 0.3 s; one at a time, one parse).
_JSON_THREAD = ThreadPoolExecutor(1, thread_name_prefix="json")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the JSON thread: for parsing a big body (or checking it) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_JSON_THREAD, fn, *args)


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
