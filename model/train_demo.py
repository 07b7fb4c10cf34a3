"""Train the two bundled toy checkpoints, `model/demo/lm` and `model/demo/classifier`.

    python -m model.train_demo [--out model/demo] [--steps N] [--smoke] ...

Data: the English fortune-cookie files of Debian's `fortunes` package (`/usr/share/games/fortunes/<category>`,
fortunes separated by lines holding only `%`). Both models use our own `model.gpt2` classes with the real
GPT-2 vocabulary (50257 ids, `model.tokenizer.GPT2Tokenizer`) and are written with
`model.checkpoint.save_pretrained` (HF layout: config.json + model.safetensors) plus vocab.json + merges.txt.

Everything is seeded (`--seed`) and the split is deterministic: fortune number i (0-based, after removing
exact duplicates) of each category file is held out when i % 10 == 9. The same split serves both models, so
the classifier's held-out fortunes were never seen by the LM it borrows its embedding from.

The script also measures held-out LM perplexity against an add-one unigram baseline and classifier accuracy
against the majority class, and writes `metrics.json` and the model card `README.md` next to the two folders.
Training code lives only here: `model/gpt2.py` stays inference-only (it has no dropout, so `.train()` and
`.eval()` compute the same function).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import save_pretrained
from model.gpt2 import GPT2, GPT2Config, GPT2ForSequenceClassification
from model.tokenizer import MERGES_TXT, VOCAB_JSON, GPT2Tokenizer, default_bpe_files

logger = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Not English prose: ASCII drawings, and Latin sentences waiting for a translation.
EXCLUDED_CATEGORIES = frozenset({"ascii-art", "translate-me"})
# Topics that are distinct in vocabulary and large enough (~150-1050 fortunes each) to learn from.
CLASSIFIER_CATEGORIES = ("computers", "food", "law", "politics", "songs-poems", "sports")
HOLDOUT_EVERY = 10  # fortune i of each file is held out when i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
EOS_ID = 50256
VOCAB_SIZE = 50257
SEQ_LEN = 128  # LM training block and classifier truncation length, in tokens
N_POSITIONS = 256
MAX_DEMO_BYTES = 40 * 10**6  # both folders together


class FortunesMissingError(FileNotFoundError):
    """The fortunes category files are not installed."""


@dataclass(frozen=True)
class Fortune:
    category: str
    index: int  # position within its category file after de-duplication
    text: str


@dataclass
class TrainArgs:
    out: Path
    fortunes_dir: Path
    seed: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    lm_embd: int
    lm_layers: int
    lm_heads: int
    cls_steps: int
    cls_batch_size: int
    cls_lr: float
    cls_embd: int
    cls_layers: int
    cls_heads: int
    eval_every: int
    eval_blocks: int | None


# ------------------------------------------------------------------------------------------------ data


def _clean(text: str) -> str:
    # Some files bold/underline with typewriter overstrike ("_\bx", "x\bx"): keep the struck character.
    text = re.sub(r"[^\n]\x08", "", text).replace("\x08", "")
    return text.strip("\n").rstrip()


def read_fortunes(directory: Path = FORTUNES_DIR) -> list[Fortune]:
    """Every fortune of every category file in `directory` (sorted by category), exact duplicates dropped.

    A text that occurs in several files is kept at its first occurrence only, so no fortune can sit in
    both the training and the held-out split.
    """
    hint = "install the Debian package with `apt-get install fortunes`"
    if not directory.is_dir():
        raise FortunesMissingError(f"fortunes directory {directory} not found: {hint}")
    # Category files have no extension; `<name>.dat` are strfile indexes and `<name>.u8` symlinks.
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
    files = [p for p in files if p.name not in EXCLUDED_CATEGORIES]
    if not files:
        raise FortunesMissingError(f"no fortune category files in {directory}: {hint}")
    seen: set[str] = set()
    out: list[Fortune] = []
    for path in files:
        raw = path.read_text(encoding="utf-8", errors="replace")
        index = 0
        for chunk in re.split(r"^%$", raw, flags=re.MULTILINE):
            text = _clean(chunk)
            if not text.strip() or text in seen:
                continue
            seen.add(text)
            out.append(Fortune(path.name, index, text))
            index += 1
    return out


def split_fortunes(fortunes: Sequence[Fortune]) -> tuple[list[Fortune], list[Fortune]]:
    """(train, held-out): every HOLDOUT_EVERY-th fortune of each category is held out."""
    train = [f for f in fortunes if f.index % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    heldout = [f for f in fortunes if f.index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return train, heldout


def pack(token_lists: Sequence[list[int]]) -> torch.Tensor:
    """One stream `eos f1 eos f2 eos ...` (1-D long), as GPT-2 saw documents during pre-training."""
    ids = [EOS_ID]
    for toks in token_lists:
        ids.extend(toks)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def fortunes_version() -> str:
    """The installed Debian package version of `fortunes`, or "unknown" (e.g. not a dpkg system)."""
    try:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "fortunes"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


# ------------------------------------------------------------------------------------------------ training


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L).

    (PyTorch's defaults would give the tied embedding N(0, 1) rows, i.e. huge initial logits.)
    """
    for name, p in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            nn.init.ones_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        elif name.endswith("c_proj.weight"):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))
        else:
            nn.init.normal_(p, std=0.02)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices (embeddings, linear weights) only; LayerNorm gains and biases stay undecayed.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields the tied wte/lm_head once


