"""Automatic prefix caching: the same server with `PREFIX_CACHING=true` and `=false`, in
interleaved rounds, on workloads that share prompt prefixes and on ones that share nothing.

    python -m bench.prefix [--rounds 3] [--only choice,system,lm-eval,unshared,join] [--out FILE]
                           [--prefix-cache-mb MB] [--checkpoint DIR]
    python -m bench.prefix --quick      # smoke run on the tiny demo model (model/demo/lm), 1 round

Every round starts `python -m app` twice, cache on and cache off, each time fresh, and runs the
CTranslate2 anchor (the order of the three rotates from round to round). The same checkpoint
throughout: the GPT-2 124M-shaped random-weight one of bench/anchors.py
(~/.cache/gpt2-serve/checkpoints/gpt2-small), fp32, ONNX Runtime, NUM_THREADS=2.
Prompts are token ids drawn from seeded numpy generators (never the EOS id 50256); both servers of
a round get exactly the same ids, and no id list is sent twice to one server except where a
prefix is meant to be shared. Greedy (`temperature: 0`), `ignore_eos` on generating requests.

Workloads (`--only` picks them):
  choice    lm-eval style multiple-choice scoring: 12 questions x 4 endings, each context 150
            token ids and each ending 25. One POST /v1/completions per choice (`echo`,
            `logprobs: 1`, `max_tokens: 0`), the 4 choices of a question in order, as lm-eval
            sends them. Tokens scored per second (prompt tokens / wall) with 1 client, and with 8
            clients (httpx async) pulling the same ordered list. A fresh question set per pass,
            after one untimed warm-up pass of 2 questions at 8 clients. The logprobs of the cache-on
            and cache-off servers must agree within 1e-5 (asserted on the 1-client pass of the
            first round; the 8-client pass's difference, where batches differ, is printed).
            Anchor: CTranslate2 (the version bench/anchors.py pins; pip-installed there if missing)
            `Generator.score_batch` on the same ids, 8 sequences per call, float32,
            intra_threads=2, on a `ct2-transformers-converter` copy of the checkpoint (shared with
            bench/anchors.py), in a child process while no server runs. Targets: cache on >= 2.2x
            cache off, and >= 1.5x CTranslate2.
  system    a shared 400-token system prompt followed by distinct 20-token questions, 16 new tokens,
            streamed /v1/completions: time to first token (the first SSE chunk with text), median of
            10 questions sent one after another, after one warm-up request that puts the prefix in
            the cache. Target: on / off <= 0.3x.
  lm-eval   lm-evaluation-harness (the installed lm_eval, 0.4.13) `local-completions` as a CLI on
            tests/app/lm_eval_tasks' `gpt2serve_choice` task (4 questions x 3 choices), as
            tests/app/test_lm_eval.py runs it, against the same server (the bench's checkpoint, its
            folder as the tokenizer, max_length its n_positions); wall time of the whole CLI,
            most of which is lm-eval's own: the same CLI on lm-eval's `dummy` model (no server)
            runs once before the rounds, untimed but reported; it also warms the file cache and
            prepares the dataset, which the first timed run would otherwise pay.
  unshared  prompts with nothing in common (each request its own random ids): one-stream decode
            tok/s (32-token prompt, 64 new tokens, median of 2 after a warm-up), 32 streams at once
            (aggregate tok/s, after a warm-up burst), time to first token of a 512-token prompt
            (median of 3 after a warm-up). Target: cache on >= 0.97x off (TTFT: <= 1.03x).
  join      31 streams running (32-token prompts, 512 max tokens), then one more streamed request
            (32-token prompt, 8 tokens), 5 times, 0.5 s apart: its time to first token, and the
            median per-token gap of the 31 running streams between its send and its first token
            (and over the whole joining period, for comparison). Cache on only. The running
            streams are cancelled afterwards.

Run time: the request counts were kept small (3 rounds, 10 system-prompt questions, 2 one-stream
and 3 TTFT requests, 5 joins, CTranslate2 on 2 question sets) so that the default run takes about
10 minutes on 2 idle cores once the checkpoint, its ONNX export and the CTranslate2 conversion are
cached in ~/.cache/gpt2-serve (a first run adds a few minutes for those). The cores must be
otherwise idle: a run that shared them with a test suite measured 2-5x slower, unevenly. `--quick`
uses model/demo/lm (n_positions 256, so the system prompt is 200 tokens, the TTFT prompt 200 and
the running streams' max tokens 200; 5 questions, 3 joins) and 1 round: under 2 minutes.

Output: the markdown table (medians and ranges over rounds; the on/off ratio of the medians with
the range of the per-round ratios) with the CPU's lscpu model name and flags, the prefix-cache
counters from /metrics per workload, and the JSON record at `--out` (default
bench/results/prefix.json; with --quick only when --out is given). Server logs and lm-eval's output
go to ~/.cache/gpt2-serve/prefix-run. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.anchors import CACHE, CT2_VERSION, REPO, THREADS, setup_ctranslate2
from bench.common import machine_info
from bench.server_bench import _start, _stop
from bench.sizes import build_checkpoint
from bench.targets import _client, free_port

logger = logging.getLogger("bench.prefix")

EOS = 50256
WORKLOADS = ("choice", "system", "lm-eval", "unshared", "join")
MODES = ("on", "off")
TASKS = REPO / "tests" / "app" / "lm_eval_tasks"
LM_EVAL_TASK = "gpt2serve_choice"
DEMO_LM = REPO / "model" / "demo" / "lm"
WORK = CACHE / "prefix-run"  # server logs, lm-eval's output and its HF_HOME
LOGPROB_TOL = 1e-5
CT2_BATCH = 8
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
         "amx_int8")
# seed tags, so that every workload and pass draws its own ids
CHOICE, SYSTEM, UNSHARED, JOIN = 1, 2, 3, 4


@dataclass(frozen=True)
class Sizes:
    questions: int = 12
    endings: int = 4
    context: int = 150
    ending: int = 25
    warmup_questions: int = 2
    concurrency: int = 8
    system_prefix: int = 400
    system_question: int = 20
    system_new: int = 16
    system_questions: int = 10
    prompt: int = 32  # unshared and join prompts
    new: int = 64
    single_repeats: int = 2
    streams: int = 32
    ttft_tokens: int = 512
    ttft_repeats: int = 3
    join_running: int = 31
    join_running_max: int = 512
    join_new: int = 8
    joins: int = 5
    join_pause_s: float = 0.5


FULL = Sizes()
QUICK = Sizes(system_prefix=200, system_questions=5, ttft_tokens=200, join_running_max=200, joins=3)


# ---- machine ---------------------------------------------------------------------------------
def lscpu() -> dict[str, Any]:
    """The CPU's model name and the SIMD flags that matter to the kernels, from lscpu (else
    /proc/cpuinfo)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                             env={**os.environ, "LC_ALL": "C"}).stdout
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
    name, flags = fields.get("Model name"), fields.get("Flags", "").split()
    if name is None:
        name = machine_info()["cpu"]
    if not flags and Path("/proc/cpuinfo").is_file():
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    return {"model_name": name, "cpus": fields.get("CPU(s)", str(os.cpu_count())),
            "flags": [f for f in FLAGS if f in flags]}


