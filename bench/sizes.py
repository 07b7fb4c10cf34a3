"""Every official GPT-2 size through the real server: export, start, memory, speed, against PyTorch.

    python -m bench.sizes [--sizes small,medium,large,xl] [--precisions fp32,int8,int4] [--torch]
                          [--checkpoints DIR] [--update-md]

Per size (random weights of the official shape, made with transformers from `GPT2Config` into
`--checkpoints`; XL in the hub's sharded-safetensors layout) and precision, with the server's
default settings otherwise:
  export      the first start's export child: wall time and its peak RSS (the server's process
              tree sampled every 0.1 s; the export is the child `python -m export`)
  cold / warm launch to the first /health 200 with an empty cache, and again with the export cached
  idle RSS    the server's RSS once healthy (warmed up, nothing running)
  1 / 8 streams  greedy /generate, 32-token prompts, 64 new tokens, aggregate tokens/s
`--torch` adds the same server on `BACKEND=torch` (PyTorch fp32) per size. Writes
bench/results/sizes.json and, with --update-md, the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_info
from bench.report import replace_section

logger = logging.getLogger("bench.sizes")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_CHECKPOINTS = Path.home() / ".cache" / "gpt2-serve" / "checkpoints"
# The official shapes: (n_embd, n_layer, n_head); vocabulary 50257, context 1024.
SHAPES = {"small": (768, 12, 12), "medium": (1024, 24, 16), "large": (1280, 36, 20), "xl": (1600, 48, 25)}
LABELS = {"small": "124M", "medium": "355M", "large": "774M", "xl": "1.5B"}
GIB = 1 << 30


def build_checkpoint(size: str, root: Path) -> Path:
    """Random weights of an official GPT-2 shape in HF format, with the real BPE files. XL is
    saved in shards (`model-0000x-of-0000N.safetensors` + `model.safetensors.index.json`)."""
    folder = root / f"gpt2-{size}"
    if (folder / "config.json").is_file() and (folder / "vocab.json").is_file():
        return folder
    import torch
    import transformers

    from model.tokenizer import default_bpe_files

    e, n_layer, n_head = SHAPES[size]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=e, n_layer=n_layer, n_head=n_head)).eval()
    model.save_pretrained(folder, max_shard_size="2GB" if size == "xl" else "50GB")
    del model
    vocab, merges = default_bpe_files()
    shutil.copyfile(vocab, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")
    return folder


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


class TreeSampler:
    """Peak RSS of each process below `pid` (not the server itself), sampled every 0.1 s,
    with the first and last time a child was seen (the export child's wall time)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.first, self.last = pid, 0, None, None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            kids, stack = [], _children(self.pid)
            while stack:
                c = stack.pop()
                kids.append(c)
                stack += _children(c)
            if kids:
                now = time.monotonic()
                self.first = self.first or now
                self.last = now
                self.peak = max(self.peak, sum(_rss(k) for k in kids))
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def _start(env: dict[str, str], log: Path, timeout: float = 3600) -> tuple[subprocess.Popen, str, float, TreeSampler]:
    port = 18600 + os.getpid() % 300
    url = f"http://127.0.0.1:{port}"
    full = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "CLASSIFIER_PATH": "", "LOG_LEVEL": "WARNING", **env}
    t0 = time.monotonic()
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=full, stdout=f, stderr=subprocess.STDOUT)
    sampler = TreeSampler(proc.pid)
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            sampler.stop()
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                sampler.stop()
                return proc, url, time.monotonic() - t0, sampler
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sampler.stop()
    proc.kill()
    raise RuntimeError(f"server not healthy after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _streams(url: str, n: int, new_tokens: int = 64, prompt_tokens: int = 32) -> float:
    """Aggregate generated tokens/s of `n` concurrent greedy /generate requests (median of 3)."""
    prompt = " ".join(["token"] * prompt_tokens)  # " token" is one GPT-2 token

    def one(_: int) -> int:
        r = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {
            "max_new_tokens": new_tokens, "details": True}}, timeout=1800, trust_env=False)
        r.raise_for_status()
        return r.json()["details"]["generated_tokens"]

    rates = []
    with ThreadPoolExecutor(n) as pool:
        one(0)  # warm-up
        for _ in range(3):
            t = time.perf_counter()
            tokens = sum(pool.map(one, range(n)))
            rates.append(tokens / (time.perf_counter() - t))
    return statistics.median(rates)


