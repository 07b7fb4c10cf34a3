"""Structured outputs (issue 29): what a grammar costs per token, on one server, constrained and
unconstrained requests interleaved.

    python -m bench.structured [--rounds 3] [--out FILE] [--checkpoint DIR]
    python -m bench.structured --quick     # smoke run on the tiny demo model, 1 round

Each round starts `python -m app` fresh (the GPT-2 124M-shaped random checkpoint of bench/anchors.py,
fp32, ONNX Runtime, NUM_THREADS=2, MAX_BATCH_SIZE=32) and runs, alternating which goes first:
  single   one greedy stream (`ignore_eos`, 32-token prompt, 128 new tokens), unconstrained, then
           with a JSON schema (`response_format` json_schema: an array of at least 40 objects with an
           integer, a short string and an enum array, so the grammar never ends before the token
           limit, and its mask changes at every structural token). The median gap between streamed
           tokens, 3 of each. Target: constrained <= 1.15x unconstrained.
  streams  32 streams at once (greedy, 32-token prompts, 128 new tokens): all unconstrained, then
           16 of them with the schema. Generated tokens / wall. Target: half constrained >= 0.85x.
  compile  time to first token (non-streamed, max_tokens 1) with no schema, with a schema new to
           the server (compiled on the request), and with the same schema again (cached).
The host's side of the token choice is timed in this process too (`host`): per row, the
unconstrained greedy choice from the runner's top-1 against the constrained one (the mask filled
by llguidance, unpacked, applied to the full logits, then the log-softmax and argmax of
`sampling.choose`). That difference is the most a mask applied inside the graph could save (the
graph would still need the mask as an input), which is why the engine takes the full-logits path.

Output: a markdown table (medians and ranges over rounds) with the CPU's lscpu model name and flags,
and the JSON record at --out (default bench/results/structured.json; --quick: only when given).
The cores must be otherwise idle. About 5 minutes with the checkpoint and its export cached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.anchors import CACHE, REPO, THREADS
from bench.prefix import DEMO_LM, _commit, _mr, _ratio, lscpu, rand_ids
from bench.server_bench import _start, _stop
from bench.sizes import build_checkpoint
from bench.targets import free_port

logger = logging.getLogger("bench.structured")
WORK = CACHE / "structured-run"
PROMPT, NEW, STREAMS, REPEATS = 32, 128, 32, 3
SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "tags"],
    "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12},
                   "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "rows", "schema": SCHEMA}}


@contextlib.contextmanager
def serve(ckpt: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"MODEL_PATH": str(ckpt), "CLASSIFIER_PATH": "", "ONNX_CACHE_DIR": str(CACHE / "anchors-run" / "onnx"),
           "HOST": "127.0.0.1", "PORT": str(port), "NUM_THREADS": str(THREADS), "PRECISION": "fp32",
           "LOG_LEVEL": "WARNING", "MAX_CONCURRENT_REQUESTS": "256", "MAX_BATCH_SIZE": "32",
           "EMBEDDING_POOLING": "off"}  # generation only: no embedding graph to export or load
    proc = _start([sys.executable, "-m", "app"], env, url, WORK / "server.log", cwd=REPO)
    try:
        yield url
    finally:
        _stop(proc)


async def stream(c: httpx.AsyncClient, ids: list[int], constrained: bool) -> tuple[list[float], int]:
    """A greedy stream: the arrival times of its chunks with text, and its completion tokens."""
    body = {"prompt": ids, "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = FORMAT
    times, tokens = [], 0
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            if ev.get("choices") and ev["choices"][0].get("text"):
                times.append(time.perf_counter())
    return times, tokens


def run_single(url: str, rnd: int) -> dict[str, float]:
    async def go() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"plain": [], "grammar": []}
        async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as c:
            await stream(c, rand_ids(PROMPT, 9, rnd), True)  # warm-up (compiles the schema)
            for k in range(REPEATS):
                for constrained in ((False, True) if (rnd + k) % 2 == 0 else (True, False)):
                    times, tokens = await stream(c, rand_ids(PROMPT, 1, rnd, k, constrained), constrained)
                    gaps = np.diff(times)  # a chunk can carry more than one token: per token over the stream
                    out["grammar" if constrained else "plain"].append(
                        1000 * (times[-1] - times[0]) / max(1, tokens - 1) if len(gaps) else float("nan"))
        return out
    res = asyncio.run(go())
    return {"plain_ms_per_token": statistics.median(res["plain"]),
            "grammar_ms_per_token": statistics.median(res["grammar"])}


def run_streams(url: str, rnd: int) -> dict[str, float]:
    async def burst(c: httpx.AsyncClient, constrained: int, tag: int) -> float:
        t = time.perf_counter()
        done = await asyncio.gather(*(stream(c, rand_ids(PROMPT, 2, rnd, tag, i), i < constrained)
                                      for i in range(STREAMS)))
        return sum(tokens for _, tokens in done) / (time.perf_counter() - t)

    async def go() -> dict[str, float]:
        limits = httpx.Limits(max_connections=STREAMS + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False, limits=limits) as c:
            await burst(c, STREAMS // 2, 99)  # warm-up at the batch size
            order = (0, STREAMS // 2) if rnd % 2 == 0 else (STREAMS // 2, 0)
            res = {n: await burst(c, n, n) for n in order}
        return {"plain_tok_s": res[0], "half_grammar_tok_s": res[STREAMS // 2]}
    return asyncio.run(go())


def run_compile(url: str, rnd: int) -> dict[str, float]:
    def ttft(body: dict) -> float:
        t = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json={"prompt": rand_ids(PROMPT, 3, rnd), "max_tokens": 1,
                                                      "temperature": 0, **body}, timeout=120, trust_env=False)
        r.raise_for_status()
        return 1000 * (time.perf_counter() - t)
    plain = [ttft({}) for _ in range(5)]
    fresh = []
    for k in range(5):  # a schema the server has not seen: one more property name each time
        schema = {**SCHEMA, "items": {**SCHEMA["items"], "properties": {**SCHEMA["items"]["properties"],
                                                                         f"p{rnd}_{k}": {"type": "boolean"}}}}
        fresh.append(ttft({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}))
    cached = [ttft({"response_format": FORMAT}) for _ in range(5)]
    return {"plain_ttft_ms": statistics.median(plain), "new_schema_ttft_ms": statistics.median(fresh),
            "cached_schema_ttft_ms": statistics.median(cached)}


def host_choice(ckpt: Path) -> dict[str, float]:
    """Per row, in this process: the unconstrained greedy choice from the top-1 against the
    constrained one over the full logits (mask, unpack, apply, log-softmax, argmax)."""
    from app.engine.grammar import Constraint, GrammarCompiler, GrammarSpec
    from app.engine.sampling import Sampler, SamplingParams
    from model.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_dir(ckpt)
    compiler = GrammarCompiler(tok, tok.vocab_size)
    grammar = compiler.compile(GrammarSpec("json", json.dumps(SCHEMA), "bench"))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, tok.vocab_size)).astype(np.float32)
    plain, masked, mask_only = [], [], []
    c = Constraint(grammar)
    s = Sampler(SamplingParams(), [1])
    s.constrained = True
    for i in range(200):
        t0 = time.perf_counter()
        allowed = c.allowed()
        t1 = time.perf_counter()
        s.allowed = allowed
        token, _ = s(logits[i])
        t2 = time.perf_counter()
        c.consume(token)
        mask_only.append(t1 - t0)
        masked.append(t2 - t0)
        ids, lps = np.array([int(np.argmax(logits[i]))]), np.array([0.0], np.float32)
        u = Sampler(SamplingParams(), [1])
        t3 = time.perf_counter()
        u.from_top(ids, lps)
        plain.append(time.perf_counter() - t3)
    us = lambda v: 1e6 * statistics.median(v)  # noqa: E731
    return {"plain_choice_us": us(plain), "grammar_choice_us": us(masked), "mask_us": us(mask_only),
            "graph_choice_us": graph_choice(logits, c)}


def graph_choice(logits: np.ndarray, c: Any) -> float:
    """The other option, a mask input to the graph: the selection's end as the graph would run it
    for one row (logits + the mask as an additive bias, LogSoftmax, TopK 1) in ONNX Runtime on
    this host, with the host's part kept (the mask filled and turned into the bias input). The
    logits are an input here, where the real graph computes them: what is timed is the selection."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    V = logits.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Add", ["logits", "bias"], ["masked"]),
         helper.make_node("LogSoftmax", ["masked"], ["logprobs"], axis=-1),
         helper.make_node("TopK", ["logprobs", "k"], ["top", "ids"], axis=-1)],
        "masked_topk",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, V]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, V])],
        [helper.make_tensor_value_info("top", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
        [helper.make_tensor("k", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    times = []
    for i in range(200):
        t0 = time.perf_counter()
        c._fresh = False
        bias = np.where(c.allowed(), np.float32(0), np.float32(-np.inf))[None]
        sess.run(None, {"logits": logits[i:i + 1], "bias": bias})
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


ROWS = [("single", "plain_ms_per_token", "grammar_ms_per_token", "one greedy stream, ms per token", 1.15, False),
        ("streams", "plain_tok_s", "half_grammar_tok_s", "32 streams (16 with the schema), tokens/s", 0.85, True)]


def report(record: dict[str, Any]) -> str:
    cpu, rounds = record["cpu"], record["rounds"]
    lines = [f"Command: `{record['command']}`  ",
             f"Machine: {cpu['model_name']} (lscpu), {cpu['cpus']} CPUs; flags: {', '.join(cpu['flags']) or 'none'}; "
             f"{record['time']}; commit `{record['commit']}`  ",
             f"Checkpoint: {record['checkpoint_label']}, fp32, ONNX Runtime, {THREADS} threads; {len(rounds)} "
             "round(s), medians (range over rounds); ratio: of the medians (per-round range).", "",
             "| workload | unconstrained | with the JSON schema | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for w, a, b, label, target, higher in ROWS:
        plain, con = [r[w][a] for r in rounds], [r[w][b] for r in rounds]
        ratio, verdict = _ratio(con, plain, target, higher)
        lines.append(f"| {label} | {_mr(plain)} | {_mr(con)} | {ratio} | {verdict} |")
    comp = lambda k: _mr([r["compile"][k] for r in rounds])  # noqa: E731
    lines += ["", f"- time to first token (1 token, 32-token prompt), ms: no schema {comp('plain_ttft_ms')}; a schema "
                  f"new to the server (compiled on the request) {comp('new_schema_ttft_ms')}; the same schema again "
                  f"(cached) {comp('cached_schema_ttft_ms')}.",
              f"- host side of one row's token choice, this process, median of 200: unconstrained greedy from the "
              f"top-1 {record['host']['plain_choice_us']:.1f} us; constrained over the full logits "
              f"{record['host']['grammar_choice_us']:.1f} us, of which the mask (llguidance's fill and the unpack) "
              f"{record['host']['mask_us']:.1f} us. The other option, the mask as an additive input to the graph's "
              f"selection (its LogSoftmax and TopK run by ONNX Runtime on the row, the mask filled and turned into "
              f"the input as here): {record['host']['graph_choice_us']:.1f} us."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny demo model, 1 round")
    p.add_argument("--out", type=Path, default=None, help="JSON record (default bench/results/structured.json)")
    p.add_argument("--checkpoint", type=Path, default=None, help="generation checkpoint")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        ckpt, label = args.checkpoint.resolve(), str(args.checkpoint)
    elif args.quick:
        ckpt, label = DEMO_LM, "model/demo/lm (tiny demo model, --quick)"
    else:
        ckpt, label = build_checkpoint("small", CACHE / "checkpoints"), "GPT-2 124M shape, random weights"
    rounds = []
    for rnd in range(args.rounds or (1 if args.quick else 3)):
        with serve(ckpt) as url:
            res = {}
            for w, fn in (("single", run_single), ("streams", run_streams), ("compile", run_compile)):
                res[w] = fn(url, rnd)
                logger.info("round %d %s: %s", rnd + 1, w, res[w])
        rounds.append(res)
    record = {"command": "python -m bench.structured " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": lscpu(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit(),
              "checkpoint_label": label, "rounds": rounds, "host": host_choice(ckpt)}
    out = args.out or (None if args.quick else REPO / "bench" / "results" / "structured.json")
    if out:
        out.write_text(json.dumps(record, indent=1))
    print(report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
