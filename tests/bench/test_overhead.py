"""`python -m bench.overhead`: the zero-cost runner behind the real server, driven over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_prints_one_json_line_per_stream_count_and_saves_the_record(tmp_path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--streams", "1,3", "--duration", "1", "--json",
                           "--new-tokens", "8", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [set(x) for x in lines] == [{"streams", "tok_s", "itl_p50_ms", "itl_p99_ms"}] * 2
    assert [x["streams"] for x in lines] == [1, 3] and all(x["tok_s"] > 0 for x in lines)
    rec = json.loads(out.read_text())
    assert [r["streams"] for r in rec["results"]] == [1, 3] and rec["settings"]["new_tokens"] == 8
    # Every stream got all its tokens (the fixed logits never stop early): requests were counted.
    assert all(run["requests"] > 0 for r in rec["results"] for run in r["runs"])
