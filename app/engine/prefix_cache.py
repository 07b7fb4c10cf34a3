"""Automatic prefix caching (issue 28): a prompt's KV outlives its request, and a later prompt that
starts with the same tokens prefills only the rest.

Blocks. A prompt is cut into blocks of `BLOCK_TOKENS` tokens; only whole blocks are kept. Block j
of a prompt is keyed by (the id of block j - 1, the bytes of its tokens), so a key names the whole
prefix up to and including it, and a dict lookup compares the bytes: no hash can collide into
another prompt's KV. A lookup walks the prompt's blocks from the first until one is missing.

Storage. The KV of a block lives in a pool of `num_blocks` blocks that the runner owns, on its
device, next to its batch buffers: (num_blocks, n_head, BLOCK_TOKENS, head_dim) per layer and kind.
The runner gives two copies: `save(src, start, pool_ids)` (its row's tokens start.. into pool
blocks) and `load(dst, pool_ids)` (pool blocks into its row's tokens 0..). A hit is a copy, never
shared memory, so a block can be evicted while a request that loaded it is still running.

Scores. A prompt to score (`echo` with `logprobs`, TGI's `decoder_input_details`) needs every
position's log-probability and alternatives, which come from the logits, not the KV. A block keeps
its tokens' scores when the prompt that made it was scored (entry t: log p(token t | tokens < t)
and the `score_k` best alternatives there; the prompt's first token has none). A scored lookup uses
only the leading blocks whose scores have at least the alternatives asked for; a later scored
prompt refreshes blocks that had fewer.

What a hit reuses. The last prompt token is always recomputed (its logits choose the first new
token). A scored prompt recomputes from the last cached token, whose logits score the first
uncached one. Rewriting a cached position writes the same KV again.

Eviction. Least recently used, within the budget. A hit touches its blocks deepest first, so a
block is always more recent than its descendants and leaves are evicted before the prefixes they
extend. The blocks of the prompt being stored are never evicted to make room for its own tail.
"""

from __future__ import annotations

import logging
import mmap
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.engine.runner import PromptScores

logger = logging.getLogger(__name__)

BLOCK_TOKENS = 4


@dataclass
class _Block:
    uid: int  # unique for the cache's lifetime: a child's key names it (a pool index is reused)
    pool_id: int
    key: tuple[int, bytes]
    score_k: int = -1  # alternatives kept per position; -1: no scores
    token_logprobs: np.ndarray | None = None  # (B,) float32; NaN for a prompt's first token
    top_ids: np.ndarray | None = None  # (B, score_k) int64
    top_logprobs: np.ndarray | None = None  # (B, score_k) float32


@dataclass
class Hit:
    """What a prompt reuses: `reuse` tokens whose KV is loaded from `pool_ids` (covering at least
    those tokens), and for a scored lookup the scores of tokens 1..reuse (`PromptScores` entries
    0..reuse-1)."""

    reuse: int = 0
    pool_ids: list[int] = field(default_factory=list)
    scores: PromptScores | None = None


@dataclass
class CacheStats:
    queries: int = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
    hits: int = 0  # of them, tokens whose KV was reused (vLLM's prefix_cache_hits)
    evicted_blocks: int = 0


