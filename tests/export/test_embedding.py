"""The embedding graph's export (`python -m export --task embed`): its parity check passes on the
model it was traced from, at fp32 and int8, and fails, naming the output, on another model's graph."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.pipeline import export_checkpoint
from export.reference import reference
from export.verify import EMBED_COSINE_TOL, compare
from model import load_pretrained
from tests.conftest import make_hf_checkpoint


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_embedding_export_passes_its_parity_check(tiny_lm_dir: Path, tmp_path: Path, precision: str) -> None:
    m = export_checkpoint(tiny_lm_dir, tmp_path / "out", task="embed", precision=precision)
    by_output = m["parity"]["max_abs_diff_by_output"]
    assert m["parity"]["passed"] and not m["parity"]["failures"]
    assert 0 < by_output["last_hidden_state cosine distance"] <= EMBED_COSINE_TOL[precision]
    assert m["parity"]["top1_positions"] == 0  # no next token to agree on
    if precision == "int8":
        q = m["quantization"]  # the kernel measured on this CPU: MatMulNBits or DynamicQuantizeMatMul
        assert q["MatMulNBits"] + q["DynamicQuantizeMatMul"] == 4 * 2  # c_attn, c_proj, c_fc, mlp c_proj per layer
        assert m["kernel"]["name"] == q["kernel"]  # (no LM head in this graph)
        assert m["quantization"]["GatherBlockQuantized"] == 0  # wte feeds no head here: it stays fp32
    assert m["attention"] is None and m["task"] == "embed"


def test_parity_fails_on_another_models_graph(tiny_lm_dir: Path, tmp_path: Path) -> None:
    other = make_hf_checkpoint(tmp_path / "other", "generate", seed=7)
    export_checkpoint(other, tmp_path / "out", task="embed", verify_parity=False)
    report = compare(reference(load_pretrained(tiny_lm_dir), "embed", tiny_lm_dir), tmp_path / "out" / "model.onnx")
    failed = report.failures()
    assert not report.passed
    assert any("last_hidden_state max |diff|" in f for f in failed)
    assert any("last_hidden_state cosine distance" in f for f in failed)
    assert {c.scenario for c in report.checks} == {"left-padded batch", "right-padded batch", "batch 1"}


def test_a_language_model_is_needed(tiny_classifier_dir: Path, tmp_path: Path) -> None:
    from export.pipeline import ExportError

    with pytest.raises(ExportError, match="holds a sequence classifier"):
        export_checkpoint(tiny_classifier_dir, tmp_path / "out", task="embed")
