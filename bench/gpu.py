"""GPU benchmark, one command: our server over HTTP on CUDA against transformers `generate` on the
same GPU, in one run.

    python -m bench.gpu [--update-md]                       # on a machine with an NVIDIA GPU
    python -m bench.gpu --device cpu --checkpoint DIR ...   # the same harness on CPU (the test's smoke run)

Systems (the same checkpoint, the same prompt token ids, greedy, never stopping early):
  transformers fp32 / fp16   `GPT2LMHeadModel.generate` on the device, eager attention, in this process
  ours ORT fp16 / ORT fp32   `python -m app` with BACKEND=onnxruntime, DEVICE=<device>, over HTTP
  ours torch fp32            `python -m app` with BACKEND=torch (the PyTorch fallback), over HTTP

Metrics:
  decode tok/s, 1 stream        ours: (n - 1) / (last token - first token) over /generate_stream;
                                transformers: (n - 1) / (t(generate n) - t(generate 1))
  aggregate tok/s, N streams    ours: N workers back to back for --duration s (closed loop), with the
                                p50 / p99 inter-token gap; transformers: one static batch of N,
                                N * n / t(generate n)
  time to first token           a --ttft-tokens prompt, batch 1: ours over HTTP; transformers
                                t(generate 1)
  runner step alone             our runner in this process (no HTTP, no scheduler): median time of
                                one decode step at batch 1 and at batch N, logits back on the host

Each of --repeats rounds measures every system (transformers first, then the runners, then each
server alone on the GPU); values are medians over rounds. A server that does not serve the backend,
device and precision asked for (a fallback) stops the run: a mislabeled row is worse than none.
Writes bench/results/gpu_<device>.json; --update-md writes the `gpu` section of BENCHMARKS.md
with the GPU's name and the versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_info
from bench.export_bench import CACHE, REPO, RESULTS
from bench.report import replace_section
from bench.targets import (
    ONNX_CACHE,
    Trace,
    _check_server_tokens,
    _closed_loop,
    _median,
    _need_context,
    _run,
    _tokenizer,
    prompt_text,
    serve,
    stream,
)

logger = logging.getLogger(__name__)

HF_SYSTEMS = {"hf-fp32": "fp32", "hf-fp16": "fp16"}
# name -> (BACKEND, PRECISION) of our server
OUR_SYSTEMS = {"ort-fp16": ("onnxruntime", "fp16"), "ort-fp32": ("onnxruntime", "fp32"),
               "torch-fp32": ("torch", "fp32")}
LABELS = {"hf-fp32": "transformers `generate`, fp32 eager", "hf-fp16": "transformers `generate`, fp16 eager",
          "ort-fp16": "ours, ONNX Runtime fp16, over HTTP", "ort-fp32": "ours, ONNX Runtime fp32, over HTTP",
          "torch-fp32": "ours, PyTorch fp32 fallback, over HTTP"}


# ---- transformers on the device ---------------------------------------------------------------
class HFOnDevice:
    def __init__(self, ckpt: Path, device: str, precision: str, threads: int) -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = transformers.GPT2LMHeadModel.from_pretrained(ckpt, torch_dtype=dtype,
                                                                  attn_implementation="eager").to(device).eval()
        self.eos = self.model.config.eos_token_id

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_generate(self, rows: list[list[int]], new_tokens: int) -> float:
        x = self.torch.tensor(rows, dtype=self.torch.long, device=self.device)
        with self.torch.inference_mode():
            self._sync()
            t = time.perf_counter()
            out = self.model.generate(input_ids=x, attention_mask=self.torch.ones_like(x), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.eos)
            self._sync()
            dt = time.perf_counter() - t
        if out.shape[1] != x.shape[1] + new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - x.shape[1]} tokens, not {new_tokens}")
        return dt

    def median(self, rows: list[list[int]], new_tokens: int, n: int) -> float:
        self.time_generate(rows, new_tokens)  # warm-up
        return statistics.median(self.time_generate(rows, new_tokens) for _ in range(n))

    def close(self) -> None:
        del self.model
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def measure_hf(ckpt: Path, device: str, precision: str, args: argparse.Namespace, ids: list[int],
               batch_ids: list[list[int]], ttft_ids: list[int]) -> dict[str, float]:
    hf = HFOnDevice(ckpt, device, precision, args.threads)
    try:
        new, n = args.new_tokens, args.per_round
        gen_new, gen_1 = hf.median([ids], new, n), hf.median([ids], 1, n)
        batch_s = hf.median(batch_ids, new, n)
        # decode rate: the tokens after the first over the time they added. When the two medians are
        # within noise of each other (a few tokens of a tiny model on a CPU: the difference came out
        # negative once), the whole generate's rate stands in, a lower bound.
        decode = (new - 1) / (gen_new - gen_1) if gen_new > gen_1 else new / gen_new
        return {"decode_tok_s": decode, "aggregate_tok_s": len(batch_ids) * new / batch_s,
                "ttft_s": hf.median([ttft_ids], 1, n)}
    finally:
        hf.close()


# ---- our runner alone -------------------------------------------------------------------------
def step_times(ckpt: Path, device: str, backend: str, precision: str, args: argparse.Namespace,
               prompts: list[list[int]]) -> dict[str, float]:
    """Median seconds of one decode step at batch 1 and at batch len(prompts), through the same
    loader (and export cache) as the server."""
    from app.loading.loader import load

    lo = load("generate", ckpt, backend=backend, device=device, precision=precision, cache_dir=ONNX_CACHE,
              num_threads=args.threads, max_batch_size=max(32, len(prompts)))
    if (lo.backend, lo.device, lo.precision) != (backend, device, precision):
        raise SystemExit(f"runner: asked for {backend}/{device}/{precision}, got {lo.backend}/{lo.device}/"
                         f"{lo.precision} ({lo.fallback_reason})")
    out: dict[str, Any] = {}
    if hasattr(lo.runner, "capture"):  # the fixed-buffer CUDA runner: what the server does at start
        out["cuda_graphs"] = lo.runner.capture(prompts[0])
        out["cuda_graphs_reason"] = lo.runner.graphs_reason
    try:
        for batch in (1, len(prompts)):
            r = lo.runner
            tokens = [int(t) for t in r.add(prompts[:batch]).top_ids[:, 0]]
            for _ in range(3):  # warm-up: allocations, kernels for this batch size
                tokens = [int(t) for t in r.step(tokens).top_ids[:, 0]]
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                sel = r.step(tokens)
                times.append(time.perf_counter() - t)
                tokens = [int(x) for x in sel.top_ids[:, 0]]
            r.reset()
            out[f"step_b{batch}_s"] = statistics.median(times)
    finally:
        lo.runner.close()
    return out


# ---- our server over HTTP ---------------------------------------------------------------------
def measure_server(ckpt: Path, device: str, backend: str, precision: str, args: argparse.Namespace,
                   text: str, texts: list[str], ttft_text: str) -> dict[str, Any]:
    sargs = argparse.Namespace(**vars(args))
    sargs.server_env = [("BACKEND", backend), ("DEVICE", device)]
    with serve(ckpt, precision, sargs) as srv:
        gen = srv.info["generation"]
        if (gen["backend"], gen["device"], gen["precision"]) != (backend, device, precision):
            raise SystemExit(f"server: asked for {backend}/{device}/{precision}, /info says {gen['backend']}/"
                             f"{gen['device']}/{gen['precision']} ({gen.get('fallback_reason')})")
        _check_server_tokens(srv.url, text, args.prompt_tokens)
        _check_server_tokens(srv.url, ttft_text, args.ttft_tokens)

        async def single(client: httpx.AsyncClient) -> list[Trace]:
            await stream(client, text, args.new_tokens)  # warm-up
            return [await stream(client, text, args.new_tokens) for _ in range(args.per_round)]

        async def ttft(client: httpx.AsyncClient) -> list[Trace]:
            await stream(client, ttft_text, 1)
            return [await stream(client, ttft_text, 1) for _ in range(args.per_round)]

        singles = _run(single, srv.url, 1)
        loop = _run(lambda c: _closed_loop(c, texts, args.new_tokens, args.duration), srv.url, len(texts))
        ttfts = _run(ttft, srv.url, 1)
    return {"decode_tok_s": statistics.median(t.decode_tok_s for t in singles),
            "aggregate_tok_s": loop["tok_s"], "itl_p50_s": loop["itl"]["p50_s"], "itl_p99_s": loop["itl"]["p99_s"],
            "ttft_s": statistics.median(t.ttft for t in ttfts), "attention": gen.get("attention"),
            "server_cuda_graphs": (gen.get("cuda_graphs") or {}).get("enabled")}


# ---- the run ----------------------------------------------------------------------------------
def versions(device: str) -> dict[str, Any]:
    import onnxruntime
    import torch
    import transformers

    v: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers(),
                         "python": platform.python_version()}
    if device == "cuda":
        v["gpu"] = torch.cuda.get_device_name(0)
        v["torch_cuda"] = torch.version.cuda
        try:
            v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            v["driver"] = None
    return v


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.server_bench import _checkpoint_with_tokenizer

    ckpt = args.checkpoint or _checkpoint_with_tokenizer()
    _need_context(ckpt, max(args.prompt_tokens, args.ttft_tokens), args.new_tokens, "bench.gpu")
    tok = _tokenizer(ckpt)
    texts = [prompt_text(tok, args.prompt_tokens, i) for i in range(args.streams)]
    ttft_text = prompt_text(tok, args.ttft_tokens, args.streams)
    batch_ids = [tok.encode(t) for t in texts]
    ttft_ids = tok.encode(ttft_text)
    systems = args.systems.split(",")
    unknown = set(systems) - set(HF_SYSTEMS) - set(OUR_SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {[*HF_SYSTEMS, *OUR_SYSTEMS]}")
    rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for r in range(args.repeats):
        for name in systems:
            logger.info("round %d/%d: %s", r + 1, args.repeats, name)
            if name in HF_SYSTEMS:
                res = measure_hf(ckpt, args.device, HF_SYSTEMS[name], args, batch_ids[0], batch_ids, ttft_ids)
            else:
                backend, prec = OUR_SYSTEMS[name]
                res = step_times(ckpt, args.device, backend, prec, args, batch_ids)
                gc.collect()
                res |= measure_server(ckpt, args.device, backend, prec, args, texts[0], texts, ttft_text)
            logger.info("%s: %s", name, res)
            rounds[name].append(res)
    def numeric(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    # medians of the measurements; labels (attention, whether CUDA graphs replayed) from the first round
    summary = {name: {k: _median([rd[k] for rd in rs]) if numeric(v) else v for k, v in rs[0].items()}
               for name, rs in rounds.items()}
    return {"command": "python -m bench.gpu " + " ".join(sys.argv[1:]), "device": args.device,
            "checkpoint": str(ckpt.name), "machine": machine_info(), "versions": versions(args.device),
            "settings": {k: getattr(args, k) for k in ("prompt_tokens", "new_tokens", "ttft_tokens", "streams",
                                                      "duration", "repeats", "per_round", "steps", "threads")},
            "summary": summary, "rounds": rounds}


def _f(v: float | None, scale: float = 1.0, digits: int = 4) -> str:
    return "—" if v is None else f"{v * scale:.{digits}g}"


def table(rec: dict[str, Any]) -> str:
    s, n = rec["summary"], rec["settings"]["streams"]
    anchor = (s.get("hf-fp16") or {}).get("decode_tok_s")
    anchor_agg = (s.get("hf-fp16") or {}).get("aggregate_tok_s")
    anchor_ttft = (s.get("hf-fp16") or {}).get("ttft_s")

    def ratio(v: float | None, a: float | None) -> str:
        return "" if v is None or not a else f" ({v / a:.2f}×)"

    lines = [f"| system | 1 stream decode tok/s | {n} streams aggregate tok/s | gap p50 / p99 (ms) | "
             f"TTFT {rec['settings']['ttft_tokens']} tokens (ms) | runner step b1 / b{n} (ms) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, v in s.items():
        agg = _f(v.get("aggregate_tok_s")) + ratio(v.get("aggregate_tok_s"), anchor_agg)
        if name in HF_SYSTEMS:
            agg += f" (one static batch of {n})"
        gaps = "—" if "itl_p50_s" not in v else f"{_f(v['itl_p50_s'], 1000, 3)} / {_f(v['itl_p99_s'], 1000, 3)}"
        steps = "—" if "step_b1_s" not in v else f"{_f(v['step_b1_s'], 1000, 3)} / {_f(v.get(f'step_b{n}_s'), 1000, 3)}"
        label = LABELS[name]
        if v.get("server_cuda_graphs") is not None:
            label += ", CUDA graphs" if v["server_cuda_graphs"] else ", eager steps (no CUDA graphs)"
        lines.append(f"| {label} | {_f(v['decode_tok_s'])}{ratio(v['decode_tok_s'], anchor)} | {agg} | {gaps} | "
                     f"{_f(v['ttft_s'], 1000, 3)}{ratio(v['ttft_s'], anchor_ttft)} | {steps} |")
    return "\n".join(lines)


def update_md(rec: dict[str, Any], md: Path = REPO / "BENCHMARKS.md") -> None:
    v = rec["versions"]
    where = (f"{v.get('gpu')}, driver {v.get('driver')}, torch {v['torch']} (CUDA {v.get('torch_cuda')})"
             if rec["device"] == "cuda" else f"CPU only ({rec['machine']['cpu']})")
    body = (f"### GPU: our server against transformers on the same device\n\n"
            f"Command: `{rec['command']}`  \n{where}; transformers {v['transformers']}, onnxruntime "
            f"{v['onnxruntime']}; checkpoint `{rec['checkpoint']}`; settings {rec['settings']}. Medians over "
            f"rounds. In brackets: each / transformers fp16 (for time to first token, below 1 is faster)."
            f"\n\n{table(rec)}\n")
    replace_section(md, "gpu", body)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="default: the GPT-2 124M-shaped random-weight checkpoint of bench/server_bench.py")
    p.add_argument("--systems", default=",".join([*HF_SYSTEMS, *OUR_SYSTEMS]))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per-round", type=int, default=3, help="timed requests (or generate calls) per metric")
    p.add_argument("--steps", type=int, default=50, help="timed runner steps per batch size")
    p.add_argument("--threads", type=int, default=2, help="server NUM_THREADS and torch CPU threads")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ttft-tokens", type=int, default=512)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="closed-loop seconds per server")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/gpu_<device>.json")
    p.add_argument("--update-md", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench.gpu] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.device == "cuda":
        import onnxruntime
        import torch

        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise SystemExit("--device cuda needs torch with CUDA and onnxruntime-gpu (CUDAExecutionProvider)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    args.server_env, args.server_repo, args.label = [], REPO, None  # what bench.targets.serve reads
    rec = run(args)
    out = args.out or RESULTS / f"gpu_{args.device}.json"
    out.write_text(json.dumps(rec, indent=2) + "\n")
    sys.stdout.write(table(rec) + "\n")
    if args.update_md:
        update_md(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