@torch.no_grad()
def lm_heldout_nll(model: GPT2, stream: torch.Tensor, batch_size: int = 16, max_blocks: int | None = None
                   ) -> tuple[float, torch.Tensor]:
    """Mean next-token NLL (nats) over the held-out stream, and the target ids it was measured on.

    The stream is cut into non-overlapping blocks of SEQ_LEN + 1 tokens that share their boundary token,
    so every token but the very first is predicted exactly once (context restarts at each block).
    """
    model.eval()
    starts = list(range(0, len(stream) - 1, SEQ_LEN))
    if max_blocks is not None:
        starts = starts[:max_blocks]
    total, targets = 0.0, []
    for i in range(0, len(starts), batch_size):
        # Only the last block can be short; it goes in a batch of its own so no padding is needed.
        chunk = [stream[s : s + SEQ_LEN + 1] for s in starts[i : i + batch_size]]
        groups = [chunk[:-1], chunk[-1:]] if len(chunk[-1]) != len(chunk[0]) else [chunk]
        for group in groups:
            if not group:
                continue
            blocks = torch.stack(group)  # (B, T+1)
            logits = model(blocks[:, :-1]).logits  # (B, T, V)
            y = blocks[:, 1:]
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            targets.append(y.flatten())
    model.train()
    y_all = torch.cat(targets)
    return total / len(y_all), y_all


def unigram_nll(train_stream: torch.Tensor, targets: torch.Tensor, vocab_size: int = VOCAB_SIZE) -> float:
    """Mean NLL (nats) of `targets` under the add-one-smoothed unigram distribution of the training tokens."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0  # (V,)
    log_p = counts.log() - counts.sum().log()
    return -log_p[targets].mean().item()


def train_lm(args: TrainArgs, train_stream: torch.Tensor, heldout_stream: torch.Tensor) -> tuple[GPT2, dict]:
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=N_POSITIONS, n_embd=args.lm_embd,
                        n_layer=args.lm_layers, n_head=args.lm_heads)
    model = GPT2(config)
    init_weights(model, config.n_layer)
    model.train()
    opt = make_optimizer(model, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    n_starts = len(train_stream) - SEQ_LEN - 1
    logger.info("LM: %d params, %d training tokens, %d steps x %d x %d tokens", num_params(model),
                len(train_stream), args.steps, args.batch_size, SEQ_LEN)
    t0, ema = time.perf_counter(), None
    for step in range(args.steps):
        lr = cosine_lr(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        # Random windows of the packed stream: x = tokens [o, o+T), y = tokens [o+1, o+T+1).
        offsets = torch.randint(0, n_starts, (args.batch_size,), generator=gen)
        idx = offsets[:, None] + torch.arange(SEQ_LEN + 1)  # (B, T+1)
        blocks = train_stream[idx]
        logits = model(blocks[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            logger.info("LM step %d/%d  lr %.2e  train loss %.3f (ema)  %.1f s", step + 1, args.steps, lr, ema,
                        time.perf_counter() - t0)
    train_time = time.perf_counter() - t0
    model.eval()
    nll, targets = lm_heldout_nll(model, heldout_stream, max_blocks=args.eval_blocks)
    uni = unigram_nll(train_stream, targets)
    metrics = {
        "heldout_tokens": len(targets),
        "train_tokens": len(train_stream),
        "heldout_nll": nll,
        "perplexity": math.exp(nll),
        "unigram_perplexity": math.exp(uni),
        "final_train_loss_ema": ema,
        "train_time_s": train_time,
        "params": num_params(model),
    }
    logger.info("LM held-out perplexity %.1f vs unigram %.1f (%d tokens)", metrics["perplexity"],
                metrics["unigram_perplexity"], len(targets))
    return model, metrics


def pca_embedding(wte: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(V, C_lm) LM token embedding -> (V, dim) along its top principal directions, at the same scale.

    Gives the small classifier word similarities learned from all of the training text, which its
    ~3k labelled fortunes alone cannot teach a 50257-row embedding. Columns beyond C_lm are random.
    """
    centred = wte - wte.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (C_lm, C_lm), rows by variance
    k = min(dim, vh.shape[0])
    proj = centred @ vh[:k].T  # (V, k)
    proj = proj * (wte.std() / proj.std())
    if k < dim:
        proj = torch.cat([proj, torch.randn(wte.shape[0], dim - k, generator=gen) * 0.02], dim=1)
    return proj


