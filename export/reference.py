"""The PyTorch side of the export's parity check, run before ONNX Runtime loads the graph.

Every verification scenario (`export.verify`) feeds both sides the same tokens at every step,
PyTorch's argmax, so the whole script of graph calls is known from PyTorch alone. `reference`
runs the scenarios on the PyTorch model and keeps only what the comparisons read: each graph
call's inputs (the cache excluded: the graph gets its own back), PyTorch's next-token logits
(B, V), the selection outputs (`select_tokens` on those logits) and the cache after a scenario's
last call (each earlier call's cache is a prefix of it: a step appends columns, it never
rewrites them). The caller can then free the model before the ONNX Runtime session exists, so
the export never holds the weights twice (GPT-2 XL: 6.2 GB each). For XL the reference is about
150 MB (the standard graph's batch-8 cache dominates; see `Reference.nbytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.gpt2 import GPT2, GPT2ForSequenceClassification, select_tokens

SIGNATURES = ("standard", "gqa", "classify", "embed")
SCORE_TOP_N = 5  # alternatives compared per position (the selection outputs, `model.gpt2.select_tokens`)
DECODE_STEPS = 8
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning",
    "Computers are useless. They can only give you answers.",
    "A man walks into a bar and",
    "To be, or not to be, that is the question:",
    "What is the meaning of life? Perhaps",
    "Once upon a time, in a land far away, there lived a",
    "It was the best of times, it was the worst of times, it was the age of wisdom,",
]


@dataclass
class Call:
    """One graph call: its inputs without the cache and, for a checked call (`name`), PyTorch's
    answers. A field left None is not compared for that call."""

    feed: dict[str, np.ndarray]
    name: str | None = None
    logits: np.ndarray | None = None  # (B, V) or (B, num_labels): compared, and counted for top-1
    token_logprobs: np.ndarray | None = None  # select_tokens on PyTorch's logits at the same positions
    top_logprobs: np.ndarray | None = None
    cache_len: int = 0  # columns of PyTorch's cache after this call (a prefix of `Scenario.kv`); 0: not compared
    hidden: np.ndarray | None = None  # (B, T, C) the trunk's final hidden states (the embedding graph)


@dataclass
class Scenario:
    label: str
    batch: int
    calls: list[Call]
    # PyTorch's cache after the last call, one (key, value) per layer, (len(cache_rows), nh, P, hd).
    kv: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    cache_rows: list[int] = field(default_factory=list)  # graph cache rows compared with `kv`, in order


@dataclass
class Reference:
    """PyTorch's side of every scenario for one graph signature (`SIGNATURES`)."""

    signature: str
    n_layer: int
    n_head: int
    head_dim: int
    buffer_len: int  # the GQA graph's cache width M (0 for the other signatures)
    scenarios: list[Scenario]

    @property
    def task(self) -> str:
        return self.signature if self.signature in ("classify", "embed") else "generate"

    @property
    def nbytes(self) -> int:
        arrays = [a for s in self.scenarios for c in s.calls
                  for a in (*c.feed.values(), c.logits, c.token_logprobs, c.top_logprobs, c.hidden) if a is not None]
        arrays += [a for s in self.scenarios for kv in s.kv for a in kv]
        return sum(a.nbytes for a in arrays)


def prompt_ids(checkpoint: Path | None, vocab_size: int, n: int = len(PROMPTS)) -> list[list[int]]:
    """The fixed prompt set, tokenised when the checkpoint ships a GPT-2 tokenizer that fits the vocab."""
    if checkpoint is not None:
        try:
            from model.tokenizer import GPT2Tokenizer

            tok = GPT2Tokenizer.from_dir(checkpoint)
            if tok.vocab_size <= vocab_size:
                return [tok.encode(p) for p in PROMPTS[:n]]
        except (FileNotFoundError, ValueError):
            pass
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, size=int(rng.integers(3, 24))).tolist() for _ in range(n)]


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return ids, mask


def last_feed(n: int, width: int) -> dict[str, np.ndarray]:
    """Selection inputs that keep each row's last position (left padding, or equal lengths)."""
    return {"logits_index": (np.arange(n)[:, None] * width + width - 1).astype(np.int64),
            "target_ids": np.zeros((n, 1), np.int64), "temperature": np.ones(n, np.float32),
            "top_n": np.array([SCORE_TOP_N], np.int64)}


def score_feed(row: list[int], temperature: float = 0.7) -> dict[str, np.ndarray]:
    """Selection inputs that score every position of one prompt (targets: the next tokens), with a
    temperature on the last position."""
    T = len(row)
    return {"logits_index": np.arange(T, dtype=np.int64)[None], "target_ids": np.asarray([row[1:] + [0]], np.int64),
            "temperature": np.array([temperature], np.float32), "top_n": np.array([SCORE_TOP_N], np.int64)}


