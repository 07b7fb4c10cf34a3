"""Continuous batching on one worker thread that owns the models.

Each iteration of the worker:
  1. drops rows whose request was cancelled or failed,
  2. runs pending classification and embedding batches, at most `max_batch_prefill_tokens` of
     their prompt tokens per iteration (`batch_jobs`),
  3. admits queued generation requests while the batch has room (`max_batch_size` rows and a
     budget of prompt + max_new_tokens tokens), fairly between requests (`admission.admit`): first the rows
     of the request (`GenerationRequest.group`) that holds the fewest rows, first come first served
     among equals; and a request that already holds a row leaves `max_batch_size // 8` rows free
     for others. So one request of many candidates cannot keep another's first token waiting for
     more than a few steps (issue 27),
  4. prefills admitted prompts (of requests with the fewest rows decoding first): while other
     rows are decoding, at most `prefill_chunk_tokens` prompt tokens per iteration, so a long
     prompt is prefilled a chunk per iteration between decode steps instead of stalling every
     running stream; with nothing decoding, or with at least `waiting_served_ratio` times as many
     prompts waiting as rows decoding (TGI's rule: a burst is better served by one pause than by
     many chunked steps), up to `max_batch_prefill_tokens` (rows x longest prompt) in one call.
     A prompt whose head is in the runner's prefix cache (issue 28) is prefilled on its own from
     its cached head (`start_prefill`); once the new rows' first tokens are handed over, the
     runner copies their prompts into the cache (`keep_pending`),
  5. runs one decode step for every running row, samples, emits tokens, and drops finished rows.
New requests therefore join between decode steps and finished ones leave at once. Events reach
each request's asyncio queue through `loop.call_soon_threadsafe`, once per iteration for all the
tokens that iteration made (one wake-up of the event loop per step, not one per token), and once
more after a prefill that made first tokens: a new stream's first token does not wait for the
decode step of the whole batch (issue 28). The event loop never runs a model step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.engine import admission
from app.engine.batch_jobs import BatchJobs, Job
from app.engine.grammar import Constraint, Grammar, prefetch
from app.engine.runner import ClassificationRunner, GenerationRunner, PendingPrefill, PromptScores, Selected, Want
from app.engine.sampling import Sampler, SamplingParams
from app.engine.speculation import Speculator
from model.tokenizer import GPT2Tokenizer, IncrementalDecoder

logger = logging.getLogger(__name__)

# How long the engine stays idle before the runner gives back buffers grown for past work (the
# GQA slot runner's KV rows and width). Requests that follow each other closer than this reuse
# them: growing 512 positions again costs about 150 ms of a 512-token prompt's first token on the
# GPT-2 124M shape here (BENCHMARKS.md, "Selection in the graph").
IDLE_RELEASE_S = 1.0


@dataclass
class TopToken:
    """One alternative at a position: a token and its log-probability."""

    id: int
    text: str
    logprob: float


@dataclass
class Token:
    id: int
    text: str
    logprob: float
    special: bool = False
    top: list[TopToken] = field(default_factory=list)  # the `logprobs` most likely, best first (when asked)


@dataclass
class PromptToken:
    """A prompt token scored by the model: log p(token | the tokens before it); None for the first."""

    id: int
    text: str
    logprob: float | None
    top: list[TopToken] = field(default_factory=list)  # the `prompt_logprobs` most likely there (none for the first)


@dataclass
class Finish:
    reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_text: str
    generated_tokens: int
    seed: int | None
    tokens: list[Token]
    prompt: list[PromptToken] | None = None  # when the request asked for prompt_logprobs
    stop_reason: int | str | None = None  # the stop sequence or stop token id that ended it (vLLM's); None for EOS
    stop_text: str = ""  # the end of generated_text that the stop sequence or stop token (EOS too) accounts for


@dataclass
class StreamEvent:
    index: int  # 0-based index of the generated token
    token: Token | None  # None only for a score-only request (max_new_tokens == 0): its one event
    finish: Finish | None = None  # set on the last event
    delta: str = ""  # text completed by this token (whole UTF-8 characters; special tokens skipped)
    prompt: list[PromptToken] | None = None  # on the first event, when the request asked for prompt_logprobs


MAX_LOGPROBS = 20  # the most alternatives per position a request may ask for (vLLM's default cap)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 20  # 0 only with prompt_logprobs (score the prompt, generate nothing)
    stop: list[str] = field(default_factory=list)
    stop_at_eos: bool = True
    logprobs: int | None = None  # alternatives per generated token (OpenAI `logprobs`, TGI `top_n_tokens`)
    prompt_logprobs: int | None = None  # score the prompt: each token's logprob and this many alternatives
    stop_token_ids: frozenset[int] = frozenset()  # more tokens that end it (vLLM's stop_token_ids)
    skip_special_tokens: bool = True  # special tokens add no text (vLLM's skip_special_tokens)
    group: object = None  # the API request it is a candidate of (prompts x best_of): admission is fair between groups
    grammar: Grammar | None = None  # structured output: every token keeps the output valid


class _Seq:
    """One generation request inside the scheduler."""

    def __init__(self, req: GenerationRequest, tokenizer: GPT2Tokenizer, eos_id: int | None,
                 emit: Callable[[Any], None], context_limit: int = 1 << 30) -> None:
        self.req = req
        self.context_limit = context_limit
        self.prompt: list[PromptToken] | None = None
        self.sampler = Sampler(req.params, req.prompt_ids)
        self.sampler.report_top = req.logprobs or 0
        self.constraint = Constraint(req.grammar) if req.grammar is not None else None
        self.sampler.constrained = self.constraint is not None
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=req.skip_special_tokens)
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.emit = emit
        self.tokens: list[Token] = []
        self.text = ""
        self.cancelled = False
        self.finished = False
        self.last_token = -1
        self.budget = len(req.prompt_ids) + req.max_new_tokens

    @property
    def top_n(self) -> int:
        """Alternatives this row needs from the runner: for choosing (`Sampler.top_n`) and for
        the `logprobs` it reports."""
        return max(self.sampler.top_n, self.req.logprobs or 0)

    def top_tokens(self, ids: np.ndarray, logprobs: np.ndarray, n: int) -> list[TopToken]:
        return [TopToken(int(i), self.tokenizer.id_to_token_text(int(i)), float(lp))
                for i, lp in zip(ids[:n], logprobs[:n], strict=True)]

    def choose(self, sel: Selected, row: int) -> None:
        """Pick this row's next token from the runner's selection (the top-N, or the whole
        vocabulary's logits when the sampler needs them) and accept it."""
        ids, lps = sel.top_ids[row], sel.top_logprobs[row]
        if self.constraint is not None:
            self.sampler.allowed = self.constraint.allowed()
        if self.sampler.needs_logits:
            token_id, logprob = self.sampler(sel.logits[row])
            if self.sampler.top is not None:  # the alternatives of the distribution the host chose from
                ids, lps = self.sampler.top
        else:
            token_id, logprob = self.sampler.from_top(ids, lps)
        complete = False
        if self.constraint is not None:
            self.constraint.consume(token_id)
            complete = self.constraint.done and token_id != self.eos_id
        self.accept(token_id, logprob, self.top_tokens(ids, lps, self.req.logprobs or 0), complete)

    def choose_top(self, ids: np.ndarray, lps: np.ndarray) -> int:
        """Pick and accept this row's next token from one position's top-N (a row that does not
        need the logits: speculative decoding's verified positions); returns it."""
        token_id, logprob = self.sampler.from_top(ids, lps)
        self.accept(token_id, logprob, self.top_tokens(ids, lps, self.req.logprobs or 0))
        return token_id

    def scored_prompt(self, scores: PromptScores | None) -> list[PromptToken]:
        """The prompt's tokens with their log-probabilities (the first has none), as asked."""
        ids, k = self.req.prompt_ids, self.req.prompt_logprobs or 0
        out = [PromptToken(ids[0], self.tokenizer.id_to_token_text(ids[0]), None)]
        for i, tok in enumerate(ids[1:]):
            top = self.top_tokens(scores.top_ids[i], scores.top_logprobs[i], k)
            out.append(PromptToken(tok, self.tokenizer.id_to_token_text(tok), float(scores.token_logprobs[i]), top))
        return out

    def start(self, scores: PromptScores | None) -> None:
        """The prompt is in the cache. A score-only request (max_new_tokens == 0) ends here."""
        if self.req.prompt_logprobs is not None:
            self.prompt = self.scored_prompt(scores)
        if self.req.max_new_tokens == 0:
            self.finished = True
            finish = Finish("length", "", 0, None, [], self.prompt)
            self.emit(StreamEvent(0, None, finish, "", self.prompt))

    def accept(self, token_id: int, logprob: float, top: list[TopToken] | None = None,
               complete: bool = False) -> None:
        """Emit the chosen token and decide whether we are done. `complete`: the row's grammar
        accepts nothing more (its only next token would be EOS), so it ends here as at EOS."""
        self.last_token = token_id
        special = token_id in self.tokenizer.special_ids
        delta = self.decoder.push(token_id)
        tok = Token(token_id, self.tokenizer.id_to_token_text(token_id), logprob, special, top or [])
        self.tokens.append(tok)
        reason, stop_reason, stop_text = None, None, ""
        self.text += delta
        if len(self.tokens) < self.req.params.min_tokens and not complete:  # vLLM: nothing stops it before min_tokens
            pass
        elif self.req.stop_at_eos and token_id == self.eos_id:
            reason, stop_text = "eos_token", delta
        elif token_id in self.req.stop_token_ids:
            reason, stop_reason, stop_text = "eos_token", token_id, delta
        elif self.req.stop:
            window = len(delta) + max(len(s) for s in self.req.stop)
            tail_start = max(0, len(self.text) - window)
            hits = [(i, s) for s in self.req.stop if (i := self.text.find(s, tail_start)) >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[: i + len(s)]  # the stop sequence is kept, as TGI does
                reason, stop_reason, stop_text = "stop_sequence", s, s
        if reason is None and complete:
            reason = "eos_token"
        if reason is None and (len(self.tokens) >= self.req.max_new_tokens
                               or len(self.req.prompt_ids) + len(self.tokens) >= self.context_limit):
            reason = "length"
        finish = None
        if reason is not None:
            if reason != "stop_sequence":
                self.text += self.decoder.flush()
            self.finished = True
            seed = self.sampler.seed if self.req.params.sampling else None  # greedy has no seed, as in TGI
            finish = Finish(reason, self.text, len(self.tokens), seed, list(self.tokens), self.prompt,
                            stop_reason=stop_reason, stop_text=stop_text)
        first = len(self.tokens) == 1
        self.emit(StreamEvent(len(self.tokens) - 1, tok, finish, delta, self.prompt if first else None))

    def fail(self, exc: BaseException) -> None:
        self.finished = True
        self.emit(exc)


def _scored(seq: _Seq) -> bool:
    return seq.req.prompt_logprobs is not None


def _score_k(seq: _Seq) -> int | None:
    """The alternatives a scored prompt asks for at each position; None when it is not scored."""
    return seq.req.prompt_logprobs


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)


class Scheduler:
    """Owns the runners; `submit`/`classify` are thread-safe and non-blocking."""

    def __init__(self, runner: GenerationRunner | None, tokenizer: GPT2Tokenizer | None,
                 classifier: ClassificationRunner | None = None, max_batch_size: int = 8,
                 max_batch_total_tokens: int = 16384, eos_token_id: int | None = None,
                 on_step: Callable[[dict[str, float]], None] | None = None, prefill_chunk_tokens: int = 64,
                 max_batch_prefill_tokens: int = 4096, waiting_served_ratio: float = 1.2,
                 score_chunk_tokens: int = 128, speculator: Speculator | None = None) -> None:
        self.runner = runner
        self.speculator = speculator  # prompt-lookup proposals verified in the decode step (speculation.py)
        self.tokenizer = tokenizer
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self.max_batch_total_tokens = max_batch_total_tokens
        self.eos_id = eos_token_id
        self.on_step = on_step
        self.context_limit = runner.info.n_positions if runner else 0
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self.max_batch_prefill_tokens = max(1, max_batch_prefill_tokens)
        self.waiting_served_ratio = waiting_served_ratio
        # A scored prompt's call computes (positions, vocabulary) logits: 128 x 50,257 floats is
        # 26 MB, and the log-softmax and top-k temporaries a few times that.
        self.score_chunk_tokens = max(1, score_chunk_tokens)
        self._queue: deque[_Seq] = deque()
        self._prefilling: deque[_Seq] = deque()  # admitted, prompt not yet in the cache
        self._chunked: tuple[_Seq, PendingPrefill] | None = None  # the prompt being prefilled in chunks
        # Classification and embedding calls: a budget of prompt tokens per iteration (batch_jobs)
        self._jobs = BatchJobs(self.max_batch_prefill_tokens, max_batch_size * 4)
        self._active: list[_Seq] = []
        # Events made during one iteration, delivered together by `_flush` (worker thread only).
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, Any]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine-worker", daemon=True)

    # ---- public, any thread ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.ident is not None:  # never started (a failed warm-up): nothing to join
            self._thread.join(timeout)

    @property
    def queue_size(self) -> int:
        """Requests waiting for their first token (queued or being prefilled)."""
        return len(self._queue) + len(self._prefilling) + (self._chunked is not None)

    @property
    def batch_size(self) -> int:
        return len(self._active)

    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue) -> _Seq:
        if self.runner is None or self.tokenizer is None:
            raise RuntimeError("no generation model is loaded")
        seq = _Seq(req, self.tokenizer, self.eos_id, lambda ev: self._outbox.append((loop, queue, ev)),
                   self.context_limit)
        with self._cond:
            self._queue.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: _Seq) -> None:
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    def classify(self, prompts: list[list[int]], done: Callable[[Any], None]) -> None:
        if self.classifier is None:
            raise RuntimeError("no classification model is loaded")
        with self._cond:
            self._jobs.add(Job(prompts, done, self.classifier.classify, "classification"))
            self._cond.notify()

    def embed(self, prompts: list[list[int]], run: Callable[[list[list[int]]], np.ndarray],
              done: Callable[[Any], None]) -> None:
        """`run(prompts)` (the embedding runner's pooled vectors) on the worker thread, batched with
        the other pending calls of the same `run`, as classification is; `done` gets the result."""
        with self._cond:
            self._jobs.add(Job(prompts, done, run, "embedding"))
            self._cond.notify()

    # ---- the worker --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stop or self._queue or self._jobs or self._active or self._prefilling
                               or self._chunked):
                        # Quiet for IDLE_RELEASE_S with memory to give back: the runner gives it back.
                        quiet = self.runner is not None and self.runner.releasable
                        if not self._cond.wait(IDLE_RELEASE_S if quiet else None) and quiet:
                            self.runner.idle()
                    if self._stop:
                        break
                try:
                    self._drop(lambda s: s.cancelled)
                    if self._jobs:
                        self._jobs.run_some()
                    if self.runner is not None:
                        self._generation_step()
                except Exception as e:  # a failed step fails the batch's requests, never the worker
                    logger.exception("engine step failed")
                    self._fail_batch(e)
                self._flush()
        finally:  # stopped, or (a bug) the worker itself died: nobody may wait forever
            waiting = [self._chunked[0]] if self._chunked else []
            with self._cond:
                queued = list(self._queue)
                self._queue.clear()
            for s in self._active + waiting + list(self._prefilling) + queued:
                s.fail(RuntimeError("engine stopped"))
            self._jobs.fail_all(RuntimeError("engine stopped"))
            self._flush()

    def _flush(self) -> None:
        """Hand this iteration's events to their event loops: one call per loop, not per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for loop, queue, ev in self._outbox:
            by_loop.setdefault(loop, []).append((queue, ev))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed (shutdown): nobody is waiting any more
                logger.debug("could not deliver %d event(s): event loop closed", len(items))

    def _fail_batch(self, exc: Exception) -> None:
        for s in self._active + ([self._chunked[0]] if self._chunked else []):
            s.fail(exc)
        self._active, self._chunked = [], None
        if self.runner is not None:
            try:
                self.runner.reset()
            except Exception:
                logger.exception("runner reset failed")

    def _drop(self, pred: Callable[[_Seq], bool]) -> None:
        # Decide once: `cancelled` can flip on the event loop while the runner copies the cache.
        dead = [pred(s) for s in self._active]
        rows = [i for i, d in enumerate(dead) if d]
        if rows:
            order = self.runner.drop(rows)  # the runner may reorder the rows it keeps
            self._active = [self._active[i] for i in order]

    def _admit(self) -> list[_Seq]:
        waiting = list(self._prefilling) + ([self._chunked[0]] if self._chunked else [])
        with self._cond:
            return admission.admit(self._queue, self._active + waiting, self.max_batch_size,
                                   self.max_batch_total_tokens)

    def _want(self, seqs: Sequence[_Seq], scored: bool = False) -> Want:
        """What a runner call over `seqs` must return: enough top alternatives for every row, each
        row's temperature, the full logits only if a row's sampling needs them; `scored`: the
        call holds one prompt (`seqs[0]`) whose every position is scored."""
        score_top_n = (seqs[0].req.prompt_logprobs or 0) if scored else 0
        return Want(top_n=max(s.top_n for s in seqs),
                    temperature=np.fromiter((s.sampler.temperature for s in seqs), np.float32, len(seqs)),
                    score=(0,) if scored else (), score_top_n=score_top_n,
                    logits=any(s.sampler.needs_logits for s in seqs))

    def _generation_step(self) -> None:
        t0 = time.perf_counter()
        self._prefilling.extend(self._admit())
        self._prefilling = admission.prefill_order(self._prefilling, self._active)
        new = self._prefill()
        if new:  # the new rows' first tokens leave now, not after the decode step of the whole batch
            self._flush()
        self.runner.keep_pending()  # then their prompts go into the prefix cache
        self._drop(lambda s: s.finished or s.cancelled)  # a score-only request ends at its prefill
        if self._active:
            prefetch([s.constraint for s in self._active if s.constraint is not None])  # during the step
            self._decode(self._active)
            self._drop(lambda s: s.finished or s.cancelled)
        if self.on_step:
            self.on_step({"seconds": time.perf_counter() - t0, "batch": len(self._active), "admitted": new,
                          "queue": self.queue_size, "kv_bytes": self.runner.kv_bytes})

    def _prefill(self) -> int:
        """Put waiting prompts into the cache within this iteration's token limit; returns how
        many rows joined the batch."""
        if any(s.cancelled for s in self._prefilling):
            self._prefilling = deque(s for s in self._prefilling if not s.cancelled)
        waiting = len(self._prefilling) + (self._chunked is not None)
        burst = waiting >= self.waiting_served_ratio * len(self._active)
        limit = self.max_batch_prefill_tokens if burst else self.prefill_chunk_tokens
        if self._chunked is None:
            group = self._take_group(limit)
            if group:
                want = self._want(group, scored=_scored(group[0]))
                sel = self._guarded(group, lambda: self.runner.add([s.req.prompt_ids for s in group], want))
                return 0 if sel is None else self._join(group, sel)
        if self._chunked is None:
            return 0
        seq, pending = self._chunked
        if seq.cancelled:
            self.runner.abort(pending)
            self._chunked = None
            return 0
        scored = _scored(seq)
        n = min(limit, self.score_chunk_tokens) if scored else limit
        sel = self._guarded([seq], lambda: self.runner.advance(pending, n, self._want([seq], scored)))
        if sel is None:  # more chunks to go, or it failed (and `_guarded` cleared it)
            return 0
        self._chunked = None
        return self._join([seq], sel)

    def _take_group(self, limit: int) -> list[_Seq]:
        """Waiting prompts to prefill together in one call of at most `limit` padded tokens. A
        prompt over the limit on its own becomes the chunked prefill instead. A prompt to score
        goes alone, in calls of at most `score_chunk_tokens` (each of its positions gets the
        vocabulary's logits in that call)."""
        group: list[_Seq] = []
        longest = 0
        while self._prefilling:
            head = self._prefilling[0]
            if head.cancelled:
                self._prefilling.popleft()
                continue
            n = len(head.req.prompt_ids)
            scored = _scored(head)
            if group and scored:
                break
            cap = min(limit, self.score_chunk_tokens) if scored else limit
            # A prompt whose head is in the prefix cache prefills only the rest, on its own (rows of
            # one call start at the same cache index).
            if (len(group) + 1) * max(longest, n) > cap or self.runner.prefix_hit(head.req.prompt_ids,
                                                                                  _score_k(head)):
                if not group:
                    pending = self.runner.start_prefill(head.req.prompt_ids, _score_k(head))
                    self._chunked = (self._prefilling.popleft(), pending)
                break
            group.append(self._prefilling.popleft())
            longest = max(longest, n)
            if scored:
                break
        return group

    def _guarded(self, seqs: list[_Seq], call: Callable[[], Any]) -> Any:
        """Run a prefill call; if it raises, fail only `seqs` (in neither the queue nor the batch)
        and return None. The runners change their batch only after a call succeeds, so the
        rows that are decoding carry on."""
        try:
            return call()
        except Exception as e:
            logger.exception("prefill of %d request(s) failed", len(seqs))
            for s in seqs:
                s.fail(e)
            if self._chunked is not None:
                self.runner.abort(self._chunked[1])
                self._chunked = None
            return None

    def _join(self, seqs: list[_Seq], sel: Selected) -> int:
        """Rows just appended to the runner's batch: their prompt scores, then their first tokens
        (a score-only request finishes here)."""
        self._active.extend(seqs)
        for i, s in enumerate(seqs):
            s.start(sel.prompt[i] if sel.prompt else None)
        self._accept(seqs, sel)
        return len(seqs)

    def _decode(self, seqs: list[_Seq]) -> None:
        """One decode step: each row's last token, and with speculation its proposals, verified in
        the same call (`speculation`): a row then makes from one to 1 + its proposals tokens."""
        spec, t0, made = self.speculator, time.perf_counter(), len(seqs)
        plan = spec.plan(seqs) if spec is not None else None
        if plan is None:
            self._accept(seqs, self.runner.step([s.last_token for s in seqs], self._want(seqs)))
        else:
            out = self.runner.verify([[s.last_token, *p] for s, p in zip(seqs, plan, strict=True)], self._want(seqs))
            keep = spec.accept(seqs, plan, out)
            self.runner.rewind(keep)
            made = sum(keep)
        if spec is not None:  # what speculation has to beat, and what it does
            spec.record(len(seqs), plan is None, time.perf_counter() - t0, made)

    def _accept(self, seqs: list[_Seq], sel: Selected) -> None:
        """Each row's next token, from the runner's selection."""
        if len(seqs) != len(sel.top_ids):
            raise RuntimeError(f"runner returned {len(sel.top_ids)} rows for {len(seqs)} sequences")
        for i, s in enumerate(seqs):
            if not s.finished:
                s.choose(sel, i)
