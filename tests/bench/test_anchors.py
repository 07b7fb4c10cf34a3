"""The anchors report's arithmetic (bench.anchors): bits per weight of each format, each one-stream
row's share of the bandwidth limit, and issue 30's target lines."""

from __future__ import annotations

from bench.anchors import CT2_VERSION, bandwidth_share, kernel_bits, targets
from bench.common import machine_info, memory_bandwidth_gbs


def test_bits_per_weight_count_the_scales_and_zero_points() -> None:
    assert kernel_bits("nbits8-b32") == 8 + 32 / 32  # one fp32 scale per 32 weights
    assert kernel_bits("nbits8-b128") == 8.25
    assert kernel_bits("dynamic8") == 8  # one scale per column of thousands of weights
    assert kernel_bits("nbits4-b32-zp") == 4 + 1 + 4 / 32  # and a 4-bit zero point per block
    assert kernel_bits("fp32") == 32


def test_bandwidth_share_is_the_decode_rate_over_what_the_bytes_allow() -> None:
    # 100M weights at 8 bits = 100 MB a token; 30 GB/s allows 300 tok/s; 150 measured is 50%
    runs = [{"decode_1": 150.0, "kernel": "dynamic8"}, {"decode_1": 140.0, "kernel": "dynamic8"},
            {"decode_1": 160.0, "kernel": "dynamic8"}]
    assert bandwidth_share("ours int8, HTTP", runs, 100_000_000, 30.0) == "50% of 300 (8 bits/weight)"
    llama = [{"decode_1": 200.0}]
    assert bandwidth_share("llama-bench q8_0 (engine)", llama, 100_000_000, 30.0) == "71% of 282 (8.5 bits/weight)"
    assert bandwidth_share("llama-bench q8_0 (engine)", [{"ttft_512_ms": 9.0}], 100_000_000, 30.0) == "-"


def test_target_lines_say_pass_or_fail_with_per_round_ranges() -> None:
    r = {"ours int8, HTTP": [{"decode_1": 110.0, "streams_32": 400.0, "ttft_512_ms": 500.0}] * 2,
         "llama-bench q8_0 (engine)": [{"decode_1": 100.0}, {"decode_1": 105.0}],
         "ours fp32, HTTP": [{"decode_1": 50.0, "streams_32": 300.0, "ttft_512_ms": 600.0}] * 2,
         f"CTranslate2 {CT2_VERSION} int8 (engine)": [{"streams_32": 420.0}] * 2}
    lines = targets(r).splitlines()
    assert lines[0] == ("- ours int8, HTTP / llama-bench q8_0 (engine), one-stream decode: 1.07x (per round "
                        "1.05-1.10x); target >= 1.1x: FAIL")
    assert "TTFT 512: 0.83x (per round 0.83-0.83x); target <= 1x: pass" in lines[1]
    assert "32 streams: 1.33x" in lines[2] and lines[2].endswith("pass")
    assert "CTranslate2" in lines[3] and lines[3].endswith("FAIL")
    assert len(lines) == 4  # no int4 or fp32-anchor rows without their systems


def test_bandwidth_and_flags_are_read_off_this_host() -> None:
    assert 0.1 < memory_bandwidth_gbs(threads=1, mib=16, repeats=2) < 10_000
    assert isinstance(machine_info()["flags"], list)