def _selection(logits: torch.Tensor, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`select_tokens` on PyTorch's logits (B, K, V) with the selection inputs of `feed`."""
    ref = select_tokens(logits.float(), torch.from_numpy(feed["target_ids"]), torch.from_numpy(feed["temperature"]),
                        int(feed["top_n"][0]))
    return ref.token_logprobs.numpy(), ref.top_logprobs.numpy()


def _checked(feed: dict[str, np.ndarray], name: str, logits: torch.Tensor, sel_feed: dict[str, np.ndarray],
             cache_len: int) -> Call:
    tok, top = _selection(logits[:, None], sel_feed)
    return Call(feed, name, logits.numpy().copy(), tok, top, cache_len)


def _final_kv(past, rows: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    return [(k[rows].numpy().copy(), v[rows].numpy().copy()) for k, v in past]


def _standard(model: GPT2, prompts: list[list[int]]) -> list[Scenario]:
    """The past/present graph: a left-padded batch and batch 1, each a prefill then decode steps
    (the graph gets its own present back as past), and a scored prompt."""

    def scenario(label: str, rows: list[list[int]], steps: int) -> Scenario:
        ids, mask = left_pad(rows)
        B = ids.shape[0]
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None),
                **last_feed(B, ids.shape[1])}
        calls, past = [], None
        for step in range(steps + 1):
            ref = model(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]),
                        torch.from_numpy(feed["position_ids"]), past, last_only=True)
            name = f"{label} prefill" if step == 0 else f"{label} decode step {step}"
            calls.append(_checked(feed, name, ref.logits, feed, ref.past_key_values[0][0].shape[2]))
            past = ref.past_key_values
            if step == steps:
                break
            nxt = ref.logits.argmax(-1).numpy()[:, None].astype(np.int64)  # the same next token on both sides
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
            feed = {"input_ids": nxt, "attention_mask": mask, "position_ids": feed["position_ids"][:, -1:] + 1,
                    **last_feed(B, 1)}
        return Scenario(label, B, calls, _final_kv(past, list(range(B))), list(range(B)))

    row = max(prompts, key=len)  # a scored prompt: every position's log-probabilities
    ids = np.asarray([row], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(row))[None],
            **score_feed(row)}
    tok, top = _selection(model(torch.from_numpy(ids)).logits, feed)
    scored = Scenario("scored prompt", 1, [Call(feed, "scored prompt", token_logprobs=tok, top_logprobs=top)])
    return [scenario("left-padded batch", prompts, DECODE_STEPS), scenario("batch 1", prompts[:1], 2), scored]


