"""Tests for model.tokenizer against the transformers GPT-2 tokenizer (built from local files)."""

import random
import shutil
from pathlib import Path

import pytest

from model.tokenizer import GPT2Tokenizer, IncrementalDecoder, default_bpe_files

TEXTS = [
    "",
    "Hello world",
    " leading space",
    "trailing space ",
    "  both  ",
    "   ",
    "don't I'M we'll they've she'd it's YOU'RE",
    "😀",
    "👨‍👩‍👧‍👦 family (ZWJ sequence)",
    "flags 🇫🇷🇯🇵 and 🏳️‍🌈",
    "日本語のテキスト",
    "中文测试，标点。",
    "한국어 문장",
    "e\u0301 combining, Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗",
    "مرحبا بالعالم",
    "a    b     c",
    "\n\n\n",
    "line1\nline2\r\n\n  indented",
    "\ttab\t\t x \t",
    "x<|endoftext|>y",
    "<|endoftext|><|endoftext|>",
    " <|endoftext|> ",
    "mixed 🤗 text 中 with émoji and ß",
    "\u200b zero width \ufeff bom",
    "1234567890 3.14159 $100",
]


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gpt2_bpe")
    vocab, merges = default_bpe_files()
    shutil.copy(vocab, d / "vocab.json")
    shutil.copy(merges, d / "merges.txt")
    return d


@pytest.fixture(scope="session")
def tok(bpe_dir: Path) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_dir(bpe_dir)


@pytest.fixture(scope="session")
def hf_tok(bpe_dir: Path):
    transformers = pytest.importorskip("transformers")
    # NB: transformers 5 silently ignores vocab_file=/merges_file= kwargs (empty vocab!);
    # loading the local folder works in v4 and v5 and never downloads.
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(bpe_dir))
    assert len(ref) == 50257 and ref("Hello world")["input_ids"] == [15496, 995]
    return ref


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tok: GPT2Tokenizer, hf_tok, text: str) -> None:
    assert tok.encode(text) == hf_tok(text)["input_ids"]


def test_encode_batch_matches_encode(tok: GPT2Tokenizer) -> None:
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_special_token_and_sizes(tok: GPT2Tokenizer) -> None:
    assert tok.eos_token_id == 50256
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.decode([15496, 50256, 995], skip_special_tokens=True) == "Hello world"


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok: GPT2Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert hf_tok.decode(ids) == text


def _stream(tok: GPT2Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    dec = IncrementalDecoder(tok)
    return [dec.push(i) for i in ids], dec.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_reassembles_text(tok: GPT2Tokenizer, text: str) -> None:
    pieces, tail = _stream(tok, tok.encode(text))
    assert "".join(pieces) == text
    assert tail == ""
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_waits_for_multi_token_char(tok: GPT2Tokenizer) -> None:
    ids = tok.encode("🤗")
    assert len(ids) == 3  # 4 UTF-8 bytes split over 3 byte-level tokens
    assert all("\ufffd" in tok.id_to_token_text(i) for i in ids)
    dec = IncrementalDecoder(tok)
    assert dec.push(ids[0]) == ""
    assert dec.push(ids[1]) == ""
    assert dec.pending == "🤗".encode()[:3]
    assert dec.push(ids[2]) == "🤗"
    assert dec.pending == b""
    assert dec.flush() == ""


def test_incremental_flush_incomplete_and_reuse(tok: GPT2Tokenizer) -> None:
    ids = tok.encode("a🤗")
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in ids[:-1]) == "a"
    assert dec.flush() == "\ufffd" == tok.decode(ids[:-1])[1:]
    assert dec.push(tok.encode("b")[0]) == "b"  # state was reset


def test_incremental_matches_decode_on_random_ids(tok: GPT2Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size + 5) for _ in range(rng.randrange(1, 12))]  # incl. unknown ids
        pieces, tail = _stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids)


def test_incremental_skip_special_tokens(tok: GPT2Tokenizer) -> None:
    ids = tok.encode("a<|endoftext|>b")
    dec = IncrementalDecoder(tok, skip_special_tokens=True)
    assert "".join(dec.push(i) for i in ids) == "ab" == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_tile_text(tok: GPT2Tokenizer, text: str) -> None:
    rows = tok.encode_with_offsets(text)
    assert [r[0] for r in rows] == tok.encode(text)
    assert all(t == tok.id_to_token_text(i) for i, t, _, _ in rows)
    assert "".join(text[a:b] for _, _, a, b in rows) == text
    pos = 0
    for _, _, a, b in rows:
        assert a == pos <= b
        pos = b


def test_offsets_multibyte_chars(tok: GPT2Tokenizer) -> None:
    text = "a 🤗日x"
    rows = tok.encode_with_offsets(text)
    # Each char belongs to the token completing its bytes; partial tokens get empty spans.
    assert [text[a:b] for _, _, a, b in rows if a < b] == ["a", " ", "🤗", "日", "x"]
    assert any(a == b for _, _, a, b in rows)


def test_from_dir_prefers_tokenizer_json(tok: GPT2Tokenizer, hf_tok, tmp_path: Path) -> None:
    hf_tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.json").write_text("not json")  # must be ignored
    loaded = GPT2Tokenizer.from_dir(tmp_path)
    assert loaded.eos_token_id == 50256 and loaded.vocab_size == 50257
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_from_dir_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.json.*merges\.txt") as e:
        GPT2Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing: merges\.txt"):
        GPT2Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT2Tokenizer.from_dir(tmp_path / "nope")


def test_from_dir_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(ValueError, match="tokenizer.json"):
        GPT2Tokenizer.from_dir(tmp_path)
