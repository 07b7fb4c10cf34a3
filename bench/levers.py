"""The performance levers of issue 7, each measured on its own at the engine level (no HTTP), on
the GPT-2 124M-shaped random checkpoint.

    python -m bench.levers [--threads 2] [--rounds 3] [--no-write]

  attention   the serving runner before (standard graph: attention decomposed into MatMul /
              Softmax, the cache grown by Concat and fed back each step) and after (the GQA graph:
              one GroupQueryAttention node per layer, KV buffers shared between past and present
              and written in place through IO binding): decode step at batch 1, 8 and 32 with a
              64-token past, and a 512-token prefill
  session     ONNX Runtime session options on the GQA graph: spinning off, dynamic block base,
              no CPU memory arena (against the defaults)
  sampling    host-side choice of the next token for 32 rows of V = 50257 random logits: greedy,
              top-p 0.9 by a full argsort (transformers' algorithm, what the server did before)
              against the partition-based top-p it does now, on flat logits (N(0, 3): what the
              random-weight model gives) and peaked ones (N(0, 12): a trained model's shape), and
              whole draws with top-k 50 + top-p 0.9
Rounds interleave the variants (the machine drifts); medians over rounds. Writes
bench/results/levers.json and the `levers` table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import machine_info
from bench.export_bench import CACHE, REPO, RESULTS, build_checkpoint
from bench.report import replace_section

logger = logging.getLogger("bench.levers")

PAST = 64
BATCHES = (1, 8, 32)
PREFILL = 512
V = 50257
STANDARD, GQA = CACHE / "fused.onnx", CACHE / "gqa.onnx"
SESSION_VARIANTS = {
    "defaults": {},
    "spinning off": {"session.intra_op.allow_spinning": "0"},
    "dynamic block base 4": {"session.dynamic_block_base": "4"},
    "no memory arena": {"session.use_env_allocators": "0", "arena": "off"},
}


def _median_ms(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _runner(kind: str, threads: int, config: dict[str, str] | None = None):  # noqa: ANN202
    from app.engine.ort_runner import OrtGenerationRunner, OrtSlotRunner

    if kind == "standard":
        return OrtGenerationRunner(STANDARD, "cpu", threads, n_positions=1024)
    config = dict(config or {})
    runner = OrtSlotRunner(GQA, "cpu", threads, n_positions=1024,
                           session_config={k: v for k, v in config.items() if k.startswith("session.")})
    if config.get("arena") == "off":  # an option of SessionOptions, not a config entry: rebuild the session
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        opts.enable_cpu_mem_arena = False
        runner.sess = ort.InferenceSession(str(GQA), opts, providers=["CPUExecutionProvider"])
    return runner


def decode_and_prefill(runner, batches: tuple[int, ...], prefill: bool, steps: int = 9) -> dict[str, float]:  # noqa: ANN001
    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        runner.reset()
        runner.add([rng.integers(0, V, PAST).tolist() for _ in range(b)])
        for _ in range(3):  # warm-up: shapes, arena growth
            runner.step([1] * b)
        out[f"decode_b{b}_ms"] = _median_ms(lambda b=b: runner.step([1] * b), steps)
    if prefill:
        prompt = rng.integers(0, V, PREFILL).tolist()

        def once() -> None:
            runner.reset()
            runner.add([prompt])

        once()
        out[f"prefill_{PREFILL}_ms"] = _median_ms(once, 3)
    runner.reset()
    return out


def _top_p_argsort(logits: np.ndarray, p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper on one row: a stable argsort of the whole vocabulary."""
    order = np.argsort(logits, kind="stable")
    z = np.exp(logits[order] - logits.max())
    remove = np.cumsum(z / z.sum()) <= 1.0 - p
    remove[-1] = False
    out = logits.copy()
    out[order[remove]] = -np.inf
    return out


def sampling(rows: int = 32, reps: int = 5) -> dict[str, float]:
    from app.engine.sampling import SamplingParams, choose, top_p_mask

    rng = np.random.default_rng(0)
    flat = rng.normal(0, 3, size=(rows, V)).astype(np.float32)
    peaked = rng.normal(0, 12, size=(rows, V)).astype(np.float32)
    gen = np.random.default_rng(1)

    def per_row(fn: Callable[[np.ndarray], Any], logits: np.ndarray = flat) -> float:
        return _median_ms(lambda: [fn(r) for r in logits], reps)

    return {
        "greedy_ms": per_row(lambda r: choose(r, SamplingParams(), set(), gen)),
        "top_p_argsort_flat_ms": per_row(lambda r: _top_p_argsort(r, 0.9)),
        "top_p_now_flat_ms": per_row(lambda r: top_p_mask(r, 0.9)),
        "top_p_argsort_peaked_ms": per_row(lambda r: _top_p_argsort(r, 0.9), peaked),
        "top_p_now_peaked_ms": per_row(lambda r: top_p_mask(r, 0.9), peaked),
        "sample_top_k50_top_p09_ms": per_row(lambda r: choose(r, SamplingParams(do_sample=True, top_k=50, top_p=0.9),
                                                                set(), gen)),
        "sample_top_p09_ms": per_row(lambda r: choose(r, SamplingParams(do_sample=True, top_p=0.9), set(), gen)),
    }


