"""The engine's async API (`generate`, `generate_stream`, `classify`, `embed`) over the scheduler.

The HTTP layer calls this; it never sees tensors. Tokenisation and limits are checked here, on
the caller's side, so bad input fails fast with an `InputError` naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from app.engine.grammar import Grammar, GrammarCompiler, GrammarError, GrammarSpec, llguidance_version
from app.engine.pooling import normalize
from app.engine.prefix_cache import BLOCK_TOKENS
from app.engine.runner import Loaded
from app.engine.sampling import SamplingParams
from app.engine.scheduler import MAX_LOGPROBS, Finish, GenerationRequest, Scheduler, StreamEvent
from app.engine.speculation import DraftProposer, Speculator
from model.tokenizer import GPT2Tokenizer

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Texts up to this many characters are tokenized on the event loop (well under a millisecond);
# longer ones in the engine's worker threads, with the GIL released (`GPT2Tokenizer.encode_nogil`).
INLINE_TOKENIZE_CHARS = 2048
WORKER_NICE = 10  # the workers' scheduling priority below the event loop and the scheduler thread


def _worker_threads() -> int:
    """Half the cores this process may use, 1 to 4: big texts must not take every core from the
    scheduler thread (TGI keeps its tokenizers in a small worker pool for the same reason)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 2
    return max(1, min(4, cores // 2))


def _lower_priority() -> None:
    """Run this worker thread at a lower priority (Linux: threads are tasks with their own nice),
    so a 2 MB tokenization yields the CPU to the streams being served."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICE))


class InputError(ValueError):
    """Bad request input; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class EngineUnavailableError(RuntimeError):
    """The requested model is not loaded (or the engine is stopped)."""


class ShuttingDownError(RuntimeError):
    """The server is shutting down: `Engine.shutdown` ended the request before it finished, or
    refused it (a 503 in the route's envelope; a stream's final error event)."""

    def __init__(self, message: str = "the server is shutting down") -> None:
        super().__init__(message)


@dataclass
class Label:
    label: str
    score: float


def _id2label(checkpoint: Path, n: int) -> list[str]:
    raw = json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
    return [str(raw.get(str(i), raw.get(i, f"LABEL_{i}"))) for i in range(n)]


class Engine:
    def __init__(self, generation: Loaded | None, classification: Loaded | None, max_batch_size: int = 32,
                 max_batch_total_tokens: int = 32768, max_input_tokens: int | None = None,
                 max_total_tokens: int | None = None, prefill_chunk_tokens: int = 64,
                 max_batch_prefill_tokens: int = 4096, waiting_served_ratio: float = 1.2,
                 score_chunk_tokens: int = 128, embedding: Loaded | None = None,
                 embedding_pooling: str = "last", speculation: str = "off", speculation_max_tokens: int = 4,
                 speculation_ngram: int = 3, draft: Loaded | None = None, speculation_max_batch: int = 8) -> None:
        self.generation = generation
        # SPECULATION=ngram|draft: proposals verified in the decode step, where the runners can
        self.speculation, self.draft = speculation, draft
        self.speculation_off_reason: str | None = None
        speculator = None
        if speculation != "off" and generation is not None:
            self.speculation_off_reason = generation.runner.speculation_off_reason or (
                f"the draft model's runner: {draft.runner.speculation_off_reason}"
                if draft is not None and draft.runner.speculation_off_reason else None)
            if self.speculation_off_reason is None:
                proposer = DraftProposer(draft.runner, str(draft.checkpoint)) if draft is not None else None
                speculator = Speculator(speculation_max_tokens, speculation_ngram, speculation_max_batch, proposer)
            else:
                logger.warning("SPECULATION=%s is off: %s", speculation, self.speculation_off_reason)
        self.speculator = speculator
        # /v1/embeddings: the embedding graph of the generation checkpoint, pooled (`app.engine.pooling`)
        # in calls of at most MAX_BATCH_PREFILL_TOKENS padded tokens, on the scheduler's worker thread.
        self.embedding, self.embedding_pooling = embedding, embedding_pooling
        self._embed_run = partial(embedding.runner.embed, pooling=embedding_pooling,
                                  max_tokens=max_batch_prefill_tokens) if embedding else None
        self.max_total_tokens = max_total_tokens
        self.classification = classification
        self.max_input_tokens = max_input_tokens
        self.tokenizer = GPT2Tokenizer.from_dir(generation.checkpoint) if generation else None
        self.cls_tokenizer = GPT2Tokenizer.from_dir(classification.checkpoint) if classification else None
        self.labels: list[str] = []
        if classification:
            probe = classification.runner.classify([[0]])  # also a warm-up
            self.labels = _id2label(classification.checkpoint, probe.shape[-1])
        self.context_length = generation.runner.info.n_positions if generation else 0
        self.vocab_size = generation.runner.info.vocab_size if generation else 0
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size) if generation else None
        # Work on big request texts (tokenizing, offsets, their JSON) runs here, off the event loop.
        self._workers = ThreadPoolExecutor(_worker_threads(), thread_name_prefix="request-worker",
                                           initializer=_lower_priority)
        self.scheduler = Scheduler(
            generation.runner if generation else None, self.tokenizer,
            classification.runner if classification else None, max_batch_size, max_batch_total_tokens,
            eos_token_id=self.tokenizer.eos_token_id if self.tokenizer else None,
            prefill_chunk_tokens=prefill_chunk_tokens, max_batch_prefill_tokens=max_batch_prefill_tokens,
            waiting_served_ratio=waiting_served_ratio, score_chunk_tokens=score_chunk_tokens,
            speculator=speculator,
        )
        # Every request awaiting the scheduler (queued, prefilling, decoding, classifying), by a
        # key of its own: how `shutdown` fails them. Touched from the event loop and the drain thread.
        self._pending: dict[object, Callable[[BaseException], None]] = {}
        self._pending_lock = threading.Lock()
        self._closing: ShuttingDownError | None = None

    def start(self) -> None:
        self.capture()
        self.warmup()
        self.scheduler.start()

    def capture(self) -> None:
        """On CUDA with the fixed-buffer runner: capture each batch bucket's decode step as a CUDA
        graph and check it against the eager step (`OrtFixedRunner.capture`); a failure leaves
        eager steps with the reason in /info (CUDA_GRAPHS=on: the start fails)."""
        runner = self.generation.runner if self.generation else None
        if runner is not None and hasattr(runner, "capture"):
            t0 = time.perf_counter()
            eos = self.tokenizer.eos_token_id
            prompt = self.tokenizer.encode("The quick brown fox jumps over the lazy dog.") or [eos]
            on = runner.capture(prompt)
            logger.info("CUDA graphs: %s (%.2f s)", "captured, self-check passed" if on else runner.graphs_reason,
                        time.perf_counter() - t0)
            if runner.prefix is not None:  # the block copies on this device give what a whole prefill does
                runner.check_prefix_cache((prompt * (1 + 2 * BLOCK_TOKENS // len(prompt)))[: 2 * BLOCK_TOKENS + 3])

    def warmup(self) -> None:
        """A prefill and a decode step at the largest batch the scheduler will run (one token per
        row), so the first burst does not pay for it. ONNX Runtime's first call at a new largest
        batch size costs about 1.2 s more on the CPU (GPT-2 124M, 32 rows, measured in
        BENCHMARKS.md); smaller batches after it do not. TGI warms up at its largest batch too."""
        if self.generation:
            r, eos = self.generation.runner, self.tokenizer.eos_token_id
            rows = max(1, self.scheduler.max_batch_size)
            t0 = time.perf_counter()
            try:
                r.add([[eos, eos]])  # a two-token prompt: the attention over a past, too
                if rows > 1:
                    r.add([[eos]] * (rows - 1))
                r.step([eos] * rows)
            except Exception as e:  # e.g. no memory for that many rows: say which setting to lower
                raise RuntimeError(f"warm-up at MAX_BATCH_SIZE={rows} rows failed ({type(e).__name__}: {e}); "
                                   f"lower MAX_BATCH_SIZE") from e
            finally:
                r.reset()
                r.idle()  # the warm-up's buffers for every row are not kept at rest
            logger.info("warm-up: a prefill and a decode step at batch %d in %.2f s", rows, time.perf_counter() - t0)
            t0 = time.perf_counter()
            _ = self.grammars.ll_tokenizer  # the vocabulary in the grammar engine's form, for structured outputs
            logger.info("grammar engine (llguidance %s) ready in %.2f s", llguidance_version(),
                        time.perf_counter() - t0)

    def kv_bytes(self) -> dict[str, int]:
        """The generation runner's KV cache memory: reserved and in use (bytes)."""
        return self.generation.runner.kv_bytes if self.generation else {"reserved": 0, "in_use": 0}

    def shutdown(self, exc: ShuttingDownError | None = None) -> int:
        """Refuse new work and fail every request awaiting the scheduler with `exc` (a
        `ShuttingDownError`), queued ones included: each awaiting coroutine gets the error at once,
        even while the worker is in the middle of a step, and the scheduler drops its rows (their
        slots are free at its next iteration). Thread-safe: the SIGTERM drain calls it from its own
        thread when the grace period ends (`app.__main__`). Returns how many requests it failed."""
        with self._pending_lock:
            self._closing = self._closing or exc or ShuttingDownError()
            failing = list(self._pending.values())
            self._pending.clear()
        for fail in failing:
            try:
                fail(ShuttingDownError(str(self._closing)))  # one each: tracebacks are per raise
            except Exception:  # e.g. its event loop is closed: nobody waits for that one
                logger.debug("could not fail a request on shutdown", exc_info=True)
        return len(failing)

    def _register(self, fail: Callable[[BaseException], None]) -> object:
        """Track a request `shutdown` must fail; raises `ShuttingDownError` once it has run."""
        key = object()
        with self._pending_lock:
            if self._closing is not None:
                raise ShuttingDownError(str(self._closing))
            self._pending[key] = fail
        return key

    def _unregister(self, key: object) -> None:
        with self._pending_lock:
            self._pending.pop(key, None)

    def stop(self) -> None:
        self.scheduler.stop()
        self._workers.shutdown(wait=False, cancel_futures=True)
        for loaded in (self.generation, self.classification, self.embedding, self.draft):
            if loaded:
                loaded.runner.close()

    # ---- tokenizing, off the event loop ---------------------------------------------------------
    async def encode(self, text: str, field: str = "inputs", limit: int | None = None, limit_name: str = "",
                     tokenizer: GPT2Tokenizer | None = None) -> list[int]:
        """Token ids of `text` without blocking the event loop. With a `limit`, a text that cannot
        fit it is refused from its length alone, before tokenizing (`GPT2Tokenizer.min_tokens`: a
        1.9 MB prompt took 0.8 s to tokenize only to be refused). Long texts are tokenized in the
        engine's tokenizer threads."""
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise EngineUnavailableError("no generation model is loaded")
        if limit is not None and tok.min_tokens(text) > limit:
            raise InputError(field, f"{len(text)} characters cannot fit in {limit_name or 'the limit'} ({limit} "
                                    f"tokens): a token covers at most {tok.max_token_bytes} characters")
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return tok.encode(text)
        return await self.offload(tok.encode_nogil, text)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the engine's worker threads (few, at a lower priority): for CPU work on a
        big request (tokenizing, offsets, a big JSON answer) that must not hold the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    async def compile_grammar(self, spec: GrammarSpec | None) -> Grammar | None:
        """A request's structured-output constraint, compiled (cached by its text; a new one is
        compiled in the worker threads, off the event loop). An invalid one is an `InputError`
        naming its field."""
        if spec is None:
            return None
        if self.grammars is None:
            raise EngineUnavailableError("no generation model is loaded")
        grammar = self.grammars.cached(spec)
        if grammar is None:
            try:
                grammar = await self.offload(self.grammars.compile, spec)
            except GrammarError as e:
                raise InputError(e.field, e.message) from None
        return grammar

    def prompt_limit(self) -> tuple[int, str]:
        """The most prompt tokens a generation request may have (a score-only request may fill
        the context), and the setting that says so; `prepare` then checks the exact limits."""
        limits = [(self.context_length, "the model's context")]
        if self.max_total_tokens is not None:
            limits.append((self.max_total_tokens, "MAX_TOTAL_TOKENS"))
        if self.max_input_tokens is not None:
            limits.append((self.max_input_tokens, "MAX_INPUT_TOKENS"))
        return min(limits)

    async def prepare_async(self, inputs: str | list[int], max_new_tokens: int,
                            params: SamplingParams | None = None, stop: list[str] | None = None,
                            logprobs: int | None = None, prompt_logprobs: int | None = None,
                            truncate: int | None = None) -> GenerationRequest:
        """`prepare` for the HTTP routes: the prompt is refused by its length when it cannot fit
        (unless it is to be truncated), and a long one is tokenized off the event loop."""
        if self.generation is None:
            raise EngineUnavailableError("no generation model is loaded")
        if isinstance(inputs, str):
            limit = self.prompt_limit() if truncate is None else (None, "")
            inputs = await self.encode(inputs, "inputs", *limit)
        return self.prepare(inputs, max_new_tokens, params, stop, logprobs, prompt_logprobs, truncate)

    # ---- generation --------------------------------------------------------------------------
    def limits(self) -> dict[str, int | None]:
        """The prompt and prompt + generation limits enforced: the settings capped by the model's context."""
        ctx = self.context_length or None

        def cap(setting: int | None) -> int | None:
            return ctx if setting is None else setting if ctx is None else min(setting, ctx)

        return {"max_input_tokens": cap(self.max_input_tokens), "max_total_tokens": cap(self.max_total_tokens)}

    def prepare(self, inputs: str | list[int], max_new_tokens: int, params: SamplingParams | None = None,
                stop: list[str] | None = None, logprobs: int | None = None,
                prompt_logprobs: int | None = None, truncate: int | None = None) -> GenerationRequest:
        """Tokenize and check a generation request. `logprobs`: alternatives per generated token;
        `prompt_logprobs`: score the prompt (each token's log-probability and that many
        alternatives), which also allows `max_new_tokens == 0` (score only). `truncate`: keep only
        the prompt's last `truncate` tokens (TGI's `truncate`, vLLM's `truncate_prompt_tokens`)."""
        if self.generation is None:
            raise EngineUnavailableError("no generation model is loaded")
        ids = self.tokenizer.encode(inputs) if isinstance(inputs, str) else list(inputs)
        if not ids:
            raise InputError("inputs", "must not be empty")
        if truncate is not None:
            ids = ids[-truncate:]
        if any(not 0 <= i < self.generation.runner.info.vocab_size for i in ids):
            raise InputError("inputs", "token id out of the vocabulary")
        if max_new_tokens < (0 if prompt_logprobs is not None else 1):
            raise InputError("max_new_tokens", "must be >= 1" if prompt_logprobs is None else "must be >= 0")
        for name, n in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise InputError(name, f"must be between 0 and {MAX_LOGPROBS}")
        if self.max_input_tokens is not None and len(ids) > self.max_input_tokens:
            raise InputError("inputs", f"{len(ids)} tokens exceed MAX_INPUT_TOKENS ({self.max_input_tokens})")
        if self.max_total_tokens is not None and len(ids) + max_new_tokens > self.max_total_tokens:
            raise InputError("max_new_tokens", f"inputs ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                                               f"exceed MAX_TOTAL_TOKENS ({self.max_total_tokens})")
        if len(ids) + max_new_tokens > self.context_length:
            raise InputError("max_new_tokens", f"inputs ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                                               f"exceed the model's context of {self.context_length} tokens")
        return GenerationRequest(ids, params or SamplingParams(), max_new_tokens, list(stop or []),
                                 logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    async def generate_batches(self, req: GenerationRequest) -> AsyncIterator[list[StreamEvent]]:
        """Events as tokens are made, in lists: each holds every event that arrived since the last
        one was taken (one, unless the consumer fell behind), so a slow stream catches up in one
        write. The last event carries `finish`. Leaving early cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq = None

        def fail(exc: BaseException) -> None:  # `shutdown`, from any thread
            if seq is not None:
                self.scheduler.cancel(seq)
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        key = self._register(fail)
        try:
            seq = self.scheduler.submit(req, loop, queue)
        except BaseException:
            self._unregister(key)
            raise
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                failed = next((i for i, ev in enumerate(batch) if isinstance(ev, BaseException)), None)
                if failed is not None:
                    if failed:
                        yield batch[:failed]
                    raise batch[failed]
                yield batch
                if batch[-1].finish is not None:
                    return
        finally:
            self._unregister(key)
            if not seq.finished:
                self.scheduler.cancel(seq)

    async def generate_stream(self, req: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Events as tokens are made, one at a time; the last carries `finish`."""
        batches = self.generate_batches(req)
        try:
            async for batch in batches:
                for ev in batch:
                    yield ev
        finally:
            await batches.aclose()

    async def generate(self, req: GenerationRequest) -> Finish:
        async for ev in self.generate_stream(req):
            if ev.finish is not None:
                return ev.finish
        raise RuntimeError("generation ended without a finish event")  # pragma: no cover

    # ---- classification ----------------------------------------------------------------------
    async def classify(self, texts: list[str], top_k: int | None = None, truncate: bool = False,
                       max_tokens: int | None = None) -> list[list[Label]]:
        if self.classification is None:
            raise EngineUnavailableError("no classification model is loaded")
        limit = min(max_tokens or self.max_input_tokens or 1024, self.classification.runner.n_positions)
        prompts = []
        for i, text in enumerate(texts):
            field = "inputs" if len(texts) == 1 else f"inputs[{i}]"
            ids = await self.encode(text, field, None if truncate else limit, "the limit", self.cls_tokenizer)
            if not ids:
                raise InputError(field, "must not be empty")
            if len(ids) > limit:
                if not truncate:
                    raise InputError(field, f"{len(ids)} tokens exceed the limit of {limit}; shorten it or set "
                                            f"truncate")
                ids = ids[:limit]
            prompts.append(ids)
        if top_k is not None and top_k < 1:
            raise InputError("top_k", "must be >= 1")
        logits = await self._on_worker(lambda done: self.scheduler.classify(prompts, done))
        z = np.exp(logits - logits.max(-1, keepdims=True))
        probs = z / z.sum(-1, keepdims=True)
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[: top_k or len(row)]
            out.append([Label(self.labels[j], float(row[j])) for j in order])
        return out

    async def _on_worker(self, submit: Callable[[Callable[[Any], None]], None]) -> Any:
        """`submit(done)` hands work to the scheduler's worker thread, which calls `done` with the
        result or an exception; awaits that (`shutdown` fails it at once)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or (fut.set_exception(result) if isinstance(
                result, BaseException) else fut.set_result(result)))

        key = self._register(done)
        try:
            submit(done)
            return await fut
        finally:
            self._unregister(key)

    # ---- embeddings --------------------------------------------------------------------------
    async def embed(self, inputs: list[str | list[int]], fields: list[str], truncate: int | None = None,
                    unit: bool = True) -> tuple[np.ndarray, int]:
        """(vectors (n, n_embd) float32, input tokens) of texts or token-id lists: the final hidden
        state pooled by EMBEDDING_POOLING and, with `unit`, scaled to unit L2 norm (vLLM's default).
        Each input must fit the model's context unless `truncate` keeps its last N tokens."""
        if self._embed_run is None:  # set with self.embedding
            raise EngineUnavailableError("no embedding model is loaded")
        limit = self.embedding.runner.n_positions
        prompts = []
        for item, field in zip(inputs, fields, strict=True):
            ids = list(item) if not isinstance(item, str) else await self.encode(
                item, field, None if truncate else limit, "the model's context")
            ids = ids[-truncate:] if truncate else ids
            if not ids:
                raise InputError(field, "must not be empty")
            if len(ids) > limit:
                raise InputError(field, f"{len(ids)} tokens exceed the model's context of {limit} tokens; shorten "
                                        f"it or set truncate_prompt_tokens")
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise InputError(field, "token id out of the vocabulary")
            prompts.append(ids)
        run = self._embed_run
        vectors = await self._on_worker(lambda done: self.scheduler.embed(prompts, run, done))
        return (normalize(vectors) if unit else vectors), sum(len(p) for p in prompts)

    def prefix_stats(self) -> dict[str, int] | None:
        """The prefix cache's counters and memory (read from any thread); None without one."""
        cache = self.generation.runner.prefix if self.generation else None
        if cache is None:
            return None
        st = cache.stats
        return {"queries": st.queries, "hits": st.hits, "evicted_blocks": st.evicted_blocks,
                "bytes_in_use": cache.bytes_in_use, "budget_bytes": cache.budget_bytes,
                "cached_tokens": cache.cached_tokens}

    def prefix_info(self) -> dict[str, Any]:
        """/info's `prefix_caching`: whether it is on (and why not), its block size and its numbers."""
        runner = self.generation.runner
        stats = self.prefix_stats()
        out: dict[str, Any] = {"enabled": stats is not None, "reason": runner.prefix_off_reason}
        if stats is not None:
            out |= {"block_tokens": runner.prefix.B, **stats}
        return out

    def speculation_stats(self) -> dict[str, int] | None:
        """Speculative decoding's counters (read from any thread); None when it is off."""
        if self.speculator is None:
            return None
        st = self.speculator.stats
        return {"proposed_tokens": st.proposed, "accepted_tokens": st.accepted, "steps": st.steps}

    def speculation_info(self) -> dict[str, Any]:
        """/info's `speculation`: the setting, whether it runs (and why not), its numbers."""
        if self.speculator is not None:
            return {"enabled": True, **self.speculator.info()}
        return {"enabled": False, "mode": self.speculation, "reason": self.speculation_off_reason
                or ("SPECULATION is off" if self.speculation == "off" else None)}

    def info(self) -> dict[str, Any]:
        def one(lo: Loaded | None) -> dict[str, Any] | None:
            if lo is None:
                return None
            out = {"model_path": str(lo.checkpoint), "backend": lo.backend, "device": lo.device,
                   "precision": lo.precision, "onnx_path": str(lo.onnx_path) if lo.onnx_path else None,
                   "fallback_reason": lo.fallback_reason, "export_cache_hit": lo.cache_hit,
                   "attention": lo.attention, "quantization": lo.quantization}
            if lo.task == "generate":
                out["prefix_caching"] = self.prefix_info()
                out["structured_outputs"] = {"engine": llguidance_version(), "compiled": self.grammars.compiled,
                                             "cached": self.grammars.cache_size}
                out["speculation"] = self.speculation_info()
            if hasattr(lo.runner, "graphs_mode"):  # the fixed-buffer CUDA runner
                r = lo.runner
                out["cuda_graphs"] = {"setting": r.graphs_mode, "enabled": r.graphs_on,
                                      "buckets": r.buckets if r.graphs_on else [], "reason": r.graphs_reason}
            return out

        embeddings: dict[str, Any] = {"available": self.embedding is not None, "endpoint": "/v1/embeddings"}
        if self.embedding is not None:
            embeddings |= {"pooling": self.embedding_pooling, "normalized": True,
                           "loaded": self.embedding.runner.loaded,  # made at the first request
                           "dimensions": self.embedding.runner.dim, **one(self.embedding)}
        return {"generation": one(self.generation), "classification": one(self.classification),
                "embeddings": embeddings,
                "context_length": self.context_length, "labels": self.labels}
