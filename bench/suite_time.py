"""Where the test suite's time goes (issue 26): sums a pytest log's `--durations=0` lines by file
and by phase, and lists the slowest set-ups, as Markdown.

    .venv/bin/python -m pytest --durations=0 --fixture-durations=15 2>&1 | tee /tmp/suite.log
    .venv/bin/python -m bench.suite_time /tmp/suite.log [--top 25]

Under pytest-xdist the durations are per worker, so their sum is more than the wall time: the
last line says how much the workers overlapped.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S+?)(?:::(\S+))?\s*$")
WALL = re.compile(r"in ([\d.]+)s(?: \((\d+):(\d+):(\d+)\))?")


def parse(text: str) -> list[tuple[float, str, str, str]]:
    rows = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4) or ""))
    return rows


def tables(text: str, top: int = 25) -> str:
    rows = parse(text)
    if not rows:
        raise SystemExit("no --durations lines in that log (run pytest with --durations=0)")
    by_file: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for secs, phase, path, _ in rows:
        by_file[path][phase] += secs
    total = sum(r[0] for r in rows)
    out = ["| file | set-up (s) | tests (s) | teardown (s) | total (s) | share |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    ranked = sorted(by_file.items(), key=lambda kv: -sum(kv[1].values()))
    for path, ph in ranked[:top]:
        t = sum(ph.values())
        out.append(f"| `{path}` | {ph['setup']:.1f} | {ph['call']:.1f} | {ph['teardown']:.1f} | {t:.1f} | "
                   f"{100 * t / total:.1f}% |")
    rest = sum(sum(ph.values()) for _, ph in ranked[top:])
    if rest:
        out.append(f"| {len(ranked) - top} other files | | | | {rest:.1f} | {100 * rest / total:.1f}% |")
    phases = {p: sum(r[0] for r in rows if r[1] == p) for p in ("setup", "call", "teardown")}
    out.append(f"| **all {len(by_file)} files** | {phases['setup']:.1f} | {phases['call']:.1f} | "
               f"{phases['teardown']:.1f} | {total:.1f} | |")
    walls = WALL.findall(text)
    if walls:
        wall = float(walls[-1][0])
        out.append(f"\nSum of the durations {total:.0f} s, wall time {wall:.0f} s ({total / wall:.2f}x).")
    fixtures = text.split("fixture set-up, summed over the run", 1)
    if len(fixtures) == 2:
        out.append("\n| fixture (scope) | set-up summed (s) | set-ups |\n| --- | ---: | ---: |")
        for line in fixtures[1].splitlines()[1:]:
            m = re.match(r"^\s*([\d.]+)s\s+(\d+)x\s+(.+)$", line)
            if not m:
                break
            out.append(f"| `{m.group(3)}` | {float(m.group(1)):.1f} | {m.group(2)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    sys.stdout.write(tables(args.log.read_text(errors="replace"), args.top) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
