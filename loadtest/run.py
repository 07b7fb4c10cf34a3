"""Closed-loop load generator for the gpt2-serve HTTP API.

    python -m loadtest.run --url http://127.0.0.1:8000 --concurrency 8 --requests 200
    python -m loadtest.run --url http://127.0.0.1:8000 --endpoint completions --stream --duration 30 --json out.json

`--concurrency` asyncio workers pull request numbers from one shared counter until `--requests`
have been started or `--duration` seconds have passed (and never more than `HARD_CAP_REQUESTS`);
each worker sends its next request as soon as the previous one is answered. In `--duration` mode
no request is started after the deadline; the ones in flight are waited for (each is bounded by
`--timeout`) and counted. Only the given `--url` is contacted: no redirects are followed and
proxy settings from the environment are ignored.

Progress: while it runs, one line on stderr, rewritten in place with `\\r` at most
`1 / PROGRESS_INTERVAL_S` (4) times a second, whether or not stderr is a terminal (`--quiet`
turns it off). The summary goes to stdout as a table, and to `--json OUT` as JSON.

Counting: a request is ok when it gets a 2xx with a well-formed body (for streams: a complete
stream without an in-band error). Errors are keyed by HTTP status ("422", "429", ...), or
"transport" (connection failures), "timeout" (over `--timeout`), "stream_error" (an in-band
`{"error": ...}` event), "incomplete_stream" (the stream ended without its final event) and
"bad_response" (a 2xx whose body cannot be parsed). Latency and time-to-first-token
percentiles are over ok requests; requests/s counts every finished request, ok/s the ok ones.

Generated tokens: `/generate` asks for `"details": true` and sums `details.generated_tokens`;
`/generate_stream` counts token events; `/v1/completions` uses `usage.completion_tokens`
(streaming too: from the final usage chunk, else the number of text chunks); `/classify` is 0.
Completions are sent with `"temperature": 0` (greedy, like `/generate`'s default).

Exit status: 0 when errors / requests <= `--max-error-rate`, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx

ENDPOINTS = ("generate", "generate_stream", "classify", "completions")
HARD_CAP_REQUESTS = 1_000_000  # no run starts more requests than this, whatever the flags
MAX_CONCURRENCY = 1024
MAX_DURATION_S = 24 * 3600.0
PROGRESS_INTERVAL_S = 0.25
ERROR_EXAMPLE_CHARS = 200

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The computer",
    "Once upon a time, in a small village by the sea,",
    "The weather today is",
    "In the beginning of the twentieth century, scientists",
    "My favourite recipe for dinner is",
    "The judge read the verdict and the courtroom",
    "How to train a neural network:",
    "The train left the station at",
    "She opened the letter and read",
    "The history of the Roman Empire",
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0..100) of `values`, or None when there are none.

    Linear interpolation between the closest ranks: numpy's default (`method="linear"`).
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return None
    xs = sorted(values)
    h = (len(xs) - 1) * (q / 100)
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


@dataclass(frozen=True)
class LoadConfig:
    """What to send, how hard and for how long."""

    url: str
    endpoint: str = "generate"
    stream: bool = False
    concurrency: int = 4
    requests: int | None = None  # default 100 when there is no `duration` either
    duration: float | None = None
    max_new_tokens: int = 32
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    prompts_source: str = "built-in"
    api_key: str | None = None
    timeout: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if self.stream and self.endpoint == "classify":
            raise ValueError("classify has no streaming variant")
        if self.requests is None and self.duration is None:
            object.__setattr__(self, "requests", 100)
        if self.requests is not None and self.duration is not None:
            raise ValueError("give requests or duration, not both")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in [1, {MAX_CONCURRENCY}]")
        if self.requests is not None and not 1 <= self.requests <= HARD_CAP_REQUESTS:
            raise ValueError(f"requests must be in [1, {HARD_CAP_REQUESTS}]")
        if self.duration is not None and not 0 < self.duration <= MAX_DURATION_S:
            raise ValueError(f"duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if not self.prompts:
            raise ValueError("no prompts")
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")

    @property
    def streaming(self) -> bool:
        return self.endpoint == "generate_stream" or (self.stream and self.endpoint in ("generate", "completions"))

    @property
    def path(self) -> str:
        if self.endpoint in ("generate", "generate_stream"):
            return "/generate_stream" if self.streaming else "/generate"
        return "/classify" if self.endpoint == "classify" else "/v1/completions"

    def body(self, prompt: str) -> dict[str, Any]:
        """The JSON body of one request."""
        if self.endpoint == "classify":
            return {"inputs": prompt}
        if self.endpoint == "completions":
            body = {"prompt": prompt, "max_tokens": self.max_new_tokens, "temperature": 0, "stream": self.streaming}
            if self.streaming:  # the usage chunk comes only when asked for (OpenAI)
                body["stream_options"] = {"include_usage": True}
            return body
        params: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if not self.streaming:
            params["details"] = True
        return {"inputs": prompt, "parameters": params}

    def settings(self) -> dict[str, Any]:
        """The settings as reported in the summary (the API key itself is never included)."""
        return {"url": self.url, "endpoint": self.endpoint, "path": self.path, "stream": self.streaming,
                "concurrency": self.concurrency, "requests": self.requests, "duration_s": self.duration,
                "max_new_tokens": self.max_new_tokens, "prompts": self.prompts_source,
                "prompt_count": len(self.prompts), "api_key": self.api_key is not None, "timeout_s": self.timeout,
                "seed": self.seed, "hard_cap_requests": HARD_CAP_REQUESTS}


@dataclass
class RequestResult:
    """One finished request. `error` is None when ok, else the key it is counted under."""

    ok: bool
    latency: float
    error: str | None = None
    ttft: float | None = None
    tokens: int = 0
    detail: str = ""


@dataclass
class Progress:
    """Live counters, passed to the progress callback."""

    done: int = 0
    errors: int = 0
    elapsed: float = 0.0
    total: int | None = None
    duration: float | None = None
    final: bool = False

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class _Run:
    results: list[RequestResult] = field(default_factory=list)
    issued: int = 0
    errors: int = 0


def _error_detail(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
    except ValueError:
        pass
    return text[:ERROR_EXAMPLE_CHARS]


def _count_tokens(endpoint: str, data: Any) -> int:
    """Generated tokens from a non-streaming response body; raises on a malformed one."""
    if endpoint == "classify":
        if not isinstance(data, list):
            raise TypeError("classify response is not a list")
        return 0
    if endpoint == "completions":
        return int(data["usage"]["completion_tokens"])
    return int(data["details"]["generated_tokens"])


async def _read_sse(resp: httpx.Response, config: LoadConfig, t0: float) -> RequestResult:
    ttft: float | None = None
    tokens = chunks = 0
    usage_tokens: int | None = None
    finished = False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            finished = True
            continue
        try:
            ev = json.loads(payload)
        except ValueError:
            return RequestResult(False, time.perf_counter() - t0, "bad_response", detail=payload[:ERROR_EXAMPLE_CHARS])
        if not isinstance(ev, dict):
            return RequestResult(False, time.perf_counter() - t0, "bad_response", detail=payload[:ERROR_EXAMPLE_CHARS])
        if "error" in ev:
            return RequestResult(False, time.perf_counter() - t0, "stream_error",
                                 detail=str(ev["error"])[:ERROR_EXAMPLE_CHARS])
        if config.endpoint == "completions":
            if isinstance(ev.get("usage"), dict):
                usage_tokens = int(ev["usage"].get("completion_tokens", 0))
            if ev.get("choices"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
        else:
            if ev.get("token") is not None:
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if ev.get("generated_text") is not None or ev.get("details") is not None:
                finished = True
    latency = time.perf_counter() - t0
    if not finished:
        return RequestResult(False, latency, "incomplete_stream", ttft=ttft,
                             detail="stream ended without its final event")
    if config.endpoint == "completions":
        tokens = usage_tokens if usage_tokens is not None else chunks
    return RequestResult(True, latency, ttft=ttft, tokens=tokens)


async def _send(client: httpx.AsyncClient, config: LoadConfig, prompt: str, t0: float) -> RequestResult:
    async with client.stream("POST", config.path, json=config.body(prompt)) as resp:
        if not 200 <= resp.status_code < 300:
            raw = await resp.aread()
            return RequestResult(False, time.perf_counter() - t0, str(resp.status_code), detail=_error_detail(raw))
        if config.streaming:
            return await _read_sse(resp, config, t0)
        raw = await resp.aread()
        latency = time.perf_counter() - t0
        try:
            tokens = _count_tokens(config.endpoint, json.loads(raw))
        except (ValueError, KeyError, TypeError):
            detail = raw[:ERROR_EXAMPLE_CHARS].decode(errors="replace")
            return RequestResult(False, latency, "bad_response", detail=detail)
        return RequestResult(True, latency, tokens=tokens)


async def one_request(client: httpx.AsyncClient, config: LoadConfig, prompt: str) -> RequestResult:
    """Send one request and classify its outcome; never raises for a failed request."""
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(_send(client, config, prompt, t0), config.timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException) as e:
        return RequestResult(False, time.perf_counter() - t0, "timeout", detail=type(e).__name__)
    except httpx.HTTPError as e:
        return RequestResult(False, time.perf_counter() - t0, "transport", detail=f"{type(e).__name__}: {e}"[:200])
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a malformed body or event
        return RequestResult(False, time.perf_counter() - t0, "bad_response", detail=f"{type(e).__name__}: {e}"[:200])


async def run_load(config: LoadConfig, on_progress: Callable[[Progress], None] | None = None,
                   transport: httpx.AsyncBaseTransport | None = None) -> dict[str, Any]:
    """Run the load test and return its summary (see `summarize`).

    `on_progress` is called at most every `PROGRESS_INTERVAL_S` while it runs and once at the
    end (`final=True`). `transport` replaces the network (for tests).
    """
    run = _Run()
    rng = random.Random(config.seed)
    limit = config.requests if config.requests is not None else HARD_CAP_REQUESTS
    start = time.perf_counter()
    deadline = start + config.duration if config.duration is not None else None
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)

    def progress(final: bool = False) -> Progress:
        return Progress(len(run.results), run.errors, time.perf_counter() - start, config.requests, config.duration,
                        final)

    async def worker(client: httpx.AsyncClient) -> None:
        while run.issued < limit and (deadline is None or time.perf_counter() < deadline):
            run.issued += 1
            prompt = rng.choice(config.prompts)  # the i-th request started gets the i-th draw
            result = await one_request(client, config, prompt)
            run.results.append(result)
            run.errors += not result.ok

    async def reporter() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            if on_progress is not None:
                on_progress(progress())

    async with httpx.AsyncClient(base_url=config.url, headers=headers, timeout=config.timeout, limits=limits,
                                 transport=transport, trust_env=False, follow_redirects=False) as client:
        ticker = asyncio.create_task(reporter())
        try:
            await asyncio.gather(*(worker(client) for _ in range(config.concurrency)))
        finally:
            ticker.cancel()
    wall = time.perf_counter() - start
    if on_progress is not None:
        on_progress(progress(final=True))
    return summarize(config, run.results, wall)


def _stats(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"p{q}": percentile(values, q) for q in qs}
    out["mean"] = sum(values) / len(values) if values else None
    out["max"] = max(values) if values else None
    return out


def summarize(config: LoadConfig, results: Sequence[RequestResult], wall: float) -> dict[str, Any]:
    """The run's summary as a JSON-serialisable dict."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    errors = Counter(r.error or "unknown" for r in failed)
    examples: dict[str, str] = {}
    for r in failed:
        examples.setdefault(r.error or "unknown", r.detail)
    tokens = sum(r.tokens for r in ok)
    total = len(results)
    return {
        "settings": config.settings(),
        "requests": total,
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_count": len(failed),
        "error_rate": len(failed) / total if total else 0.0,
        "error_examples": dict(sorted(examples.items())),
        "wall_s": wall,
        "requests_per_s": total / wall if wall > 0 else 0.0,
        "ok_per_s": len(ok) / wall if wall > 0 else 0.0,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "latency_s": _stats([r.latency for r in ok], (50, 90, 99)),
        "ttft_s": _stats([r.ttft for r in ok if r.ttft is not None], (50, 99)) if config.streaming else None,
    }


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f} s"


