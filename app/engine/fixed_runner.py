"""The GroupQueryAttention graph on fixed device buffers, its decode steps replayed as CUDA graphs
(DESIGN §9).

Everything a decode step reads and writes lives in buffers allocated once on the device: the KV
cache (one (capacity, n_head, context, head_dim) buffer per layer and kind, bound as both past and
present, so GroupQueryAttention writes the new column in place) and, per batch bucket, the step's
inputs (ids, positions, seqlens, selection inputs) and outputs (logits, top-N). A step writes its
few inputs into those buffers and reads back only the top-N (and the logits when a row's sampling
needs them). With the addresses fixed, each bucket's step can be captured once as a CUDA graph
(ONNX Runtime's `enable_cuda_graph`, one `gpu_graph_id` per bucket) and replayed; prefill stays
eager (variable lengths) and writes into the same buffers.

Slots instead of moves: each sequence owns one buffer row (slot) for its whole life, since moving
a row on the GPU is a device copy. The runner's rows are in the order they joined; `slots[i]` is
row i's slot. A decode step runs over slots 0..R-1, R being one past the highest slot in use
(rounded up to a bucket when graphs replay). A free slot in that range runs a junk row (token 0,
seqlens 0: it writes cache index 0, which the next prompt there overwrites); a slot whose prompt
is being prefilled in chunks runs a junk row at its next index (seqlens = tokens so far), which its
next chunk overwrites. Slots are handed out lowest first, so R stays near the number of rows.

On the CPU the same class runs with numpy buffers bound by address (what CI tests: the slots,
buckets, fixed buffers and junk rows, everything but the capture).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.engine import prefix_cache
from app.engine.device_buffer import DeviceBuffer
from app.engine.kv_copy import KVCopier
from app.engine.ort_runner import SELECT_OUTPUTS, _kv_contract, make_session
from app.engine.prefix_cache import BLOCK_TOKENS
from app.engine.runner import (
    GenerationRunner,
    PendingPrefill,
    PromptScores,
    Selected,
    SettingRefusedError,
    Want,
    parse_selection,
    select_inputs,
)
from app.engine.sampling import MAX_TOP_K
from app.engine.scheduler import MAX_LOGPROBS

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A captured step returns this many alternatives (ONNX Runtime reads TopK's k on the host, so it is
# frozen into the graph): enough for top-k sampling up to MAX_TOP_K and for `logprobs`.
GRAPH_TOP_N = max(MAX_TOP_K, MAX_LOGPROBS)
SELF_CHECK_STEPS = 6


@dataclass
class _BucketIO:
    """One bucket's fixed step inputs and outputs and the binding over them (and the KV rows 0..b-1)."""

    size: int
    inputs: dict[str, DeviceBuffer]
    outputs: dict[str, DeviceBuffer]
    binding: ort.IOBinding
    run_options: ort.RunOptions | None = None
    host: dict[str, Any] = field(default_factory=dict)  # CPU-side scalars bound once (total, top_n)


def buckets_for(capacity: int) -> list[int]:
    """The batch buckets up to `capacity` (the last one is the capacity itself)."""
    return [b for b in BUCKETS if b < capacity] + [capacity]


