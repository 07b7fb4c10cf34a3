"""Issue 7 performance targets, measured through the HTTP API against transformers `generate`.

    python -m bench.targets single      [--precisions fp32,int8] [--prompt-tokens 32] [--new-tokens 64]
    python -m bench.targets concurrency [--precisions fp32] [--streams 32] [--duration 40]
    python -m bench.targets ttft        [--precisions fp32,int8] [--ttft-tokens 512]
    python -m bench.targets startup
    python -m bench.targets all         # the four above, in that order
    python -m bench.targets report      # only re-render BENCHMARKS.md and the plot from the saved JSONs
    common options: [--checkpoint DIR] [--repeats 3] [--per-round 3] [--threads 2] [--update-md]

Targets (ours / transformers, both on `--threads` cores, greedy, the same prompt token ids):
  single       single-stream decode tok/s over /generate_stream, 32-token prompt, 64 new tokens:
               fp32 >= 1.25x, int8 >= 2.3x. Ours: (n - 1) / (last token - first token) from the
               SSE event times, and n / (last token - request sent). transformers: 63 / (t(generate 64)
               - t(generate 1)), and 64 / t(generate 64).
  concurrency  32 streams (no transformers): "burst" (32 at once), "closed loop" (32 workers back to
               back for --duration s) and "long prompt" (31 running, one --ttft-tokens prompt arrives
               once each has a quarter of its tokens). Aggregate tok/s / single-stream tok/s >= 6x;
               p99 inter-token gap / single-stream median gap < 3x; burst time to first token p50 /
               closed-loop p50 <= 2x (issue 13).
  ttft         time to first token of a --ttft-tokens (512) prompt, batch 1: ours / t(generate 1) <= 0.8.
  startup      `python -m app` with the demo models and a cached export: launch to the first /health
               200 (polled every 50 ms) < 5 s; the server process must not map libtorch. Also RSS.

Our server runs as a subprocess (`python -m app`, ONNX export cache in bench/.cache/onnx) on a free
port; transformers runs in this process, only while the server is stopped, so they never share the
cores. Each of `--repeats` rounds measures every server precision and then transformers (the
machine's speed drifts, so systems are interleaved); reported values are medians over rounds, each
round's value the median of `--per-round` requests after a warm-up. Default checkpoint: the GPT-2
124M-shaped random-weight checkpoint of bench/server_bench.py; random weights rarely emit EOS, and
a stream that stops early is logged and counted in the JSON.

Each target writes bench/results/targets_<name>.json and prints its table; `--update-md` renders
every bench/results/targets_*.json into BENCHMARKS.md (between `<!-- targets:start -->` and
`<!-- targets:end -->`) and draws bench/results/targets.png when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_info
from bench.export_bench import CACHE, REPO, RESULTS
from bench.report import replace_section
from bench.server_bench import _checkpoint_with_tokenizer, _start, _stop
from loadtest.run import percentile

logger = logging.getLogger(__name__)

TARGET_NAMES = ("single", "concurrency", "ttft", "startup")
DEFAULT_PRECISIONS = {"single": "fp32,int8", "concurrency": "fp32", "ttft": "fp32,int8"}
SINGLE_TARGET = {"fp32": 1.25, "int8": 2.3}  # ours / transformers decode tok/s, at least
AGGREGATE_TARGET = 6.0  # aggregate tok/s at `--streams` / single-stream tok/s, at least
ITL_TARGET = 3.0  # p99 inter-token gap / single-stream median gap, below
BURST_TTFT_TARGET = 2.0  # burst time to first token p50 / closed-loop p50, at most (issue 13)
TTFT_TARGET = 0.8  # ours / transformers time to first token, at most
STARTUP_TARGET_S = 5.0  # launch to first /health 200, below
ONNX_CACHE = CACHE / "onnx"  # shared with bench.server_bench: exports are keyed by checkpoint hash
HEALTH_POLL_S = 0.05
TORCH_MARKERS = ("libtorch", "/torch/lib/", "/torch/_C")
# Common words that are one GPT-2 token each with a leading space; prompts are cut from this cycle.
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "small", "birds", "sing",
         "in", "tall", "green", "trees", "near", "an", "old", "stone", "house", "by", "the", "river", "and",
         "children", "play", "with", "their", "friends", "on", "warm", "summer", "days", "before", "going", "home",
         "for", "dinner", "with", "family", "who", "tell", "long", "stories", "about", "people", "they", "met",
         "in", "many", "different", "cities", "around", "the", "world")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t, "==": lambda v, t: v == t}


# ---- prompts ---------------------------------------------------------------------------------
def prompt_text(tokenizer: Any, n_tokens: int, variant: int = 0) -> str:
    """A text that the checkpoint's tokenizer encodes to exactly `n_tokens` tokens; `variant`
    rotates the word cycle so concurrent streams do not send identical prompts."""
    words = [w for w in WORDS if len(tokenizer.encode(" " + w)) == 1]
    start = (variant * 7) % len(words)
    text = "".join(" " + words[(start + i) % len(words)] for i in range(n_tokens))
    n = len(tokenizer.encode(text))
    if n != n_tokens:
        raise RuntimeError(f"prompt of {n_tokens} words encodes to {n} tokens")
    return text


def _check_server_tokens(url: str, text: str, n_tokens: int) -> None:
    r = httpx.post(url + "/tokenize", json={"inputs": text}, timeout=60, trust_env=False)
    r.raise_for_status()
    if len(r.json()) != n_tokens:
        raise RuntimeError(f"the server tokenizes the {n_tokens}-token prompt to {len(r.json())} tokens")


# ---- our server ------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    info: dict[str, Any]


SERVER_INFO: dict[str, Any] = {}  # /generation of /info per precision, for the record of the current target


@contextlib.contextmanager
def serve(ckpt: Path, precision: str, args: argparse.Namespace) -> Iterator[Server]:
    """`python -m app` on `ckpt` at `precision`, healthy on entry, stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    longest = max(512, args.ttft_tokens, args.prompt_tokens)
    env = {"MODEL_PATH": str(ckpt), "CLASSIFIER_PATH": "", "ONNX_CACHE_DIR": str(ONNX_CACHE), "HOST": "127.0.0.1",
           "PORT": str(port), "NUM_THREADS": str(args.threads), "PRECISION": precision, "LOG_LEVEL": "WARNING",
           "MAX_CONCURRENT_REQUESTS": "256", "MAX_BATCH_SIZE": str(max(32, args.streams)),
           "MAX_INPUT_TOKENS": str(longest), "MAX_TOTAL_TOKENS": str(max(1024, longest + args.new_tokens + 1))}
    env.update(args.server_env)
    t = time.perf_counter()
    proc = _start([sys.executable, "-m", "app"], env, url, RESULTS / f"targets_server_{precision}.log",
                  cwd=args.server_repo)
    try:
        info = httpx.get(url + "/info", timeout=30, trust_env=False).json()
        gen = info.get("generation") or {}
        SERVER_INFO[precision] = gen
        logger.info("server %s up in %.1f s: backend %s, precision %s, cache hit %s", precision,
                    time.perf_counter() - t, gen.get("backend"), gen.get("precision"), gen.get("export_cache_hit"))
        if gen.get("fallback_reason") or gen.get("precision") != precision:
            logger.warning("server is not serving %s on ONNX Runtime: %s", precision, gen)
        yield Server(url, proc, info)
    finally:
        _stop(proc)


