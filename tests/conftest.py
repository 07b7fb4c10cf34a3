"""Session fixtures: tiny random GPT-2 checkpoints in HF format, built with `transformers`
from a `GPT2Config` (never downloaded), with the real GPT-2 BPE files beside them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from model.tokenizer import default_bpe_files

VOCAB = 50257  # the real GPT-2 vocabulary, so the real tokenizer drives the tiny models


def copy_bpe_files(folder: Path) -> None:
    vocab, merges = default_bpe_files()
    shutil.copyfile(vocab, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")


def make_hf_checkpoint(folder: Path, task: str = "generate", seed: int = 0, **config) -> Path:
    """Save a random `transformers` GPT-2 (LM or sequence classifier) as a checkpoint folder."""
    import transformers

    torch.manual_seed(seed)
    defaults = dict(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    cfg = transformers.GPT2Config(**(defaults | config))
    if task == "classify":
        cfg.pad_token_id = cfg.eos_token_id
        cfg.id2label = {0: "negative", 1: "neutral", 2: "positive"}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        hf = transformers.GPT2ForSequenceClassification(cfg)
    else:
        hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # HF's init gives LayerNorm weight 1 / bias 0; random ones test more
        for name, p in hf.named_parameters():
            if ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    hf.eval().save_pretrained(folder)
    copy_bpe_files(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-dim, 4-head GPT-2 LM with the real vocabulary."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_lm"), "generate", seed=0)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 sequence classifier with labels negative/neutral/positive, pad = eos."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_cls"), "classify", seed=1)


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the session: the first user exports, later ones hit the cache."""
    return tmp_path_factory.mktemp("onnx_cache")


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return True
    except ImportError:
        pass
    return torch.cuda.is_available()


def require(*commands: str, packages: str, paths: tuple[Path, ...] = ()) -> None:
    """Skip the running test when a system component it needs is missing, naming the Debian
    packages, or fail it under CI=true: `.ci/run` installs them, so a missing one there is a
    broken CI, not a reason to test less (issue 20). GPU tests are the exception (marker `cuda`)."""
    missing = [c for c in commands if shutil.which(c) is None] + [str(p) for p in paths if not Path(p).exists()]
    if not missing:
        return
    reason = f"needs {', '.join(missing)}: apt-get install {packages}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason} (.ci/run installs it)", pytrace=False)
    pytest.skip(reason)


def needs(*commands: str, packages: str, paths: tuple[Path, ...] = ()) -> pytest.MarkDecorator:
    """Mark a test (or a module, as `pytestmark`) that needs system components; see `require`."""
    return pytest.mark.needs(commands=commands, packages=packages, paths=paths)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        require(*mark.kwargs["commands"], packages=mark.kwargs["packages"], paths=mark.kwargs.get("paths", ()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` need an NVIDIA GPU; they skip (with the reason) where there is none."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDAExecutionProvider or torch.cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