def _gqa_feed(ids: np.ndarray, pos: np.ndarray, seqlens: np.ndarray,
              select: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    n, width = ids.shape
    if select is None:  # each row's last real token (right padding: cache index seqlens, or the call's last)
        last = np.minimum(seqlens, width - 1) if width > 1 else np.zeros(n, np.int64)
        select = last_feed(n, width)
        select["logits_index"] = (np.arange(n) * width + last)[:, None].astype(np.int64)
    return {"input_ids": ids, "position_ids": pos, "seqlens_k": seqlens.astype(np.int32),
            "total_sequence_length": np.array(int(seqlens.max()) + 1, np.int32)} | select


def _gqa(model: GPT2, prompts: list[list[int]]) -> list[Scenario]:
    """The shared-buffer graph against PyTorch's standard (left-padded) path: a right-padded
    prefill batch then decode steps, a batch-1 prompt, a prompt prefilled in two chunks, and a
    scored prompt. Each row's logits and its filled cache columns are compared (rows without
    left padding in PyTorch's cache, column for column)."""

    def scenario(label: str, rows: list[list[int]], steps: int, chunk: int | None = None,
                 score: bool = False) -> Scenario:
        B, lengths = len(rows), [len(r) for r in rows]
        calls: list[Call] = []
        if chunk:  # batch 1, two calls: the second continues the cache
            (row,) = rows
            calls.append(Call(_gqa_feed(np.asarray([row[:chunk]]), np.arange(chunk)[None], np.asarray([chunk - 1]))))
            feed = _gqa_feed(np.asarray([row[chunk:]]), np.arange(chunk, len(row))[None], np.asarray([len(row) - 1]))
        elif score:  # batch 1, every position scored
            (row,) = rows
            feed = _gqa_feed(np.asarray([row]), np.arange(len(row))[None], np.asarray([len(row) - 1]), score_feed(row))
            tok, top = _selection(model(torch.from_numpy(np.asarray([row]))).logits, feed)
            return Scenario(label, B, [Call(feed, f"{label} prefill", token_logprobs=tok, top_logprobs=top)])
        else:
            T = max(lengths)
            ids, pos = np.zeros((B, T), np.int64), np.zeros((B, T), np.int64)
            for b, r in enumerate(rows):
                ids[b, :len(r)], pos[b, :len(r)] = r, np.arange(len(r))
            feed = _gqa_feed(ids, pos, np.asarray(lengths) - 1)
        lids, mask = left_pad(rows)
        P = lids.shape[1]
        cache_rows = [b for b, n in enumerate(lengths) if n == P]  # stays so: every row grows by one a step
        ref = model(torch.from_numpy(lids), torch.from_numpy(mask),
                    torch.from_numpy(np.clip(mask.cumsum(-1) - 1, 0, None)), last_only=True)
        for step in range(steps + 1):
            name = f"{label} prefill" if step == 0 else f"{label} decode step {step}"
            calls.append(_checked(feed, name, ref.logits, last_feed(B, 1), ref.past_key_values[0][0].shape[2]))
            if step == steps:
                break
            nxt = ref.logits.argmax(-1).numpy()[:, None].astype(np.int64)
            cur = np.asarray(lengths)
            feed = _gqa_feed(nxt, cur[:, None], cur)
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
            ref = model(torch.from_numpy(nxt), torch.from_numpy(mask), torch.from_numpy(cur[:, None]),
                        ref.past_key_values, last_only=True)
            lengths = [n + 1 for n in lengths]
        return Scenario(label, B, calls, _final_kv(ref.past_key_values, cache_rows), cache_rows)

    out = [scenario("right-padded batch", prompts, DECODE_STEPS), scenario("batch 1", prompts[:1], 2)]
    longest = max(prompts, key=len)
    if len(longest) > 1:
        out += [scenario("chunked prompt", [longest], 1, chunk=len(longest) // 2),
                scenario("scored prompt", [longest], 0, score=True)]
    return out


def _padded_batches(prompts: list[list[int]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A left-padded batch, the same rows right-padded, and batch 1: (ids, mask) each."""
    ids, mask = left_pad(prompts)
    return {"left-padded batch": (ids, mask), "right-padded batch": (
        np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask, strict=True)]),
        np.stack([np.roll(m, -int((m == 0).sum())) for m in mask]),
    ), "batch 1": (ids[-1:], mask[-1:])}


def _classify(model: GPT2ForSequenceClassification, prompts: list[list[int]]) -> list[Scenario]:
    out = []
    for label, (i, m) in _padded_batches(prompts).items():
        logits = model(torch.from_numpy(i), torch.from_numpy(m)).logits.numpy().copy()
        out.append(Scenario(label, i.shape[0], [Call({"input_ids": i, "attention_mask": m}, label, logits)]))
    return out


def _embed(model: GPT2, prompts: list[list[int]]) -> list[Scenario]:
    """The trunk's final hidden states (what the embedding graph returns) for the same batches."""
    out = []
    for label, (i, m) in _padded_batches(prompts).items():
        hidden, _ = model.transformer(torch.from_numpy(i), torch.from_numpy(m))
        out.append(Scenario(label, i.shape[0], [Call({"input_ids": i, "attention_mask": m}, label,
                                                     hidden=hidden.numpy().copy())]))
    return out


@torch.no_grad()
def reference(model: nn.Module, attention: str = "standard", checkpoint: Path | None = None) -> Reference:
    """PyTorch's answers for every scenario of the graph `model` was exported to: `attention`
    ("standard" or "gqa") for a language model's generation graph, "embed" for its embedding graph;
    a classifier has one signature."""
    cfg = model.config
    prompts = prompt_ids(checkpoint, cfg.vocab_size)
    if attention == "embed":
        return Reference("embed", cfg.n_layer, cfg.n_head, cfg.head_dim, 0, _embed(model, prompts))
    if isinstance(model, GPT2ForSequenceClassification):
        return Reference("classify", cfg.n_layer, cfg.n_head, cfg.head_dim, 0, _classify(model, prompts))
    if attention == "gqa":
        M = min(cfg.n_positions, max(len(p) for p in prompts) + DECODE_STEPS + 1)
        return Reference("gqa", cfg.n_layer, cfg.n_head, cfg.head_dim, M, _gqa(model, prompts))
    if attention != "standard":
        raise ValueError(f"unknown attention {attention!r}; expected 'standard' or 'gqa'")
    return Reference("standard", cfg.n_layer, cfg.n_head, cfg.head_dim, 0, _standard(model, prompts))
