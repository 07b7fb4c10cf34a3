"""Server-level sweep: our server against a naive FastAPI + transformers `generate` baseline, on
the same GPT-2 124M-shaped random checkpoint, through HTTP, at several concurrencies.

    python -m bench.server_bench [--concurrency 1,4,16,32] [--repeats 3] [--max-new-tokens 32]

Each point is the median of `repeats` runs of the load test (`loadtest.run`), with
max(8, concurrency) requests of greedy /generate. Writes bench/results/server_bench.json,
bench/results/server_bench.png and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_info
from bench.export_bench import CACHE, REPO, RESULTS, build_checkpoint
from bench.report import replace_section
from loadtest.run import LoadConfig, run_load

logger = logging.getLogger("bench.server_bench")


def _checkpoint_with_tokenizer() -> Path:
    ckpt = build_checkpoint(CACHE / "gpt2-124m-random")
    if not (ckpt / "vocab.json").is_file():
        from model.tokenizer import default_bpe_files

        vocab, merges = default_bpe_files()
        shutil.copyfile(vocab, ckpt / "vocab.json")
        shutil.copyfile(merges, ckpt / "merges.txt")
    return ckpt


def _start(cmd: list[str], env: dict[str, str], url: str, log: Path, timeout: float = 900,
           cwd: Path = REPO) -> subprocess.Popen:
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:  # loopback: no proxy
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd} never became healthy")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def sweep(url: str, concurrencies: list[int], repeats: int, max_new_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in concurrencies:
        runs = []
        for _ in range(repeats):
            cfg = LoadConfig(url=url, endpoint="generate", concurrency=c, requests=max(8, c),
                             max_new_tokens=max_new_tokens, timeout=900)
            s = asyncio.run(run_load(cfg))
            if s["error_count"]:
                raise RuntimeError(f"{url} c={c}: errors {s['errors']} {s['error_examples']}")
            runs.append(s)
        out[str(c)] = {
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 2),
            "requests_per_s": round(statistics.median(r["requests_per_s"] for r in runs), 3),
            "latency_p50_s": round(statistics.median(r["latency_s"]["p50"] for r in runs), 3),
            "latency_p99_s": round(statistics.median(r["latency_s"]["p99"] for r in runs), 3),
            "runs": len(runs),
        }
        logger.info("%s c=%d: %s", url, c, out[str(c)])
    return out


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        cs = [int(c) for c in res]
        a.plot(cs, [res[str(c)]["tokens_per_s"] for c in cs], marker="o", label=name)
        b.plot(cs, [res[str(c)]["latency_p50_s"] for c in cs], marker="o", label=f"{name} p50")
        b.plot(cs, [res[str(c)]["latency_p99_s"] for c in cs], marker="x", linestyle="--", label=f"{name} p99")
    a.set(xscale="log", xlabel="concurrent clients", ylabel="generated tokens/s", title="throughput")
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="request latency (s)", title="latency")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.server_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--systems", default="ours,naive")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    ckpt = _checkpoint_with_tokenizer()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    port = 8790
    for name in args.systems.split(","):
        url = f"http://127.0.0.1:{port}"
        if name == "ours":
            env = {"MODEL_PATH": str(ckpt), "CLASSIFIER_PATH": "", "ONNX_CACHE_DIR": str(CACHE / "onnx"),
                   "HOST": "127.0.0.1", "PORT": str(port), "NUM_THREADS": str(args.threads), "LOG_LEVEL": "WARNING",
                   "MAX_CONCURRENT_REQUESTS": "256", "MAX_BATCH_SIZE": "32"}
            proc = _start([sys.executable, "-m", "app"], env, url, RESULTS / "server_bench_ours.log")
        elif name == "naive":
            proc = _start([sys.executable, "-m", "bench.naive_server", "--checkpoint", str(ckpt), "--port", str(port),
                           "--threads", str(args.threads)], {}, url, RESULTS / "server_bench_naive.log")
        else:
            p.error(f"unknown system {name!r}")
        try:
            results[name] = sweep(url, concurrencies, args.repeats, args.max_new_tokens)
        finally:
            _stop(proc)
        port += 1

    cmd = "python -m bench.server_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"benchmark": "server_bench", "command": cmd.strip(), "machine": machine_info(), "threads": args.threads,
              "max_new_tokens": args.max_new_tokens, "results": results}
    lines = ["| concurrency | " + " | ".join(f"{n} tok/s | {n} p50 / p99 (s)" for n in results) + " | ours / naive |",
             "|" + " --- |" * (2 * len(results) + 2)]
    for c in concurrencies:
        cells = []
        for n in results:
            r = results[n][str(c)]
            cells += [f"{r['tokens_per_s']:g}", f"{r['latency_p50_s']:g} / {r['latency_p99_s']:g}"]
        ratio = ""
        if "ours" in results and "naive" in results:
            ratio = f"{results['ours'][str(c)]['tokens_per_s'] / results['naive'][str(c)]['tokens_per_s']:.2f}×"
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {ratio} |")
    md = "\n".join(lines)
    sys.stdout.write(md + "\n")
    if not args.no_write:
        (RESULTS / "server_bench.json").write_text(json.dumps(record, indent=2) + "\n")
        plot(results, RESULTS / "server_bench.png")
        m = record["machine"]
        body = (f"Command: `{record['command']}`  \nMachine: {m['cpu']}, {m['cores']} cores; server and load "
                f"generator share them. GPT-2 124M shape, random weights, greedy /generate with "
                f"{args.max_new_tokens} new tokens, max(8, concurrency) requests per run, medians of {args.repeats} "
                f"runs. `naive` is a minimal FastAPI app calling transformers `generate` per request "
                f"(`bench/naive_server.py`).\n\n{md}\n\n![server sweep](bench/results/server_bench.png)\n")
        replace_section(REPO / "BENCHMARKS.md", "server_bench", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
