"""The bundled demo checkpoints (model/demo, made by `python -m model.train_demo`) and the script itself.

Both folders must load in `transformers` and in our `model.load_pretrained` with the same logits, stay
within the size budget, and carry metrics that beat their trivial baselines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_pretrained
from model.tokenizer import GPT2Tokenizer
from model.train_demo import (
    CLASSIFIER_CATEGORIES,
    FORTUNES_DIR,
    FortunesMissingError,
    main,
    read_fortunes,
    split_fortunes,
)
from tests.conftest import needs

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "model" / "demo"
LM_DIR, CLS_DIR = DEMO / "lm", DEMO / "classifier"
FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
MAX_BYTES = 40 * 10**6
EOS = 50256
# A small corpus in the `fortunes` format that ships with the tests, so training runs without the package.
CORPUS = Path(__file__).resolve().parent / "data" / "fortunes"
needs_fortunes = needs(packages="fortunes", paths=(FORTUNES_DIR,))

SENTENCES = [
    "The computer is down again, so we went out for lunch.",
    "A lawyer is a person who writes a ten-thousand word document and calls it a brief.",
    "Love is the triumph of imagination over intelligence.",
    "Football combines the two worst things about America: it is violence punctuated by committee meetings.",
    "I never eat anything with a face.",
]


def _padded(tok: GPT2Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention_mask and explicit position_ids (0.. per row): all (B, T)."""
    rows = tok.encode_batch(texts)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), EOS, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, torch.arange(T).expand(len(rows), T)


def _hf_load(cls_name: str, folder: Path) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    model, info = getattr(transformers, cls_name).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.from_dir(LM_DIR)


@pytest.fixture(scope="module")
def hf_lm() -> torch.nn.Module:
    return _hf_load("GPT2LMHeadModel", LM_DIR)


@pytest.fixture(scope="module")
def hf_cls() -> torch.nn.Module:
    return _hf_load("GPT2ForSequenceClassification", CLS_DIR)


def test_demo_folders_hold_exactly_the_four_files_within_budget() -> None:
    total = 0
    for folder in (LM_DIR, CLS_DIR):
        assert {p.name for p in folder.iterdir()} == FILES, folder
        total += sum(p.stat().st_size for p in folder.iterdir())
    assert total <= MAX_BYTES, f"demo checkpoints take {total / 1e6:.1f} MB, budget {MAX_BYTES / 1e6:.0f} MB"


def test_metrics_beat_baselines() -> None:
    metrics = json.loads((DEMO / "metrics.json").read_text(encoding="utf-8"))
    lm, cls = metrics["lm"], metrics["classifier"]
    assert lm["perplexity"] < lm["unigram_perplexity"]
    assert cls["accuracy"] > cls["majority_baseline"]
    # The card renders the same numbers the script measured.
    card = (DEMO / "README.md").read_text(encoding="utf-8")
    assert f"{lm['perplexity']:.1f}" in card and f"{cls['accuracy']:.3f}" in card


def test_lm_logits_match_transformers(tok: GPT2Tokenizer, hf_lm: torch.nn.Module) -> None:
    ours = load_pretrained(LM_DIR)
    ids, mask, pos = _padded(tok, SENTENCES)
    with torch.no_grad():
        ref = hf_lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # (B, T, V)
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()  # padded positions are unused and may differ
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)


def test_classifier_logits_match_transformers(tok: GPT2Tokenizer, hf_cls: torch.nn.Module) -> None:
    ours = load_pretrained(CLS_DIR)
    assert ours.config.pad_token_id == EOS == hf_cls.config.pad_token_id
    assert ours.config.id2label == hf_cls.config.id2label and len(ours.config.id2label) >= 4
    ids, mask, pos = _padded(tok, SENTENCES)
    with torch.no_grad():
        # HF pools at the rightmost non-pad id; with right padding that is our last-real-token rule too.
        ref = hf_cls(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # (B, num_labels)
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_lm_greedy_continuation_matches_transformers_generate(tok: GPT2Tokenizer, hf_lm: torch.nn.Module) -> None:
    ours = load_pretrained(LM_DIR)
    prompt = torch.tensor([tok.encode("The computer")])
    ids = prompt
    with torch.no_grad():
        for _ in range(16):  # plain greedy loop, full recompute each step: no cache to get wrong
            logits = ours(ids, last_only=True).logits  # (1, V)
            logits[:, EOS] = float("-inf")  # what min_new_tokens=16 does in HF: no early stop, 16 tokens
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        hf_ids = hf_lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                min_new_tokens=16, do_sample=False, pad_token_id=EOS)
    assert hf_ids.shape == ids.shape
    assert hf_ids[0].tolist() == ids[0].tolist()
    assert tok.decode(ids[0, prompt.shape[1]:].tolist(), skip_special_tokens=True).strip()


def test_read_fortunes_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FortunesMissingError, match="apt-get install fortunes"):
        read_fortunes(tmp_path / "no-such-dir")
    assert main(["--fortunes-dir", str(tmp_path / "no-such-dir"), "--out", str(tmp_path / "out")]) == 2


def test_shipped_corpus_reads_every_classifier_category() -> None:
    fortunes = read_fortunes(CORPUS)
    assert sorted({f.category for f in fortunes}) == sorted(CLASSIFIER_CATEGORIES)
    assert len(fortunes) == 12 * len(CLASSIFIER_CATEGORIES)
    assert fortunes[0].text == "The compiler found no errors, which worried everyone."
    assert all("%" not in f.text and f.text == f.text.strip() for f in fortunes)


@pytest.mark.parametrize("directory", [
    pytest.param(CORPUS, id="shipped-corpus"),
    pytest.param(FORTUNES_DIR, id="debian-fortunes", marks=needs_fortunes),
])
def test_split_is_deterministic_and_disjoint(directory: Path) -> None:
    fortunes = read_fortunes(directory)
    train, heldout = split_fortunes(fortunes)
    assert len(train) + len(heldout) == len(fortunes)
    assert heldout and {f.text for f in train}.isdisjoint(f.text for f in heldout)
    assert all(f.index % 10 == 9 for f in heldout)
    assert split_fortunes(read_fortunes(directory)) == (train, heldout)


@pytest.mark.slow
def test_training_script_smoke(tmp_path: Path) -> None:
    """Tiny shapes, 3 steps per model: the script runs end to end and its folders load in both stacks."""
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "model.train_demo", "--smoke", "--fortunes-dir", str(CORPUS),
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    for name, cls_name in (("lm", "GPT2LMHeadModel"), ("classifier", "GPT2ForSequenceClassification")):
        assert {p.name for p in (out / name).iterdir()} == FILES
        load_pretrained(out / name)
        _hf_load(cls_name, out / name)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["lm"]["perplexity"] > 0 and 0 <= metrics["classifier"]["accuracy"] <= 1
    assert metrics["data"]["categories"] == sorted(CLASSIFIER_CATEGORIES) and metrics["data"]["fortunes"] == 72
    assert "python -m model.train_demo --smoke" in (out / "README.md").read_text(encoding="utf-8")
