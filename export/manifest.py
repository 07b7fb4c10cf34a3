"""`manifest.json`, written beside `model.onnx`: what was exported, from what, and how well it matched.

Torch-free on purpose: the serving path reads manifests and hashes checkpoints to find a
cached export without importing torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
# 2: the generation graphs select tokens (logits_index, target_ids, temperature, top_n ->
# token_logprobs, top_ids, top_logprobs). A cache entry of another version is never reused.
# 3: top_n is a (1,) input, TopK's k itself (a 0-d one put a Reshape on the CPU EP under CUDA).
FORMAT_VERSION = 3
DEFAULT_OPSET = 18
# What determines an export: the config and the weights. Tokenizer files do not change the graph.
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_sha256(folder: str | Path) -> str:
    """One hash over the files that define a checkpoint's graph and weights (names included)."""
    folder = Path(folder)
    names = [n for n in _CHECKPOINT_FILES if (folder / n).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        names += sorted(set(weight_map.values()))
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + file_sha256(folder / name).encode() + b"\n")
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def model_files(out_dir: Path) -> list[str]:
    """`model.onnx` and its external data file, if any."""
    return sorted(p.name for p in out_dir.iterdir() if p.name == MODEL_FILE or p.name.startswith(MODEL_FILE + "."))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Read a manifest; `ValueError` if missing or malformed."""
    path = Path(out_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"{path}: missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a format-{FORMAT_VERSION} export manifest")
    return data


def verify_files(out_dir: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Names of model files whose sha256 differs from the manifest (damaged or missing)."""
    out_dir = Path(out_dir)
    bad = []
    for name, digest in manifest.get("files", {}).items():
        p = out_dir / name
        if not p.is_file() or file_sha256(p) != digest:
            bad.append(name)
    if not manifest.get("files"):
        bad.append(MODEL_FILE)
    return bad
