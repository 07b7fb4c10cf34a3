"""Which queued rows join the batch, and in which order admitted prompts are prefilled: fair
between API requests (issue 27).

The candidates of one API request (its prompts x best_of) share a `GenerationRequest.group`. The
next row admitted is one of the request that holds the fewest rows (the first queued among
equals), and a request that already holds a row leaves `max_batch_size // 8` rows free for the
others, so a request of 64 candidates delays another request's first token by a few steps, not by
its whole run. Rows without a group are each their own request. Token budget: FIFO as before, the
row picked is never overtaken when it does not fit (unless the batch is empty)."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from typing import Any


def group(seq: Any) -> object:
    """The request a scheduler row (`_Seq`) belongs to."""
    return seq if seq.req.group is None else seq.req.group


def one_request(reqs: Iterable[Any]) -> None:
    """Mark engine requests (`GenerationRequest`s) as the candidates of one API request."""
    key = object()
    for r in reqs:
        r.group = key


def admit(queue: deque, held: Iterable[Any], max_batch_size: int, max_batch_total_tokens: int) -> list:
    """Take the rows to admit out of `queue` (the caller holds its lock); `held`: the rows in the
    batch or waiting for their prefill. A row's `budget` is its prompt + max_new_tokens."""
    held = list(held)
    rows = Counter(group(s) for s in held)  # rows each request holds
    used, busy = sum(s.budget for s in held), len(held)
    reserve = max_batch_size // 8  # rows a request that holds some leaves to the others
    admitted: list = []
    if any(s.cancelled for s in queue):
        kept = [s for s in queue if not s.cancelled]
        queue.clear()
        queue.extend(kept)
    while queue and busy + len(admitted) < max_batch_size:
        at, fewest = 0, rows[group(queue[0])]
        for i, s in enumerate(queue):
            if fewest == 0:
                break
            if rows[group(s)] < fewest:
                at, fewest = i, rows[group(s)]
        head = queue[at]
        if fewest and max_batch_size - (busy + len(admitted) + 1) < reserve:
            break
        if used + head.budget > max_batch_total_tokens and (busy or admitted):
            break
        del queue[at]
        admitted.append(head)
        rows[group(head)] += 1
        used += head.budget
    return admitted


def prefill_order(waiting: deque, decoding: Iterable[Any]) -> deque:
    """`waiting` prompts, those of requests with the fewest rows decoding first (a stable sort)."""
    if len(waiting) < 2:
        return waiting
    counts = Counter(group(s) for s in decoding)
    return deque(sorted(waiting, key=lambda s: counts[group(s)]))