def _client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections + 8, max_keepalive_connections=connections + 8)
    return httpx.AsyncClient(base_url=url, timeout=900, limits=limits, trust_env=False, follow_redirects=False)


@dataclass
class Trace:
    """One /generate_stream request: when it was sent and when each token event arrived."""

    sent: float
    times: list[float] = field(default_factory=list)
    generated_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in pairwise(self.times)]

    @property
    def decode_tok_s(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    @property
    def e2e_tok_s(self) -> float:
        return len(self.times) / (self.times[-1] - self.sent)


async def stream(client: httpx.AsyncClient, text: str, new_tokens: int,
                 on_token: Callable[[int], None] | None = None) -> Trace:
    """Greedy /generate_stream of `new_tokens`, timing every token event on arrival."""
    body = {"inputs": text, "parameters": {"max_new_tokens": new_tokens, "do_sample": False, "stop": [],
                                           "details": True}}
    tr = Trace(time.perf_counter())
    async with client.stream("POST", "/generate_stream", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"/generate_stream answered {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue
            ev = json.loads(line[5:])
            if "error" in ev:
                raise RuntimeError(f"in-band stream error: {ev}")
            if ev.get("token") is not None:
                tr.times.append(now)
                if on_token is not None:
                    on_token(len(tr.times))
            if ev.get("details") is not None:
                tr.generated_tokens = ev["details"]["generated_tokens"]
                tr.finish_reason = ev["details"]["finish_reason"]
    if tr.finish_reason is None or not tr.times:
        raise RuntimeError("stream ended without its final event")
    return tr


def _short(traces: Sequence[Trace], new_tokens: int) -> int:
    """How many streams stopped before `new_tokens` (EOS); logged, since it skews the rates."""
    short = [t for t in traces if len(t.times) != new_tokens]
    if short:
        lengths = ", ".join(str(n) for n in sorted({len(t.times) for t in short}))
        reasons = ", ".join(sorted({str(t.finish_reason) for t in short}))
        logger.warning("%d of %d streams stopped before %d tokens (after %s tokens; %s)", len(short), len(traces),
                       new_tokens, lengths, reasons)
    return len(short)


def _run(coro_fn: Callable[[httpx.AsyncClient], Awaitable[Any]], url: str, connections: int) -> Any:
    async def go() -> Any:
        async with _client(url, connections) as client:
            return await coro_fn(client)

    return asyncio.run(go())


# ---- transformers ----------------------------------------------------------------------------
class HFGenerate:
    """transformers `GPT2LMHeadModel.generate`, greedy, never stopping early, in this process."""

    def __init__(self, ckpt: Path, threads: int) -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
        self.eos = self.model.config.eos_token_id

    def time_generate(self, ids: list[int], new_tokens: int) -> float:
        """Seconds for one `generate` of exactly `new_tokens` tokens after `ids`."""
        x = self.torch.tensor([ids], dtype=self.torch.long)
        mask = self.torch.ones_like(x)
        with self.torch.inference_mode():
            t = time.perf_counter()
            out = self.model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.eos)
            dt = time.perf_counter() - t
        if out.shape[1] != len(ids) + new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - len(ids)} tokens, not {new_tokens}")
        return dt

    def median_time(self, ids: list[int], new_tokens: int, n: int) -> float:
        return statistics.median(self.time_generate(ids, new_tokens) for _ in range(n))