def report(summary: dict[str, Any], stream: TextIO) -> None:
    """Write the summary as a human-readable table to `stream`."""
    s = summary["settings"]
    run_for = f"{s['requests']} requests" if s["requests"] is not None else f"{s['duration_s']:g} s"
    rows: list[tuple[str, str]] = [
        ("target", f"POST {s['url'].rstrip('/')}{s['path']}" + (" (stream)" if s["stream"] else "")),
        ("settings", f"concurrency {s['concurrency']}, {run_for}, max_new_tokens {s['max_new_tokens']}, "
                     f"timeout {s['timeout_s']:g} s, seed {s['seed']}"),
        ("prompts", f"{s['prompt_count']} from {s['prompts']}" + (", with API key" if s["api_key"] else "")),
        ("requests", str(summary["requests"])),
        ("ok", str(summary["ok"])),
        ("errors", f"{summary['error_count']} ({summary['error_rate']:.1%})"),
    ]
    for key, n in summary["errors"].items():
        example = summary["error_examples"].get(key, "")
        rows.append((f"  {key}", f"{n}" + (f"  e.g. {example}" if example else "")))
    rows += [
        ("wall time", f"{summary['wall_s']:.3f} s"),
        ("requests/s", f"{summary['requests_per_s']:.2f} (ok {summary['ok_per_s']:.2f})"),
        ("generated tokens", str(summary["generated_tokens"])),
        ("tokens/s", f"{summary['tokens_per_s']:.1f}"),
    ]
    lat = summary["latency_s"]
    rows += [(f"latency {k}", _fmt_s(lat[k])) for k in ("p50", "p90", "p99", "mean", "max")]
    if summary["ttft_s"] is not None:
        rows += [(f"ttft {k}", _fmt_s(summary["ttft_s"][k])) for k in ("p50", "p99")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        stream.write(f"{k.ljust(width)}  {v}\n")


class ProgressLine:
    """Writes `Progress` as one line rewritten in place (`\\r`) on `stream`; a newline at the end."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.width = 0

    def __call__(self, p: Progress) -> None:
        if p.total is not None:
            head = f"{p.done}/{p.total} done"
        else:
            head = f"{p.done} done, {min(p.elapsed, p.duration or 0):.1f}/{p.duration:g} s"
        line = f"[loadtest] {head}, {p.errors} errors, {p.rate:.1f} req/s"
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line.ljust(self.width) + ("\n" if p.final else ""))
        self.stream.flush()


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description="Load-test a gpt2-serve server.")
    p.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=ENDPOINTS, default="generate",
                   help="generate (default), generate_stream, classify or completions (OpenAI /v1/completions)")
    p.add_argument("--stream", action="store_true",
                   help="streaming variant: generate -> /generate_stream, completions -> \"stream\": true")
    p.add_argument("--concurrency", type=_positive_int, default=4,
                   help=f"workers (default 4, at most {MAX_CONCURRENCY})")
    run_for = p.add_mutually_exclusive_group()
    run_for.add_argument("--requests", type=_positive_int, default=None,
                         help=f"requests to send (default 100; at most {HARD_CAP_REQUESTS})")
    run_for.add_argument("--duration", type=_positive_float, default=None,
                         help=f"seconds to keep starting requests (at most {MAX_DURATION_S:g})")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32,
                   help="max_new_tokens / max_tokens per request (default 32)")
    p.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line (default: built-in)")
    p.add_argument("--json", type=Path, default=None, dest="json_out", metavar="OUT",
                   help="also write the summary here, as JSON")
    p.add_argument("--api-key", default=os.environ.get("API_KEY") or None,
                   help="sent as 'Authorization: Bearer KEY' (default: $API_KEY)")
    p.add_argument("--max-error-rate", type=_rate, default=0.0,
                   help="exit 1 when errors / requests is above this (default 0)")
    p.add_argument("--timeout", type=_positive_float, default=120.0,
                   help="seconds per request, whole request (default 120)")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of prompts (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LoadConfig:
    """Validate the parsed flags into a `LoadConfig` (argument errors exit 2 via `parser.error`)."""
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        parser.error(f"--url must be an http(s) URL, got {args.url!r}")
    if args.requests is None and args.duration is None:
        args.requests = 100
    if args.requests is not None and args.requests > HARD_CAP_REQUESTS:
        parser.error(f"--requests is capped at {HARD_CAP_REQUESTS}")
    if args.duration is not None and args.duration > MAX_DURATION_S:
        parser.error(f"--duration is capped at {MAX_DURATION_S:g} s")
    if args.concurrency > MAX_CONCURRENCY:
        parser.error(f"--concurrency is capped at {MAX_CONCURRENCY}")
    if args.stream and args.endpoint == "classify":
        parser.error("--stream does not apply to --endpoint classify")
    if args.json_out is not None and not args.json_out.resolve().parent.is_dir():
        parser.error(f"--json: no folder {args.json_out.resolve().parent}")
    prompts, source = DEFAULT_PROMPTS, "built-in"
    if args.prompts is not None:
        try:
            lines = args.prompts.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--prompts: cannot read {args.prompts}: {e}")
        prompts = tuple(line for line in lines if line.strip())
        if not prompts:
            parser.error(f"--prompts: {args.prompts} has no non-empty lines")
        source = str(args.prompts)
    return LoadConfig(url=args.url.rstrip("/"), endpoint=args.endpoint, stream=args.stream,
                      concurrency=args.concurrency, requests=args.requests, duration=args.duration,
                      max_new_tokens=args.max_new_tokens, prompts=prompts, prompts_source=source,
                      api_key=args.api_key, timeout=args.timeout, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    try:
        summary = asyncio.run(run_load(config, None if args.quiet else ProgressLine(sys.stderr)))
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    report(summary, sys.stdout)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0 if summary["error_rate"] <= args.max_error_rate else 1


if __name__ == "__main__":
    sys.exit(main())