# ---- prompts ---------------------------------------------------------------------------------
def rand_ids(n: int, *seed: int) -> list[int]:
    """`n` token ids from a numpy generator seeded by `seed`, never EOS (50256)."""
    return np.random.default_rng(list(seed)).integers(0, EOS, size=n).tolist()


def choice_set(sz: Sizes, rnd: int, pass_: int, questions: int) -> list[list[list[int]]]:
    """Questions, each its `endings` prompts (context + ending), for round `rnd` and pass `pass_`."""
    out = []
    for q in range(questions):
        context = rand_ids(sz.context, CHOICE, rnd, pass_, q)
        out.append([context + rand_ids(sz.ending, CHOICE, rnd, pass_, q, 1 + k) for k in range(sz.endings)])
    return out


# ---- the server ------------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    mode: str
    proc: subprocess.Popen
    info: dict[str, Any]


@contextlib.contextmanager
def serve(ckpt: Path, mode: str, args: argparse.Namespace) -> Iterator[Server]:
    """`python -m app` with PREFIX_CACHING on or off, healthy on entry, stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"MODEL_PATH": str(ckpt), "CLASSIFIER_PATH": "", "ONNX_CACHE_DIR": str(CACHE / "anchors-run" / "onnx"),
           "HOST": "127.0.0.1", "PORT": str(port), "NUM_THREADS": str(THREADS), "PRECISION": "fp32",
           "LOG_LEVEL": "WARNING", "MAX_CONCURRENT_REQUESTS": "256", "MAX_BATCH_SIZE": "32",
           "MAX_INPUT_TOKENS": "1023", "MAX_TOTAL_TOKENS": "1024",  # capped by the model's n_positions
           "PREFIX_CACHING": "true" if mode == "on" else "false"}
    if args.prefix_cache_mb is not None:
        env["PREFIX_CACHE_MB"] = str(args.prefix_cache_mb)
    t = time.perf_counter()
    proc = _start([sys.executable, "-m", "app"], env, url, WORK / f"server_{mode}.log", cwd=args.server_repo or REPO)
    try:
        info = httpx.get(url + "/info", timeout=30, trust_env=False).json()
        gen = info.get("generation") or {}
        logger.info("server cache %s up in %.1f s: backend %s, precision %s, prefix_caching %s", mode,
                    time.perf_counter() - t, gen.get("backend"), gen.get("precision"), gen.get("prefix_caching"))
        if gen.get("fallback_reason") or gen.get("precision") != "fp32":
            raise RuntimeError(f"the server is not serving fp32 on ONNX Runtime: {gen}")
        pc = gen.get("prefix_caching")
        if pc is None:
            logger.warning("/info has no prefix_caching: PREFIX_CACHING=%s is unconfirmed (see the /metrics counters "
                           "in the report; none at all: the server ignores it)", env["PREFIX_CACHING"])
        elif isinstance(pc, dict) and isinstance(pc.get("enabled"), bool) and pc["enabled"] != (mode == "on"):
            raise RuntimeError(f"asked PREFIX_CACHING={env['PREFIX_CACHING']}, /info says {pc}")
        yield Server(url, mode, proc, info)
    finally:
        _stop(proc)


def cache_counters(url: str) -> dict[str, float]:
    """The prefix cache's counters from /metrics (0 where the server has none)."""
    names = {"gpt2_prefix_cache_queries_total": "queries", "gpt2_prefix_cache_hits_total": "hits",
             "gpt2_prefix_cache_bytes": "bytes"}
    out = dict.fromkeys(names.values(), 0.0)
    for line in httpx.get(url + "/metrics", timeout=30, trust_env=False).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names and not line.startswith("#"):
            out[names[name]] += float(line.split()[-1])
    return out


