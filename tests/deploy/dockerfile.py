"""A small reader for the project's Dockerfile: stages, ENV defaults, RUN lines, CMD, HEALTHCHECK.

Just enough Dockerfile syntax for our own file (line continuations, `KEY=VALUE` ENV lists,
exec-form JSON arrays); the tests use it to check that what the image runs is what we test.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    run: list[str] = field(default_factory=list)
    user: str | None = None
    expose: list[int] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    lines, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        lines.append((cur + line).strip())
        cur = ""
    return lines


def parse(path: Path) -> tuple[dict[str, str], dict[str, Stage]]:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(path.read_text()):
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and stage is None:
            k, _, v = rest.partition("=")
            args[k] = v
        elif op == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            base = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g[1], g[0]), m[1])
            stage = Stage(m[2] or base, base)
            stages[stage.name] = stage
        elif stage is None:
            continue
        elif op == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                stage.env[k] = v
        elif op == "RUN":
            stage.run.append(rest)
        elif op == "USER":
            stage.user = rest.strip()
        elif op == "EXPOSE":
            stage.expose += [int(p.split("/")[0]) for p in rest.split()]
        elif op == "CMD":
            stage.cmd = json.loads(rest)
        elif op == "COPY":
            stage.copies.append(rest)
        elif op == "HEALTHCHECK":
            stage.healthcheck = json.loads(rest[rest.index("CMD") + 3:].strip())
    return args, stages
