"""Write `loadtest.run`'s built-in prompts as an AIPerf `single_turn` dataset (one JSON object per line),
so `make bench-aiperf` and `python -m loadtest.run --endpoint completions` send the same prompts.

    python -m bench.aiperf_prompts OUT.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loadtest.run import DEFAULT_PROMPTS


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m bench.aiperf_prompts OUT.jsonl\n")
        return 2
    out = Path(args[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": p}) + "\n" for p in DEFAULT_PROMPTS), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
