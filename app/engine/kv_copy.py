"""Block copies between the fixed runner's KV buffers and its prefix-cache pool, on their device.

ONNX Runtime's Python API moves whole tensors between host and device, not slices of a device
buffer into another, so the copies are two small ONNX graphs, bound by address like the decode
step (`device_buffer.DeviceBuffer`), every layer and kind in one call:

    load: slot_i[0, :, :n*B] = pool_i[pool_ids] (blocks laid end to end)
          Gather -> Transpose -> Reshape -> ScatterND(slot_i) -> bound at slot_i's own address
    save: pool_i[pool_ids] = slot_i[0, :, start:start + n*B] cut into blocks
          Slice -> Reshape -> Transpose -> ScatterND(pool_i) -> bound at pool_i's own address

ScatterND's output is bound to its data input's memory: ONNX Runtime's CPU and CUDA kernels copy
data to output only when the two differ, then write the updates, so the call writes n blocks and
nothing else (measured on CPU: 0.07 ms to write 48 tokens of one GPT-2 124M layer's keys into a
1,024-position slot; a copy of the whole slot alone would take 0.3 ms).
`OrtFixedRunner.check_prefix_cache` checks the result on the serving device at start.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from export.providers import providers_for

IR_VERSION = 9  # what ONNX Runtime 1.20+ reads (onnx's newest IR is ahead of it)


def _model(nodes: list, inputs: list, outputs: list, name: str) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def copy_models(n_bufs: int, n_head: int, positions: int, head_dim: int, num_blocks: int, block_tokens: int,
                dtype: type) -> tuple[bytes, bytes]:
    """(load, save) graphs for `n_bufs` buffers of one slot (1, n_head, positions, head_dim) and a
    pool (num_blocks, n_head, block_tokens, head_dim) each."""
    elem = TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT
    H, M, D, NB, B = n_head, positions, head_dim, num_blocks, block_tokens

    def io(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, shape)

    def ints(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.INT64, shape)

    load_nodes, save_nodes = [], []
    for i in range(n_bufs):
        load_nodes += [
            helper.make_node("Gather", [f"pool_{i}", "pool_ids"], [f"g_{i}"], axis=0),  # (n, H, B, D)
            helper.make_node("Transpose", [f"g_{i}"], [f"t_{i}"], perm=[1, 0, 2, 3]),  # (H, n, B, D)
            helper.make_node("Reshape", [f"t_{i}", "slot_shape"], [f"u_{i}"]),  # (1, H, n*B, D)
            helper.make_node("ScatterND", [f"slot_{i}", "slot_index", f"u_{i}"], [f"slot_out_{i}"]),
        ]
        save_nodes += [
            helper.make_node("Slice", [f"slot_{i}", "starts", "ends", "axes"], [f"s_{i}"]),  # (1, H, n*B, D)
            helper.make_node("Reshape", [f"s_{i}", "block_shape"], [f"r_{i}"]),  # (H, n, B, D)
            helper.make_node("Transpose", [f"r_{i}"], [f"t_{i}"], perm=[1, 0, 2, 3]),  # (n, H, B, D)
            helper.make_node("ScatterND", [f"pool_{i}", "pool_index", f"t_{i}"], [f"pool_out_{i}"]),
        ]
    slots = [io(f"slot_{i}", [1, H, M, D]) for i in range(n_bufs)]
    pools = [io(f"pool_{i}", [NB, H, B, D]) for i in range(n_bufs)]
    load = _model(load_nodes, [*pools, *slots, ints("pool_ids", ["n"]), ints("slot_shape", [4]),
                               ints("slot_index", [1, H, "nB", 3])],
                  [io(f"slot_out_{i}", [1, H, M, D]) for i in range(n_bufs)], "kv_load")
    save = _model(save_nodes, [*slots, *pools, ints("starts", [1]), ints("ends", [1]), ints("axes", [1]),
                               ints("block_shape", [4]), ints("pool_index", ["n", 1])],
                  [io(f"pool_out_{i}", [NB, H, B, D]) for i in range(n_bufs)], "kv_save")
    return load, save


class KVCopier:
    """Runs the two graphs over a runner's slot buffers and pool buffers (`DeviceBuffer`s)."""

    def __init__(self, kv: list, pool: list, device: str, block_tokens: int) -> None:
        self.kv, self.pool, self.B = kv, pool, block_tokens
        _, H, M, D = kv[0].shape
        load, save = copy_models(len(kv), H, M, D, pool[0].shape[0], block_tokens, kv[0].dtype.type)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.load_sess = ort.InferenceSession(load, opts, providers=providers_for(device))
        self.save_sess = ort.InferenceSession(save, opts, providers=providers_for(device))
        self.H = H

    def _bind_pair(self, binding: ort.IOBinding, bufs: list, name: str, rows: tuple[int, int] | None) -> None:
        for i, buf in enumerate(bufs):  # the same memory in and out: ScatterND writes only the updates
            buf.bind(binding, f"{name}_{i}", rows=rows)
            buf.bind(binding, f"{name}_out_{i}", output=True, rows=rows)

    def load(self, slot: int, pool_ids: list[int]) -> None:
        n = len(pool_ids) * self.B
        index = np.zeros((1, self.H, n, 3), np.int64)  # [0, head, position] of each update row
        index[..., 1] = np.arange(self.H)[:, None]
        index[..., 2] = np.arange(n)[None, :]
        binding = self.load_sess.io_binding()
        for i, buf in enumerate(self.pool):
            buf.bind(binding, f"pool_{i}")
        self._bind_pair(binding, self.kv, "slot", (slot, slot + 1))
        for name, value in (("pool_ids", np.asarray(pool_ids, np.int64)), ("slot_index", index),
                            ("slot_shape", np.array([1, self.H, n, self.kv[0].shape[3]], np.int64))):
            binding.bind_cpu_input(name, value)
        self.load_sess.run_with_iobinding(binding)

    def save(self, slot: int, start: int, pool_ids: list[int]) -> None:
        n = len(pool_ids)
        binding = self.save_sess.io_binding()
        for i, buf in enumerate(self.kv):
            buf.bind(binding, f"slot_{i}", rows=(slot, slot + 1))
        self._bind_pair(binding, self.pool, "pool", None)
        for name, value in (("starts", [start]), ("ends", [start + n * self.B]), ("axes", [2]),
                            ("block_shape", [self.H, n, self.B, self.kv[0].shape[3]]),
                            ("pool_index", np.asarray(pool_ids, np.int64)[:, None])):
            binding.bind_cpu_input(name, np.asarray(value, np.int64))
        self.save_sess.run_with_iobinding(binding)
