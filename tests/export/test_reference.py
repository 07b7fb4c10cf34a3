"""The parity and perplexity checks in two phases: PyTorch's answers first, then the graph's.

What matters for memory is the order: the export must free the PyTorch model before ONNX
Runtime loads its own copy of the weights (GPT-2 XL: 6.2 GB each). These tests watch the
model through a weak reference while the real export runs the real ONNX Runtime sessions.
"""

from __future__ import annotations

import weakref

import numpy as np
import onnxruntime as ort
import pytest

import model as model_pkg
from export.pipeline import export_checkpoint
from export.reference import reference
from export.verify import compare, verify
from model import load_pretrained
from tests.conftest import make_hf_checkpoint


@pytest.fixture
def watched(monkeypatch) -> tuple[list[weakref.ref], list[list[bool]]]:
    """Weak references to every model `load_pretrained` returns and to its largest weight (the
    tied embedding), and for each ONNX Runtime session created, whether each of those was still
    alive at that moment. The weight matters on its own: the exporter's in-memory graph refers
    to the parameters, and a module-level cache in onnxscript's rewriter kept that graph (and so
    every weight) alive after the model itself was gone."""
    models: list[weakref.ref] = []
    alive_at_session: list[list[bool]] = []
    real_load, real_session = model_pkg.load_pretrained, ort.InferenceSession

    def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        m = real_load(*args, **kwargs)
        models.append(weakref.ref(m))
        models.append(weakref.ref(max(m.parameters(), key=lambda t: t.numel())))
        return m

    class Session(real_session):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            alive_at_session.append([r() is not None for r in models])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(model_pkg, "load_pretrained", load)
    monkeypatch.setattr(ort, "InferenceSession", Session)
    return models, alive_at_session


@pytest.mark.parametrize(("precision", "attention", "sessions"), [
    ("fp32", "gqa", 1),  # the parity check
    ("int8", "gqa", 2 + 3 * 4),  # each int8 kernel timed at 3 row counts, the parity check, the perplexity
    ("fp32", "standard", 1),
])
def test_export_frees_the_pytorch_model_before_onnx_runtime_loads_the_graph(tmp_path, tiny_lm_dir, watched, precision,
                                                                            attention, sessions) -> None:
    models, alive_at_session = watched
    manifest = export_checkpoint(tiny_lm_dir, tmp_path, "generate", precision=precision, attention=attention)
    assert manifest["parity"]["passed"], manifest["parity"]["failures"]
    assert (manifest["parity"]["perplexity"] is not None) == (precision == "int8")
    assert len(models) == 2 and len(alive_at_session) == sessions
    assert alive_at_session == [[False, False]] * sessions  # no session ever coexisted with the weights


def test_classifier_export_frees_the_model_too(tmp_path, tiny_classifier_dir, watched) -> None:
    models, alive_at_session = watched
    manifest = export_checkpoint(tiny_classifier_dir, tmp_path, "classify")
    assert manifest["parity"]["passed"] and manifest["parity"]["top1_positions"] == 8 + 8 + 1
    assert len(models) == 2 and alive_at_session == [[False, False]]


def test_reference_keeps_one_cache_per_scenario_and_each_step_reads_a_prefix(tmp_path) -> None:
    """The reference keeps PyTorch's cache once per scenario, not once per step: each checked
    call reads the first `cache_len` columns, which grow by one per decode step."""
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", "generate", seed=3, vocab_size=1000, n_embd=48, n_layer=2, n_head=3)
    m = load_pretrained(ckpt)
    for attention in ("standard", "gqa"):
        ref = reference(m, attention, ckpt)
        batch = ref.scenarios[0]
        lens = [c.cache_len for c in batch.calls if c.name]
        assert lens == list(range(lens[0], lens[0] + 9))  # prefill + 8 decode steps
        assert batch.kv[0][0].shape[2] == lens[-1] and len(batch.kv) == 2
    # gqa keeps only the rows PyTorch's left padding leaves column for column
    assert len(batch.cache_rows) < batch.batch and batch.kv[0][0].shape[0] == len(batch.cache_rows)


def test_compare_refuses_a_reference_made_for_another_graph(tmp_path, tiny_lm_dir) -> None:
    export_checkpoint(tiny_lm_dir, tmp_path, "generate", verify_parity=False, attention="gqa")
    m = load_pretrained(tiny_lm_dir)
    with pytest.raises(ValueError, match="a gqa graph, but the reference was made for a standard graph"):
        compare(reference(m, "standard", tiny_lm_dir), tmp_path / "model.onnx")
    # verify() reads the signature from the graph itself, and the two phases give the same report
    one = verify(m, tmp_path / "model.onnx", "fp32", checkpoint=tiny_lm_dir).to_dict()
    two = compare(reference(m, "gqa", tiny_lm_dir), tmp_path / "model.onnx").to_dict()
    assert one == two and one["passed"]
    assert np.isfinite(one["max_logit_error"]) and one["top1_positions"] == 8 * 9 + 3 + 2