_HF: dict[tuple[Path, int], HFGenerate] = {}


def hf_model(ckpt: Path, threads: int) -> HFGenerate:
    """One loaded transformers model per checkpoint for the whole run (`all` reuses it)."""
    if (ckpt, threads) not in _HF:
        _HF[(ckpt, threads)] = HFGenerate(ckpt, threads)
    return _HF[(ckpt, threads)]


# ---- helpers ---------------------------------------------------------------------------------
def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else float(f"{v:.{digits}g}")


def row(system: str, metric: str, measured: Any, baseline: float | None = None, baseline_label: str = "",
        ratio: float | None = None, target: Any = None, op: str | None = None, unit: str = "",
        label: str = "") -> dict[str, Any]:
    """One table row; `passed` is judged on the ratio when there is one, else on `measured`.
    `label` is the bar's short name in the plot."""
    subject = ratio if ratio is not None else measured
    passed = None if target is None or op is None or subject is None else bool(OPS[op](subject, target))
    if isinstance(measured, float):
        measured = _round(measured)
    return {"system": system, "metric": metric, "measured": measured, "unit": unit, "baseline": _round(baseline),
            "baseline_label": baseline_label, "ratio": _round(ratio, 3), "target": target, "op": op,
            "passed": passed, "label": label or metric}


def _precisions(args: argparse.Namespace, target: str) -> list[str]:
    return (args.precisions or DEFAULT_PRECISIONS[target]).split(",")


def _n_positions(ckpt: Path) -> int:
    return int(json.loads((ckpt / "config.json").read_text())["n_positions"])


def _need_context(ckpt: Path, prompt: int, new: int, what: str) -> None:
    n = _n_positions(ckpt)
    if prompt + new > n:
        raise SystemExit(f"{what}: {prompt} prompt + {new} new tokens exceed {ckpt.name}'s context of {n}; "
                         f"use shorter --prompt-tokens / --ttft-tokens / --new-tokens")


def _tokenizer(ckpt: Path) -> Any:
    from model.tokenizer import GPT2Tokenizer

    return GPT2Tokenizer.from_dir(ckpt)


# ---- target: single-stream decode ------------------------------------------------------------
def run_single(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    new, precisions = args.new_tokens, _precisions(args, "single")
    _need_context(ckpt, args.prompt_tokens, new, "single")
    tok = _tokenizer(ckpt)
    text = prompt_text(tok, args.prompt_tokens)
    ids = tok.encode(text)
    ours: dict[str, list[dict[str, Any]]] = {p: [] for p in precisions}
    hf_rounds: list[dict[str, float]] = []
    for r in range(args.repeats):
        for prec in precisions:
            logger.info("single round %d/%d: ours %s", r + 1, args.repeats, prec)
            with serve(ckpt, prec, args) as srv:
                _check_server_tokens(srv.url, text, args.prompt_tokens)

                async def measure(client: httpx.AsyncClient) -> list[Trace]:
                    await stream(client, text, new)  # warm-up
                    return [await stream(client, text, new) for _ in range(args.per_round)]

                traces = _run(measure, srv.url, 1)
            ours[prec].append({"decode_tok_s": statistics.median(t.decode_tok_s for t in traces),
                               "e2e_tok_s": statistics.median(t.e2e_tok_s for t in traces),
                               "ttft_s": statistics.median(t.ttft for t in traces),
                               "short_streams": _short(traces, new)})
            logger.info("ours %s: %s", prec, ours[prec][-1])
        logger.info("single round %d/%d: transformers", r + 1, args.repeats)
        hf = hf_model(ckpt, args.threads)
        hf.time_generate(ids, 2)  # warm-up: prefill and one step
        gen_new = hf.median_time(ids, new, args.per_round)
        gen_1 = hf.median_time(ids, 1, args.per_round)
        hf_rounds.append({"generate_new_s": gen_new, "generate_1_s": gen_1,
                          "decode_tok_s": (new - 1) / (gen_new - gen_1), "e2e_tok_s": new / gen_new})
        logger.info("transformers: %s", hf_rounds[-1])

    hf_decode = _median([h["decode_tok_s"] for h in hf_rounds])
    hf_e2e = _median([h["e2e_tok_s"] for h in hf_rounds])
    rows = []
    for prec in precisions:
        target = SINGLE_TARGET.get(prec)
        decode = _median([o["decode_tok_s"] for o in ours[prec]])
        e2e = _median([o["e2e_tok_s"] for o in ours[prec]])
        rows.append(row(f"ours {prec}", f"decode tok/s ({new - 1} steps after the first token)", decode, hf_decode,
                        f"transformers, {new - 1} / (t(gen {new}) - t(gen 1))", decode / hf_decode, target,
                        ">=", "tok/s", f"{prec} decode"))
        rows.append(row(f"ours {prec}", f"end-to-end tok/s ({new} tokens incl. prefill)", e2e, hf_e2e,
                        f"transformers, {new} / t(gen {new})", e2e / hf_e2e, target, ">=", "tok/s",
                        f"{prec} end-to-end"))
    short = sum(o["short_streams"] for runs in ours.values() for o in runs)
    notes = [f"{short} measured streams stopped before {new} tokens"] if short else []
    return {"settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": new, "precisions": precisions},
            "rows": rows, "notes": notes, "rounds": {"ours": ours, "transformers": hf_rounds}}


