"""Classification and embedding calls on the scheduler's worker thread, a budget at a time.

A classification or embedding request is a list of prompts with one answer per prompt (label
logits, a pooled vector). Requests waiting together are batched: their prompts go through one call
of the model per kind. A request may be big (2048 inputs of up to the whole context), and the
worker that runs it also runs every generation row's decode step; so each worker iteration takes
at most `max_tokens` prompt tokens (and `max_rows` prompts) from the head of the queue, and a
request bigger than that is worked through over several iterations with decode steps between
them: a big embedding request slows the running streams down, it does not stall them.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Run = Callable[[list[list[int]]], np.ndarray]  # prompts -> one row per prompt


@dataclass(eq=False)  # identity: a job is found in the queue by itself
class Job:
    prompts: list[list[int]]
    done: Callable[[Any], None]  # gets (len(prompts), ...) results, or the exception
    run: Run
    kind: str  # "classification" or "embedding": for the log
    results: list[np.ndarray] = field(default_factory=list)
    next: int = 0  # the first prompt not yet taken

    @property
    def taken_all(self) -> bool:
        return self.next >= len(self.prompts)


class BatchJobs:
    """A FIFO of jobs; `add` from any thread, `run_some` on the worker thread only."""

    def __init__(self, max_tokens: int, max_rows: int) -> None:
        self.max_tokens = max(1, max_tokens)
        self.max_rows = max(1, max_rows)
        self._jobs: deque[Job] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs.append(job)

    def _take(self) -> list[tuple[Job, int, int]]:
        """(job, start, end) slices from the head: at most `max_tokens` tokens and `max_rows`
        prompts in all, at least one prompt."""
        taken: list[tuple[Job, int, int]] = []
        tokens = rows = 0
        with self._lock:
            for job in self._jobs:
                start = job.next
                while job.next < len(job.prompts) and rows < self.max_rows:
                    n = len(job.prompts[job.next])
                    if rows and tokens + n > self.max_tokens:
                        break
                    tokens, rows, job.next = tokens + n, rows + 1, job.next + 1
                if job.next > start:
                    taken.append((job, start, job.next))
                if not job.taken_all:
                    break
            while self._jobs and self._jobs[0].taken_all:  # taken now: off the queue, finished below
                self._jobs.popleft()
        return taken

    def run_some(self) -> None:
        """Run one budget of the queued prompts, one call per kind; hand over finished jobs."""
        by_run: dict[int, list[tuple[Job, int, int]]] = {}
        for part in self._take():
            by_run.setdefault(id(part[0].run), []).append(part)
        for parts in by_run.values():
            flat = [p for job, a, b in parts for p in job.prompts[a:b]]
            try:
                out = parts[0][0].run(flat)
            except Exception as e:  # the jobs fail; the worker and the other kind go on
                logger.exception("%s batch failed", parts[0][0].kind)
                self._fail({id(job): job for job, _, _ in parts}.values(), e)
                continue
            k = 0
            for job, a, b in parts:
                job.results.append(out[k:k + b - a])
                k += b - a
                if job.taken_all and sum(len(r) for r in job.results) == len(job.prompts):
                    job.done(np.concatenate(job.results))

    def fail_all(self, exc: BaseException) -> None:
        """The engine stops: every queued job gets `exc` (nobody waits forever)."""
        with self._lock:
            jobs = list(self._jobs)
        self._fail(jobs, exc)

    def _fail(self, jobs: Any, exc: BaseException) -> None:
        with self._lock:
            for job in jobs:
                if job in self._jobs:
                    self._jobs.remove(job)
                job.next = len(job.prompts)
        for job in jobs:
            job.done(exc)
