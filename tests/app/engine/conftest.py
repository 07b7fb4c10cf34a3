"""Fixtures of the runner tests: the tiny LM exported once per worker, in both attention layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.pipeline import export_checkpoint


@pytest.fixture(scope="session")
def graphs(tiny_lm_dir, tmp_path_factory) -> dict[str, Path]:
    """{"gqa": the GroupQueryAttention graph (slot and fixed runners), "standard": past/present}."""
    out = {}
    for attention in ("gqa", "standard"):
        folder = tmp_path_factory.mktemp(f"runner-{attention}")
        export_checkpoint(tiny_lm_dir, folder, "generate", verify_parity=False, attention=attention)
        out[attention] = folder / "model.onnx"
    return out