def _classifier_batch(examples: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask, labels): (B, T), (B, T), (B,). Pads with eos, mask 0 there."""
    T = max(len(t) for t, _ in examples)
    ids = torch.full((len(examples), T), EOS_ID, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (toks, _) in enumerate(examples):
        ids[i, : len(toks)] = torch.tensor(toks)
        mask[i, : len(toks)] = 1
    return ids, mask, torch.tensor([label for _, label in examples])


@torch.no_grad()
def classifier_accuracy(model: GPT2ForSequenceClassification, examples: Sequence[tuple[list[int], int]],
                        batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        ids, mask, labels = _classifier_batch(examples[i : i + batch_size])
        correct += (model(ids, attention_mask=mask).logits.argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(examples)


def train_classifier(args: TrainArgs, lm: GPT2, train: Sequence[tuple[list[int], int]],
                     heldout: Sequence[tuple[list[int], int]], labels: Sequence[str]
                     ) -> tuple[GPT2ForSequenceClassification, dict]:
    torch.manual_seed(args.seed + 1)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=N_POSITIONS, n_embd=args.cls_embd,
                        n_layer=args.cls_layers, n_head=args.cls_heads, pad_token_id=EOS_ID,
                        id2label=dict(enumerate(labels)), architectures=["GPT2ForSequenceClassification"])
    model = GPT2ForSequenceClassification(config)
    init_weights(model, config.n_layer)
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(pca_embedding(lm.transformer.wte.weight.detach(), args.cls_embd, gen))
    model.train()
    opt = make_optimizer(model, args.cls_lr, args.weight_decay)
    logger.info("classifier: %d params, %d training / %d held-out fortunes, labels %s, %d steps x %d",
                num_params(model), len(train), len(heldout), list(labels), args.cls_steps, args.cls_batch_size)
    t0, ema = time.perf_counter(), None
    warmup = max(1, args.cls_steps // 20)
    for step in range(args.cls_steps):
        lr = cosine_lr(step, args.cls_steps, args.cls_lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        pick = torch.randint(0, len(train), (args.cls_batch_size,), generator=gen).tolist()
        ids, mask, y = _classifier_batch([train[i] for i in pick])
        loss = F.cross_entropy(model(ids, attention_mask=mask).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.cls_steps:
            logger.info("classifier step %d/%d  lr %.2e  train loss %.3f (ema)  %.1f s", step + 1, args.cls_steps,
                        lr, ema, time.perf_counter() - t0)
    train_time = time.perf_counter() - t0
    model.eval()
    counts = Counter(label for _, label in heldout)
    # The baseline always answers the majority class of the *training* labels; scored on held-out labels.
    majority = Counter(label for _, label in train).most_common(1)[0][0]
    metrics = {
        "labels": list(labels),
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "heldout_per_label": {labels[k]: counts[k] for k in range(len(labels))},
        "accuracy": classifier_accuracy(model, heldout),
        "train_accuracy": classifier_accuracy(model, train),
        "majority_label": labels[majority],
        "majority_baseline": counts[majority] / len(heldout),
        "train_time_s": train_time,
        "params": num_params(model),
    }
    logger.info("classifier held-out accuracy %.3f vs majority baseline %.3f (%s)", metrics["accuracy"],
                metrics["majority_baseline"], metrics["majority_label"])
    return model, metrics


# ------------------------------------------------------------------------------------------------ output


def save_folder(model: nn.Module, folder: Path) -> None:
    """config.json + model.safetensors + the GPT-2 BPE files; nothing else (an old folder is replaced)."""
    if folder.exists():
        shutil.rmtree(folder)
    save_pretrained(model, folder)
    vocab, merges = default_bpe_files()
    shutil.copyfile(vocab, folder / VOCAB_JSON)
    shutil.copyfile(merges, folder / MERGES_TXT)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def render_card(metrics: dict, args: TrainArgs, command: str, lm_cfg: GPT2Config, cls_cfg: GPT2Config) -> str:
    lm, cls, data = metrics["lm"], metrics["classifier"], metrics["data"]
    per_label = ", ".join(f"{k} {v}" for k, v in cls["heldout_per_label"].items())
    mb = 10**6
    seen = args.steps * args.batch_size * SEQ_LEN
    env = metrics["env"]
    partial = f" (only the first {args.eval_blocks} blocks: a quick check)" if args.eval_blocks else ""
    return f"""# Demo checkpoints: toy GPT-2 models trained on Debian fortunes

