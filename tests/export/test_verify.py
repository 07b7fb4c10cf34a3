"""Top-1 agreement up to near-ties: how the quantized exports' floor counts a position."""

from __future__ import annotations

import numpy as np
import pytest

from export.verify import TIE_NATS, TOP1_FLOOR, ParityReport, _top1


def _ref_and_picks() -> tuple[np.ndarray, np.ndarray]:
    """PyTorch logits for 4 positions over 5 tokens, and graph logits that pick, per position:
    the same token; a token 0.1 below the best; one 0.3 below; the worst one."""
    ref = np.array([[3.0, 1.0, 0.0, 0.0, -1.0],
                    [2.0, 1.9, 0.0, 0.0, -1.0],
                    [2.0, 1.7, 0.0, 0.0, -1.0],
                    [2.0, 1.0, 0.0, 0.0, -1.0]], np.float32)
    picks = [0, 1, 1, 4]
    got = np.zeros_like(ref)
    got[np.arange(4), picks] = 10.0
    return ref, got


@pytest.mark.parametrize(("precision", "matches"), [("fp32", 1), ("fp16", 1), ("int8", 2), ("int4", 2)])
def test_near_ties_count_only_for_the_quantized_precisions(precision, matches) -> None:
    ref, got = _ref_and_picks()
    report = ParityReport("generate", precision, "CPUExecutionProvider")
    _top1(report, got, ref)
    assert (report.top1_total, report.top1_exact, report.top1_matches) == (4, 1, matches)
    d = report.to_dict()
    assert d["top1_agreement"] == matches / 4 and d["top1_exact_agreement"] == 0.25
    assert d["top1_tie_nats"] == TIE_NATS[precision]
    assert d["passed"] is (matches / 4 >= TOP1_FLOOR[precision]) and not d["passed"]
    assert any("top-1 agreement" in f for f in d["failures"])


def test_a_broken_quantization_still_fails_up_to_ties() -> None:
    """Picks uncorrelated with PyTorch's (what a wrong block layout gives) stay far below every
    floor even when near-ties count: GPT-2-like flat logits over a 50,257-token vocabulary."""
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 0.64, (77, 50257)).astype(np.float32)
    got = rng.normal(0, 0.64, ref.shape).astype(np.float32)
    report = ParityReport("generate", "int4", "CPUExecutionProvider")
    _top1(report, got, ref)
    assert report.top1_agreement < 0.05 < TOP1_FLOOR["int4"]
