"""A failed export is remembered, not re-run at every start.

An export that failed deterministically (its parity checks, or an error about the checkpoint or
the options, or any other crash of the exporter) leaves `<cache entry>.failed.json` beside the
cache entry (`loader.failure_report_path`); the entry's name already holds the checkpoint hash
and the export options (task, precision, attention, opset). Recorded with it is the version of
the code that made the export: the package version plus a hash of the exporter's sources. A
later start with the same checkpoint, options and exporter reads that record and reports the
failure at once (one line in the log and `/info`, pointing at the report) instead of spending
minutes and gigabytes failing again. Any change to the exporter's code, `RETRY_FAILED_EXPORT=1`,
or `python -m app.prepare --retry-failed` runs it again. A failure that may not recur is not
recorded (`loader.TransientExportError`): the child killed by a signal (the out-of-memory killer),
a full or failing cache disk, memory exhausted (`export_child.EXIT_TRANSIENT`), or the export lock
taken over by another process; the next start tries again.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
# The code whose behaviour decides an export's outcome.
_SOURCES = ("export", "model/gpt2.py", "model/checkpoint.py")


@lru_cache
def exporter_version() -> str:
    """`<package version>+<sha256 of the exporter's sources, 12 hex>`."""
    try:
        pkg = metadata.version("gpt2-serve")
    except metadata.PackageNotFoundError:
        pkg = "0+unknown"
    h = hashlib.sha256()
    for src in _SOURCES:
        path = _ROOT / src
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if f.is_file():
                h.update(str(f.relative_to(_ROOT)).encode() + b"\0" + f.read_bytes())
    return f"{pkg}+{h.hexdigest()[:12]}"


def remembered(report: Path) -> dict[str, Any] | None:
    """The failure recorded in `report` if it was made by this exporter version, else None."""
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("exporter_version") != exporter_version():
        return None
    return data


def describe(data: dict[str, Any], report: Path) -> str:
    """The one line a remembered failure is reported with."""
    when = data.get("failed_at", "an earlier start")
    return (f"{data.get('summary', 'export failed')} (remembered from {when}, not retried: set "
            f"RETRY_FAILED_EXPORT=1 or run `python -m app.prepare --retry-failed`; report: {report})")