**These are toy demo models.** They exist so the service, its tests and the ONNX export have small
real checkpoints (with the real GPT-2 vocabulary) to load. They are not useful for anything real: the
language model writes barely-grammatical fortune-cookie pastiche and the classifier guesses the topic of
a fortune-cookie text. Do not use them for any decision, evaluation or product.

Both were produced by `model/train_demo.py` with the project's own `model.gpt2` classes and saved with
`model.checkpoint.save_pretrained` in Hugging Face's GPT-2 layout, so `transformers`
(`GPT2LMHeadModel` / `GPT2ForSequenceClassification`) loads them too. Each folder holds exactly
`config.json`, `model.safetensors` (fp32), `vocab.json` and `merges.txt` (the original GPT-2 BPE files).

| folder | architecture | n_embd | n_layer | n_head | n_positions | vocab | parameters | size |
|---|---|---|---|---|---|---|---|---|
| `lm/` | GPT2LMHeadModel (tied embeddings) | {lm_cfg.n_embd} | {lm_cfg.n_layer} | {lm_cfg.n_head} | \
{lm_cfg.n_positions} | {lm_cfg.vocab_size} | {lm["params"]:,} | {metrics["sizes"]["lm_bytes"] / mb:.1f} MB |
| `classifier/` | GPT2ForSequenceClassification ({len(cls["labels"])} labels) | {cls_cfg.n_embd} | \
{cls_cfg.n_layer} | {cls_cfg.n_head} | {cls_cfg.n_positions} | {cls_cfg.vocab_size} | {cls["params"]:,} | \
{metrics["sizes"]["classifier_bytes"] / mb:.1f} MB |

The classifier's labels (`id2label`): {", ".join(f"{i} = {n}" for i, n in enumerate(cls["labels"]))}.
It reads the hidden state at the last real token (from `attention_mask`; `pad_token_id` is
{EOS_ID}, `<|endoftext|>`), and was trained on fortunes truncated to their first {SEQ_LEN} tokens.

## Metrics (measured by the script on the held-out split)

| model | metric | value | baseline |
|---|---|---|---|
| `lm/` | perplexity on {lm["heldout_tokens"]:,} held-out tokens | **{lm["perplexity"]:.1f}** | \
{lm["unigram_perplexity"]:.1f} (unigram, add-one smoothed over {VOCAB_SIZE} ids, from the training tokens) |
| `classifier/` | accuracy on {cls["heldout_examples"]} held-out fortunes | **{cls["accuracy"]:.3f}** | \
{cls["majority_baseline"]:.3f} (always `{cls["majority_label"]}`, the majority training label) |

