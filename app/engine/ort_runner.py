"""ONNX Runtime runners. No torch import here: this is the slim serving path.

Input and output names, head count, head size and vocabulary come from the session itself; a
graph that lacks a name the runner needs fails at construction, naming what is missing.

On CUDA the runner uses IO binding: ids, mask and positions are bound from the host (a few
bytes), `present.*` are bound to device memory and fed back as the next step's
`past_key_values.*` OrtValues, so the KV cache stays on the GPU across steps; only the
(B, V) logits come back for sampling. Merging or dropping rows (batch membership changes, not
steps) moves the cache through the host.
"""

from __future__ import annotations

import ctypes
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.engine import prefix_cache
from app.engine.padded_runner import PaddedRunner
from app.engine.pooling import EmbeddingRunner
from app.engine.runner import (
    KV,
    ClassificationRunner,
    GenerationRunner,
    ModelInfo,
    PendingPrefill,
    PromptScores,
    Selected,
    Want,
    left_pad,
    parse_selection,
    select_inputs,
)
from export.providers import CUDA, providers_for

logger = logging.getLogger(__name__)

def trim_heap() -> None:
    """glibc's malloc_trim: return the heap's free pages to the system. Freed KV buffers of a few
    MB come back to the heap rather than to the system once glibc has raised its mmap threshold
    (it does after the first large free), so without this the memory a burst used stayed resident
    at rest (measured: 926 MiB after a burst against 657 before it, GPT-2 124M). No-op elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
SELECT_INPUTS = ("logits_index", "target_ids", "temperature", "top_n")
SELECT_OUTPUTS = ("logits", "token_logprobs", "top_ids", "top_logprobs")


class GraphContractError(RuntimeError):
    """The ONNX graph does not have the inputs/outputs the runner needs."""


def make_session(path: str | Path, device: str, num_threads: int | None = None,
                 config: dict[str, str] | None = None, cuda_options: dict[str, str] | None = None,
                 ) -> ort.InferenceSession:
    """A session on `device`; raises if CUDA was asked for and ONNX Runtime could not take it.
    On CUDA, TF32 is off (`export.providers`: fp32 must mean fp32). `config`: extra session config
    entries (`session.intra_op.allow_spinning`, ...); the defaults measured as well as any of
    those tried (bench/levers.py). `cuda_options`: more CUDA EP options (`enable_cuda_graph`)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if num_threads:
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    sess = ort.InferenceSession(str(path), opts, providers=providers_for(device, cuda_options))
    if device == "cuda" and sess.get_providers()[0] != CUDA:
        raise RuntimeError(f"CUDAExecutionProvider is not usable (session got {sess.get_providers()})")
    return sess


