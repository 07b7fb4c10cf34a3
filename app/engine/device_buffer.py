"""A tensor allocated once on a device and bound to ONNX Runtime by address: what the fixed-buffer
runner's KV cache, step inputs and outputs, and prefix-cache pool are made of (DESIGN §9). With
the addresses fixed, a decode step can be captured as a CUDA graph and replayed."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class DeviceBuffer:
    """A tensor allocated once on `device` ("cpu": numpy; "cuda": an OrtValue), bound by address."""

    def __init__(self, shape: tuple[int, ...], dtype: type, device: str) -> None:
        self.shape, self.dtype, self.device = tuple(shape), np.dtype(dtype), device
        if device == "cpu":
            self.host: np.ndarray | None = np.zeros(self.shape, self.dtype)
            self.value = ort.OrtValue.ortvalue_from_numpy(self.host)
        else:
            self.host = None
            self.value = ort.OrtValue.ortvalue_from_shape_and_type(self.shape, self.dtype, "cuda", 0)

    @property
    def ptr(self) -> int:
        return int(self.value.data_ptr())

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def write(self, a: np.ndarray) -> None:
        if self.host is not None:
            self.host[...] = a
        else:
            self.value.update_inplace(np.ascontiguousarray(a, dtype=self.dtype))

    def read(self) -> np.ndarray:
        """A host copy."""
        return self.host.copy() if self.host is not None else self.value.numpy()

    def bind(self, binding: ort.IOBinding, name: str, output: bool = False, rows: tuple[int, int] | None = None,
             ) -> None:
        """Bind the buffer (or its rows [a, b)) as input or output `name`, by address."""
        a, b = rows if rows is not None else (0, self.shape[0])
        shape, ptr = [b - a, *self.shape[1:]], self.ptr + a * self.row_bytes
        dev = "cpu" if self.device == "cpu" else "cuda"
        if output:
            binding.bind_output(name, dev, 0, self.dtype, shape, ptr)
        else:
            binding.bind_input(name, dev, 0, self.dtype, shape, ptr)