Classifier training-set accuracy: {cls["train_accuracy"]:.3f}. Held-out fortunes per label: {per_label}.
Perplexity is over every token of the held-out stream but the first (`<|endoftext|>` separators included),
in blocks of {SEQ_LEN} tokens of context{partial}. The two folders take {metrics["sizes"]["total_bytes"] / mb:.1f} MB
together.

## Data

- Source: the fortune files of the Debian package `fortunes` (version {data["fortunes_version"]}), read from
  `{data["fortunes_dir"]}/<category>`; fortunes are separated by lines holding only `%`.
  Typewriter overstrike (`x\\bx`) is reduced to the struck character and exact duplicate fortunes are kept once.
- Licence: the package's `/usr/share/doc/fortunes/copyright` says "This program falls under the BSD
  copyright" (Copyright (c) 1991 The Regents of the University of California; the BSD licence with clause 3,
  the advertising clause, deleted) and gives no separate licence for the fortune texts. The fortunes are
  quotations and jokes collected from many sources (the file credits, for example, Karl Lehenbauer's
  alt.sources postings for `cookie`); the trained weights are derived from them.
- Categories: all {len(data["categories"])} category files except {", ".join(sorted(EXCLUDED_CATEGORIES))}
  (not English prose) for the LM: {data["fortunes"]:,} fortunes. The classifier uses
  {", ".join(cls["labels"])}.
- Split: fortune *i* (0-based, per category file, after de-duplication) is held out when
  *i* mod {HOLDOUT_EVERY} = {HOLDOUT_EVERY - 1}; {data["train_fortunes"]:,} training / {data["heldout_fortunes"]:,}
  held-out fortunes. The same split serves both models.

## Training

- Seeds: `torch.manual_seed({args.seed})` for the LM, `{args.seed + 1}` for the classifier, and `torch.Generator`s
  with the same seeds for batch sampling; `torch.set_num_threads(2)` (results can differ in the last bits on
  other thread counts or CPUs).
- LM: training fortunes (order shuffled with seed {args.seed}) packed into one stream with `<|endoftext|>`
  ({EOS_ID}) between fortunes (and at both ends); {args.steps} AdamW steps (betas 0.9/0.95, weight decay
  {args.weight_decay} on matrices) of {args.batch_size} random windows of {SEQ_LEN} tokens; learning rate {args.lr:g},
  linear warm-up {args.warmup} steps then cosine decay to 10%; gradient clipping 1.0; GPT-2 initialisation (N(0, 0.02),
  residual projections / sqrt(2 n_layer)). {lm["train_tokens"]:,} training tokens; {seen:,} tokens
  seen in training ({lm["train_time_s"] / 60:.1f} min).
- Classifier: token embedding initialised from the LM's along its top {cls_cfg.n_embd} principal directions
  (PCA), the other weights GPT-2-initialised; {args.cls_steps} AdamW steps of {args.cls_batch_size} right-padded
  fortunes (sampled with replacement), cross-entropy, learning rate {args.cls_lr:g} with warm-up and cosine decay,
  weight decay {args.weight_decay}, clipping 1.0 ({cls["train_time_s"] / 60:.1f} min).
- Environment: torch {env["torch"]}, Python {env["python"]}, {env["threads"]} CPU threads.
- Total wall time of the script: {metrics["wall_time_s"] / 60:.1f} min.

## Reproduce

```
{command}
```