def _require(sess: ort.InferenceSession, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    have_in = {i.name for i in sess.get_inputs()}
    have_out = {o.name for o in sess.get_outputs()}
    missing = [f"input {n}" for n in inputs if n not in have_in] + [f"output {n}" for n in outputs if n not in have_out]
    if missing:
        raise GraphContractError(f"ONNX graph is missing {', '.join(missing)}")


def _kv_contract(sess: ort.InferenceSession, inputs: Sequence[str],
                 n_positions: int) -> tuple[list[str], list[str], type, ModelInfo]:
    """(past names, present names, KV dtype, model info) of a generation graph whose other
    required inputs are `inputs`; raises GraphContractError naming whatever is missing."""
    past = sorted((int(m[1]), m[2], i) for i in sess.get_inputs() if (m := _PAST.match(i.name)))
    n_layer = len({layer for layer, _, _ in past})
    if n_layer == 0:
        raise GraphContractError("ONNX graph has no past_key_values.{i}.key/value inputs")
    past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    _require(sess, [*inputs, *SELECT_INPUTS, *past_names], [*SELECT_OUTPUTS, *present_names])
    shape = past[0][2].shape  # (batch, n_head, past or cache length, head_dim): n_head, head_dim static
    kv_dtype = np.float16 if past[0][2].type == "tensor(float16)" else np.float32
    vocab = next(o for o in sess.get_outputs() if o.name == "logits").shape[-1]
    return past_names, present_names, kv_dtype, ModelInfo(n_layer, int(shape[1]), int(shape[3]), int(vocab),
                                                          n_positions)


class OrtGenerationRunner(PaddedRunner):
    """The standard past/present graph (DESIGN §7), left-padded batch; CPU or CUDA."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", num_threads: int | None = None,
                 n_positions: int = 1024) -> None:
        self.sess = make_session(path, device, num_threads)
        self.device = device
        self.past_names, self.present_names, self.kv_dtype, info = _kv_contract(
            self.sess, ["input_ids", "attention_mask", "position_ids"], n_positions)
        super().__init__(info)
        self.io_binding = device == "cuda"
        logger.info("ONNX Runtime generation runner on %s (%s), %d layers, kv %s, io binding %s",
                    device, self.sess.get_providers()[0], info.n_layer, np.dtype(self.kv_dtype).name, self.io_binding)

    def _empty_kv(self, n: int) -> list[Any]:
        z = np.zeros((n, self.info.n_head, 0, self.info.head_dim), self.kv_dtype)
        return [self._to_device(z) for _ in self.past_names]

    def _to_device(self, a: np.ndarray) -> Any:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0) if self.io_binding else a

    def _to_host(self, kv: KV) -> list[np.ndarray]:
        return [v.numpy() for v in kv] if self.io_binding else kv

    def _forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, kv: KV | None, sel: dict[str, np.ndarray],
                 want_logits: bool) -> tuple[tuple, KV]:
        kv = kv if kv is not None else self._empty_kv(ids.shape[0])
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **sel}
        if not self.io_binding:
            outs = self.sess.run([*SELECT_OUTPUTS, *self.present_names],
                                 feed | dict(zip(self.past_names, kv, strict=True)))
            return tuple(outs[:4]), outs[4:]
        binding = self.sess.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, kv, strict=True):
            binding.bind_ortvalue_input(name, value)
        # Only the selection crosses to the host; the (B, V) logits stay on the device unless asked.
        binding.bind_output("logits", "cpu" if want_logits else "cuda", 0)
        for name in SELECT_OUTPUTS[1:]:
            binding.bind_output(name, "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cuda", 0)
        self.sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        logits = outs[0].numpy() if want_logits else None
        return (logits, *(o.numpy() for o in outs[1:4])), list(outs[4:])

    # KV moves: numpy on CPU; through the host on CUDA (only when batch membership changes).
    def _map(self, kv: KV, fn) -> KV:  # noqa: ANN001
        return [self._to_device(fn(a)) for a in self._to_host(kv)]

    def _kv_pad_left(self, kv: KV, cols: int) -> KV:
        return self._map(kv, lambda a: np.pad(a, ((0, 0), (0, 0), (cols, 0), (0, 0))))

    def _kv_cat_rows(self, a: KV, b: KV) -> KV:
        return [self._to_device(np.concatenate([x, y])) for x, y in
                zip(self._to_host(a), self._to_host(b), strict=True)]

    def _kv_take_rows(self, kv: KV, rows: np.ndarray) -> KV:
        return self._map(kv, lambda a: a[rows])

    def _kv_drop_cols(self, kv: KV, cols: int) -> KV:
        return self._map(kv, lambda a: a[:, :, cols:])


class OrtSlotRunner(GenerationRunner):
    """The GroupQueryAttention graph (`export_generation_gqa`) on CPU, with one KV buffer per
    layer and kind, (capacity + 1, n_head, width, head_dim).

    Row r of the batch is buffer row r and holds its tokens at cache indices 0..length-1, so a
    row's position ids are its cache indices and rows of any lengths share a step without
    padding. Each call binds views of the buffers as both past and present (IO binding over
    numpy memory), and GroupQueryAttention writes the new columns in place: a decode step copies
    no cache. Dropping a row moves the last rows into its place (only their filled columns); the
    returned order tells the caller. The extra buffer row (`capacity`) holds a prompt being
    prefilled in chunks until it joins the batch.

    Memory follows the tokens held: the buffers double in rows and in width (cache positions, up
    to the context) as the batch needs, and go back to their first size when the batch is empty.
    A fixed width of the whole context would cost every row its full cache as soon as it is
    prefilled: ONNX Runtime's CPU kernel writes a prompt row's whole width (measured: +63 MB a row
    of the GPT-2 124M shape at 1,024 positions, so a warm-up at 32 rows held 2 GB).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", num_threads: int | None = None,
                 n_positions: int = 1024, initial_capacity: int = 4, session_config: dict[str, str] | None = None,
                 initial_width: int = 64, max_rows: int | None = None, prefix_cache_bytes: int = 0) -> None:
        if device != "cpu":
            raise ValueError("the GroupQueryAttention graph runs on CPU here; CUDA uses the standard graph")
        self.sess = make_session(path, device, num_threads, session_config)
        self.device = device
        self.past_names, self.present_names, self.kv_dtype, self.info = _kv_contract(
            self.sess, ["input_ids", "position_ids", "seqlens_k", "total_sequence_length"], n_positions)
        self.capacity, self.width = 0, 0
        self.max_rows = max_rows  # the scheduler's MAX_BATCH_SIZE: doubling rows stops there
        self.first_size = (min(initial_capacity, max_rows or initial_capacity), min(initial_width, n_positions))
        self.bufs: list[np.ndarray] = []
        self.lengths = np.zeros((0,), np.int64)  # (B,) tokens in each row's cache
        self.chunk_done = 0  # tokens of a chunked prefill in progress in the extra row
        self._arena_grown = False  # a prompt call ran since the arena was last shrunk
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._grow(*self.first_size)
        self._enable_prefix_cache(prefix_cache_bytes)
        logger.info("ONNX Runtime GQA generation runner on cpu, %d layers, kv %s, KV buffers growing to %d positions",
                    self.info.n_layer, np.dtype(self.kv_dtype).name, n_positions)

    @property
    def num_rows(self) -> int:
        return int(self.lengths.shape[0])

    def _enable_prefix_cache(self, budget: int) -> None:
        """The prefix cache's pool: (blocks, n_head, BLOCK_TOKENS, head_dim) per layer and kind, in
        host memory beside the batch buffers: pages the kernel maps on first write (`lazy_zeros`),
        so the budget is an upper bound, not memory taken at start."""
        self._to_keep = []
        self.prefix, self.prefix_off_reason = prefix_cache.build(budget, self.info, np.dtype(self.kv_dtype).itemsize,
                                                                 self._host_pool)

    def _host_pool(self, n: int) -> tuple:
        shape = (n, self.info.n_head, prefix_cache.BLOCK_TOKENS, self.info.head_dim)
        self.pool = [prefix_cache.lazy_zeros(shape, self.kv_dtype) for _ in self.past_names]
        return self._save_blocks, self._load_blocks

    def _save_blocks(self, row: int, start: int, pool_ids: list[int]) -> None:
        n, (H, B, D) = len(pool_ids), self.pool[0].shape[1:]
        for buf, pool in zip(self.bufs, self.pool, strict=True):
            pool[pool_ids] = buf[row, :, start:start + n * B].reshape(H, n, B, D).transpose(1, 0, 2, 3)

    def _load_blocks(self, row: int, pool_ids: list[int]) -> None:
        n, (H, B, D) = len(pool_ids), self.pool[0].shape[1:]
        row = self.capacity if row < 0 else row
        for buf, pool in zip(self.bufs, self.pool, strict=True):
            buf[row, :, :n * B] = pool[pool_ids].transpose(1, 0, 2, 3).reshape(H, n * B, D)

    def _before_load(self, dst: int, tokens: int) -> None:
        self._grow(self.num_rows, tokens)

    @property
    def kv_bytes(self) -> dict[str, int]:
        """KV cache memory: `reserved` by the buffers, `in_use` by the tokens held."""
        per_token = sum(b.shape[1] * b.shape[3] * b.itemsize for b in self.bufs)
        return {"reserved": sum(b.nbytes for b in self.bufs),
                "in_use": per_token * (int(self.lengths.sum()) + self.chunk_done)}

    def _grow(self, rows: int, width: int) -> None:
        """Room for `rows` rows of `width` positions: rows double, the width grows by half (a
        burst of 32-token prompts and 64 new tokens then fits 96 positions, not 128), capped at the
        context."""
        if rows <= self.capacity and width <= self.width:
            return
        cap = self.capacity
        if rows > self.capacity:  # doubling, but never past the batch the scheduler can run
            cap = max(rows, min(2 * self.capacity, self.max_rows or 2 * self.capacity))
        wide = self.width
        if width > self.width:
            wide = min(self.info.n_positions, max(width, self.width + self.width // 2))
        self._realloc(cap, wide)

    def _realloc(self, cap: int, wide: int) -> None:
        """New buffers, one layer and kind at a time, so the old and the new coexist for one of
        them, not for the whole cache."""
        shape = (cap + 1, self.info.n_head, wide, self.info.head_dim)
        n = self.num_rows
        filled = min(wide, int(self.lengths.max(initial=0)))
        if not self.bufs:
            self.bufs = [np.zeros(shape, self.kv_dtype) for _ in self.past_names]
            self.capacity, self.width = cap, wide
            return
        for i, old in enumerate(self.bufs):
            buf = np.zeros(shape, self.kv_dtype)
            buf[:n, :, :filled] = old[:n, :, :filled]
            buf[cap, :, :self.chunk_done] = old[self.capacity, :, :self.chunk_done]  # a chunked prefill
            self.bufs[i] = buf
            del old
        self.capacity, self.width = cap, wide

    @property
    def releasable(self) -> bool:
        return not self.num_rows and not self.chunk_done and (
            self._arena_grown or (self.capacity, self.width) != self.first_size)

    def idle(self) -> None:
        """With no row and no chunked prefill, go back to the first (small) buffers, give ONNX
        Runtime's arena back, and hand the freed memory back to the system."""
        if self.releasable:
            self._realloc(*self.first_size)
            self._shrink_arena()
            trim_heap()

    def _shrink_arena(self) -> None:
        """Prompt calls' activations (tokens x hidden, x MLP width) grow ONNX Runtime's CPU arena,
        which keeps what it grew. ONNX Runtime shrinks it only at the end of a run that asks to
        (`memory.enable_memory_arena_shrinkage`), so an idle runner makes one: a one-token call
        on the spare row, whose content is not needed (no chunked prefill is in progress). Doing
        it per prompt call instead made every prompt allocate its activations again (about 5% of
        a 512-token prompt's first token)."""
        zero = np.zeros(1, np.int64)
        self._run(np.zeros((1, 1), np.int64), zero.reshape(1, 1), zero, slice(self.capacity, self.capacity + 1),
                  select_inputs(zero, zero, 1, Want()), shrink=True)
        self._arena_grown = False

    def _run(self, ids: np.ndarray, pos: np.ndarray, seqlens_k: np.ndarray, rows: slice,
             sel: dict[str, np.ndarray], shrink: bool = False) -> list[np.ndarray]:
        """One call on buffer rows `rows`; `seqlens_k` (n,) is each row's last cache index after it.
        Returns the selection outputs (logits, token_logprobs, top_ids, top_logprobs)."""
        binding = self.sess.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", seqlens_k.astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(int(seqlens_k.max()) + 1, dtype=np.int32))
        for name, value in sel.items():
            binding.bind_cpu_input(name, value)
        for name in SELECT_OUTPUTS:  # bound first: get_outputs() follows binding order
            binding.bind_output(name, "cpu")
        views = [ort.OrtValue.ortvalue_from_numpy(buf[rows]) for buf in self.bufs]  # no copy: numpy memory
        for past, present, view in zip(self.past_names, self.present_names, views, strict=True):
            binding.bind_ortvalue_input(past, view)
            binding.bind_ortvalue_output(present, view)
        # A prompt call grows ONNX Runtime's CPU arena; `idle` gives it back (_shrink_arena).
        self._arena_grown = self._arena_grown or ids.shape[1] > 1
        self.sess.run_with_iobinding(binding, self._shrink if shrink else None)
        return [o.numpy() for o in binding.get_outputs()[:4]]

    def _check_room(self, lengths: np.ndarray) -> None:
        if lengths.size and int(lengths.max()) > self.info.n_positions:
            raise ValueError(f"a sequence would exceed the context of {self.info.n_positions} tokens")

    def add(self, prompts: Sequence[Sequence[int]], want: Want | None = None) -> Selected:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        want = want or Want()
        lengths = np.asarray([len(p) for p in prompts], np.int64)
        self._check_room(lengths)
        n, k, T = self.num_rows, len(prompts), int(lengths.max())
        self._grow(n + k, T)
        ids = np.zeros((k, T), np.int64)  # right-padded: each row's tokens start at cache index 0
        pos = np.zeros((k, T), np.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
            pos[b, :len(p)] = np.arange(len(p))
        first, last = np.zeros(k, np.int64), lengths - 1
        logits, *sel = self._run(ids, pos, lengths - 1, slice(n, n + k),
                                 select_inputs(first, last, T, want, prompts))
        self.lengths = np.concatenate([self.lengths, lengths])
        out = parse_selection(first, last, want, *sel, logits)
        self._count_misses(prompts)
        self._keep(prompts, range(n, n + k), out, want.score_top_n)
        return out

    def step(self, tokens: Sequence[int], want: Want | None = None) -> Selected:
        if len(tokens) != self.num_rows:
            raise ValueError(f"step got {len(tokens)} tokens for {self.num_rows} rows")
        want = want or Want()
        self._check_room(self.lengths + 1)
        self._grow(self.num_rows, int(self.lengths.max(initial=0)) + 1)
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        zero = np.zeros(self.num_rows, np.int64)
        logits, *sel = self._run(ids, self.lengths.reshape(-1, 1), self.lengths, slice(0, self.num_rows),
                                 select_inputs(zero, zero, 1, want))
        self.lengths = self.lengths + 1
        return parse_selection(zero, zero, want, *sel, logits)

    speculation_off_reason = None

    def _room_for(self, fed: np.ndarray) -> None:
        self._check_room(self.lengths + fed)
        self._grow(self.num_rows, int((self.lengths + fed).max(initial=0)))

    def _feed(self, row: int, tokens: Sequence[int], want: Want) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        c, at = len(tokens), int(self.lengths[row])
        ids = np.asarray([tokens], np.int64)
        first, last = np.zeros(1, np.int64), np.full(1, c - 1)
        logits, _, top_ids, top_lps = self._run(ids, np.arange(at, at + c)[None], np.asarray([at + c - 1]),
                                                slice(row, row + 1), select_inputs(first, last, c, want, ids))
        self.lengths[row] = at + c
        return logits, top_ids, top_lps

    def drop(self, rows: Sequence[int]) -> np.ndarray:
        self.keep_pending()  # before rows move
        n = self.num_rows
        dead = np.zeros(n, bool)
        dead[np.asarray(rows, dtype=np.int64)] = True
        order = np.arange(n)
        keep = int((~dead).sum())
        holes = np.flatnonzero(dead[:keep])  # dropped rows inside the new batch...
        movers = np.flatnonzero(~dead[keep:]) + keep  # ...filled by kept rows from beyond it
        for hole, mover in zip(holes, movers, strict=True):
            width = int(self.lengths[mover])
            for buf in self.bufs:
                buf[hole, :, :width] = buf[mover, :, :width]
            order[hole] = mover
        order = order[:keep]
        self.lengths = self.lengths[order]
        return order

    def advance(self, pending: PendingPrefill, n_tokens: int, want: Want | None = None) -> Selected | None:
        want = want or Want()
        ids, pos, end = pending.next_chunk(n_tokens)
        want = pending.chunk_want(want, end)
        self._check_room(np.asarray([end]))
        self._grow(self.num_rows, end)
        c = ids.shape[1]
        first, last = np.zeros(1, np.int64), np.full(1, c - 1)
        self.chunk_done = pending.done
        logits, *sel = self._run(ids, pos, np.asarray([end - 1]), slice(self.capacity, self.capacity + 1),
                                 select_inputs(first, last, c, want, [pending.prompt], [pending.done]))
        out = parse_selection(first, last, want, *sel, logits, final=end == len(pending.prompt))
        if out.prompt is not None:
            pending.scores.append(out.prompt[0])
        pending.done = self.chunk_done = end
        if pending.remaining:
            return None
        if pending.scores:
            out.prompt, pending.scores = [PromptScores.concat(pending.scores)], []
        n = self.num_rows
        self._grow(n + 1, end)
        for buf in self.bufs:
            buf[n, :, :end] = buf[self.capacity, :, :end]
        self.lengths = np.concatenate([self.lengths, [end]])
        self.chunk_done = 0
        self._keep([pending.prompt], [n], out, want.score_top_n)
        return out

    def start_prefill(self, prompt: Sequence[int], score_k: int | None = None) -> PendingPrefill:
        """The prompt goes to the spare row; a cached head is loaded there first."""
        pending = super().start_prefill(prompt)
        self._check_room(np.asarray([len(prompt)]))
        self._reuse(pending, score_k, -1)  # -1: the spare row (`capacity`, which a load may not move)
        self.chunk_done = pending.done
        return pending

    def abort(self, pending: PendingPrefill) -> None:
        super().abort(pending)
        self.chunk_done = 0


class OrtEmbeddingRunner(EmbeddingRunner):
    """The embedding graph (`export.graphs.export_embedding`): `last_hidden_state` of a padded batch.

    The session is made at construction to check the graph's names and read its width, then let
    go: it is made again at the first call (0.4 s for GPT-2 124M here) and kept. A server that
    never embeds does not hold a second copy of the trunk's weights (+345 MB resident for 124M
    in fp32, measured); `loaded` says whether it is held."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", num_threads: int | None = None,
                 n_positions: int = 1024) -> None:
        self.path, self.device, self.num_threads = Path(path), device, num_threads
        self.n_positions = n_positions
        sess = make_session(path, device, num_threads)
        _require(sess, ["input_ids", "attention_mask"], ["last_hidden_state"])
        dim = next(o for o in sess.get_outputs() if o.name == "last_hidden_state").shape[-1]
        if not isinstance(dim, int):
            raise GraphContractError(f"last_hidden_state's last dim is {dim!r}, not a fixed n_embd")
        self.dim = dim
        self.sess: ort.InferenceSession | None = None  # made again at the first call

    @property
    def loaded(self) -> bool:
        return self.sess is not None

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.sess is None:  # the first call (the scheduler's worker thread: one caller at a time)
            t = time.perf_counter()
            self.sess = make_session(self.path, self.device, self.num_threads)
            logger.info("embedding graph loaded on its first request in %.2f s", time.perf_counter() - t)
        (hidden,) = self.sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})
        return hidden.astype(np.float32, copy=False)

    def close(self) -> None:
        self.sess = None


class OrtClassificationRunner(ClassificationRunner):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", num_threads: int | None = None,
                 n_positions: int = 1024) -> None:
        self.sess = make_session(path, device, num_threads)
        self.device = device
        self.n_positions = n_positions
        _require(self.sess, ["input_ids", "attention_mask"], ["logits"])

    def classify(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask = left_pad(prompts)
        (logits,) = self.sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        return logits.astype(np.float32)
