"""The Optimum anchor, run in its own venv (Optimum pins transformers 4.x; the project uses 5.x).

    bench/.venv-optimum/bin/python -m bench.optimum_anchor --checkpoint DIR --threads 2 --workloads JSON

Exports the checkpoint with `ORTModelForCausalLM.from_pretrained(..., export=True)` (with its
KV cache), runs the shared workloads, and prints one JSON line of results on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.common import Workloads, run_workloads


class OptimumSystem:
    def __init__(self, checkpoint: Path, threads: int, cache: Path) -> None:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if not (cache / "model.onnx").is_file():
            ORTModelForCausalLM.from_pretrained(checkpoint, export=True, use_cache=True).save_pretrained(cache)
        self.model = ORTModelForCausalLM.from_pretrained(cache, use_cache=True, session_options=opts,
                                                         provider="CPUExecutionProvider")

    def _run(self, ids, mask, past):
        import torch

        out = self.model(input_ids=torch.from_numpy(ids), attention_mask=mask, past_key_values=past, use_cache=True)
        return out.logits[:, -1].numpy(), (mask, out.past_key_values)

    def prefill(self, ids: np.ndarray):
        import torch

        return self._run(ids, torch.ones(ids.shape, dtype=torch.long), None)

    def step(self, state, next_ids: np.ndarray):
        import torch

        mask, past = state
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], dim=1)
        return self._run(next_ids, mask, past)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workloads", default="{}")
    p.add_argument("--cache", type=Path, required=True)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    w = json.loads(args.workloads)
    w = Workloads(**{k: tuple(v) if isinstance(v, list) else v for k, v in w.items()})
    result = run_workloads(OptimumSystem(args.checkpoint, args.threads, args.cache), w)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
