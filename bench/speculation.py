"""Speculative decoding by prompt lookup (issue 31): tokens/s with SPECULATION=ngram against off.

    python -m bench.speculation [--rounds 3] [--size medium] [--out FILE]
    python -m bench.speculation --size large --draft-size small     # SPECULATION=draft, random pair
    python -m bench.speculation --target DIR --draft DIR --label X  # SPECULATION=draft, given pair
    python -m bench.speculation --quick     # smoke run on the tiny demo model, 1 round

With a draft model (`--draft DIR`, or `--draft-size` for a random checkpoint of that shape), the
second server runs `SPECULATION=draft` with it instead of `ngram`.

Each round starts two servers in turn, `SPECULATION=off` and `SPECULATION=ngram` (the order
alternates by round), on a GPT-2-shaped checkpoint with random weights (medium, 355M, by default;
fp32, ONNX Runtime, NUM_THREADS=2), and runs on each:
  repeat    one greedy stream (`ignore_eos`, a 32-token random prompt, 128 new tokens): greedy
            decoding of a model falls into loops of its own, which prompt lookup proposes.
            Target: >= 1.6x tokens/s.
  nomatch   one stream that repeats little: top-k 40 sampling at temperature 1 (seeded; such a row
            speculates) from a random prompt, 128 new tokens. With random weights greedy output
            always loops, so a stream whose n-grams rarely recur is a sampled one. Target: >= 0.95x.
  few2/4    2, then 4 greedy streams at once (128 new tokens each, their outputs looping):
            tokens / wall; rows that propose are verified in the same steps as the others.
  streams   32 greedy streams at once (64 new tokens each): tokens / wall. Target: >= 0.95x
            (over SPECULATION_MAX_BATCH, 8 by default, the batch decodes plainly; --max-batch 32
            has the server measure whether speculating pays at that size instead).
and reads `/metrics`' proposed and accepted tokens. Output: a markdown table with medians and ranges
over rounds, the CPU's model name and flags, and the JSON record (default
bench/results/speculation.json; --quick: only with --out). The cores must be otherwise idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.anchors import CACHE, REPO, THREADS
from bench.prefix import DEMO_LM, _commit, _mr, _ratio, lscpu, rand_ids
from bench.server_bench import _start, _stop
from bench.sizes import LABELS, build_checkpoint
from bench.targets import free_port

logger = logging.getLogger("bench.speculation")
WORK = CACHE / "speculation-run"
PROMPT, NEW, STREAMS, STREAM_NEW, REPEATS, FEW = 32, 128, 32, 64, 2, (2, 4)


@contextlib.contextmanager
def serve(ckpt: Path, speculation: str, draft: Path | None = None, max_batch: int = 8) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"MODEL_PATH": str(ckpt), "CLASSIFIER_PATH": "", "ONNX_CACHE_DIR": str(CACHE / "anchors-run" / "onnx"),
           "HOST": "127.0.0.1", "PORT": str(port), "NUM_THREADS": str(THREADS), "PRECISION": "fp32",
           "LOG_LEVEL": "WARNING", "MAX_CONCURRENT_REQUESTS": "256", "MAX_BATCH_SIZE": "32",
           "EMBEDDING_POOLING": "off", "SPECULATION": speculation, "SPECULATION_MAX_BATCH": str(max_batch)}
    if draft is not None:
        env["DRAFT_MODEL_PATH"] = str(draft)
    proc = _start([sys.executable, "-m", "app"], env, url, WORK / f"server_{speculation}.log", cwd=REPO)
    try:
        yield url
    finally:
        _stop(proc)


async def one(c: httpx.AsyncClient, ids: list[int], new: int, sampled: int | None = None) -> tuple[float, int]:
    """(seconds, completion tokens) of one non-streamed completion."""
    body: dict[str, Any] = {"prompt": ids, "max_tokens": new, "ignore_eos": True, "temperature": 0}
    if sampled is not None:
        body |= {"temperature": 1.0, "top_k": 40, "seed": sampled}
    t = time.perf_counter()
    r = await c.post("/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
    return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]


def spec_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30, trust_env=False).text
    out = {}
    for name in ("num_draft_tokens", "num_accepted_tokens"):
        m = re.search(rf"^gpt2_spec_decode_{name}_total (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def run(url: str, rnd: int) -> dict[str, float]:
    async def go() -> dict[str, float]:
        async with httpx.AsyncClient(base_url=url, timeout=900, trust_env=False,
                                     limits=httpx.Limits(max_connections=64)) as c:
            await one(c, rand_ids(PROMPT, 9, rnd), 8)  # warm-up
            res: dict[str, list[float]] = {"repeat": [], "nomatch": []}
            for k in range(REPEATS):
                s, n = await one(c, rand_ids(PROMPT, 1, rnd, k), NEW)
                res["repeat"].append(n / s)
                s, n = await one(c, rand_ids(PROMPT, 2, rnd, k), NEW, sampled=1000 * rnd + k)
                res["nomatch"].append(n / s)
            few = {}
            for f in FEW:
                t = time.perf_counter()
                done = await asyncio.gather(*(one(c, rand_ids(PROMPT, 4 + f, rnd, i), NEW) for i in range(f)))
                few[f"few{f}_tok_s"] = sum(n for _, n in done) / (time.perf_counter() - t)
            t = time.perf_counter()
            done = await asyncio.gather(*(one(c, rand_ids(PROMPT, 3, rnd, i), STREAM_NEW) for i in range(STREAMS)))
            streams = sum(n for _, n in done) / (time.perf_counter() - t)
        return {"repeat_tok_s": statistics.median(res["repeat"]), "nomatch_tok_s": statistics.median(res["nomatch"]),
                **few, "streams_tok_s": streams}
    out = asyncio.run(go())
    return out | spec_counters(url)


def report(record: dict[str, Any]) -> str:
    cpu = record["cpu"]
    rounds = record["rounds"]
    mode = record.get("mode", "ngram")
    lines = [f"Command: `{record['command']}`  ",
             f"Machine: {cpu['model_name']} (lscpu), {cpu['cpus']} CPUs; flags: {', '.join(cpu['flags']) or 'none'}; "
             f"{record['time']}; commit `{record['commit']}`  ",
             f"Checkpoint: {record['checkpoint_label']}, fp32, ONNX Runtime, {THREADS} threads; {len(rounds)} "
             "round(s), the two servers in alternating order; medians (range over rounds); ratio: of the medians "
             "(per-round range).", "",
             f"| workload | SPECULATION=off | SPECULATION={mode} | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for key, label, target in (("repeat_tok_s", "one greedy stream, its output looping, tokens/s", 1.6),
                               ("nomatch_tok_s", "one top-k sampled stream (little repeats), tokens/s", 0.95),
                               *((f"few{f}_tok_s", f"{f} greedy streams, their outputs looping, tokens/s", None)
                                 for f in FEW),
                               ("streams_tok_s", f"{STREAMS} greedy streams, tokens/s", 0.95)):
        if any(key not in r["off"] for r in rounds):
            continue  # a record from before the row existed
        off = [r["off"][key] for r in rounds]
        on = [r[mode][key] for r in rounds]
        # the targets are prompt lookup's; a draft pair's rows report acceptance and speed
        ratio, verdict = _ratio(on, off, target if mode == "ngram" and target else None, higher=True)
        lines.append(f"| {label} | {_mr(off)} | {_mr(on)} | {ratio} | {verdict} |")
    proposed = sum(r[mode]["num_draft_tokens"] for r in rounds)
    accepted = sum(r[mode]["num_accepted_tokens"] for r in rounds)
    if proposed:
        lines += ["", f"- proposals over all rounds (`/metrics`): {proposed:,.0f} tokens proposed, {accepted:,.0f} "
                      f"accepted ({accepted / proposed:.0%})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speculation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick: 1)")
    p.add_argument("--size", default="medium", choices=sorted(LABELS), help="the random checkpoint's shape")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny demo model, 1 round")
    p.add_argument("--target", type=Path, default=None, help="the served checkpoint (instead of --size)")
    p.add_argument("--draft", type=Path, default=None, help="a draft checkpoint: SPECULATION=draft")
    p.add_argument("--draft-size", default=None, choices=sorted(LABELS), help="a random draft of this shape")
    p.add_argument("--label", default=None, help="how the table names the checkpoints")
    p.add_argument("--out", type=Path, default=None, help="JSON record (default bench/results/speculation.json)")
    p.add_argument("--max-batch", type=int, default=8, help="SPECULATION_MAX_BATCH of the speculating server")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.quick:
        ckpt, label = DEMO_LM, "model/demo/lm (tiny demo model, --quick)"
    elif args.target:
        ckpt, label = args.target.resolve(), str(args.target)
    else:
        ckpt = build_checkpoint(args.size, CACHE / "checkpoints")
        label = f"GPT-2 {LABELS[args.size]} shape ({args.size}), random weights"
    draft = args.draft.resolve() if args.draft else (
        build_checkpoint(args.draft_size, CACHE / "checkpoints") if args.draft_size else None)
    if draft is not None:
        label += f", draft {args.draft or f'GPT-2 {LABELS[args.draft_size]} shape, random weights'}"
    label = args.label or label
    mode = "draft" if draft is not None else "ngram"
    rounds = []
    for rnd in range(args.rounds or (1 if args.quick else 3)):
        res = {}
        for m in (("off", mode) if rnd % 2 == 0 else (mode, "off")):
            with serve(ckpt, m, draft if m == "draft" else None, args.max_batch) as url:
                res[m] = run(url, rnd)
            logger.info("round %d %s: %s", rnd + 1, m, res[m])
        rounds.append(res)
    record = {"command": "python -m bench.speculation " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": lscpu(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit(),
              "checkpoint_label": label, "mode": mode, "rounds": rounds}
    out = args.out or (None if args.quick else REPO / "bench" / "results" / "speculation.json")
    if out:
        out.write_text(json.dumps(record, indent=1))
    print(report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
