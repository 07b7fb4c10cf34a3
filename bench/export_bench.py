"""Engine-level benchmark of the exported graphs against the anchors, on a GPT-2 124M shape.

    python -m bench.export_bench [--threads 2] [--repeats 5]

Systems, all on the same random weights (transformers' `GPT2Config()`, seed 0, no download):
  ours-onnx-fused       our export: SkipLayerNormalization + FastGelu (ONNX Runtime, CPU EP)
  ours-onnx-unfused     the same export with plain Add + LayerNormalization and decomposed GELU
  ours-onnx-fused-int8  the fused export, int8 dynamic quantization of the MatMul weights
  ours-onnx-gqa         the export CPU serving uses: fused + GroupQueryAttention, run through the
                        serving runner (OrtSlotRunner: shared KV buffers written in place, IO binding)
  ours-onnx-gqa-int8    the same, int8 MatMul weights
  ours-torch            our PyTorch GPT-2 (eager, KV cache)
  transformers          GPT2LMHeadModel forward with its KV cache (the loop `generate` runs)
  optimum               Optimum's ORTModelForCausalLM export (run in its own venv, see bench/README.md)
Writes bench/results/export_bench.json and the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Workloads, machine_info, run_workloads
from bench.report import replace_section

logger = logging.getLogger("bench.export_bench")

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
RESULTS = REPO / "bench" / "results"
OPTIMUM_PY = REPO / "bench" / ".venv-optimum" / "bin" / "python"


def build_checkpoint(folder: Path) -> Path:
    """GPT-2 124M-shaped random weights in HF format (transformers' GPT2Config defaults)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    model.save_pretrained(folder)
    return folder


class OrtGraph:
    """Our generation graph on ONNX Runtime's CPU EP; KV fed back as numpy (host) arrays."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.dtype = np.float16 if self.past[0].type == "tensor(float16)" else np.float32

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, kv: dict[str, np.ndarray]):
        outs = dict(zip(self.outputs, self.sess.run(None, {"input_ids": ids, "attention_mask": mask,
                                                              "position_ids": pos, **kv}), strict=True))
        new_kv = {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}
        return outs["logits"], (mask, pos[:, -1:], new_kv)

    def prefill(self, ids: np.ndarray):
        B, T = ids.shape
        kv = {i.name: np.zeros((B, i.shape[1], 0, i.shape[3]), self.dtype) for i in self.past}
        return self._run(ids, np.ones((B, T), np.int64), np.tile(np.arange(T), (B, 1)), kv)

    def step(self, state, next_ids: np.ndarray):
        mask, last_pos, kv = state
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        return self._run(next_ids, mask, last_pos + 1, kv)


class SlotGraph:
    """The GQA graph through the serving runner: shared KV buffers, IO binding over numpy."""

    def __init__(self, path: Path, threads: int) -> None:
        from app.engine.ort_runner import OrtSlotRunner

        self.runner = OrtSlotRunner(path, "cpu", threads, n_positions=1024)

    def prefill(self, ids: np.ndarray):
        self.runner.reset()
        return self.runner.add(ids.tolist()).logits, None

    def step(self, state, next_ids: np.ndarray):
        return self.runner.step(next_ids[:, 0].tolist()).logits, state


class TorchOurs:
    def __init__(self, checkpoint: Path) -> None:
        from model import load_pretrained

        self.model = load_pretrained(checkpoint)

    def prefill(self, ids: np.ndarray):
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(ids), last_only=True)
        return out.logits.numpy(), (torch.ones(ids.shape, dtype=torch.long), out.past_key_values)

    def step(self, state, next_ids: np.ndarray):
        import torch

        mask, past = state
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], dim=1)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(next_ids), mask, past_key_values=past, last_only=True)
        return out.logits.numpy(), (mask, out.past_key_values)


class Transformers:
    """GPT2LMHeadModel's forward with its cache and logits for the last position only: the
    per-step work of `generate`, without its Python-side logits processors."""

    def __init__(self, checkpoint: Path) -> None:
        import transformers

        self.model = transformers.GPT2LMHeadModel.from_pretrained(checkpoint).eval()

    def prefill(self, ids: np.ndarray):
        import torch

        mask = torch.ones(ids.shape, dtype=torch.long)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(ids), attention_mask=mask, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].numpy(), (mask, out.past_key_values)

    def step(self, state, next_ids: np.ndarray):
        import torch

        mask, past = state
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], dim=1)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(next_ids), attention_mask=mask, past_key_values=past, use_cache=True,
                             logits_to_keep=1)
        return out.logits[:, -1].numpy(), (mask, out.past_key_values)


def _optimum(checkpoint: Path, threads: int, w: Workloads) -> dict[str, Any]:
    if not OPTIMUM_PY.is_file():
        return {"skipped": f"no Optimum venv at {OPTIMUM_PY.parent.parent} (run `make bench-venv`)"}
    cmd = [str(OPTIMUM_PY), "-m", "bench.optimum_anchor", "--checkpoint", str(checkpoint), "--threads", str(threads),
           "--workloads", json.dumps(asdict(w)), "--cache", str(CACHE / "optimum")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        logger.error("optimum anchor failed:\n%s", r.stderr[-3000:])
        return {"skipped": f"optimum anchor failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "skipped" not in r]
    if not ok:
        return runs[-1]
    return {k: round(statistics.median(r[k] for r in ok), 2) for k in ok[0]}


COLUMNS = [("prefill_128_ms", "prefill 128 (ms)"), ("prefill_512_ms", "prefill 512 (ms)"),
           ("decode_b1_tok_s", "decode b1 (tok/s)"), ("decode_b8_tok_s", "decode b8 (tok/s)")]


def table(results: dict[str, dict[str, Any]], baseline: str = "transformers") -> str:
    base = results.get(baseline, {})
    head = "| system | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | " + " | ".join("—" for _ in COLUMNS) + f" |  ({r['skipped']})")
            continue
        cells = []
        for key, _ in COLUMNS:
            v, b = r.get(key), base.get(key)
            if v is None:
                cells.append("—")
                continue
            # ratio > 1 means better than transformers: less time for prefill, more tok/s for decode
            ratio = (b / v if key.endswith("_ms") else v / b) if b else None
            cells.append(f"{v:g}" + (f" ({ratio:.2f}×)" if ratio and name != baseline else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Four panels (prefill 128/512 ms, decode b1/b8 tok/s), one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if "skipped" not in r]
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 4))
    for ax, (key, title) in zip(axes, COLUMNS, strict=True):
        vals = [results[n].get(key, 0) for n in names]
        ax.barh(names, vals, color=["tab:blue" if n.startswith("ours") else "tab:gray" for n in names])
        ax.set_title(title + (" - lower is better" if key.endswith("_ms") else " - higher is better"), fontsize=9)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
        if ax is not axes[0]:
            ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each workload within a round")
    p.add_argument("--rounds", type=int, default=3, help="passes over all systems; medians across rounds")
    p.add_argument("--systems", default="ours-onnx-gqa,ours-onnx-gqa-int8,ours-onnx-fused,ours-onnx-unfused,"
                                        "ours-onnx-fused-int8,ours-torch,transformers,optimum")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from bench/results/export_bench.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    if args.plot_only:
        plot(json.loads((RESULTS / "export_bench.json").read_text())["results"], RESULTS / "export_bench.png")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    from export.graphs import export_generation
    from export.precision import to_int8_dynamic
    from model import load_pretrained

    ckpt = build_checkpoint(CACHE / "gpt2-124m-random")
    w = Workloads(repeats=args.repeats)
    graphs = {"ours-onnx-fused": CACHE / "fused.onnx", "ours-onnx-unfused": CACHE / "unfused.onnx",
              "ours-onnx-fused-int8": CACHE / "fused-int8.onnx"}
    slot_graphs = {"ours-onnx-gqa": CACHE / "gqa.onnx", "ours-onnx-gqa-int8": CACHE / "gqa-int8.onnx"}
    wanted = args.systems.split(",")
    if any(s.startswith("ours-onnx") for s in wanted):
        model = load_pretrained(ckpt)
        for name, fused in (("ours-onnx-fused", True), ("ours-onnx-unfused", False)):
            if not graphs[name].is_file():
                logger.info("exporting %s", name)
                export_generation(model, graphs[name], fused=fused)
        if not slot_graphs["ours-onnx-gqa"].is_file():
            logger.info("exporting ours-onnx-gqa")
            export_generation(model, slot_graphs["ours-onnx-gqa"], attention="gqa")
        for fp32, int8 in (("ours-onnx-fused", "ours-onnx-fused-int8"), ("ours-onnx-gqa", "ours-onnx-gqa-int8")):
            out = (graphs | slot_graphs)[int8]
            if not out.is_file():
                import onnx

                from export.fusion import prune_unused_optional_outputs

                proto = onnx.load(str((graphs | slot_graphs)[fp32]))
                prune_unused_optional_outputs(proto)
                to_int8_dynamic(proto, out)
        del model

    # Rounds: every system once per round, medians across rounds. This machine's speed drifts
    # over minutes (shared host), so spreading each system over time beats back-to-back repeats.
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in wanted}
    for r in range(args.rounds):
        for name in wanted:
            logger.info("round %d/%d: measuring %s", r + 1, args.rounds, name)
            if name in graphs:
                res = run_workloads(OrtGraph(graphs[name], args.threads), w)
            elif name in slot_graphs:
                res = run_workloads(SlotGraph(slot_graphs[name], args.threads), w)
            elif name == "ours-torch":
                res = run_workloads(TorchOurs(ckpt), w)
            elif name == "transformers":
                res = run_workloads(Transformers(ckpt), w)
            elif name == "optimum":
                res = _optimum(ckpt, args.threads, w)
            else:
                p.error(f"unknown system {name!r}")
            logger.info("%s: %s", name, res)
            rounds[name].append(res)
    results = {name: _median(runs) for name, runs in rounds.items()}

    cmd = "python -m bench.export_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"benchmark": "export_bench", "command": cmd.strip(), "machine": machine_info(), "threads": args.threads,
              "workloads": asdict(w), "rounds": args.rounds, "results": results, "per_round": rounds}
    md = table(results)
    sys.stdout.write(md + "\n")
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "export_bench.json").write_text(json.dumps(record, indent=2) + "\n")
        plot(results, RESULTS / "export_bench.png")
        m = record["machine"]
        body = (f"Command: `{record['command']}`  \nMachine: {m['cpu']}, {m['cores']} cores, {args.threads} threads; "
                f"GPT-2 124M shape, random weights; medians over {args.rounds} rounds (each: every system in turn, "
                f"median of {args.repeats} timed runs per workload). Prefill is batch 1; decode is "
                f"{w.decode_steps} greedy steps after a {w.decode_prompt}-token prompt. Ratios are against "
                f"`transformers` (higher is better).\n\n{md}\n\n![engine benchmark](bench/results/export_bench.png)\n")
        replace_section(REPO / "BENCHMARKS.md", "export_bench", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
