"""Structured outputs: a token mask per constrained row and step, from llguidance.

Why llguidance (issue 29): it is a maintained grammar engine (Microsoft's, what llama.cpp and vLLM's
`guidance` backend use) shipped as one abi3 wheel with no dependencies, where xgrammar's wheel pulls
torch, transformers and triton, and outlines-core needs a regex index built per vocabulary and
schema. It takes JSON schemas, regular expressions and Lark grammars (GBNF converts), builds its
lexer lazily, so compiling a schema takes about a millisecond here, and computes a 50,257-token mask
in a few microseconds a step with the GIL released (BENCHMARKS.md, "Structured outputs").

The parts:
- `GrammarSpec`: what a request asked for (a JSON schema, a regex, choices, a Lark grammar), as the
  protocol layer parsed it, with the request field it came from for 4xx messages.
- `GrammarCompiler`: the tokenizer in llguidance's form (built once, on first use) and the compiled
  grammars, cached by their text (LRU); a spec that does not compile is an `InputError` naming the
  field. `Engine.compile_grammar` runs it off the event loop.
- `Constraint`: one row's matcher. The scheduler starts the next masks of all constrained rows on a
  thread of their own before a decode step (`prefetch`), so they are computed while the model step
  runs (both release the GIL); the sampler then applies the mask to the row's logits as the first
  processor, the way `logit_bias` enters (DESIGN.md section 12): one selection path.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.numpy as llnp
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from model.tokenizer import GPT2Tokenizer

logger = logging.getLogger(__name__)

# JSON without optional whitespace (`{"a":1}`): a small model given free whitespace can emit newlines
# until its token limit (why vLLM added `disable_any_whitespace`). A schema's "x-guidance" overrides it.
JSON_OPTIONS = {"whitespace_flexible": False}

# Compiled grammars kept (by their text): a client repeating its schema compiles it once.
CACHE_ENTRIES = 256


class GrammarError(ValueError):
    """A grammar that does not compile; `field` is the request field it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GrammarSpec:
    """A request's constraint. `kind`: "json" (value: a JSON schema, as JSON text), "regex",
    "choice" (value: a JSON list of strings) or "lark" (a Lark grammar; GBNF is converted)."""

    kind: str
    value: str
    field: str

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's serialized form (not yet checked)."""
        if self.kind == "json":
            try:
                schema = json.loads(self.value)
            except ValueError as e:
                raise GrammarError(self.field, f"not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise GrammarError(self.field, "a JSON schema must be an object")
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            except ValueError as e:
                raise GrammarError(self.field, f"invalid JSON schema: {e}") from None
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            # A Lark alternation of string literals (JSON's quoting is Lark's): no regex escaping.
            choices = json.loads(self.value)
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        if self.kind == "lark":
            text = self.value
            if "::=" in text:  # GBNF (llama.cpp's, xgrammar's): llguidance converts it to Lark
                try:
                    text = gbnf_to_lark(text)
                except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions
                    raise GrammarError(self.field, f"invalid GBNF grammar: {e}") from None
            return llguidance.LLMatcher.grammar_from_lark(text)
        raise GrammarError(self.field, f"unknown grammar kind {self.kind!r}")


class Grammar:
    """A compiled grammar: a matcher in its start state, copied for each row that uses it."""

    def __init__(self, spec: GrammarSpec, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.spec = spec
        self._matcher = matcher
        self.vocab_size = vocab_size

    def matcher(self) -> llguidance.LLMatcher:
        return self._matcher.deep_copy()


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer, with an LRU cache by (kind, text). Thread-safe."""

    def __init__(self, tokenizer: GPT2Tokenizer, vocab_size: int, entries: int = CACHE_ENTRIES) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._entries = entries
        self._ll: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # how many specs were compiled (not served from the cache)

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (about 0.25 s to build for GPT-2's: made once)."""
        with self._lock:
            if self._ll is None:
                self._ll = llguidance.LLTokenizer(self._tokenizer.backend_json(), n_vocab=self.vocab_size,
                                                  eos_token=self._tokenizer.eos_token_id)
            return self._ll

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def cached(self, spec: GrammarSpec) -> Grammar | None:
        with self._lock:
            g = self._cache.get((spec.kind, spec.value))
            if g is not None:
                self._cache.move_to_end((spec.kind, spec.value))
            return g

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar; raises `GrammarError` naming the spec's field when it is invalid."""
        hit = self.cached(spec)
        if hit is not None:
            return hit
        text = spec.llguidance_grammar()
        tok = self.ll_tokenizer
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tok)
        if is_error:
            raise GrammarError(spec.field, _first_line(messages[0]) if messages else "invalid grammar")
        matcher = llguidance.LLMatcher(tok, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(spec.field, _first_line(matcher.get_error()))
        grammar = Grammar(spec, matcher, self.vocab_size)
        with self._lock:
            self.compiled += 1
            self._cache[(spec.kind, spec.value)] = grammar
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)
        logger.debug("compiled a %s grammar (%d characters)", spec.kind, len(spec.value))
        return grammar


def llguidance_version() -> str:
    return llguidance.get_version() if hasattr(llguidance, "get_version") else "?"


def _first_line(message: str) -> str:
    """llguidance's messages carry a source excerpt after the first line; keep the line and the cause."""
    lines = [x.strip() for x in message.strip().splitlines() if x.strip()]
    keep = lines[:1] + [x for x in lines[1:] if x.lower().startswith("error")]
    return "; ".join(keep)[:500] or "invalid grammar"


class Constraint:
    """One row's grammar state: the mask of the tokens that keep its output valid, and the tokens
    it has taken. The mask of the next step is computed at most once (by `prefetch` on the mask
    thread, or here on first use)."""

    def __init__(self, grammar: Grammar) -> None:
        self.matcher = grammar.matcher()
        self.vocab_size = grammar.vocab_size
        self._bits = llnp.allocate_token_bitmask(1, grammar.vocab_size)
        self._fresh = False  # `_bits` holds the mask of the current state
        self._pending: Future | None = None

    def _fill(self) -> None:
        llnp.fill_next_token_bitmask(self.matcher, self._bits)  # releases the GIL
        self._fresh = True

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens this row may take next."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if not self._fresh:
            self._fill()
        bits = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")[: self.vocab_size]
        return bits.astype(bool)

    def consume(self, token: int) -> None:
        """The row took `token` (the mask allowed it, so the matcher accepts it)."""
        self._fresh = False
        if not self.matcher.consume_token(token):
            logger.warning("grammar refused token %d: %s", token, self.matcher.get_error())

    @property
    def done(self) -> bool:
        """Nothing but the end can follow: the output is complete and valid."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


_MASKS = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")


def prefetch(constraints: Sequence[Constraint]) -> None:
    """Start computing the next masks of `constraints` on the mask thread (called before a model
    step; `Constraint.allowed` waits for it). Rows whose mask is already fresh are skipped."""
    todo = [c for c in constraints if not c._fresh and c._pending is None]
    if not todo:
        return

    def run() -> None:
        for c in todo:
            c._fill()

    future = _MASKS.submit(run)
    for c in todo:
        c._pending = future
