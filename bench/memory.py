"""Where the server's memory goes, at rest and through a burst (issue 21, "memory follows the work").

    python -m bench.memory [--precision fp32] [--rounds 3] [--server-repo DIR --label before] [--update-md]

The GPT-2 124M-shaped random checkpoint served by `python -m app` (default settings but the
checkpoint, on ONNX Runtime); its resident memory (VmRSS) is sampled every 20 ms by this process:
  rest        after /health is 200 (models loaded and warmed up, nothing running)
  burst peak  the largest sample while 32 streams (32-token prompts, 64 new tokens each, greedy)
              arrive at once and run to the end; with their tokens/s and time to first token
  after       2 s after the burst
and /metrics' `gpt2_kv_cache_bytes` (reserved, in use) at the burst's peak. The profile splits
the peak into: Python and the libraries (a process that only imports the server), the loaded
session (rest minus that; weights, ONNX Runtime's pre-packed copies), the KV cache reserved at
the peak, and the rest (ONNX Runtime's arena, activations, Python objects). Rounds alternate
with `--server-repo` (another checkout, e.g. the commit before) when given; medians and ranges.
Writes bench/results/memory_<label>.json and the `memory` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_info
from bench.export_bench import REPO, RESULTS
from bench.report import replace_section
from bench.targets import _burst, _client, _commit, _status_mib, _tokenizer, prompt_text, serve

logger = logging.getLogger("bench.memory")

STREAMS, PROMPT, NEW = 32, 32, 64


class Sampler:
    """VmRSS of `pid` (MiB) every `period` seconds in a thread, and /metrics' KV bytes alongside."""

    def __init__(self, pid: int, url: str, period: float = 0.02) -> None:
        self.pid, self.url, self.period = pid, url, period
        self.samples: list[tuple[float, float]] = []
        self.kv: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last_metrics = 0.0
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as client:
            while not self._stop.is_set():
                now = time.perf_counter()
                rss = _status_mib(self.pid, "VmRSS")
                if rss is not None:
                    self.samples.append((now, rss))
                if now - last_metrics > 0.2:  # the KV gauges, less often: /metrics is a request too
                    last_metrics = now
                    self.kv.append(kv_bytes(client))
                time.sleep(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return max(r for _, r in self.samples)


def kv_bytes(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("gpt2_kv_cache_bytes{"):
            out[line.split('kind="')[1].split('"')[0]] = float(line.split()[-1])
        elif line.startswith("gpt2_prefix_cache_bytes "):  # issue 28: the prefix cache, beside the batch's KV
            out["prefix"] = float(line.split()[-1])
    return out


def import_baseline(repo: Path) -> float:
    """RSS (MiB) of a process that imports the server and ONNX Runtime, loads nothing."""
    code = ("import app.main, onnxruntime, numpy\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def one_round(ckpt: Path, args: argparse.Namespace, repo: Path) -> dict[str, Any]:
    sargs = argparse.Namespace(ttft_tokens=PROMPT, prompt_tokens=PROMPT, new_tokens=NEW, streams=STREAMS,
                               threads=args.threads, server_env=[], server_repo=repo)
    tok = _tokenizer(ckpt)
    texts = [prompt_text(tok, PROMPT, i) for i in range(STREAMS)]
    with serve(ckpt, args.precision, sargs) as srv:
        pid = srv.proc.pid
        time.sleep(1.0)
        rest = _status_mib(pid, "VmRSS")
        with httpx.Client(base_url=srv.url, timeout=5, trust_env=False) as c:
            kv_rest = kv_bytes(c)

        async def burst() -> dict[str, Any]:
            async with _client(srv.url, STREAMS) as client:
                return await _burst(client, texts, NEW)

        with Sampler(pid, srv.url) as sampler:
            res = asyncio.run(burst())
            time.sleep(0.2)
        time.sleep(2.0)
        after = _status_mib(pid, "VmRSS")
        hwm = _status_mib(pid, "VmHWM")
        with httpx.Client(base_url=srv.url, timeout=5, trust_env=False) as c:
            kv_bytes_after = kv_bytes(c)
        gen = srv.info.get("generation") or {}
    kv_peak = max((k.get("reserved", 0.0) for k in sampler.kv), default=0.0)
    kv_used = max((k.get("in_use", 0.0) for k in sampler.kv), default=0.0)
    prefix = max((k.get("prefix", 0.0) for k in [*sampler.kv, kv_bytes_after]), default=0.0)
    return {"rest_mib": rest, "peak_mib": sampler.peak, "after_mib": after, "hwm_since_start_mib": hwm,
            "kv_reserved_rest_mib": kv_rest.get("reserved", 0.0) / 2**20, "kv_reserved_peak_mib": kv_peak / 2**20,
            "kv_in_use_peak_mib": kv_used / 2**20, "prefix_cache_mib": prefix / 2**20,
            "peak_less_prefix_mib": sampler.peak - prefix / 2**20, "burst_tok_s": res["tok_s"],
            "ttft_p50_s": res["ttft_p50_s"],
            "samples": len(sampler.samples), "backend": gen.get("backend"), "precision": gen.get("precision")}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rounds[0].items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            vals = [r[k] for r in rounds]
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        else:
            out[k] = v
    return out


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from bench.server_bench import _checkpoint_with_tokenizer

    ckpt = _checkpoint_with_tokenizer()
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
    systems = {args.label: REPO}
    if args.server_repo:
        systems = {args.before_label: Path(args.server_repo), args.label: REPO}
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in systems}
    for r in range(args.rounds):
        for label, repo in systems.items():  # interleaved: the machine drifts
            logger.info("round %d/%d: %s (%s)", r + 1, args.rounds, label, repo)
            rounds[label].append(one_round(ckpt, args, repo))
            logger.info("%s: %s", label, rounds[label][-1])
    records = {}
    for label, repo in systems.items():
        rec = {"label": label, "commit": _commit(repo), "precision": args.precision, "weights_mib": weights,
               "import_baseline_mib": import_baseline(repo), "summary": summarize(rounds[label]),
               "rounds": rounds[label], "machine": machine_info(),
               "command": "python -m bench.memory " + " ".join(sys.argv[1:])}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"memory_{label}.json").write_text(json.dumps(rec, indent=2))
        records[label] = rec
    return records


def _m(rec: dict[str, Any], key: str) -> str:
    s = rec["summary"][key]
    return f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"


def table(records: dict[str, dict[str, Any]]) -> str:
    lines = ["| | " + " | ".join(records) + " |", "| --- |" + " --- |" * len(records)]

    def row(name: str, fn) -> None:  # noqa: ANN001
        lines.append(f"| {name} | " + " | ".join(fn(r) for r in records.values()) + " |")

    row("commit", lambda r: f"`{(r['commit'] or '?')[:8]}`")
    row("RSS at rest (MiB)", lambda r: _m(r, "rest_mib"))
    row("RSS peak through the burst (MiB)", lambda r: _m(r, "peak_mib"))
    row("peak / fp32 weight bytes", lambda r: f"{r['summary']['peak_mib']['median'] / r['weights_mib']:.2f}x "
                                              f"(target <= 2.2x)")
    if all("prefix_cache_mib" in r["summary"] for r in records.values()):
        row("prefix cache in use after the burst (MiB; PREFIX_CACHE_MB is its ceiling)",
            lambda r: _m(r, "prefix_cache_mib"))
        row("peak less the prefix cache / fp32 weight bytes",
            lambda r: f"{r['summary']['peak_less_prefix_mib']['median'] / r['weights_mib']:.2f}x (target <= 2.2x)")
    row("RSS 2 s after the burst (MiB)", lambda r: _m(r, "after_mib"))
    row("KV reserved at rest / at the peak (MiB)",
        lambda r: f"{r['summary']['kv_reserved_rest_mib']['median']:,.1f} / "
                  f"{r['summary']['kv_reserved_peak_mib']['median']:,.1f}")
    row("KV in use at the peak (MiB)", lambda r: f"{r['summary']['kv_in_use_peak_mib']['median']:,.1f}")
    row("burst tok/s (32 streams)", lambda r: f"{r['summary']['burst_tok_s']['median']:,.0f} "
                                              f"({r['summary']['burst_tok_s']['min']:,.0f}-"
                                              f"{r['summary']['burst_tok_s']['max']:,.0f})")
    row("burst TTFT p50 (ms)", lambda r: f"{1000 * r['summary']['ttft_p50_s']['median']:,.0f}")
    lines.append("")
    lines.append("Profile of the peak (medians, MiB): " + "; ".join(
        f"{label}: Python and libraries {r['import_baseline_mib']:,.0f}, loaded session {_session(r):,.0f} "
        f"(weights {r['weights_mib']:,.0f}), KV reserved {r['summary']['kv_reserved_peak_mib']['median']:,.0f}, rest "
        f"(arena, activations, Python objects) {_rest(r):,.0f}" for label, r in records.items()))
    return "\n".join(lines)


def _session(r: dict[str, Any]) -> float:
    s = r["summary"]
    return s["rest_mib"]["median"] - r["import_baseline_mib"] - s["kv_reserved_rest_mib"]["median"]


def _rest(r: dict[str, Any]) -> float:
    s = r["summary"]
    return s["peak_mib"]["median"] - s["rest_mib"]["median"] - (s["kv_reserved_peak_mib"]["median"]
                                                                  - s["kv_reserved_rest_mib"]["median"])


def update_md(records: dict[str, dict[str, Any]], md: Path = REPO / "BENCHMARKS.md") -> None:
    r = next(iter(records.values()))
    body = (f"### Memory through a burst (issue 21)\n\nCommand: `{r['command']}`  \n"
            f"GPT-2 124M shape, {r['precision']}, {r['weights_mib']:,.0f} MiB of weights; {STREAMS} streams of "
            f"{PROMPT}-token prompts and {NEW} new tokens at once; {machine_info()['cpu']}. VmRSS of the server "
            f"process sampled every 20 ms; medians (ranges) over {len(r['rounds'])} interleaved rounds.\n\n"
            + table(records) + "\n")
    replace_section(md, "memory", body)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="after")
    p.add_argument("--server-repo", default=None, help="another checkout to measure in alternation")
    p.add_argument("--before-label", default="before")
    p.add_argument("--update-md", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench.memory] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    records = run(args)
    sys.stdout.write(table(records) + "\n")
    if args.update_md:
        update_md(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
