"""Chat templates render in worker processes with a time, size and memory limit (issue 27, items 1-3):
the same text as in-process rendering; a template past a limit, or one that fails in any way, is a
`ChatTemplateError` (a 400 at the route) and the pool keeps serving."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.protocol.chat_template import ChatTemplate, ChatTemplateError, ChatTemplateLimitError
from app.protocol.template_sandbox import TemplateRenderer
from tests.app.protocol.test_chat_template import CHAT, CHATML

# O(messages^2) with no output: 3,000 messages take about 7 s in-process here (17 s on the loop in issue 27)
QUADRATIC = ("{% for a in messages %}{% for b in messages %}{% if a.content != b.content %}x{% endif %}"
             "{% endfor %}{% endfor %}ok")
PLAIN = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"


def run(template: str, calls, workers: int = 1, timeout_s: float = 1.0, max_chars: int = 100_000,
        named: dict[str, str] | None = None):
    """`calls(renderer)` inside a started renderer; the renderer is closed afterwards."""
    async def main():
        r = TemplateRenderer(ChatTemplate(template, "test", named=named), workers, timeout_s, max_chars)
        await r.start()
        try:
            return await calls(r)
        finally:
            await r.close()
    return asyncio.run(main())


def test_renders_what_chat_template_renders() -> None:
    tools, docs = [{"type": "function", "function": {"name": "f"}}], [{"title": "T", "text": "body"}]
    want = ChatTemplate(CHATML, "x").render(CHAT, tools=tools, documents=docs, kwargs={"end_with_eos": True})

    async def calls(r):
        return await r.render(CHAT, tools=tools, documents=docs, kwargs={"end_with_eos": True})
    assert run(CHATML, calls) == want and "<|im_start|>assistant" in want
    named = {"tool_use": "T{{ tools | length }}"}  # a named template reaches the worker too
    assert run("D", lambda r: r.render(CHAT, tools=tools), named=named) == "T1"


def test_a_slow_template_is_stopped_at_the_time_limit_and_the_pool_recovers() -> None:
    many = [{"role": "user", "content": "x"}] * 3000

    async def calls(r):
        t0 = time.monotonic()
        with pytest.raises(ChatTemplateLimitError, match=r"CHAT_TEMPLATE_TIMEOUT_SECONDS \(1 s\)"):
            await r.render(many)
        took = time.monotonic() - t0
        # the one worker was killed and replaced: the next request is served
        return took, await r.render([{"role": "user", "content": "x"}])
    took, after = run(QUADRATIC, calls)
    assert 0.9 < took < 4, took
    assert after == "ok"


@pytest.mark.parametrize("template", [
    "{{ 'a' * messages[0].content | int }}",  # one 50 MB string from a number in a message
    "{% for i in range(messages[0].content | int) %}{{ 'a' * 10**6 }}{% endfor %}",  # 50 MB in 1 MB pieces
])
def test_the_rendered_text_is_bounded(template) -> None:
    async def calls(r):
        with pytest.raises(ChatTemplateLimitError, match=r"CHAT_TEMPLATE_MAX_CHARS \(100000\)"):
            await r.render([{"role": "user", "content": "50000000" if "range" not in template else "50"}])
        return await r.render([{"role": "user", "content": "0"}])
    assert run(template, calls) == ""


def test_constant_expressions_are_not_built_when_the_template_compiles() -> None:
    # Jinja's optimizer would fold this at compile time, in the server: 24 GB before this fix
    t0 = time.monotonic()
    ChatTemplate("{% set x = [1] * 10**8 %}{{ 'a' * 10**9 }}{{ 10**10**10 }}", "test")
    assert time.monotonic() - t0 < 1


@pytest.mark.parametrize(("template", "match"), [
    ("{% set x = [1] * 10**8 %}{{ x | length }}", "needed more than 512 MiB"),  # 800 MB: the worker's cap
    ("{% for i in range(10**9) %}{% endfor %}", "OverflowError"),  # the sandbox's range limit
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deep"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{{ messages[7].content }}", "no element 7"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
])
def test_any_template_failure_is_one_line_and_the_pool_keeps_serving(template, match) -> None:
    async def calls(r):
        with pytest.raises(ChatTemplateError, match=match) as e:
            await r.render(CHAT)
        return str(e.value), await r.render(CHAT)
    # a template that fails for every input still answers the second request (with its error)
    try:
        message, _ = run(template, calls)
    except ChatTemplateError:
        message = match
    assert "\n" not in message and len(message) < 400


def test_workers_render_side_by_side_and_a_cancelled_render_frees_its_worker() -> None:
    async def calls(r):
        slow = asyncio.create_task(r.render([{"role": "user", "content": "x"}] * 3000))
        await asyncio.sleep(0.3)
        fast = await asyncio.wait_for(r.render([{"role": "user", "content": "y"}]), 1.0)  # the other worker
        slow.cancel()  # the client went away: its worker is killed and replaced, not left rendering
        with pytest.raises(asyncio.CancelledError):
            await slow
        return fast, await asyncio.wait_for(asyncio.gather(*(r.render([]) for _ in range(2))), 3.0)
    fast, both = run(QUADRATIC, calls, workers=2, timeout_s=30)
    assert fast == "ok" and both == ["ok", "ok"]
