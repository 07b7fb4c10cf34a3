"""The quantized kernel chosen per CPU (export.kernels): instruction-set tags, the candidates'
one-node graphs against fp32, the measured ranking, the settings' names."""

from __future__ import annotations

import typing

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from app.core.config import Settings
from export.kernels import CANDIDATES, KERNELS, ROWS, isa_tag, matmul_model, rank, resolve


@pytest.mark.parametrize(("flags", "tag"), [
    (["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"], "amx"),
    (["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"], "avx512vnni"),  # this host (2026-12-05)
    (["avx2", "avx_vnni"], "avxvnni"),
    (["avx2", "avx512f", "avx512bw"], "avx512"),
    (["avx2", "fma"], "avx2"),  # the AVX2-only EPYC of 2026-11-30
    (["asimddp", "i8mm"], "arm-i8mm"),
    (["asimddp"], "arm-dotprod"),
])
def test_isa_tag_is_the_best_level_the_kernels_dispatch_on(flags, tag) -> None:
    assert isa_tag(flags) == tag
    assert isa_tag([], "x86_64") == "x86_64"


def test_resolve_names_the_setting_on_a_wrong_kernel() -> None:
    assert resolve("int8") == CANDIDATES["int8"] and len(CANDIDATES["int8"]) >= 3
    assert resolve("int4", "nbits4-b32") == (KERNELS["nbits4-b32"],)
    with pytest.raises(ValueError, match=r"QUANT_KERNEL='dynamic8' is not a int4 kernel; expected auto or one of "
                                         r"nbits4-b32-zp"):
        resolve("int4", "dynamic8")
    with pytest.raises(ValueError, match="precision 'fp32' has no quantized kernels"):
        resolve("fp32")


@pytest.mark.parametrize("name", list(KERNELS))
def test_each_candidate_graph_computes_the_matmul(name) -> None:
    """The one-node graph each candidate is timed as computes x @ W within its bits' error: a
    wrong packing (layout, zero point, scale per row instead of column) is far off."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((128, 96)) * 0.02).astype(np.float32)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    kern = KERNELS[name]
    sess = ort.InferenceSession(matmul_model(kern, w).SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    ref = x @ w
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    assert rel < (0.03 if kern.bits == 8 else 0.2), rel
    assert rel > 0  # really quantized


def test_rank_times_every_candidate_and_orders_by_score() -> None:
    order, record = rank("int8", 64, budget_s=0.3)
    names = [k.name for k in CANDIDATES["int8"]]
    assert sorted(k.name for k in order) == sorted(names)
    assert record["chosen_by"] == "measured" and record["isa"] == isa_tag() and record["shape"] == [64, 256]
    assert record["timings_ms"].keys() == set(names)
    assert all(t[str(m)] > 0 for t in record["timings_ms"].values() for m in ROWS)
    scores = [record["score"][k.name] for k in order]
    assert scores == sorted(scores) and scores[0] >= 1.0
    # the score is the geometric mean of each row count's time over the fastest's
    t = record["timings_ms"][order[-1].name]
    best = {m: min(v[str(m)] for v in record["timings_ms"].values()) for m in ROWS}
    expected = np.exp(np.mean([np.log(t[str(m)] / best[m]) for m in ROWS]))
    assert record["score"][order[-1].name] == pytest.approx(expected, abs=2e-3)
    forced, rec = rank("int8", 64, "dynamic8")
    assert [k.name for k in forced] == ["dynamic8"] and rec["chosen_by"] == "setting" and "timings_ms" not in rec


def test_settings_name_the_same_kernels_and_refuse_a_mismatch(monkeypatch) -> None:
    names = typing.get_args(Settings.model_fields["quant_kernel"].annotation)
    assert set(names) == {"auto", *KERNELS}
    assert Settings(precision="int8", quant_kernel="dynamic8").quant_kernel == "dynamic8"
    assert Settings(precision="int4", quant_kernel="nbits4-b128-zp").quant_kernel == "nbits4-b128-zp"
    with pytest.raises(ValidationError, match="QUANT_KERNEL=dynamic8 does not apply to PRECISION=int4"):
        Settings(precision="int4", quant_kernel="dynamic8")
    with pytest.raises(ValidationError, match="QUANT_KERNEL=nbits8-b32 does not apply to PRECISION=fp32"):
        Settings(precision="fp32", quant_kernel="nbits8-b32")


def test_copies_are_distinct_weights() -> None:
    """ONNX Runtime shares equal weights between nodes, so copies of one weight would stay in the
    cache and time a decode step as if it never read memory (seen: 0.025 ms against 0.108 ms for
    a 768x3072 block int8 weight). Copy i is the weight shifted by i columns."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    sess = ort.InferenceSession(matmul_model(None, w, copies=3).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    for i, y in enumerate(sess.run(None, {"x": x})):
        np.testing.assert_allclose(y, x @ np.roll(w, i, axis=1), rtol=1e-5, atol=1e-5)
