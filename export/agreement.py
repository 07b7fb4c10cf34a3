"""Held-out perplexity of a quantized generation graph against the PyTorch fp32 model.

Top-1 agreement (export.verify) says whether the graph picks the same next token; it does not
say how much the distribution moved. So a quantized export also scores a held-out text
(`heldout.txt`: fortunes written for this project's tests, never seen by the demo LM in
training) with the graph and with PyTorch, and the perplexity ratio must stay within
`PPL_MARGIN`. The graph is run the way it serves: one token per step for 8 rows at a time,
each row feeding its own KV cache back; PyTorch scores the same rows in one forward pass.
As with the parity check, PyTorch's side runs first (`heldout_reference`: the rows and one
number), so the export frees the model before the graph's session loads (`compare_perplexity`).

Margins (ratio - 1, upper bound), measured on the demo LM and on the random-weight GPT-2
124M shape (BENCHMARKS.md, "Block-quantized weights"): int8 blocks moved the ratio by
less than 0.2%, int4 blocks by about 1-3%; the margins leave room for other checkpoints and
still fail a broken quantization, which multiplies perplexity many times over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.providers import with_options
from model.gpt2 import GPT2

HELDOUT = Path(__file__).with_name("heldout.txt")
PPL_MARGIN = {"int8": 0.01, "int4": 0.08}
ROWS, ROW_TOKENS = 8, 128


def heldout_rows(checkpoint: Path | None, vocab_size: int, n_positions: int) -> np.ndarray:
    """(rows, tokens) int64 of the held-out text, tokenized with the checkpoint's tokenizer
    (random ids with a fixed seed when it has none that fits the vocabulary)."""
    length = min(ROW_TOKENS, n_positions)
    ids: list[int] = []
    if checkpoint is not None:
        try:
            from model.tokenizer import GPT2Tokenizer

            tok = GPT2Tokenizer.from_dir(checkpoint)
            if tok.vocab_size <= vocab_size:
                text = "".join(ln for ln in HELDOUT.read_text(encoding="utf-8").splitlines(keepends=True)
                               if not ln.startswith("#"))
                ids = tok.encode(text)
        except (FileNotFoundError, ValueError):
            ids = []
    if len(ids) < length:
        ids = np.random.default_rng(0).integers(0, vocab_size, size=ROWS * length).tolist()
    rows = min(ROWS, len(ids) // length)
    return np.asarray(ids[: rows * length], dtype=np.int64).reshape(rows, length)


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of `targets` under `logits` (..., V), in float64."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]


@torch.no_grad()
def torch_nll(model: GPT2, rows: np.ndarray) -> float:
    # One row at a time: a row's (T, V) logits and their float64 copies are about 0.1 GB with
    # GPT-2's vocabulary, all 8 rows at once were over 2 GB of the XL export's peak.
    nll = [_nll(model(torch.from_numpy(row[None])).logits.float().numpy()[:, :-1], row[None, 1:]) for row in rows]
    return float(np.concatenate(nll, axis=None).mean())


def graph_nll(onnx_path: Path, rows: np.ndarray, providers: list[str] | None = None) -> float:
    """Mean next-token NLL of `rows` under the generation graph, decoding one token per step; the
    graph's own log-probability of the next token (`target_ids` -> `token_logprobs`, computed where
    the logits are), the mechanism the server scores prompts with."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=with_options(providers or ["CPUExecutionProvider"]))
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    past = sorted(n for n in inputs if n.startswith("past_key_values."))
    kv_dtype = np.float16 if inputs[past[0]].type == "tensor(float16)" else np.float32
    _, n_head, _, head_dim = inputs[past[0]].shape
    B, T = rows.shape
    gqa = "seqlens_k" in inputs
    kv = {n: np.zeros((B, n_head, T if gqa else 0, head_dim), kv_dtype) for n in past}
    nll = []
    for t in range(T - 1):
        feed = {"input_ids": rows[:, t:t + 1], "position_ids": np.full((B, 1), t, np.int64),
                "logits_index": np.arange(B, dtype=np.int64)[:, None], "target_ids": rows[:, t + 1:t + 2],
                "temperature": np.ones(B, np.float32), "top_n": np.array([1], np.int64)}
        if gqa:
            feed |= {"seqlens_k": np.full((B,), t, np.int32), "total_sequence_length": np.array(t + 1, np.int32)}
        else:
            feed["attention_mask"] = np.ones((B, t + 1), np.int64)
        out = dict(zip(outputs, sess.run(None, feed | kv), strict=True))
        kv = {n: out[n.replace("past_key_values.", "present.")] for n in past}
        nll.append(-out["token_logprobs"][:, 0].astype(np.float64))
    return float(np.mean(nll))


@dataclass(frozen=True)
class HeldoutReference:
    """PyTorch fp32's side of the perplexity check: the held-out rows and their mean NLL."""

    rows: np.ndarray  # (rows, tokens) int64
    nll: float


def heldout_reference(model: GPT2, checkpoint: Path | None) -> HeldoutReference:
    cfg = model.config
    rows = heldout_rows(checkpoint, cfg.vocab_size, cfg.n_positions)
    return HeldoutReference(rows, torch_nll(model, rows))


def compare_perplexity(ref: HeldoutReference, onnx_path: Path, precision: str,
                       providers: list[str] | None = None) -> dict[str, float | int | bool]:
    """Perplexity of the held-out rows under the graph against PyTorch's, their ratio, and
    whether it is within the precision's margin. Holds the session, never the PyTorch model."""
    got = graph_nll(onnx_path, ref.rows, providers)
    ratio = math.exp(got - ref.nll)
    margin = PPL_MARGIN[precision]
    return {"tokens": int(ref.rows.shape[0] * (ref.rows.shape[1] - 1)), "torch": math.exp(ref.nll),
            "onnx": math.exp(got), "ratio": ratio, "margin": margin, "passed": ratio - 1 <= margin}


def perplexity_check(model: GPT2, onnx_path: Path, precision: str, checkpoint: Path | None,
                     providers: list[str] | None = None) -> dict[str, float | int | bool]:
    """Both sides for a caller that holds the model anyway (`heldout_reference`, then
    `compare_perplexity`)."""
    return compare_perplexity(heldout_reference(model, checkpoint), onnx_path, precision, providers)