class PrefixCache:
    """The block index, LRU and statistics over a runner's pool (see the module docstring)."""

    def __init__(self, num_blocks: int, block_bytes: int, save: Callable[[Any, int, list[int]], None],
                 load: Callable[[Any, list[int]], None], block_tokens: int = BLOCK_TOKENS) -> None:
        if num_blocks < 1:
            raise ValueError("a prefix cache needs room for at least one block")
        self.num_blocks, self.block_bytes, self.B = num_blocks, block_bytes, block_tokens
        self._save, self._load = save, load
        self._blocks: OrderedDict[tuple[int, bytes], _Block] = OrderedDict()  # least recently used first
        self._free = list(range(num_blocks - 1, -1, -1))
        self._uid = 0
        self._score_bytes = 0  # kept as a sum: /metrics reads it from another thread while blocks change
        self.stats = CacheStats()

    # ---- what /info and /metrics show ------------------------------------------------------------
    @property
    def budget_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def bytes_in_use(self) -> int:
        return len(self._blocks) * self.block_bytes + self._score_bytes

    @property
    def cached_tokens(self) -> int:
        return len(self._blocks) * self.B

    def clear(self) -> None:
        """Empty, counters included (the start's self-check leaves nothing in /metrics)."""
        self._blocks.clear()
        self._score_bytes = 0
        self.stats = CacheStats()
        self._free = list(range(self.num_blocks - 1, -1, -1))

    # ---- lookup ----------------------------------------------------------------------------------
    def _keys(self, prompt: Sequence[int], n_blocks: int) -> list[bytes]:
        raw = np.asarray(prompt[: n_blocks * self.B], np.int64).tobytes()
        step = self.B * 8
        return [raw[j * step:(j + 1) * step] for j in range(n_blocks)]

    def _walk(self, prompt: Sequence[int]) -> list[_Block]:
        """The prompt's leading blocks that are cached."""
        chain: list[_Block] = []
        parent = -1
        for tokens in self._keys(prompt, len(prompt) // self.B):
            block = self._blocks.get((parent, tokens))
            if block is None:
                break
            chain.append(block)
            parent = block.uid
        return chain

    def _touch(self, chain: Sequence[_Block]) -> None:
        for block in reversed(chain):  # deepest first: a prefix stays more recent than its extensions
            self._blocks.move_to_end(block.key)

    def lookup(self, prompt: Sequence[int], score_k: int | None = None, count: bool = True) -> Hit:
        """The hit for `prompt` (`score_k`: the prompt is scored with that many alternatives).
        `count=False`: a peek (the scheduler routing a request) that neither counts nor touches."""
        L = len(prompt)
        chain = self._walk(prompt)
        if score_k is not None:
            n = next((i for i, b in enumerate(chain) if b.score_k < score_k), len(chain))
            chain = chain[:n]
        h = len(chain) * self.B
        reuse = (min(h, L) - 1 if h else 0) if score_k is not None else min(h, L - 1)
        if count:
            self.stats.queries += L
            self.stats.hits += reuse
        if reuse <= 0:
            return Hit()
        used = chain[: -(-reuse // self.B)] if score_k is None else chain
        if count:
            self._touch(used)
        hit = Hit(reuse, [b.pool_id for b in used])
        if score_k is not None:
            rows = slice(1, reuse + 1)  # tokens 1..reuse
            hit.scores = PromptScores(np.concatenate([b.token_logprobs for b in used])[rows],
                                      np.concatenate([b.top_ids[:, :score_k] for b in used])[rows],
                                      np.concatenate([b.top_logprobs[:, :score_k] for b in used])[rows])
        return hit

    def load(self, hit: Hit, dst: Any) -> None:
        if hit.pool_ids:
            self._load(dst, hit.pool_ids)

    # ---- store -----------------------------------------------------------------------------------
    def store(self, prompt: Sequence[int], src: Any, scores: PromptScores | None = None, score_k: int = 0) -> int:
        """Keep the whole blocks of `prompt`, whose KV is in the runner's `src` row (tokens 0..),
        and its scores when it was scored (`scores`: entries 0..len-2, `score_k` alternatives).
        Returns how many blocks were added."""
        n_blocks = len(prompt) // self.B
        if not n_blocks:
            return 0
        chain = self._walk(prompt)
        keys = self._keys(prompt, n_blocks)
        if scores is not None:  # refresh the cached blocks that kept fewer alternatives
            for j, block in enumerate(chain):
                if block.score_k < score_k:
                    self._set_scores(block, j, scores, score_k)
        pinned = {b.uid for b in chain}
        start, new = len(chain), []
        parent = chain[-1].uid if chain else -1
        for j in range(start, n_blocks):
            pool_id = self._take(pinned)
            if pool_id is None:  # the budget holds fewer blocks than this prompt: keep its head
                break
            self._uid += 1
            block = _Block(self._uid, pool_id, (parent, keys[j]))
            if scores is not None:
                self._set_scores(block, j, scores, score_k)
            self._blocks[block.key] = block
            pinned.add(block.uid)
            new.append(block)
            parent = block.uid
        if new:
            self._save(src, start * self.B, [b.pool_id for b in new])
        self._touch(chain + new)
        return len(new)

    def _set_scores(self, block: _Block, j: int, scores: PromptScores, k: int) -> None:
        """Block j's tokens jB..jB+B-1 are score entries jB-1..jB+B-2 (the first token has none)."""
        lo, hi = j * self.B - 1, j * self.B + self.B - 1
        pad = 1 if lo < 0 else 0
        lp = np.asarray(scores.token_logprobs[max(lo, 0):hi], np.float32)
        ids = np.asarray(scores.top_ids[max(lo, 0):hi, :k], np.int64)
        tops = np.asarray(scores.top_logprobs[max(lo, 0):hi, :k], np.float32)
        if pad:
            lp = np.concatenate([[np.nan], lp]).astype(np.float32)
            ids = np.concatenate([np.zeros((1, k), np.int64), ids])
            tops = np.concatenate([np.full((1, k), np.nan, np.float32), tops])
        self._score_bytes += lp.nbytes + ids.nbytes + tops.nbytes - _score_bytes(block)
        block.token_logprobs, block.top_ids, block.top_logprobs, block.score_k = lp, ids, tops, k

    def _take(self, pinned: set[int]) -> int | None:
        """A free pool block, evicting the least recently used block outside `pinned`."""
        if self._free:
            return self._free.pop()
        victim = next((b for b in self._blocks.values() if b.uid not in pinned), None)
        if victim is None:
            return None
        del self._blocks[victim.key]
        self._score_bytes -= _score_bytes(victim)
        self.stats.evicted_blocks += 1
        return victim.pool_id


def _score_bytes(block: _Block) -> int:
    if block.token_logprobs is None:
        return 0
    return block.token_logprobs.nbytes + block.top_ids.nbytes + block.top_logprobs.nbytes


def lazy_zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Zeros in anonymous memory that the kernel maps a 4 KiB page at a time, on first write, and
    never as transparent huge pages. numpy asks for huge pages on large arrays (MADV_HUGEPAGE), and
    with this host's `defrag=madvise` a first write then waits for the kernel to zero, and often
    compact, 2 MiB at a time: storing a 172-token prompt's blocks (12.7 MB, GPT-2 124M) took
    25-100 ms on fresh pages against 9 ms with 4 KiB pages (1.4 ms once written)."""
    nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # transparent_hugepage=always would map huge pages anyway
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype).reshape(shape)


def build(budget: int, info: Any, itemsize: int,
          make_pool: Callable[[int], tuple[Callable[[Any, int, list[int]], None], Callable[[Any, list[int]], None]]],
          ) -> tuple[PrefixCache | None, str | None]:
    """A runner's prefix cache within `budget` bytes, or None and why not. `info`: the runner's
    `ModelInfo`; `itemsize`: bytes of a KV element; `make_pool(n)` allocates the runner's pool of n
    blocks and returns its (save, load) copies."""
    if budget <= 0:
        return None, "PREFIX_CACHING=false"
    per_block = 2 * info.n_layer * info.n_head * BLOCK_TOKENS * info.head_dim * itemsize  # keys and values
    n = budget // per_block
    if n < 1:
        return None, f"PREFIX_CACHE_MB holds no block of {BLOCK_TOKENS} tokens"
    return PrefixCache(n, per_block, *make_pool(n)), None