def _med(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


def tables(res: dict[str, Any]) -> str:
    att = res["attention"]
    keys = [*(f"decode_b{b}_ms" for b in BATCHES), f"prefill_{PREFILL}_ms"]
    lines = ["| serving runner | " + " | ".join(k.replace("_ms", " (ms)").replace("_", " ") for k in keys) + " |",
             "|" + " --- |" * (len(keys) + 1)]
    for name in ("standard", "gqa"):
        lines.append(f"| {name} | " + " | ".join(f"{att[name][k]:g}" for k in keys) + " |")
    lines.append("| standard / gqa | " + " | ".join(f"{att['standard'][k] / att['gqa'][k]:.2f}×" for k in keys)
                 + " |")
    ses = res["session"]
    lines += ["", "| GQA session options | decode b1 (ms) | decode b32 (ms) |", "| --- | --- | --- |"]
    lines += [f"| {name} | {v['decode_b1_ms']:g} | {v['decode_b32_ms']:g} |" for name, v in ses.items()]
    smp = res["sampling"]
    lines += ["", "| sampling, 32 rows of V = 50257 (ms per step) | ms |", "| --- | --- |"]
    lines += [f"| {k.removesuffix('_ms').replace('_', ' ')} | {v:g} |" for k, v in smp.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="attention,session,sampling",
                   help="which levers to measure; the others keep their numbers from bench/results/levers.json")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    if not (STANDARD.is_file() and GQA.is_file()):
        logger.info("exporting the standard and GQA graphs of the 124M checkpoint into %s", CACHE)
        from export.graphs import export_generation
        from model import load_pretrained

        model = load_pretrained(build_checkpoint(CACHE / "gpt2-124m-random"))
        for path, attention in ((STANDARD, "standard"), (GQA, "gqa")):
            if not path.is_file():
                export_generation(model, path, attention=attention)
    runs: dict[str, Any] = {"attention": {"standard": [], "gqa": []}, "session": {k: [] for k in SESSION_VARIANTS},
                            "sampling": []}
    for r in range(args.rounds):
        logger.info("round %d/%d", r + 1, args.rounds)
        if "attention" in parts:
            for kind in ("standard", "gqa"):
                runs["attention"][kind].append(decode_and_prefill(_runner(kind, args.threads), BATCHES, True))
        if "session" in parts:
            for name, config in SESSION_VARIANTS.items():
                runs["session"][name].append(decode_and_prefill(_runner("gqa", args.threads, config), (1, 32), False))
        if "sampling" in parts:
            runs["sampling"].append(sampling())
    saved = json.loads((RESULTS / "levers.json").read_text()) if (RESULTS / "levers.json").is_file() else {}
    res = {"attention": {k: _med(v) for k, v in runs["attention"].items()} if "attention" in parts else None,
           "session": {k: _med(v) for k, v in runs["session"].items()} if "session" in parts else None,
           "sampling": _med(runs["sampling"]) if "sampling" in parts else None}
    for part in res:
        if res[part] is None:
            if part not in saved.get("results", {}):
                p.error(f"no saved numbers for {part!r}: measure it (--parts)")
            res[part] = saved["results"][part]
            runs[part] = saved["per_round"][part]
    md = tables(res)
    sys.stdout.write(md + "\n")
    if not args.no_write:
        cmd = ("python -m bench.levers " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        if parts != {"attention", "session", "sampling"} and saved.get("command"):
            cmd = f"{saved['command'].split('`; ')[0]}`; `{cmd}"  # both runs, oldest first
        record = {"benchmark": "levers", "command": cmd, "machine": machine_info(), "threads": args.threads,
                  "rounds": args.rounds, "past": PAST, "results": res, "per_round": runs}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "levers.json").write_text(json.dumps(record, indent=2) + "\n")
        m = record["machine"]
        body = (f"Command: `{record['command']}`  \nMachine: {m['cpu']}, {m['cores']} cores, {args.threads} threads; "
                f"GPT-2 124M shape, random weights; decode steps with a {PAST}-token past; medians over "
                f"{args.rounds} rounds that interleave the variants.\n\n{md}\n")
        replace_section(REPO / "BENCHMARKS.md", "levers", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