# ---- requests --------------------------------------------------------------------------------
async def score(client: httpx.AsyncClient, ids: list[int]) -> list[float | None]:
    """The prompt's token logprobs (None for the first), scored without generating."""
    body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"/v1/completions answered {r.status_code}: {r.text[:300]}")
    lp = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    if len(lp) != len(ids):
        raise RuntimeError(f"{len(lp)} logprobs for a {len(ids)}-token prompt")
    return lp


@dataclass
class Stream:
    """One streamed /v1/completions: when it was sent, when each chunk with text came and how many
    tokens had been generated by then (continuous usage stats)."""

    sent: float
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def tokens(self) -> int:
        return self.counts[-1] if self.counts else 0

    def gaps(self, after: float = float("-inf"), before: float = float("inf")) -> list[float]:
        """Seconds per token between consecutive chunks, for chunk pairs that overlap (after, before)."""
        return [(tb - ta) / (cb - ca) for (ta, ca), (tb, cb) in pairwise(zip(self.times, self.counts, strict=True))
                if cb > ca and tb > after and ta < before]

    @property
    def decode_tok_s(self) -> float:
        return (self.counts[-1] - self.counts[0]) / (self.times[-1] - self.times[0])


async def stream(client: httpx.AsyncClient, ids: list[int], max_tokens: int, into: Stream | None = None) -> Stream:
    """Greedy streamed /v1/completions of `max_tokens` tokens (EOS ignored), timing each chunk."""
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    s = into or Stream(time.perf_counter())
    s.sent = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"/v1/completions answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            ev = json.loads(line[5:])
            if "error" in ev:
                raise RuntimeError(f"in-band stream error: {ev}")
            choices = ev.get("choices") or []
            if choices and (choices[0].get("text") or choices[0].get("finish_reason")):
                s.times.append(now)
                s.counts.append(ev["usage"]["completion_tokens"])
                s.finish_reason = choices[0].get("finish_reason") or s.finish_reason
    if not s.times or s.finish_reason is None:
        raise RuntimeError("the stream ended without text or a finish reason")
    return s


def run_async(url: str, connections: int, fn: Callable[[httpx.AsyncClient], Any]) -> Any:
    async def go() -> Any:
        async with _client(url, connections) as client:
            return await fn(client)

    return asyncio.run(go())


