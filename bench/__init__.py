"""Reproducible benchmarks against the anchors; each writes JSON and a table in BENCHMARKS.md."""
