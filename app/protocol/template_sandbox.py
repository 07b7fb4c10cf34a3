"""Chat templates rendered in worker processes, with a time limit and an output size limit.

A chat template is code (it comes with the checkpoint or `CHAT_TEMPLATE`) and its input comes from
the client: a loop over the messages inside a loop over the messages, sent 20,000 messages, ran for
minutes, and `'a' * n` or `[1] * 10**8` took gigabytes (issue 27). Rendered on the event loop, or in
a thread that holds the GIL, that stalls every stream. So the server renders in a small pool of
child processes (`CHAT_TEMPLATE_WORKERS`), each running this module:

- the render of one request may take `CHAT_TEMPLATE_TIMEOUT_SECONDS`; past it the worker is killed
  (a process can be stopped anywhere, even inside one long C call) and replaced;
- the rendered text may be `CHAT_TEMPLATE_MAX_CHARS` long: the worker renders piece by piece
  (Jinja's `generate`) and stops at the limit;
- a worker's address space is capped (`WORKER_ADDRESS_SPACE`), so a memory bomb is a MemoryError in
  the worker, not in the server;
- any error (the template's own `raise_exception`, a sandbox refusal, a recursion, `range(10**9)`)
  comes back as one line and becomes a 400 naming `messages`.

The protocol is one JSON line each way on the worker's stdin/stdout: first the template (source,
origin, special tokens, named templates, the output limit), then one request per line, answered
`{"text": ...}` or `{"error": ...}`. The worker imports only Jinja and `chat_template`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import signal
import sys
from typing import Any

from app.protocol.chat_template import ChatTemplate, ChatTemplateError, ChatTemplateLimitError

logger = logging.getLogger(__name__)

WORKER_ADDRESS_SPACE = 512 * 1024 * 1024  # bytes; the interpreter and Jinja need about 40 MB of it
_READ_LIMIT_FLOOR = 1 << 20


class TemplateRenderer:
    """Renders a `ChatTemplate` in `workers` child processes. Start with `await start()`, stop with
    `await close()`; `render` takes the same arguments as `ChatTemplate.render`."""

    def __init__(self, template: ChatTemplate, workers: int = 2, timeout_s: float = 5.0,
                 max_chars: int = 4 * 1024 * 1024) -> None:
        self.template = template
        self.origin = template.origin
        self.workers = workers
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self._idle: asyncio.Queue[asyncio.subprocess.Process] = asyncio.Queue()
        self._all: set[asyncio.subprocess.Process] = set()
        self._closed = False
        # json.dumps escapes control characters (up to 6 bytes each): room for the worst line
        self._read_limit = max(_READ_LIMIT_FLOOR, 6 * max_chars + 4096)

    async def start(self) -> None:
        for _ in range(self.workers):
            self._idle.put_nowait(await self._spawn())
        logger.info("chat template: %d worker process(es), %g s and %d characters per render", self.workers,
                    self.timeout_s, self.max_chars)

    async def _spawn(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app.protocol.template_sandbox", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=self._read_limit)
        self._all.add(proc)
        t = self.template
        init = {"source": t.source, "origin": t.origin, "special_tokens": t.special_tokens, "named": t.named,
                "max_chars": self.max_chars}
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(init).encode() + b"\n")
        await proc.stdin.drain()
        return proc

    async def _discard(self, proc: asyncio.subprocess.Process) -> None:
        """Kill a worker that is mid-render (timed out, or its request went away) and replace it."""
        self._all.discard(proc)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if not self._closed:
            self._idle.put_nowait(await self._spawn())

    async def render(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The prompt text, or `ChatTemplateError` (`ChatTemplateLimitError` past a limit)."""
        from app.api.routing import INLINE_JSON_BYTES, off_loop  # the JSON thread: a reply can be megabytes

        line = await off_loop(_request_line, {"messages": messages, **kwargs})
        proc = await self._idle.get()
        done = False
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(line)
            await proc.stdin.drain()
            try:
                reply = await asyncio.wait_for(proc.stdout.readline(), self.timeout_s)
            except TimeoutError:
                raise ChatTemplateLimitError(f"rendering took longer than CHAT_TEMPLATE_TIMEOUT_SECONDS "
                                             f"({self.timeout_s:g} s)") from None
            except ValueError:  # the line passed the reader's limit: cannot happen within max_chars
                raise ChatTemplateLimitError(f"the rendered text is longer than CHAT_TEMPLATE_MAX_CHARS "
                                             f"({self.max_chars})") from None
            if not reply:
                code = await proc.wait()
                raise ChatTemplateLimitError(f"the chat template's worker process exited ({code}) while rendering")
            out = json.loads(reply) if len(reply) <= INLINE_JSON_BYTES else await off_loop(json.loads, reply)
            done = True
        finally:
            if done:
                self._idle.put_nowait(proc)
            else:  # its answer (if any) would reach the next request: replace it
                await asyncio.shield(self._discard(proc))
        if "error" in out:
            raise (ChatTemplateLimitError if out.get("limit") else ChatTemplateError)(out["error"])
        return out["text"]

    async def close(self) -> None:
        self._closed = True
        for proc in list(self._all):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self._all.clear()


def _request_line(request: dict[str, Any]) -> bytes:
    return json.dumps(request, ensure_ascii=False).encode() + b"\n"


def _serve() -> None:
    """The worker: the template on the first line, then one render per line until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    first = sys.stdin.readline()
    if not first:
        return
    init = json.loads(first)
    template = ChatTemplate(init["source"], init["origin"], init["special_tokens"], init["named"] or None)
    max_chars = int(init["max_chars"])
    with contextlib.suppress(ValueError, OSError):  # after the imports: they need the room
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_ADDRESS_SPACE, WORKER_ADDRESS_SPACE))
    out = sys.stdout
    for line in sys.stdin:
        reply: dict[str, Any]
        try:
            req = json.loads(line)
            text = template.render(req.pop("messages"), max_chars=max_chars, **req)
            reply = {"text": text}
        except ChatTemplateError as e:
            reply = {"error": str(e), "limit": isinstance(e, ChatTemplateLimitError)}
        except MemoryError:
            reply = {"error": f"the chat template needed more than {WORKER_ADDRESS_SPACE >> 20} MiB", "limit": True}
        except RecursionError:
            reply = {"error": "the chat template recursed too deep (RecursionError)"}
        except Exception as e:  # noqa: BLE001 - whatever the template did, the answer is one line
            reply = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        try:
            out.write(json.dumps(reply, ensure_ascii=False) + "\n")
        except MemoryError:
            out.write(json.dumps({"error": "the rendered text did not fit in the worker's memory", "limit": True})
                      + "\n")
        out.flush()


if __name__ == "__main__":
    _serve()