# ---- workload: multiple-choice scoring -------------------------------------------------------
async def score_in_order(client: httpx.AsyncClient, questions: list[list[list[int]]],
                         concurrency: int) -> tuple[float, list[list[float | None]]]:
    """Every choice of every question, in order, by `concurrency` clients pulling from one list;
    (prompt tokens per second, the logprobs of each choice)."""
    flat = [c for q in questions for c in q]
    out: list[list[float | None]] = [[] for _ in flat]
    todo = iter(enumerate(flat))

    async def worker() -> None:
        for i, ids in todo:  # one shared iterator: the next choice in lm-eval's order
            out[i] = await score(client, ids)

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(map(len, flat)) / (time.perf_counter() - t), out


def run_choice(url: str, sz: Sizes, rnd: int) -> tuple[dict[str, float], dict[str, list]]:
    async def go(client: httpx.AsyncClient) -> tuple[dict[str, float], dict[str, list]]:
        await score_in_order(client, choice_set(sz, rnd, 0, sz.warmup_questions), sz.concurrency)
        c1, lp1 = await score_in_order(client, choice_set(sz, rnd, 1, sz.questions), 1)
        c8, lp8 = await score_in_order(client, choice_set(sz, rnd, 2, sz.questions), sz.concurrency)
        return {"c1_tok_s": c1, "c8_tok_s": c8}, {"c1": lp1, "c8": lp8}

    return run_async(url, sz.concurrency, go)


def max_diff(a: list[list[float | None]], b: list[list[float | None]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)
               if x is not None and y is not None)


# ---- workload: shared system prompt ----------------------------------------------------------
def run_system(url: str, sz: Sizes, rnd: int) -> dict[str, float]:
    prefix = rand_ids(sz.system_prefix, SYSTEM, rnd, 0)

    async def go(client: httpx.AsyncClient) -> dict[str, float]:
        warm = await stream(client, prefix + rand_ids(sz.system_question, SYSTEM, rnd, 1), sz.system_new)
        ttfts = [(await stream(client, prefix + rand_ids(sz.system_question, SYSTEM, rnd, 2, i), sz.system_new)).ttft
                 for i in range(sz.system_questions)]
        return {"ttft_ms": 1000 * statistics.median(ttfts), "warmup_ttft_ms": 1000 * warm.ttft}

    return run_async(url, 1, go)


# ---- workload: lm-evaluation-harness ---------------------------------------------------------
def n_positions(ckpt: Path) -> int:
    return int(json.loads((ckpt / "config.json").read_text()).get("n_positions", 1024))


