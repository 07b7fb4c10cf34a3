"""`python -m app.prepare`: make (or check) the cached ONNX exports for MODEL_PATH (its generation
and, unless EMBEDDING_POOLING=off, embedding graphs) and CLASSIFIER_PATH, so the server's first
start is fast. The Docker image runs it at build time."""

from __future__ import annotations

import argparse
import logging
import sys

from app.core.config import get_settings
from app.loading.loader import ensure_export, resolve_precision

logger = logging.getLogger("app.prepare")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--retry-failed", action="store_true",
                   help="re-run an export that failed before (otherwise its recorded failure is reported)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[prepare] %(message)s", stream=sys.stderr)
    s = get_settings()
    device = "cpu" if s.device == "auto" else s.device
    jobs = [("generate", s.model_path)] + ([("classify", s.classifier_path)] if s.classifier_path else [])
    jobs += [("embed", s.model_path)] if s.embedding_pooling != "off" else []
    for task, path in jobs:
        try:
            onnx, _ = ensure_export(path, task, resolve_precision(s.precision, device), s.onnx_cache_dir, device,
                                    retry_failed=args.retry_failed or s.retry_failed_export,
                                    lock_stale_s=s.export_lock_stale_seconds)
        except Exception as e:  # a CLI: say what failed and exit non-zero
            logger.error("%s export of %s failed: %s", task, path, e)
            return 1
        logger.info("%s: %s", task, onnx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
