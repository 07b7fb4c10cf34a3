"""What selecting tokens in the graph costs or saves (issues 19 and 22), at the engine level.

    python -m bench.selection --before DIR [--rounds 5] [--update-md]

before  the runner of another checkout (DIR, e.g. `git worktree add /tmp/before 4ca92ca`): the
        graph returns the last position's logits and the host picks each greedy token and its
        log-probability (`sampling.greedy_rows`, one exp over the vocabulary per row)
after   this checkout: the graph returns the top-N with their log-probabilities
        (`model.gpt2.select_tokens`) and the host reads them

Per round, each in its own process (GPT-2 124M shape, fp32, the GQA graph the CPU serves, 2
threads): a greedy decode step with its selection at batch 1 and 32 (64-token pasts), and a
512-token prefill with its first token (the engine's time to first token). After only: a decode
step at batch 32 with 5 alternatives per row (`logprobs`), and scoring a 512-token prompt (every
position's log-probability and top 5, the `echo` path). Rounds alternate before and after;
medians and ranges. Writes bench/results/selection.json and the `selection` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import machine_info
from bench.export_bench import CACHE, REPO, RESULTS
from bench.report import replace_section
from bench.targets import _commit

logger = logging.getLogger("bench.selection")

# Runs in a fresh process with cwd = the checkout under test; prints one JSON line.
WORKER = r"""
import json, statistics, sys, time
import numpy as np
from app.engine.ort_runner import OrtSlotRunner
mode, path, threads, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = OrtSlotRunner(path, "cpu", threads, n_positions=1024)
V = r.info.vocab_size
rng = np.random.default_rng(0)
if mode == "before":
    from app.engine.sampling import greedy_rows
    scratch = np.empty((33, V), np.float32)
    def pick(out):
        return greedy_rows(out, scratch)[0]
else:
    from app.engine.runner import Want
    def pick(out):
        return out.top_ids[:, 0]
def median_ms(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)
res = {}
for b in (1, 32):
    r.reset()
    tokens = pick(r.add([rng.integers(0, V, 64).tolist() for _ in range(b)])).tolist()
    def step():
        global tokens
        tokens = pick(r.step(tokens)).tolist()
    for _ in range(3):
        step()
    res[f"decode_b{b}_ms"] = median_ms(step, steps)
    if mode == "after" and b == 32:
        want = Want(top_n=5)
        res["decode_b32_logprobs5_ms"] = median_ms(lambda: r.step(tokens, want), steps)
r.reset()
prompt = rng.integers(0, V, 512).tolist()
def prefill():
    r.reset(); pick(r.add([prompt]))
prefill()
res["prefill_512_first_token_ms"] = median_ms(prefill, 3)
if hasattr(r, "idle"):
    def cold():  # the first prompt after the engine went idle and gave its grown KV buffers back
        r.reset(); r.idle(); pick(r.add([prompt]))
    res["prefill_512_after_idle_ms"] = median_ms(cold, 3)
if mode == "after":
    def score():
        r.reset()
        pending = r.start_prefill(prompt)
        while r.advance(pending, 128, Want(score=(0,), score_top_n=5)) is None:
            pass
    score()
    res["score_512_top5_ms"] = median_ms(score, 3)
print(json.dumps(res))
"""


def export(repo: Path, ckpt: Path, out: Path) -> Path:
    if not (out / "model.onnx").is_file():
        logger.info("exporting the GQA graph with %s into %s", repo, out)
        subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(ckpt), "--task", "generate", "--attention",
                        "gqa", "--out", str(out), "--no-verify"], cwd=repo, check=True, capture_output=True)
    return out / "model.onnx"


def measure(mode: str, repo: Path, model: Path, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", WORKER, mode, str(model), str(args.threads), str(args.steps)],
                         cwd=repo, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{mode} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.server_bench import _checkpoint_with_tokenizer

    ckpt = _checkpoint_with_tokenizer()
    before_repo = Path(args.before).resolve()
    systems = {"before": (before_repo, export(before_repo, ckpt, CACHE / "selection" / "before")),
               "after": (REPO, export(REPO, ckpt, CACHE / "selection" / "after"))}
    rounds: dict[str, list[dict[str, float]]] = {k: [] for k in systems}
    for i in range(args.rounds):
        for mode, (repo, model) in systems.items():
            rounds[mode].append(measure(mode, repo, model, args))
            logger.info("round %d/%d %s: %s", i + 1, args.rounds, mode, rounds[mode][-1])
    summary = {mode: {k: {"median": statistics.median(r[k] for r in rs), "min": min(r[k] for r in rs),
                          "max": max(r[k] for r in rs)} for k in rs[0]} for mode, rs in rounds.items()}
    rec = {"command": "python -m bench.selection " + " ".join(sys.argv[1:]), "machine": machine_info(),
           "before_commit": _commit(before_repo), "after_commit": _commit(REPO), "threads": args.threads,
           "summary": summary, "rounds": rounds}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "selection.json").write_text(json.dumps(rec, indent=2))
    return rec


METRICS = {"decode_b1_ms": "greedy decode step + selection, batch 1 (ms)",
           "decode_b32_ms": "greedy decode step + selection, batch 32 (ms)",
           "prefill_512_first_token_ms": "512-token prefill + first token (ms)",
           "prefill_512_after_idle_ms": "the same, first after the engine went idle (KV buffers grown again) (ms)",
           "decode_b32_logprobs5_ms": "decode step, batch 32, 5 alternatives per row (ms)",
           "score_512_top5_ms": "score a 512-token prompt: every position's logprob + top 5 (ms)"}


# After-only metrics compared with a before metric (the before runner kept its buffers whole).
BASELINE = {"prefill_512_after_idle_ms": "prefill_512_first_token_ms"}


def table(rec: dict[str, Any]) -> str:
    s = rec["summary"]

    def cell(mode: str, k: str) -> str:
        v = s[mode].get(k)
        return "—" if v is None else f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"

    lines = [f"| | before `{(rec['before_commit'] or '?')[:8]}` (logits to the host) | after `"
             f"{(rec['after_commit'] or '?')[:8]}` (top-N from the graph) | after / before |",
             "| --- | --- | --- | --- |"]
    for k, label in METRICS.items():
        ratio, base = "", BASELINE.get(k, k)
        if base in s["before"] and k in s["after"]:
            ratio = f"{s['after'][k]['median'] / s['before'][base]['median']:.2f}x"
        lines.append(f"| {label} | {cell('before', k)} | {cell('after', k)} | {ratio} |")
    return "\n".join(lines)


def update_md(rec: dict[str, Any], md: Path = REPO / "BENCHMARKS.md") -> None:
    body = (f"### Token selection in the graph (issues 19, 22): what plain requests pay\n\nCommand: "
            f"`{rec['command']}`  \n{rec['machine']['cpu']}, {rec['threads']} threads; GPT-2 124M shape fp32, GQA "
            f"graph, the runner alone; medians (ranges) over {len(rec['rounds']['after'])} alternating rounds, each "
            f"in a fresh process. The after runner's KV buffers follow the work (issue 21): an empty batch "
            f"keeps what it grew until the engine has been idle for `IDLE_RELEASE_S` (1 s), so back-to-back "
            f"requests reuse it; the after-idle line is the first long prompt after such a release.\n\n"
            + table(rec) + "\n")
    replace_section(md, "selection", body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.selection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="checkout of the commit to compare with")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--update-md", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench.selection] %(message)s", stream=sys.stderr)
    rec = run(args)
    sys.stdout.write(table(rec) + "\n")
    if args.update_md:
        update_md(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
