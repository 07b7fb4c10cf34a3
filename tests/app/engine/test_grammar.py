"""The grammar module on its own (issue 29): compiling and caching by text, errors naming the field,
masks computed on the mask thread equal to masks computed in place, and the mask as the first
processor of the one selection path (greedy, sampling, min_tokens, logit_bias)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.engine.grammar import Constraint, GrammarCompiler, GrammarError, GrammarSpec, prefetch
from app.engine.sampling import Sampler, SamplingParams
from model.tokenizer import GPT2Tokenizer, default_bpe_files

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                     "required": ["a"], "additionalProperties": False})


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.from_files(*default_bpe_files())


@pytest.fixture(scope="module")
def compiler(tok: GPT2Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tok, tok.vocab_size, entries=2)


def test_compiled_grammars_are_cached_by_their_text(compiler) -> None:
    before = compiler.compiled
    a = compiler.compile(GrammarSpec("json", SCHEMA, "f"))
    assert compiler.compile(GrammarSpec("json", SCHEMA, "other_field")) is a  # the text is the key
    assert compiler.compiled == before + 1
    compiler.compile(GrammarSpec("regex", "x+", "f"))
    compiler.compile(GrammarSpec("regex", "y+", "f"))  # 2 entries: the schema is evicted (LRU)
    assert compiler.cached(GrammarSpec("json", SCHEMA, "f")) is None
    assert compiler.compiled == before + 3


@pytest.mark.parametrize(("spec", "words"), [
    (GrammarSpec("regex", "a(b", "guided_regex"), "unclosed group"),
    (GrammarSpec("json", '{"type": "foo"}', "response_format.json_schema.schema"), "foo"),
    (GrammarSpec("json", "[1]", "guided_json"), "must be an object"),
    (GrammarSpec("lark", "start: nothing_here", "guided_grammar"), "nothing_here"),
    (GrammarSpec("lark", "root ::= (", "guided_grammar"), "GBNF"),
])
def test_invalid_grammars_raise_naming_the_field(compiler, spec, words) -> None:
    with pytest.raises(GrammarError) as e:
        compiler.compile(spec)
    assert e.value.field == spec.field and words in e.value.message


def test_prefetched_masks_equal_masks_computed_in_place(compiler, tok) -> None:
    grammar = compiler.compile(GrammarSpec("json", SCHEMA, "f"))
    a, b = Constraint(grammar), Constraint(grammar)
    for token in tok.encode('{"a":7}'):
        prefetch([a])  # on the mask thread
        assert a._pending is not None or a._fresh
        mask_a, mask_b = a.allowed(), b.allowed()
        assert mask_a.shape == (tok.vocab_size,) and np.array_equal(mask_a, mask_b)
        assert mask_a[token], tok.decode([token])
        a.consume(token)
        b.consume(token)
    assert a.done and not a.error
    # Only EOS may follow a complete value.
    assert np.flatnonzero(a.allowed()).tolist() == [tok.eos_token_id]


def test_the_mask_is_the_first_processor(compiler, tok) -> None:
    grammar = compiler.compile(GrammarSpec("choice", json.dumps(["cat", "dog"]), "f"))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=tok.vocab_size).astype(np.float32)
    cat, dog = tok.encode("cat")[0], tok.encode("dog")[0]  # one token each; prefixes like 'c' are allowed too
    for params in (SamplingParams(), SamplingParams(do_sample=True, temperature=2.0, seed=3),
                   SamplingParams(logit_bias={cat: -100.0}), SamplingParams(min_tokens=5, suppress_ids=(50256,))):
        s = Sampler(params, [1, 2])
        s.constrained, s.report_top = True, 5
        c = Constraint(grammar)
        s.allowed = c.allowed()
        assert s.needs_logits
        token, lp = s(logits)
        starts = lambda t: any(w.startswith(tok.decode([t])) for w in ("cat", "dog"))  # noqa: E731
        allowed = np.flatnonzero(s.allowed)
        assert starts(token) and cat in allowed and dog in allowed and all(starts(t) for t in allowed)
        ids, lps = s.top
        assert set(ids.tolist()) <= set(allowed.tolist()) and len(ids) == min(5, len(allowed))
        if params.logit_bias:
            assert token != cat  # the bias applies after the mask
    # At the grammar's end only EOS is allowed: min_tokens cannot suppress it into an empty choice.
    c = Constraint(grammar)
    for t in tok.encode("cat"):
        c.consume(t)
    s = Sampler(SamplingParams(min_tokens=5, suppress_ids=(50256,)), [1])
    s.constrained, s.allowed = True, c.allowed()
    assert s(logits)[0] == 50256