def measure(ckpt: Path, precision: str, backend: str, work: Path) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    env = {"MODEL_PATH": str(ckpt), "ONNX_CACHE_DIR": str(cache), "BACKEND": backend}
    if backend != "torch":
        env["PRECISION"] = precision
    log = work / f"{ckpt.name}-{backend}-{precision}.log"
    row: dict[str, Any] = {"size": ckpt.name, "backend": backend, "precision": precision if backend != "torch"
                           else "fp32"}
    proc, url, cold, sampler = _start(env, log)
    try:
        info = httpx.get(url + "/info", timeout=10, trust_env=False).json()["generation"]
        row |= {"served_by": info["backend"], "fallback_reason": info["fallback_reason"], "cold_s": round(cold, 1)}
        if sampler.first is not None:
            row |= {"export_s": round(sampler.last - sampler.first, 1), "export_peak_gib": round(sampler.peak / GIB, 2)}
        time.sleep(1)
        row["idle_rss_gib"] = round(_rss(proc.pid) / GIB, 2)
        row["tok_s_1"] = round(_streams(url, 1), 1)
        row["tok_s_8"] = round(_streams(url, 8), 1)
        row["peak_rss_gib"] = round(int(Path(f"/proc/{proc.pid}/status").read_text().split("VmHWM:")[1].split()[0])
                                    * 1024 / GIB, 2)
    finally:
        _stop(proc)
    if backend != "torch":
        proc, _, warm, _ = _start(env, log)
        _stop(proc)
        row["warm_s"] = round(warm, 1)
    shutil.rmtree(cache, ignore_errors=True)
    logger.info("%s", row)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| size | precision | served by | export time / peak RSS | healthy cold / warm | idle RSS | peak RSS | "
            "1 stream tok/s | 8 streams tok/s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for r in rows:
        size = r["size"].removeprefix("gpt2-")
        export = f"{r['export_s']} s / {r['export_peak_gib']} GiB" if "export_s" in r else "-"
        warm = f" / {r['warm_s']} s" if "warm_s" in r else ""
        served = r.get("served_by", "?") + (f" (fallback: {r['fallback_reason']})" if r.get("fallback_reason") else "")
        prec = "PyTorch fp32" if r["backend"] == "torch" else r["precision"]
        lines.append(f"| {size} {LABELS.get(size, '')} | {prec} | {served} | {export} | {r['cold_s']} s{warm} | "
                     f"{r['idle_rss_gib']} GiB | {r['peak_rss_gib']} GiB | {r['tok_s_1']} | {r['tok_s_8']} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sizes", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="small,medium,large,xl")
    p.add_argument("--precisions", default="fp32,int8,int4")
    p.add_argument("--torch", action="store_true", help="also the PyTorch backend (fp32) per size")
    p.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    p.add_argument("--update-md", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-sizes-"))
    rows = []
    for size in args.sizes.split(","):
        ckpt = build_checkpoint(size, args.checkpoints)
        for precision in args.precisions.split(","):
            rows.append(measure(ckpt, precision, "auto", work))
        if args.torch:
            rows.append(measure(ckpt, "fp32", "torch", work))
    cmd = "python -m bench.sizes " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": cmd, "machine": machine_info(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sizes.json").write_text(json.dumps(record, indent=1) + "\n")
    body = (f"Command: `{cmd}`  \nMachine: {record['machine']['cpu']}, {record['machine']['cores']} cores, "
            f"shared; {record['time']}; random weights of each official shape; default settings otherwise. "
            "One start per row; stream rates are medians of 3 rounds after a warm-up.\n\n" + table(rows))
    sys.stdout.write(body)
    if args.update_md:
        replace_section(REPO / "BENCHMARKS.md", "sizes", body)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