class OrtFixedRunner(GenerationRunner):
    """The GQA graph on fixed device buffers with one slot per sequence; see the module docstring.
    `cuda_graphs`: "off", "auto" (capture on CUDA, fall back to eager steps with a reason when that
    fails or differs) or "on" (fail instead)."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cuda", capacity: int = 32, num_threads: int | None = None,
                 n_positions: int = 1024, cuda_graphs: str = "auto", pad_to_buckets: bool | None = None,
                 prefix_cache_bytes: int = 0) -> None:
        if cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be auto, on or off, not {cuda_graphs!r}")
        self.device, self.capacity, self.M = device, capacity, n_positions
        self.graphs_mode = cuda_graphs
        # Steps run a bucket's rows on CUDA (captured or not: a padded row costs little there and the
        # buffers stay few), the exact rows on the CPU, where padding costs compute; tests pad on
        # the CPU too, to run the captured path's bookkeeping.
        self.pad_to_buckets = device == "cuda" if pad_to_buckets is None else pad_to_buckets
        self.graphs_on = False  # replaying captured steps (after `capture`)
        self.graphs_reason: str | None = None  # why not, when asked for
        self.sess, graph_session = self._session(path, num_threads)
        self.graph_session = graph_session
        self.past_names, self.present_names, self.kv_dtype, self.info = _kv_contract(
            self.sess, ["input_ids", "position_ids", "seqlens_k", "total_sequence_length"], n_positions)
        shape = (capacity, self.info.n_head, n_positions, self.info.head_dim)
        self.kv = [DeviceBuffer(shape, self.kv_dtype, device) for _ in self.past_names]
        self.slots: list[int] = []  # row -> slot
        self.lengths: list[int] = []  # row -> tokens in its cache
        self.reserved: dict[int, PendingPrefill] = {}  # slot -> the prompt being prefilled there in chunks
        self.buckets = buckets_for(capacity)
        self._io: dict[int, _BucketIO] = {}
        self._enable_prefix_cache(prefix_cache_bytes)
        logger.info("ONNX Runtime GQA runner on fixed %s buffers: %d slots x %d positions, kv %s, buckets %s",
                    device, capacity, n_positions, self.kv_dtype.__name__, self.buckets)

    def _session(self, path: str | Path, num_threads: int | None) -> tuple[ort.InferenceSession, bool]:
        """The session, with CUDA graph capture enabled where it is wanted and ONNX Runtime accepts
        it (every node on the CUDA EP); else a plain one and the reason."""
        if self.device != "cuda" or self.graphs_mode == "off":
            if self.graphs_mode == "on":
                raise SettingRefusedError(f"CUDA_GRAPHS=on needs DEVICE=cuda (this runner is on {self.device})")
            if self.device != "cuda" and self.graphs_mode == "auto":
                self.graphs_reason = "not on CUDA"
            return make_session(path, self.device, num_threads), False
        try:
            return make_session(path, self.device, num_threads, cuda_options={"enable_cuda_graph": "1"}), True
        except Exception as e:  # e.g. a node ONNX Runtime places on the CPU
            self._no_graphs(f"capture refused: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return make_session(path, self.device, num_threads), False

    def _no_graphs(self, reason: str) -> None:
        if self.graphs_mode == "on":
            raise SettingRefusedError(f"CUDA_GRAPHS=on but CUDA graphs cannot be used: {reason}")
        self.graphs_on, self.graphs_reason = False, reason
        logger.warning("CUDA graphs off, decode steps run eagerly: %s", reason)

    # ---- prefix cache ----------------------------------------------------------------------------
    def _enable_prefix_cache(self, budget: int) -> None:
        """The pool on the runner's device, (blocks, n_head, BLOCK_TOKENS, head_dim) per layer and
        kind, allocated at start (device memory, counted by the memory check); copies by graph
        (`app.engine.kv_copy`)."""
        self._to_keep = []
        self.prefix, self.prefix_off_reason = prefix_cache.build(budget, self.info, np.dtype(self.kv_dtype).itemsize,
                                                                 self._device_pool)

    def _device_pool(self, n: int) -> tuple:
        pool = [DeviceBuffer((n, self.info.n_head, BLOCK_TOKENS, self.info.head_dim), self.kv_dtype, self.device)
                for _ in self.past_names]
        self.copier = KVCopier(self.kv, pool, self.device, BLOCK_TOKENS)
        return self.copier.save, self.copier.load

    def check_prefix_cache(self, prompt: Sequence[int]) -> bool:
        """On the serving device, check that a prompt prefilled after a cached head gives the
        first token and log-probabilities of the same prompt prefilled whole, and its greedy
        steps the same tokens; else turn the cache off with the reason. Needs an empty batch;
        leaves the cache empty."""
        if self.prefix is None:
            return False
        prompt = list(prompt)
        if len(prompt) <= BLOCK_TOKENS:
            raise ValueError(f"the check needs a prompt of more than {BLOCK_TOKENS} tokens")
        try:
            whole = self._greedy_tokens(lambda: self.add([prompt], Want(top_n=5)))
            if self.prefix_hit(prompt) == 0:
                raise RuntimeError("the prompt's blocks were not kept")
            pending = self.start_prefill(prompt)
            reused = self._greedy_tokens(lambda: self.advance(pending, len(prompt), Want(top_n=5)))
            if whole[0] != reused[0] or not np.allclose(whole[1], reused[1], atol=1e-2):
                raise RuntimeError(f"a cached head gives {reused[0]} ({reused[1]}), the whole prompt {whole[0]} "
                                   f"({whole[1]})")
        except Exception as e:
            self.reset()
            self.prefix, self.prefix_off_reason = None, f"self-check failed: {type(e).__name__}: {e}"[:300]
            logger.warning("prefix caching off: %s", self.prefix_off_reason)
            return False
        self.reset()
        self.prefix.clear()
        logger.info("prefix cache: %d blocks of %d tokens on %s (%d MiB); self-check passed",
                    self.prefix.num_blocks, BLOCK_TOKENS, self.device, self.prefix.budget_bytes >> 20)
        return True

    def _greedy_tokens(self, prefill) -> tuple[list[int], np.ndarray]:  # noqa: ANN001
        """(top-5 of the first token then SELF_CHECK_STEPS greedy tokens, the first's log-probabilities)
        of one prompt, the batch emptied after."""
        first = prefill()
        out = [int(first.top_ids[0, 0])]
        for _ in range(SELF_CHECK_STEPS):
            out.append(int(self.step([out[-1]]).top_ids[0, 0]))
        self.drop([0])
        return [*first.top_ids[0].tolist(), *out[1:]], first.top_logprobs[0]

    # ---- bookkeeping -----------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.slots)

    @property
    def kv_bytes(self) -> dict[str, int]:
        """Reserved: the fixed buffers (allocated once); in use: the tokens held."""
        reserved = sum(int(np.prod(b.shape)) * b.dtype.itemsize for b in self.kv)
        per_token = reserved // (self.capacity * self.M)
        held = sum(self.lengths) + sum(p.done for p in self.reserved.values())
        return {"reserved": reserved, "in_use": per_token * held}

    def _take_slots(self, n: int) -> list[int]:
        self.keep_pending()  # before a freed slot is written again
        used = set(self.slots) | set(self.reserved)
        free = [s for s in range(self.capacity) if s not in used][:n]
        if len(free) < n:
            raise ValueError(f"no free KV slot: {self.capacity} in use (MAX_BATCH_SIZE)")
        return free

    def _check_room(self, lengths: Sequence[int]) -> None:
        if lengths and max(lengths) > self.M:
            raise ValueError(f"a sequence would exceed the context of {self.M} tokens")

    def _bind_kv(self, binding: ort.IOBinding, start: int, n: int) -> None:
        for past, present, buf in zip(self.past_names, self.present_names, self.kv, strict=True):
            buf.bind(binding, past, rows=(start, start + n))
            buf.bind(binding, present, output=True, rows=(start, start + n))

    def _eager(self, feed: dict[str, np.ndarray], start: int, n: int, want_logits: bool) -> list[Any]:
        """One eager call on slots [start, start + n): prefill or a prompt chunk."""
        binding = self.sess.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits", "cpu" if (want_logits or self.device == "cpu") else "cuda", 0)
        for name in SELECT_OUTPUTS[1:]:
            binding.bind_output(name, "cpu")
        self._bind_kv(binding, start, n)
        self.sess.run_with_iobinding(binding, self._eager_options())
        outs = binding.get_outputs()
        return [outs[0].numpy() if want_logits else None, *(o.numpy() for o in outs[1:4])]

    def _eager_options(self) -> ort.RunOptions | None:
        if not self.graph_session:
            return None
        ro = ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", "-1")  # a regular run in a graph-enabled session
        return ro

    # ---- prefill ---------------------------------------------------------------------------------
    def add(self, prompts: Sequence[Sequence[int]], want: Want | None = None) -> Selected:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        want = want or Want()
        self._check_room([len(p) for p in prompts])
        slots = self._take_slots(len(prompts))
        parts, i = [], 0
        while i < len(slots):  # one call per run of consecutive slots
            j = i + 1
            while j < len(slots) and slots[j] == slots[j - 1] + 1:
                j += 1
            parts.append(self._prefill(prompts[i:j], slots[i], _sub_want(want, i, j)))
            i = j
        self.slots += slots
        self.lengths += [len(p) for p in prompts]
        out = _concat(parts)
        self._count_misses(prompts)
        self._keep(prompts, slots, out, want.score_top_n)
        return out

    def _prefill(self, prompts: Sequence[Sequence[int]], start: int, want: Want) -> Selected:
        k, T = len(prompts), max(len(p) for p in prompts)
        ids, pos = np.zeros((k, T), np.int64), np.zeros((k, T), np.int64)
        lengths = np.asarray([len(p) for p in prompts], np.int64)
        for b, p in enumerate(prompts):  # right-padded first prompts
            ids[b, :len(p)], pos[b, :len(p)] = p, np.arange(len(p))
        first, last = np.zeros(k, np.int64), lengths - 1
        feed = {"input_ids": ids, "position_ids": pos, "seqlens_k": (lengths - 1).astype(np.int32),
                "total_sequence_length": np.array(T, np.int32), **select_inputs(first, last, T, want, prompts)}
        logits, *sel = self._eager(feed, start, k, want.logits)
        return parse_selection(first, last, want, *sel, logits)

    def start_prefill(self, prompt: Sequence[int], score_k: int | None = None) -> PendingPrefill:
        """The prompt gets a slot of its own; a cached head is loaded there first."""
        pending = super().start_prefill(prompt)
        self._check_room([len(prompt)])
        (slot,) = self._take_slots(1)
        self._reuse(pending, score_k, slot)
        pending.state = slot
        self.reserved[slot] = pending
        return pending

    def advance(self, pending: PendingPrefill, n_tokens: int, want: Want | None = None) -> Selected | None:
        want = want or Want()
        slot = pending.state
        ids, pos, end = pending.next_chunk(n_tokens)
        want = pending.chunk_want(want, end)
        c = ids.shape[1]
        first, last = np.zeros(1, np.int64), np.full(1, c - 1)
        feed = {"input_ids": ids, "position_ids": pos, "seqlens_k": np.array([end - 1], np.int32),
                "total_sequence_length": np.array(end, np.int32),
                **select_inputs(first, last, c, want, [pending.prompt], [pending.done])}
        logits, *sel = self._eager(feed, slot, 1, want.logits)
        out = parse_selection(first, last, want, *sel, logits, final=end == len(pending.prompt))
        if out.prompt is not None:
            pending.scores.append(out.prompt[0])
        pending.done = end
        if pending.remaining:
            return None
        if pending.scores:
            out.prompt, pending.scores = [PromptScores.concat(pending.scores)], []
        del self.reserved[slot]
        pending.state = None
        self.slots.append(slot)
        self.lengths.append(end)
        self._keep([pending.prompt], [slot], out, want.score_top_n)
        return out

    def abort(self, pending: PendingPrefill) -> None:
        if pending.state is not None:
            self.reserved.pop(pending.state, None)
        pending.state = None

    # ---- decode ----------------------------------------------------------------------------------
    def _bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows) if self.pad_to_buckets or self.graphs_on else rows

    def _bucket_io(self, b: int) -> _BucketIO:
        io = self._io.get(b)
        if io is not None:
            return io
        dev, V = self.device, self.info.vocab_size
        inputs = {"input_ids": DeviceBuffer((b, 1), np.int64, dev), "position_ids": DeviceBuffer((b, 1), np.int64, dev),
                  "seqlens_k": DeviceBuffer((b,), np.int32, dev), "logits_index": DeviceBuffer((b, 1), np.int64, dev),
                  "target_ids": DeviceBuffer((b, 1), np.int64, dev), "temperature": DeviceBuffer((b,), np.float32, dev)}
        outputs = {"logits": DeviceBuffer((b, V), np.float32, dev),
                   "token_logprobs": DeviceBuffer((b, 1), np.float32, dev),
                   "top_ids": DeviceBuffer((b, 1, GRAPH_TOP_N), np.int64, dev),
                   "top_logprobs": DeviceBuffer((b, 1, GRAPH_TOP_N), np.float32, dev)}
        inputs["logits_index"].write(np.arange(b, dtype=np.int64)[:, None])  # T = 1: row r's token is r
        binding = self.sess.io_binding()
        for name, buf in inputs.items():
            buf.bind(binding, name)
        for name, buf in outputs.items():
            buf.bind(binding, name, output=True)
        # Read on the host by the kernels (and frozen into a captured graph): the buffer length on
        # every step (rows are masked by seqlens_k) and a fixed number of alternatives.
        host = {"total_sequence_length": np.array(self.M, np.int32), "top_n": np.array([GRAPH_TOP_N], np.int64)}
        for name, value in host.items():
            binding.bind_cpu_input(name, value)
        self._bind_kv(binding, 0, b)
        io = _BucketIO(b, inputs, outputs, binding, host=host)
        if self.graph_session:
            io.run_options = ort.RunOptions()
            io.run_options.add_run_config_entry("gpu_graph_id", str(self.buckets.index(b) + 1))
        self._io[b] = io
        return io

    def step(self, tokens: Sequence[int], want: Want | None = None) -> Selected:
        n = self.num_rows
        if len(tokens) != n:
            raise ValueError(f"step got {len(tokens)} tokens for {n} rows")
        want = want or Want()
        if want.n > GRAPH_TOP_N:
            raise ValueError(f"at most {GRAPH_TOP_N} alternatives per step")
        self._check_room([length + 1 for length in self.lengths])
        used = self.slots + list(self.reserved)
        b = self._bucket(max(used) + 1)
        ids, pos = np.zeros((b, 1), np.int64), np.zeros((b, 1), np.int64)
        seqlens, temperature = np.zeros(b, np.int32), np.ones(b, np.float32)
        slots = np.asarray(self.slots)
        ids[slots, 0], pos[slots, 0], seqlens[slots] = tokens, self.lengths, self.lengths
        if want.temperature is not None:
            temperature[slots] = want.temperature
        for slot, pending in self.reserved.items():  # a junk token at the chunked prompt's next index
            if slot < b:
                pos[slot, 0] = seqlens[slot] = pending.done
        io = self._bucket_io(b)
        for name, value in (("input_ids", ids), ("position_ids", pos), ("seqlens_k", seqlens),
                            ("temperature", temperature)):
            io.inputs[name].write(value)
        self.sess.run_with_iobinding(io.binding, io.run_options if self.graphs_on else self._eager_options())
        self.lengths = [length + 1 for length in self.lengths]
        k = max(1, want.top_n)
        top_ids = io.outputs["top_ids"].read()[slots, 0, :k]
        top_lps = io.outputs["top_logprobs"].read()[slots, 0, :k]
        logits = io.outputs["logits"].read()[slots] if want.logits else None
        return Selected(top_ids, top_lps, logits)

    # ---- speculative decoding --------------------------------------------------------------------
    speculation_off_reason = None

    def _room_for(self, fed: np.ndarray) -> None:
        self._check_room([length + int(f) for length, f in zip(self.lengths, fed, strict=True)])

    def _feed(self, row: int, tokens: Sequence[int], want: Want) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """An eager call on the row's slot (chunked prefill's call, after the cache)."""
        if want.n > GRAPH_TOP_N:
            raise ValueError(f"at most {GRAPH_TOP_N} alternatives per step")
        c, at = len(tokens), self.lengths[row]
        ids = np.asarray([tokens], np.int64)
        first, last = np.zeros(1, np.int64), np.full(1, c - 1)
        feed = {"input_ids": ids, "position_ids": np.arange(at, at + c, dtype=np.int64)[None],
                "seqlens_k": np.array([at + c - 1], np.int32), "total_sequence_length": np.array(at + c, np.int32),
                **select_inputs(first, last, c, want, ids)}
        logits, _, top_ids, top_lps = self._eager(feed, self.slots[row], 1, want.logits)
        self.lengths[row] = at + c
        return logits, top_ids, top_lps

    def drop(self, rows: Sequence[int]) -> np.ndarray:
        self.keep_pending()  # a freed slot runs junk rows in padded steps
        dead = set(int(r) for r in rows)
        keep = np.asarray([i for i in range(self.num_rows) if i not in dead], np.int64)
        self.slots = [self.slots[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        return keep

    def reset(self) -> None:
        self._to_keep = []
        self.slots, self.lengths = [], []
        self.reserved.clear()

    # ---- CUDA graphs -----------------------------------------------------------------------------
    def capture(self, prompt: Sequence[int]) -> bool:
        """Capture every bucket's step, then check that greedy steps of `prompt` through the
        captured graphs give the eager path's tokens, at every bucket (the prompt in the bucket's
        last slot). On a failure or a difference: eager steps, the reason in `graphs_reason`
        (`CUDA_GRAPHS=on`: raise). Returns whether graphs replay."""
        if not self.graph_session:
            return False
        if self.num_rows or self.reserved:
            raise RuntimeError("capture needs an empty batch")
        try:
            self.graphs_on = True
            for b in self.buckets:  # regular runs first (allocations), then the capturing run
                for _ in range(3):
                    self._junk_step(b)
            for b in self.buckets:
                got = self._greedy(prompt, b)
                self.graphs_on = False
                want = self._greedy(prompt, b)
                self.graphs_on = True
                if got != want:
                    first = next(i for i, (x, y) in enumerate(zip(got, want, strict=True)) if x != y)
                    raise RuntimeError(f"captured decode differs from eager at bucket {b}, step {first}: "
                                       f"{got} vs {want}")
        except Exception as e:
            self.reset()
            self._no_graphs(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            return False
        self.reset()
        logger.info("CUDA graphs captured for buckets %s; self-check passed (%d greedy steps each)",
                    self.buckets, SELF_CHECK_STEPS)
        return True

    def _junk_step(self, b: int) -> None:
        io = self._bucket_io(b)
        for name in ("input_ids", "position_ids", "seqlens_k"):
            io.inputs[name].write(np.zeros(io.inputs[name].shape, io.inputs[name].dtype))
        io.inputs["temperature"].write(np.ones(b, np.float32))
        self.sess.run_with_iobinding(io.binding, io.run_options)

    def _greedy(self, prompt: Sequence[int], b: int) -> list[int]:
        """Greedy tokens of `prompt` prefilled into slot b - 1 (so the step runs at bucket b)."""
        self.reset()
        self.reserved = {s: PendingPrefill([0], done=0) for s in range(b - 1)}  # hold the lower slots
        out = [int(self.add([list(prompt)]).top_ids[0, 0])]
        for _ in range(SELF_CHECK_STEPS):
            out.append(int(self.step([out[-1]]).top_ids[0, 0]))
        self.reset()
        return out


def _sub_want(want: Want, i: int, j: int) -> Want:
    """`want` for rows i..j-1 of a call that is split by slot runs."""
    return Want(want.top_n, None if want.temperature is None else want.temperature[i:j],
                [r - i for r in want.score if i <= r < j], want.score_top_n, want.logits)


def _concat(parts: list[Selected]) -> Selected:
    if len(parts) == 1:
        return parts[0]
    logits = None if parts[0].logits is None else np.concatenate([p.logits for p in parts])
    prompt = None
    if any(p.prompt is not None for p in parts):
        prompt = [x for p in parts for x in (p.prompt or [None] * len(p.top_ids))]
    return Selected(np.concatenate([p.top_ids for p in parts]), np.concatenate([p.top_logprobs for p in parts]),
                    logits, prompt)
