"""Weights on disk: an export's tensors are handled one at a time, never as one protobuf message.

Protobuf cannot serialize a message past 2 GB (GPT-2 large's fp32 weights are 3.1 GB, XL's
6.2 GB), and even asking for its size (`ModelProto.ByteSize()`) raises there. So the trace is
always saved with its weights in an external data file (`export.graphs`), the passes that
follow load only the graph's structure (`load_structure`), read a weight as a memory map when
they need it (`read_array`), and write new weights through `DataWriter`, which appends them to
the export's own data file. An export is `model.onnx` (the graph) + `model.onnx.data` (the
weights), whatever its size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Beyond this many bytes of weights a protobuf message cannot hold them inline (2 GB cap).
INLINE_LIMIT = 1_800_000_000
# Offsets of external tensors are multiples of this, so ONNX Runtime can map them from the file.
ALIGN = 4096
# Tensors this small stay inside model.onnx even when the weights are external.
SMALL_TENSOR = 1024


def _external(t: TensorProto) -> dict[str, str] | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


def tensor_bytes(t: TensorProto) -> int:
    """Bytes of a tensor's data, wherever it is stored, without serializing anything."""
    ext = _external(t)
    if ext is not None:
        if "length" in ext:
            return int(ext["length"])
        n = int(np.prod(t.dims)) if t.dims else 1
        return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Total bytes of the top-level initializers (the weights)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph without its external weights (they stay on disk, referenced by location)."""
    return onnx.load(str(path), load_external_data=False)


def read_array(t: TensorProto, base_dir: Path) -> np.ndarray:
    """A tensor's value: a read-only memory map of the data file for an external tensor (pages
    are read when touched and released with the array), a copy for an inline one."""
    ext = _external(t)
    if ext is None:
        return numpy_helper.to_array(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    shape = tuple(t.dims)
    offset = int(ext.get("offset", 0))
    return np.memmap(base_dir / ext["location"], dtype=dtype, mode="r", offset=offset, shape=shape)


class DataWriter:
    """Appends tensors to `<model file>.data` at aligned offsets and returns TensorProtos that
    refer to them. Use as a context manager; the file is complete when the block exits."""

    def __init__(self, model_path: Path) -> None:
        self.location = model_path.name + ".data"
        self.path = model_path.parent / self.location
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> DataWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def put(self, name: str, array: np.ndarray, data_type: int | None = None) -> TensorProto:
        """Write `array` (C order) and return the external TensorProto `name` for it.
        `data_type` overrides the ONNX type (e.g. UINT4 stored as packed uint8 bytes)."""
        array = np.ascontiguousarray(array)
        if array.nbytes <= SMALL_TENSOR:
            t = numpy_helper.from_array(np.asarray(array), name)
            if data_type is not None:
                t = helper.make_tensor(name, data_type, array.shape, array.tobytes(), raw=True)
            return t
        pad = -self._f.tell() % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
        offset = self._f.tell()
        self._f.write(memoryview(array.reshape(-1).view(np.uint8)))
        t = TensorProto()
        t.name = name
        t.data_type = data_type if data_type is not None else helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def copy(self, t: TensorProto, base_dir: Path) -> TensorProto:
        """Rewrite tensor `t` (read from `base_dir`) into this file, unchanged."""
        if _external(t) is None and tensor_bytes(t) <= SMALL_TENSOR:
            return t
        arr = read_array(t, base_dir)
        try:
            out = self.put(t.name, arr, t.data_type)
        finally:
            del arr
        return out


def save(model: onnx.ModelProto, src_dir: Path, target: Path) -> None:
    """Write `model` (structure; weights external in `src_dir`) as `target` + `target.data`.

    When every external tensor sits in one file in `src_dir`, that file is moved into place (a
    rename); otherwise the weights are copied there one tensor at a time. Weights always stay
    outside `model.onnx`: writing them inline would mean one more copy of them in memory (the
    serialized message) and is impossible past 2 GB; ONNX Runtime reads either the same way.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    exts = [(t, _external(t)) for t in model.graph.initializer]
    files = {e["location"] for _, e in exts if e is not None}
    inline_big = [t for t, e in exts if e is None and tensor_bytes(t) > SMALL_TENSOR]
    data_name = target.name + ".data"
    if len(files) == 1 and not inline_big:
        (src,) = files
        os.replace(src_dir / src, target.parent / data_name)
        for t, e in exts:
            if e is not None:
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = data_name
    else:
        if any((src_dir / f).resolve() == (target.parent / data_name).resolve() for f in files):
            raise ValueError(f"{target}: would overwrite its own source weights {data_name}")
        with DataWriter(target) as w:
            for i, t in enumerate(list(model.graph.initializer)):
                model.graph.initializer[i].CopyFrom(w.copy(t, src_dir))
    onnx.save_model(model, str(target))