It rewrites `lm/`, `classifier/`, `metrics.json` and this README (numbers above are read from the run).
"""


# ------------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("model/demo"), help="output folder (default model/demo)")
    p.add_argument("--fortunes-dir", type=Path, default=FORTUNES_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=500, help="LM optimiser steps")
    p.add_argument("--batch-size", type=int, default=16, help="LM windows of 128 tokens per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--lm-embd", type=int, default=96)
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--lm-heads", type=int, default=4)
    p.add_argument("--cls-steps", type=int, default=600)
    p.add_argument("--cls-batch-size", type=int, default=32)
    p.add_argument("--cls-lr", type=float, default=2e-3)
    p.add_argument("--cls-embd", type=int, default=64)
    p.add_argument("--cls-layers", type=int, default=2)
    p.add_argument("--cls-heads", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=25, help="log every N steps")
    p.add_argument("--eval-blocks", type=int, default=None,
                   help="score only the first N held-out LM blocks (default: all; a quick check only)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and 3 steps each, to check the pipeline in seconds (flags given explicitly win)")
    return p


_SMOKE = {"steps": 3, "cls_steps": 3, "batch_size": 2, "cls_batch_size": 4, "warmup": 1, "eval_every": 1,
          "lm_embd": 16, "lm_layers": 1, "lm_heads": 2, "cls_embd": 8, "cls_layers": 1, "cls_heads": 2,
          "eval_blocks": 4}


def parse_args(argv: Sequence[str] | None = None) -> TrainArgs:
    p = _parser()
    ns = vars(p.parse_args(argv))
    if ns.pop("smoke"):
        for k, v in _SMOKE.items():
            if ns[k] == p.get_default(k):
                ns[k] = v
    return TrainArgs(**ns)


def run(args: TrainArgs, command: str) -> dict:
    """Train both models, write the two folders, metrics.json and README.md under `args.out`."""
    t_start = time.perf_counter()
    torch.set_num_threads(2)
    fortunes = read_fortunes(args.fortunes_dir)
    train, heldout = split_fortunes(fortunes)
    categories = sorted({f.category for f in fortunes})
    logger.info("%d fortunes from %d categories: %d train / %d held out", len(fortunes), len(categories),
                len(train), len(heldout))
    tok = GPT2Tokenizer.from_files(*default_bpe_files())
    assert tok.vocab_size == VOCAB_SIZE and tok.eos_token_id == EOS_ID

    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)  # mixes categories through the packed training stream
    train_tokens = tok.encode_batch([f.text for f in train])
    train_stream = pack([train_tokens[i] for i in order])
    heldout_stream = pack(tok.encode_batch([f.text for f in heldout]))
    lm, lm_metrics = train_lm(args, train_stream, heldout_stream)

    missing = [c for c in CLASSIFIER_CATEGORIES if c not in categories]
    if missing:
        raise FortunesMissingError(f"classifier categories {missing} not in {args.fortunes_dir}: "
                                   "install the Debian package with `apt-get install fortunes`")
    label_of = {c: i for i, c in enumerate(CLASSIFIER_CATEGORIES)}

    def examples(split: list[Fortune]) -> list[tuple[list[int], int]]:
        chosen = [f for f in split if f.category in label_of]
        toks = tok.encode_batch([f.text for f in chosen])
        return [(t[:SEQ_LEN], label_of[f.category]) for t, f in zip(toks, chosen, strict=True)]

    cls, cls_metrics = train_classifier(args, lm, examples(train), examples(heldout), CLASSIFIER_CATEGORIES)

    args.out.mkdir(parents=True, exist_ok=True)
    save_folder(lm, args.out / "lm")
    save_folder(cls, args.out / "classifier")
    sizes = {"lm_bytes": folder_bytes(args.out / "lm"), "classifier_bytes": folder_bytes(args.out / "classifier")}
    sizes["total_bytes"] = sizes["lm_bytes"] + sizes["classifier_bytes"]
    if sizes["total_bytes"] > MAX_DEMO_BYTES:
        logger.warning("demo folders take %d bytes, over the %d-byte budget", sizes["total_bytes"], MAX_DEMO_BYTES)
    metrics = {
        "lm": lm_metrics,
        "classifier": cls_metrics,
        "data": {
            "fortunes_dir": str(args.fortunes_dir),
            "fortunes_version": fortunes_version(),
            "categories": categories,
            "fortunes": len(fortunes),
            "train_fortunes": len(train),
            "heldout_fortunes": len(heldout),
            "holdout_rule": f"index % {HOLDOUT_EVERY} == {HOLDOUT_EVERY - 1}",
        },
        "sizes": sizes,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "command": command,
        "env": {"torch": torch.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads()},
        "wall_time_s": time.perf_counter() - t_start,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (args.out / "README.md").write_text(render_card(metrics, args, command, lm.config, cls.config), encoding="utf-8")
    logger.info("wrote %s (%.1f MB in the two folders) in %.1f min", args.out, sizes["total_bytes"] / 1e6,
                metrics["wall_time_s"] / 60)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = " ".join(["python -m model.train_demo", *(shlex.quote(a) for a in argv)])
    try:
        run(args, command)
    except FortunesMissingError as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