def _lm_eval(model: str, model_args: str | None) -> tuple[float, float]:
    """One `python -m lm_eval` CLI run of the choice task as tests/app/test_lm_eval.py runs it
    (offline, data paths relative to the task folder): (wall seconds, accuracy)."""
    out = Path(tempfile.mkdtemp(prefix="lm_eval_", dir=WORK))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(WORK / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, *(["--model_args", model_args] if model_args else []),
           "--tasks", LM_EVAL_TASK, "--include_path", str(TASKS), "--output_path", str(out)]
    try:
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"lm_eval exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        if "API request failed" in proc.stderr:
            raise RuntimeError("lm_eval retried a refused request: " + proc.stderr[-2000:])
        acc = json.loads(next(out.rglob("results_*.json")).read_text())["results"][LM_EVAL_TASK]["acc,none"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return wall, acc


def lm_eval_overhead() -> float:
    """lm-eval's own cost: the same CLI run on its `dummy` model (random answers, no server).
    Run once before the rounds, it also warms the file cache and prepares the dataset in HF_HOME,
    which the first timed run would otherwise pay."""
    return _lm_eval("dummy", None)[0]


def run_lm_eval(url: str, ckpt: Path) -> dict[str, float]:
    """`local-completions` against the server, the tokenizer from the checkpoint's folder."""
    name = httpx.get(url + "/v1/models", timeout=30, trust_env=False).json()["data"][0]["id"]
    wall, acc = _lm_eval("local-completions", f"model={name},base_url={url}/v1/completions,tokenizer={ckpt},"
                                              f"max_length={n_positions(ckpt)}")
    return {"wall_s": wall, "acc": acc}


# ---- workload: nothing shared ----------------------------------------------------------------
def run_unshared(url: str, sz: Sizes, rnd: int) -> dict[str, float]:
    def ids(n: int, *tag: int) -> list[int]:
        return rand_ids(n, UNSHARED, rnd, *tag)

    async def go(client: httpx.AsyncClient) -> dict[str, float]:
        await stream(client, ids(sz.prompt, 0), 8)  # warm-up
        singles = [await stream(client, ids(sz.prompt, 1, i), sz.new) for i in range(sz.single_repeats)]
        await asyncio.gather(*(stream(client, ids(sz.prompt, 2, i), 4) for i in range(sz.streams)))  # warm-up
        t = time.perf_counter()
        burst = await asyncio.gather(*(stream(client, ids(sz.prompt, 3, i), sz.new) for i in range(sz.streams)))
        streams_tok_s = sum(s.tokens for s in burst) / (max(s.times[-1] for s in burst) - t)
        await stream(client, ids(sz.ttft_tokens, 4), 1)  # warm-up
        ttfts = [(await stream(client, ids(sz.ttft_tokens, 5, i), 1)).ttft for i in range(sz.ttft_repeats)]
        return {"decode_tok_s": statistics.median(s.decode_tok_s for s in singles), "streams_tok_s": streams_tok_s,
                "ttft_ms": 1000 * statistics.median(ttfts)}

    return run_async(url, sz.streams, go)


# ---- workload: a stream joining running ones -------------------------------------------------
def run_join(url: str, sz: Sizes, rnd: int) -> dict[str, float]:
    async def go(client: httpx.AsyncClient) -> dict[str, float]:
        running = [Stream(time.perf_counter()) for _ in range(sz.join_running)]
        tasks = [asyncio.ensure_future(stream(client, rand_ids(sz.prompt, JOIN, rnd, 0, i), sz.join_running_max, s))
                 for i, s in enumerate(running)]
        try:
            deadline = time.perf_counter() + 600
            while min(s.tokens for s in running) < 4:  # every running stream is decoding
                if time.perf_counter() > deadline or any(t.done() for t in tasks):
                    raise RuntimeError("the running streams did not all start decoding")
                await asyncio.sleep(0.05)
            joins = []
            for j in range(sz.joins):
                joins.append(await stream(client, rand_ids(sz.prompt, JOIN, rnd, 1, j), sz.join_new))
                await asyncio.sleep(sz.join_pause_s)
            if any(t.done() for t in tasks):
                logger.warning("some running streams ended before the last join: raise join_running_max")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        during = [g for j in joins for s in running for g in s.gaps(j.sent, j.times[0])]
        steady = [g for s in running for g in s.gaps(joins[0].sent, joins[-1].times[-1])]
        return {"ttft_ms": 1000 * statistics.median(j.ttft for j in joins),
                "gap_ms": 1000 * statistics.median(during) if during else float("nan"),
                "steady_gap_ms": 1000 * statistics.median(steady)}

    return run_async(url, sz.join_running + 1, go)


# ---- the CTranslate2 anchor ------------------------------------------------------------------
def ct2_score(model_dir: str, sets_path: str) -> dict[str, Any]:
    """In a child process: `score_batch`, 8 sequences per call, on each set of `sets_path` (a JSON
    {name: [token ids, ...]}, "warmup" first and untimed); prompt tokens / second over the rest,
    and the logprobs of "c1" (each sequence's tokens after the first)."""
    import ctranslate2

    sets = json.loads(Path(sets_path).read_text())
    vocab = json.loads((Path(model_dir) / "vocabulary.json").read_text())
    gen = ctranslate2.Generator(model_dir, device="cpu", compute_type="float32", intra_threads=THREADS)

    def run(seqs: list[list[int]]) -> list[Any]:
        toks = [[vocab[i] for i in s] for s in seqs]
        return [r for k in range(0, len(toks), CT2_BATCH) for r in gen.score_batch(toks[k:k + CT2_BATCH])]

    run(sets.pop("warmup"))
    seconds, tokens, logprobs = 0.0, 0, []
    for name, seqs in sets.items():
        t = time.perf_counter()
        res = run(seqs)
        seconds += time.perf_counter() - t
        tokens += sum(map(len, seqs))
        if name == "c1":
            logprobs = [list(r.log_probs) for r in res]
    return {"tok_s": tokens / seconds, "c1_logprobs": logprobs}


def run_ct2(ckpt: Path, sz: Sizes, rnd: int) -> dict[str, Any]:
    model_dir = setup_ctranslate2(ckpt)["float32"]
    sets = {name: [c for q in choice_set(sz, rnd, p, n) for c in q]
            for name, p, n in (("warmup", 0, sz.warmup_questions), ("c1", 1, sz.questions), ("c8", 2, sz.questions))}
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=WORK, delete=False) as f:
        json.dump(sets, f)
    try:
        code = ("import json, sys; from bench.prefix import ct2_score; "
                "print(json.dumps(ct2_score(sys.argv[1], sys.argv[2])))")
        out = subprocess.run([sys.executable, "-c", code, str(model_dir), f.name], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return json.loads(out.splitlines()[-1])


# ---- one server, all its workloads -----------------------------------------------------------
def one_server(ckpt: Path, mode: str, rnd: int, args: argparse.Namespace, sz: Sizes,
               logprobs: dict[str, dict[str, list]]) -> dict[str, Any]:
    res: dict[str, Any] = {"cache": {}}
    with serve(ckpt, mode, args) as srv:
        res["prefix_caching_info"] = (srv.info.get("generation") or {}).get("prefix_caching")
        for w in args.only:
            if w == "join" and mode != "on":
                continue
            before = cache_counters(srv.url)
            t = time.perf_counter()
            if w == "choice":
                res[w], logprobs[mode] = run_choice(srv.url, sz, rnd)
            elif w == "system":
                res[w] = run_system(srv.url, sz, rnd)
            elif w == "lm-eval":
                res[w] = run_lm_eval(srv.url, ckpt)
            elif w == "unshared":
                res[w] = run_unshared(srv.url, sz, rnd)
            elif w == "join":
                res[w] = run_join(srv.url, sz, rnd)
            after = cache_counters(srv.url)
            res["cache"][w] = {"queries": after["queries"] - before["queries"], "hits": after["hits"] - before["hits"],
                               "bytes": after["bytes"]}
            logger.info("round %d, cache %s, %s (%.0f s): %s; prefix cache %s", rnd + 1, mode, w,
                        time.perf_counter() - t, _fmt_dict(res[w]), res["cache"][w])
    return res


def _fmt_dict(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


# ---- report ----------------------------------------------------------------------------------
# (workload, key, label, higher is better, target on/off ratio or None)
ROWS = (
    ("choice", "c1_tok_s", "multiple-choice scoring, 1 client: tokens scored/s", True, 2.2),
    ("choice", "c8_tok_s", "multiple-choice scoring, 8 clients: tokens scored/s", True, 2.2),
    ("system", "ttft_ms", "shared system prompt: TTFT (ms)", False, 0.3),
    ("lm-eval", "wall_s", "lm-eval local-completions, gpt2serve_choice: wall (s)", False, None),
    ("unshared", "decode_tok_s", "nothing shared: 1-stream decode tok/s", True, 0.97),
    ("unshared", "streams_tok_s", "nothing shared: 32 streams, aggregate tok/s", True, 0.97),
    ("unshared", "ttft_ms", "nothing shared: TTFT (ms)", False, 1 / 0.97),
    ("join", "ttft_ms", "a stream joining 31 running: its TTFT (ms)", False, None),
    ("join", "gap_ms", "  the 31 running: median gap while it joins (ms)", False, None),
    ("join", "steady_gap_ms", "  the 31 running: median gap over the joins (ms)", False, None),
)
CT2_TARGET = 1.5


def values(rounds: list[dict[str, Any]], mode: str, w: str, key: str) -> list[float]:
    return [r[mode][w][key] for r in rounds if w in r.get(mode, {})]


def _mr(vals: list[float]) -> str:
    if not vals:
        return "—"
    return f"{statistics.median(vals):,.4g} ({min(vals):,.4g}-{max(vals):,.4g})"


def _ratio(on: list[float], off: list[float], target: float | None, higher: bool) -> tuple[str, str]:
    if not on or not off:
        return "—", "—"
    med = statistics.median(on) / statistics.median(off)
    per = [a / b for a, b in zip(on, off, strict=True)]
    cell = f"{med:.2f}x ({min(per):.2f}-{max(per):.2f}x)"
    if target is None:
        return cell, "—"
    ok = med >= target if higher else med <= target
    return cell, f"{'>=' if higher else '<='} {target:.2f}x: {'pass' if ok else '**FAIL**'}"


def report(record: dict[str, Any]) -> str:
    rounds, s = record["rounds"], record["settings"]
    cpu = record["cpu"]
    lines = [f"Command: `{record['command']}`  ",
             f"Machine: {cpu['model_name']} (lscpu), {cpu['cpus']} CPUs; flags: {', '.join(cpu['flags']) or 'none'}; "
             f"{record['time']}; commit `{record['commit']}`  ",
             f"Checkpoint: {record['checkpoint_label']}, fp32, ONNX Runtime, {THREADS} threads; "
             f"{len(rounds)} interleaved round(s), medians (range); on/off: ratio of the medians (per-round range).",
             "", "| workload | cache on | cache off | on / off | target |", "| --- | --- | --- | --- | --- |"]
    for w, key, label, higher, target in ROWS:
        on, off = values(rounds, "on", w, key), values(rounds, "off", w, key)
        if not on and not off:
            continue
        ratio, verdict = _ratio(on, off, target, higher)
        lines.append(f"| {label} | {_mr(on)} | {_mr(off)} | {ratio} | {verdict} |")
    ct2 = [r["ct2"]["tok_s"] for r in rounds if "ct2" in r]
    if ct2:
        lines += ["", "| anchor (engine, in its own process) | tokens scored/s | cache on, 1 client / anchor | "
                      "cache on, 8 clients / anchor | target |", "| --- | --- | --- | --- | --- |"]
        cells = []
        for key in ("c1_tok_s", "c8_tok_s"):
            on = values(rounds, "on", "choice", key)
            cells.append(_ratio(on, ct2, CT2_TARGET, True)[0] if on else "—")
        on8 = values(rounds, "on", "choice", "c8_tok_s")
        verdict = _ratio(on8, ct2, CT2_TARGET, True)[1] if on8 else "—"
        lines.append(f"| CTranslate2 {CT2_VERSION} float32 `score_batch`, {CT2_BATCH} per call, intra_threads "
                     f"{THREADS} | {_mr(ct2)} | {cells[0]} | {cells[1]} | {verdict} (8 clients) |")
    lines.append("")
    checks = record.get("checks", {})
    if "logprobs_c1_max_diff" in checks:
        lines.append(f"- logprobs, cache on vs off, same ids: max |diff| {checks['logprobs_c1_max_diff']:.2e} with "
                     f"1 client (asserted <= {LOGPROB_TOL:g}), {checks['logprobs_c8_max_diff']:.2e} with 8 clients.")
    if "ct2_vs_ours_max_diff" in checks:
        lines.append(f"- logprobs, CTranslate2 vs ours (cache off), same ids: max |diff| "
                     f"{checks['ct2_vs_ours_max_diff']:.2e} (a check that both score the same model and tokens).")
    for mode in MODES:
        per = {}
        for w in WORKLOADS:
            c = [r[mode]["cache"][w] for r in rounds if w in r.get(mode, {}).get("cache", {})]
            if c:
                q, h = sum(x["queries"] for x in c), sum(x["hits"] for x in c)
                per[w] = f"{w} {h:,.0f}/{q:,.0f}" + (f" ({h / q:.0%})" if q else "")
        if per:
            info = next((r[mode].get("prefix_caching_info") for r in rounds if mode in r), None)
            lines.append(f"- prefix cache {mode}: hits / queries (prompt tokens, /metrics, all rounds): "
                         f"{'; '.join(per.values())}. /info prefix_caching: "
                         f"{json.dumps(info) if info is not None else 'absent'}.")
    lines.append("- sizes: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    if "lm-eval" in record["workloads"]:
        lines.append(f"- lm-eval ran on the bench's checkpoint ({record['checkpoint_label']}), max_length "
                     f"{record['n_positions']}. The task has 4 questions x 3 choices, so the wall time is mostly "
                     f"lm-eval's own: the same CLI on its `dummy` model (no server) took "
                     f"{checks.get('lm_eval_dummy_s', float('nan')):.1f} s (once, before the rounds).")
    return "\n".join(lines) + "\n"


# ---- CLI -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny demo model (model/demo/lm), 1 round")
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON record (default bench/results/prefix.json; with --quick none unless given)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="generation checkpoint (default: the GPT-2 124M-shaped random one of bench/anchors.py)")
    p.add_argument("--prefix-cache-mb", type=int, default=None, help="PREFIX_CACHE_MB for both servers")
    p.add_argument("--server-repo", type=Path, default=None,
                   help="run `python -m app` from this checkout instead (e.g. an older commit, for `join` before "
                        "a change; a checkout without prefix caching ignores PREFIX_CACHING)")
    return p


def _commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    return None


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    if bad := [w for w in args.only if w not in WORKLOADS]:
        p.error(f"unknown workload(s) {bad}; choose from {', '.join(WORKLOADS)}")
    rounds_n = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds_n < 1:
        p.error("--rounds must be >= 1")
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    WORK.mkdir(parents=True, exist_ok=True)
    sz = QUICK if args.quick else FULL
    if args.checkpoint:
        ckpt, label = args.checkpoint.resolve(), str(args.checkpoint)
    elif args.quick:
        ckpt, label = DEMO_LM, "model/demo/lm (tiny demo model, --quick)"
    else:
        ckpt, label = build_checkpoint("small", CACHE / "checkpoints"), "GPT-2 124M shape, random weights"
    n_pos = n_positions(ckpt)
    longest = max(sz.context + sz.ending, sz.system_prefix + sz.system_question + sz.system_new, sz.ttft_tokens + 1,
                  sz.prompt + sz.join_running_max)
    if longest > n_pos:
        p.error(f"{ckpt}: n_positions {n_pos} < {longest}, the longest request; use --quick sizes or another model")
    started = time.perf_counter()
    if "choice" in args.only:
        setup_ctranslate2(ckpt)  # install and convert before the timed rounds
    checks: dict[str, float] = {}
    if "lm-eval" in args.only:
        checks["lm_eval_dummy_s"] = lm_eval_overhead()
        logger.info("lm-eval on its dummy model (no server; untimed warm-up): %.1f s", checks["lm_eval_dummy_s"])

    rounds: list[dict[str, Any]] = []
    for rnd in range(rounds_n):
        systems = ["on", "off"] + (["ct2"] if "choice" in args.only else [])
        order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]  # the machine drifts: rotate
        res: dict[str, Any] = {}
        logprobs: dict[str, dict[str, list]] = {}
        for system in order:
            logger.info("round %d/%d: %s", rnd + 1, rounds_n, system if system == "ct2" else f"cache {system}")
            if system == "ct2":
                res["ct2"] = run_ct2(ckpt, sz, rnd)
                logger.info("round %d, CTranslate2: %.4g tokens/s", rnd + 1, res["ct2"]["tok_s"])
            else:
                res[system] = one_server(ckpt, system, rnd, args, sz, logprobs)
        if rnd == 0 and "choice" in args.only:
            checks["logprobs_c1_max_diff"] = max_diff(logprobs["on"]["c1"], logprobs["off"]["c1"])
            checks["logprobs_c8_max_diff"] = max_diff(logprobs["on"]["c8"], logprobs["off"]["c8"])
            theirs = [[None, *lp] for lp in res["ct2"]["c1_logprobs"]]
            checks["ct2_vs_ours_max_diff"] = max_diff(theirs, logprobs["off"]["c1"])
            logger.info("logprobs on vs off: max |diff| %.2e (1 client), %.2e (8 clients); CTranslate2 vs ours %.2e",
                        checks["logprobs_c1_max_diff"], checks["logprobs_c8_max_diff"], checks["ct2_vs_ours_max_diff"])
            assert checks["logprobs_c1_max_diff"] <= LOGPROB_TOL, (
                f"cache-on and cache-off logprobs differ by {checks['logprobs_c1_max_diff']:.3g} > {LOGPROB_TOL}")
            if checks["logprobs_c8_max_diff"] > LOGPROB_TOL:
                logger.warning("with 8 clients, on and off logprobs differ by %.3g", checks["logprobs_c8_max_diff"])
        if "ct2" in res:
            res["ct2"].pop("c1_logprobs", None)
        rounds.append(res)

    cmd = ("python -m bench.prefix " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    record = {"benchmark": "prefix", "command": cmd, "cpu": lscpu(), "machine": machine_info(),
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit(),
              "checkpoint": str(ckpt), "checkpoint_label": label, "n_positions": n_pos, "workloads": args.only,
              "settings": asdict(sz), "checks": checks, "rounds": rounds,
              "elapsed_s": round(time.perf_counter() - started, 1)}
    body = report(record)
    sys.stdout.write(body)
    out = args.out or (None if args.quick else REPO / "bench" / "results" / "prefix.json")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        logger.info("wrote %s", out)
    logger.info("done in %.0f s", record["elapsed_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