# ---- target: concurrency ---------------------------------------------------------------------
def _itl(gaps: Sequence[float]) -> dict[str, float | None]:
    return {"p50_s": percentile(gaps, 50), "p99_s": percentile(gaps, 99), "max_s": max(gaps) if gaps else None,
            "n": len(gaps)}


async def _single_stream(client: httpx.AsyncClient, text: str, new: int, n: int) -> dict[str, Any]:
    await stream(client, text, new)  # warm-up
    t0 = time.perf_counter()
    traces = [await stream(client, text, new) for _ in range(n)]
    wall = traces[-1].times[-1] - t0
    gaps = [g for t in traces for g in t.gaps]
    return {"tok_s": sum(len(t.times) for t in traces) / wall, "itl": _itl(gaps), "short": _short(traces, new)}


async def _burst(client: httpx.AsyncClient, texts: Sequence[str], new: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    traces = await asyncio.gather(*(stream(client, t, new) for t in texts))
    wall = max(t.times[-1] for t in traces) - t0
    gaps = [g for t in traces for g in t.gaps]
    return {"tok_s": sum(len(t.times) for t in traces) / wall, "wall_s": wall, "itl": _itl(gaps),
            "ttft_p50_s": percentile([t.ttft for t in traces], 50), "short": _short(traces, new)}


async def _closed_loop(client: httpx.AsyncClient, texts: Sequence[str], new: int, duration: float) -> dict[str, Any]:
    """`len(texts)` workers send back to back until `duration`; tokens and gaps are counted in
    [start, start + duration], so the drain of the last requests is left out."""
    traces: list[Trace] = []
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker(i: int) -> None:
        k = 0
        while time.perf_counter() < deadline:
            traces.append(await stream(client, texts[(i + k) % len(texts)], new))
            k += 1

    await asyncio.gather(*(worker(i) for i in range(len(texts))))
    tokens = sum(1 for t in traces for x in t.times if x <= deadline)
    gaps = [b - a for t in traces for a, b in pairwise(t.times) if b <= deadline]
    ttfts = [t.ttft for t in traces if t.times[0] <= deadline]
    return {"tok_s": tokens / duration, "requests": len(traces), "itl": _itl(gaps), "short": _short(traces, new),
            "ttft_p50_s": percentile(ttfts, 50)}


async def _long_prompt(client: httpx.AsyncClient, texts: Sequence[str], long_text: str, new: int) -> dict[str, Any]:
    """`len(texts)` streams run; once each has a quarter of its tokens the long prompt is sent.
    Gaps of the running streams that overlap its prefill (send to first token) are the stall."""
    progress = [0] * len(texts)
    trigger = asyncio.Event()

    def advance(i: int, n: int) -> None:
        progress[i] = n
        if min(progress) >= max(1, new // 4):
            trigger.set()

    async def running(i: int) -> Trace:
        try:
            return await stream(client, texts[i], new, lambda n: advance(i, n))
        finally:
            advance(i, new)  # a stream that ends (even early or failing) no longer holds the trigger back

    tasks = [asyncio.ensure_future(running(i)) for i in range(len(texts))]
    await trigger.wait()
    long_tr = await stream(client, long_text, new)
    traces = await asyncio.gather(*tasks)
    a0, a1 = long_tr.sent, long_tr.times[0]
    during = [b - a for t in traces for a, b in pairwise(t.times) if b > a0 and a < a1]
    still = sum(t.times[-1] > a1 for t in traces)
    if still < len(traces):
        logger.warning("only %d of %d streams were still decoding when the long prefill ended", still, len(traces))
    return {"itl": _itl([g for t in traces for g in t.gaps]), "during_prefill": _itl(during),
            "long_ttft_s": long_tr.ttft, "running_at_prefill_end": still, "short": _short(traces, new)}


def run_concurrency(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    new, n, precisions = args.new_tokens, args.streams, _precisions(args, "concurrency")
    _need_context(ckpt, args.prompt_tokens, new, "concurrency")
    _need_context(ckpt, args.ttft_tokens, new, "concurrency (long prompt)")
    tok = _tokenizer(ckpt)
    texts = [prompt_text(tok, args.prompt_tokens, i) for i in range(n)]
    long_text = prompt_text(tok, args.ttft_tokens, n)
    rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in precisions}
    for r in range(args.repeats):
        for prec in precisions:
            with serve(ckpt, prec, args) as srv:
                _check_server_tokens(srv.url, texts[0], args.prompt_tokens)
                _check_server_tokens(srv.url, long_text, args.ttft_tokens)
                res: dict[str, Any] = {}
                for name, fn in (
                    ("single", lambda c: _single_stream(c, texts[0], new, args.per_round)),
                    ("burst", lambda c: _burst(c, texts, new)),
                    ("closed_loop", lambda c: _closed_loop(c, texts, new, args.duration)),
                    ("long_prompt", lambda c: _long_prompt(c, texts[: n - 1], long_text, new)),
                ):
                    logger.info("concurrency round %d/%d, %s: %s", r + 1, args.repeats, prec, name)
                    res[name] = _run(fn, srv.url, n)
                    logger.info("%s: %s", name, res[name])
            rounds[prec].append(res)

    def med(prec: str, *path: str) -> float | None:
        vals = []
        for res in rounds[prec]:
            v: Any = res
            for p in path:
                v = v[p]
            vals.append(v)
        return _median(vals)

    rows = []
    for prec in precisions:
        single_tok_s, single_itl = med(prec, "single", "tok_s"), med(prec, "single", "itl", "p50_s")
        one = "ours, 1 stream"
        for name, label, tag in (("burst", f"burst of {n}", "burst"), ("closed_loop", f"closed loop, {n} workers",
                                                                        "closed loop")):
            agg, p99 = med(prec, name, "tok_s"), med(prec, name, "itl", "p99_s")
            rows.append(row(f"ours {prec}", f"{label}: aggregate tok/s", agg, single_tok_s, one + " tok/s",
                            agg / single_tok_s, AGGREGATE_TARGET, ">=", "tok/s", f"{prec} {tag}\naggregate"))
            rows.append(row(f"ours {prec}", f"{label}: p99 inter-token gap (ms)", 1000 * p99, 1000 * single_itl,
                            one + " median gap (ms)", p99 / single_itl, ITL_TARGET, "<", "ms",
                            f"{prec} {tag}\np99 gap"))
        burst_ttft, loop_ttft = med(prec, "burst", "ttft_p50_s"), med(prec, "closed_loop", "ttft_p50_s")
        if burst_ttft is not None and loop_ttft:
            rows.append(row(f"ours {prec}", f"burst of {n}: time to first token p50 (s)", burst_ttft, loop_ttft,
                            f"closed loop, {n} workers: TTFT p50 (s)", burst_ttft / loop_ttft, BURST_TTFT_TARGET,
                            "<=", "s", f"{prec} burst\nTTFT p50"))
        p99 = med(prec, "long_prompt", "itl", "p99_s")
        stall = med(prec, "long_prompt", "during_prefill", "max_s")
        rows.append(row(f"ours {prec}", f"{n - 1} streams + one {args.ttft_tokens}-token prompt: p99 gap (ms)",
                        1000 * p99, 1000 * single_itl, one + " median gap (ms)", p99 / single_itl, ITL_TARGET, "<",
                        "ms", f"{prec} long prompt\np99 gap"))
        if stall is not None:
            rows.append(row(f"ours {prec}", f"  the same: max gap while the {args.ttft_tokens}-token prefill runs "
                            "(ms)", 1000 * stall, 1000 * single_itl, one + " median gap (ms)", stall / single_itl,
                            ITL_TARGET, "<", "ms", f"{prec} long prompt\nmax gap in prefill"))
    short = sum(res[w]["short"] for runs in rounds.values() for res in runs for w in res)
    notes = ["no transformers comparison: the targets are against our own single-stream run"]
    if short:
        notes.append(f"{short} streams stopped before {new} tokens")
    return {"settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": new, "streams": n,
                         "duration_s": args.duration, "long_prompt_tokens": args.ttft_tokens,
                         "single_stream_requests": args.per_round, "precisions": precisions},
            "rows": rows, "notes": notes, "rounds": rounds}


# ---- target: time to first token ------------------------------------------------------------
def run_ttft(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    n, precisions = args.ttft_tokens, _precisions(args, "ttft")
    _need_context(ckpt, n, 1, "ttft")
    tok = _tokenizer(ckpt)
    text = prompt_text(tok, n)
    ids = tok.encode(text)
    ours: dict[str, list[float]] = {p: [] for p in precisions}
    hf_rounds: list[float] = []
    for r in range(args.repeats):
        for prec in precisions:
            logger.info("ttft round %d/%d: ours %s", r + 1, args.repeats, prec)
            with serve(ckpt, prec, args) as srv:
                _check_server_tokens(srv.url, text, n)

                async def measure(client: httpx.AsyncClient) -> list[Trace]:
                    for _ in range(2):  # warm-up
                        await stream(client, text, 1)
                    return [await stream(client, text, 1) for _ in range(args.per_round)]

                ours[prec].append(statistics.median(t.ttft for t in _run(measure, srv.url, 1)))
            logger.info("ours %s: ttft %.4f s", prec, ours[prec][-1])
        logger.info("ttft round %d/%d: transformers", r + 1, args.repeats)
        hf = hf_model(ckpt, args.threads)
        for _ in range(2):  # warm-up
            hf.time_generate(ids, 1)
        hf_rounds.append(hf.median_time(ids, 1, args.per_round))
        logger.info("transformers: generate(max_new_tokens=1) %.4f s", hf_rounds[-1])
    hf_s = _median(hf_rounds)
    rows = []
    for prec in precisions:
        s = _median(ours[prec])
        rows.append(row(f"ours {prec}", f"time to first token, {n}-token prompt (ms)", 1000 * s, 1000 * hf_s,
                        "transformers, generate(max_new_tokens=1) (ms)", s / hf_s, TTFT_TARGET, "<=", "ms",
                        f"{prec} TTFT {n}"))
    return {"settings": {"prompt_tokens": n, "precisions": precisions}, "rows": rows, "notes": [],
            "rounds": {"ours": ours, "transformers": hf_rounds}}


# ---- target: startup -------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _status_mib(pid: int, key: str) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    return None


def torch_mappings(pid: int) -> list[str]:
    """Mapped files of process `pid` that belong to PyTorch (empty: torch is not imported)."""
    paths = {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
             if len(line.split(maxsplit=5)) == 6}
    return sorted(p for p in paths if any(m in p for m in TORCH_MARKERS))


def _launch(env: dict[str, str], url: str, log: Path, timeout: float = 900,
            cwd: Path = REPO) -> tuple[subprocess.Popen, float]:
    """Start `python -m app`; seconds from launch to the first /health 200, polled every 50 ms."""
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    with httpx.Client(base_url=url, timeout=2, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"python -m app exited: {log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if client.get("/health").status_code == 200:
                    return proc, time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                _stop(proc)
                raise RuntimeError("python -m app never became healthy")
            time.sleep(HEALTH_POLL_S)


def run_startup(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    del ckpt  # the demo models, as `make serve` starts them
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_PATH", "CLASSIFIER_PATH", "BACKEND", "DEVICE", "PRECISION", "API_KEY")}
    env.update({"ONNX_CACHE_DIR": str(ONNX_CACHE), "HOST": "127.0.0.1", "NUM_THREADS": str(args.threads),
                "LOG_LEVEL": "WARNING"})
    log = RESULTS / "targets_startup.log"
    starts: list[dict[str, Any]] = []
    for i in range(args.repeats + 1):  # start 0 makes sure the export cache exists; not counted
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc, seconds = _launch({**env, "PORT": str(port)}, url, log, cwd=args.server_repo)
        try:
            info = httpx.get(url + "/info", timeout=30, trust_env=False).json()
            with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:  # warm-up
                c.post("/generate", json={"inputs": "The computer", "parameters": {"max_new_tokens": 16}}
                       ).raise_for_status()
                if info.get("classification"):
                    c.post("/classify", json={"inputs": "The judge read the verdict."}).raise_for_status()
            pids = [proc.pid, *_children(proc.pid)]
            torch_maps = {str(p): m for p in pids if (m := torch_mappings(p))}
            start = {"seconds": seconds, "rss_mib": _status_mib(proc.pid, "VmRSS"),
                     "hwm_mib": _status_mib(proc.pid, "VmHWM"), "children": len(pids) - 1,
                     "torch_imported": bool(torch_maps), "torch_mappings": {p: m[:5] for p, m in torch_maps.items()},
                     "cache_hit": all((info.get(t) or {}).get("export_cache_hit", True)
                                      for t in ("generation", "classification")),
                     "backend": (info.get("generation") or {}).get("backend")}
        finally:
            _stop(proc)
        logger.info("start %d%s: %s", i, " (cache priming, not counted)" if i == 0 else "", start)
        starts.append(start)
    timed = starts[1:]
    if not all(s["cache_hit"] for s in timed):
        logger.warning("some timed starts missed the export cache: %s", [s["cache_hit"] for s in timed])
    torch_any = any(s["torch_imported"] for s in timed)
    rows = [row("ours (demo models)", "launch to first /health 200, cached export (s)",
                _median([s["seconds"] for s in timed]), target=STARTUP_TARGET_S, op="<", unit="s",
                label="launch to /health 200"),
            row("ours (demo models)", "torch imported by the server process", torch_any, target=False, op="=="),
            row("ours (demo models)", "RSS after warm-up (MiB)", _median([s["rss_mib"] for s in timed]), unit="MiB"),
            row("ours (demo models)", "peak RSS, VmHWM (MiB)", _median([s["hwm_mib"] for s in timed]), unit="MiB")]
    return {"settings": {"starts": args.repeats, "poll_s": HEALTH_POLL_S, "models": "demo (default MODEL_PATH, "
                         "CLASSIFIER_PATH)"}, "rows": rows, "notes": [], "rounds": starts}


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "single": run_single, "concurrency": run_concurrency, "ttft": run_ttft, "startup": run_startup}
TITLES = {"single": "Single-stream decode, ours / transformers",
          "concurrency": "Concurrent streams, against our own single stream",
          "ttft": "Time to first token, ours / transformers",
          "startup": "Startup with a cached export"}


# ---- reporting -------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def table(record: dict[str, Any]) -> str:
    """The markdown table of one target's record."""
    lines = ["| system | metric | measured | transformers / baseline | ratio | target | result |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in record["rows"]:
        base = "—" if r["baseline"] is None else f"{_fmt(r['baseline'])} ({r['baseline_label']})"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:g}×"
        unit = "×" if r["ratio"] is not None else (f" {r['unit']}" if r["unit"] else "")
        target = "—" if r["target"] is None else f"{r['op']} {_fmt(r['target'])}{unit}"
        result = {True: "pass", False: "**FAIL**", None: "—"}[r["passed"]]
        lines.append(f"| {r['system']} | {r['metric'].strip()} | {_fmt(r['measured'])} | {base} | {ratio} | "
                     f"{target} | {result} |")
    return "\n".join(lines)


def load_records(label: str | None = None) -> dict[str, dict[str, Any]]:
    """Every saved target record (with `label`: those saved under it), in the order of TARGET_NAMES."""
    out = {}
    suffix = f"_{label}" if label else ""
    for name in TARGET_NAMES:
        path = RESULTS / f"targets_{name}{suffix}.json"
        if path.is_file():
            out[name] = json.loads(path.read_text())
    return out


def _commit(repo: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def plot(records: dict[str, dict[str, Any]], path: Path) -> bool:
    """Bars of each row's ratio (or value, where there is no ratio) with its target as a line;
    False when matplotlib is not importable."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not importable: no %s", path.name)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, rec in records.items():
        rows = [r for r in rec["rows"] if isinstance(r["target"], (int, float)) and not isinstance(r["target"], bool)
                and (r["ratio"] is not None or isinstance(r["measured"], (int, float)))]
        if rows:
            panels.append((name, rows))
    if not panels:
        return False
    widths = [max(2, len(rows)) for _, rows in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.0 * sum(widths) + 3, 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (name, rows) in zip(axes[0], panels, strict=True):
        vals = [r["ratio"] if r["ratio"] is not None else r["measured"] for r in rows]
        colors = ["tab:green" if r["passed"] else "tab:red" for r in rows]
        xs = range(len(rows))
        ax.bar(xs, vals, color=colors, width=0.6)
        for x, r in zip(xs, rows, strict=True):
            ax.hlines(r["target"], x - 0.4, x + 0.4, colors="black", linestyles="--")
            ax.annotate(f"{r['op']} {r['target']:g}", (x, r["target"]), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=7)
        ax.set_xticks(list(xs), [(r.get("label") or r["metric"][:24]).replace("\n", " ") for r in rows],
                      rotation=50, ha="right", fontsize=7)
        ylabel = "ratio (x)" if rows[0]["ratio"] is not None else rows[0]["unit"]
        ax.set(title=TITLES.get(name, name), ylabel=ylabel)
        ax.title.set_fontsize(9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Issue 7 targets: bars green = pass, red = fail; dashed = target", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_md(records: dict[str, dict[str, Any]], md: Path = REPO / "BENCHMARKS.md",
              png: Path = RESULTS / "targets.png") -> None:
    """Write the `targets` section of `md` from every saved record, and the plot."""
    drew = plot(records, png)
    parts = ["Issue 7 targets, measured through the HTTP API (`bench/targets.py`). Our server runs as "
             "`python -m app`; transformers `generate` (greedy, never stopping early, the same prompt token ids) "
             "runs in the benchmark process only while the server is stopped. Values are medians over rounds "
             "that interleave the systems; the client shares the cores with the server."]
    before = load_records("before")
    for name in records:
        if name in before:
            b = before[name]
            parts.append(f"#### Before: {TITLES[name]} (server at commit `{b.get('server_commit')}`)\n\n"
                         f"Command: `{b['command']}`" + "".join(f"  \nNote: {n}" for n in b.get("notes", [])) +
                         f"\n\n{table(b)}")
    for name, rec in records.items():
        m = rec["machine"]
        settings = ", ".join(f"{k} {','.join(v) if isinstance(v, list) else v}" for k, v in rec["settings"].items())
        rounds = "" if name == "startup" else (f"; {rec.get('repeats')} round(s), each the median of "
                                               f"{rec.get('per_round')} timed requests per system after a warm-up")
        parts.append(f"#### After: {TITLES[name]}\n\nCommand: `{rec['command']}`  \nMachine: {m['cpu']}, {m['cores']} "
                     f"cores, {rec.get('threads')} threads; checkpoint `{rec.get('checkpoint')}`; {settings}"
                     f"{rounds}." + "".join(f"  \nNote: {n}" for n in rec.get("notes", [])) +
                     f"\n\n{table(rec)}")
    if drew:
        parts.append("![targets](bench/results/targets.png)")
    replace_section(md, "targets", "\n\n".join(parts) + "\n")
    logger.info("wrote the targets section of BENCHMARKS.md%s", " and targets.png" if drew else "")


# ---- CLI -------------------------------------------------------------------------------------
def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=(*TARGET_NAMES, "all", "report"))
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="generation checkpoint (default: the GPT-2 124M-shaped random one in bench/.cache)")
    p.add_argument("--precisions", default=None,
                   help="server precisions, comma-separated (default fp32,int8; concurrency: fp32)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (startup: timed starts); medians over them")
    p.add_argument("--per-round", type=int, default=3, help="timed requests (or generate calls) per system per round")
    p.add_argument("--threads", type=int, default=2, help="server NUM_THREADS and torch threads")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ttft-tokens", type=int, default=512, help="prompt of the ttft target and the long-prompt run")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--duration", type=float, default=40.0, help="closed-loop seconds")
    p.add_argument("--server-repo", type=Path, default=REPO,
                   help="checkout whose `python -m app` is served, e.g. a `git worktree` of an older commit")
    p.add_argument("--server-env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="extra server setting, e.g. PREFILL_CHUNK_TOKENS=32 (repeatable)")
    p.add_argument("--label", default=None,
                   help="save as targets_<name>_<label>.json (e.g. 'before'), rendered as its own table")
    p.add_argument("--update-md", action="store_true",
                   help="render every bench/results/targets_*.json into BENCHMARKS.md and targets.png")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.server_env = dict(args.server_env)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for k in ("repeats", "per_round", "threads", "prompt_tokens", "new_tokens", "ttft_tokens", "streams"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode rates need two tokens)")
    if args.streams < 2:
        p.error("--streams must be >= 2")
    if args.duration <= 0:
        p.error("--duration must be > 0")
    RESULTS.mkdir(parents=True, exist_ok=True)
    names = list(TARGET_NAMES) if args.target == "all" else [] if args.target == "report" else [args.target]
    if names and names != ["startup"]:
        ckpt = args.checkpoint.resolve() if args.checkpoint else _checkpoint_with_tokenizer()
        if not (ckpt / "config.json").is_file() or not (ckpt / "vocab.json").is_file():
            p.error(f"--checkpoint {ckpt}: needs config.json, vocab.json and merges.txt")
    else:
        ckpt = Path("model/demo/lm")
    cmd = ("python -m bench.targets " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    for name in names:
        logger.info("target %s", name)
        record = {"benchmark": "targets", "target": name, "command": cmd, "machine": machine_info(),
                  "checkpoint": str(ckpt.relative_to(REPO) if ckpt.is_relative_to(REPO) else ckpt)
                  if name != "startup" else "model/demo (default)",
                  "threads": args.threads, "repeats": args.repeats, "per_round": args.per_round,
                  **RUNNERS[name](args, ckpt)}
        if SERVER_INFO:
            record["server"] = dict(SERVER_INFO)
            SERVER_INFO.clear()
        if args.server_env:
            record["settings"]["server env"] = " ".join(f"{k}={v}" for k, v in args.server_env.items())
        if args.label:
            record["label"] = args.label
            record["server_commit"] = _commit(args.server_repo)
        suffix = f"_{args.label}" if args.label else ""
        (RESULTS / f"targets_{name}{suffix}.json").write_text(json.dumps(record, indent=2) + "\n")
        sys.stdout.write(f"\n## {TITLES[name]}\n\n{table(record)}\n")
        for note in record["notes"]:
            sys.stdout.write(f"\nNote: {note}\n")
        sys.stdout.flush()
    if args.update_md or args.target == "report":
        records = load_records()
        if not records:
            logger.error("no bench/results/targets_*.json to render")
            return 1
        update_md(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
