"""Tests for statelens.data: token sources and tokenizers.

Every expected value is computed another way: with numpy directly, with ``str.encode``, or with the
``tokenizers`` library itself.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statelens.data import TokenData, load_tokenizer, load_tokens
from statelens.errors import BadInput, DataError

BYTES = load_tokenizer(None, 256)


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def _utf8(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def _train_word_level(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return tok


# --- .npy token files -------------------------------------------------------------------------------


def test_npy_1d_round_trip_is_memory_mapped(tmp_path):
    tokens = np.array([5, 0, 7, 65535, 3], dtype=np.int32)
    np.save(tmp_path / "t.npy", tokens)

    data = load_tokens(tmp_path / "t.npy", None)

    assert (data.kind, data.tokenizer_name, data.num_documents, data.num_tokens) == ("stream", None, 1, 5)
    np.testing.assert_array_equal(data.stream(), tokens)
    assert isinstance(data.stream(), np.memmap)
    assert data.stream() is data.documents[0]


def test_npy_2d_rows_are_views_of_the_memmap(tmp_path):
    tokens = np.arange(24, dtype=np.uint16).reshape(4, 6)
    np.save(tmp_path / "m.npy", tokens)

    data = load_tokens(tmp_path / "m.npy", None)

    assert (data.kind, data.num_documents, data.num_tokens) == ("matrix", 4, 24)
    assert isinstance(data.matrix, np.memmap)
    for row, expected in zip(data.documents, tokens):
        np.testing.assert_array_equal(row, expected)
        assert np.shares_memory(row, data.matrix)
    np.testing.assert_array_equal(data.stream(), tokens.reshape(-1))
    seqs = data.sequences(3, 5)
    assert seqs.dtype == np.int64
    np.testing.assert_array_equal(seqs, tokens[:3, :5])


def test_npy_fortran_order_streams_row_by_row(tmp_path):
    tokens = np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4))
    np.save(tmp_path / "f.npy", tokens)

    data = load_tokens(tmp_path / "f.npy", None)

    np.testing.assert_array_equal(data.stream(), np.ascontiguousarray(tokens).reshape(-1))
    np.testing.assert_array_equal(np.concatenate(list(data.iter_stream(5))), np.arange(12))


def test_npy_matrix_too_small_for_sequences(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((2, 4), dtype=np.int64))
    data = load_tokens(tmp_path / "m.npy", None)

    with pytest.raises(DataError, match=r"asked for 3 sequences of length 4.*holds 2 sequences of length 4"):
        data.sequences(3, 4)
    with pytest.raises(DataError, match=r"holds 2 sequences of length 4") as info:
        data.sequences(2, 5)
    assert str(tmp_path / "m.npy") in str(info.value)


def test_check_vocab_finds_the_first_id_too_large(tmp_path):
    tokens = np.array([1, 2, 300, 4, 301], dtype=np.int64)
    np.save(tmp_path / "t.npy", tokens)
    data = load_tokens(tmp_path / "t.npy", None)

    data.check_vocab(int(tokens.max()) + 1)  # every id fits: no error
    with pytest.raises(DataError, match=r"token id 300 at stream position 2") as info:
        data.check_vocab(300)
    assert str(tmp_path / "t.npy") in str(info.value)


# --- tokenizers --------------------------------------------------------------------------------------


def test_byte_tokenizer_encodes_utf8_bytes_and_decodes_back():
    text = "héllo"

    ids = BYTES.encode(text)

    assert BYTES.name == "bytes" and BYTES.vocab_size == 256
    assert ids.dtype == np.int64
    assert ids.tolist() == list(text.encode("utf-8"))
    assert BYTES.decode(ids) == text
    assert BYTES.decode([0x68, 0xFF]) == "h\ufffd"  # invalid UTF-8 is replaced, not an error


def test_byte_tokenizer_when_checkpoint_has_no_tokenizer(tmp_path):
    """Only for a byte-sized vocabulary (256 ids plus a few, padded); larger ones: tests/test_tokenizer_choice.py."""
    tok = load_tokenizer(tmp_path, 264)
    assert tok.name == "bytes"
    assert tok.encode("ab").tolist() == [ord("a"), ord("b")]


def test_tokenizer_json_encodes_like_the_tokenizers_library(tmp_path):
    from tokenizers import Tokenizer

    texts = ["the cat sat on the mat", "a dog sat on a log", "the dog and the cat"]
    _train_word_level(texts).save(str(tmp_path / "tokenizer.json"))
    direct = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))

    tok = load_tokenizer(tmp_path, 1000)

    assert "tokenizer.json" in tok.name and str(tmp_path) in tok.name
    assert tok.vocab_size == direct.get_vocab_size(with_added_tokens=True)
    for text in [*texts, "the unknown zebra"]:
        assert tok.encode(text).tolist() == direct.encode(text).ids
    assert tok.decode(tok.encode("the cat")) == direct.decode(direct.encode("the cat").ids)


def test_tokenizer_ids_beyond_the_model_vocabulary_raise(tmp_path):
    from tokenizers import Tokenizer

    _train_word_level(["x y z w v u"]).save(str(tmp_path / "tokenizer.json"))
    top = max(Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("x y z w v u").ids)

    tok = load_tokenizer(tmp_path, top)  # one id too few

    with pytest.raises(DataError, match=f"produced token id {top}") as info:
        tok.encode("x y z w v u")
    assert tok.name in str(info.value)


def test_transformers_layout_without_tokenizer_json(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world", "the cat sat on the mat"] * 5, vocab_size=280, min_frequency=1)
    bpe.save_model(str(tmp_path))  # vocab.json + merges.txt
    _write(tmp_path / "tokenizer_config.json", json.dumps({"tokenizer_class": "GPT2Tokenizer"}))

    tok = load_tokenizer(tmp_path, 1000)

    assert "transformers" in tok.name
    assert tok.encode("hello the mat").tolist() == bpe.encode("hello the mat").ids


def test_unreadable_tokenizer_files_raise(tmp_path):
    _write(tmp_path / "tokenizer.json", "{not json")
    with pytest.raises(DataError) as info:
        load_tokenizer(tmp_path, 1000)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def test_no_tokenizer_and_small_vocab_raises(tmp_path):
    with pytest.raises(DataError, match=r"smaller than 256") as info:
        load_tokenizer(tmp_path, 100)
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, BadInput)


# --- text sources ------------------------------------------------------------------------------------


def test_jsonl_documents_are_the_texts(tmp_path):
    texts = ["first doc", "zweites Dokument: ü", "third\nwith a newline"]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    path = _write(tmp_path / "d.jsonl", lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")

    data = load_tokens(path, BYTES)

    assert (data.kind, data.tokenizer_name, data.num_documents) == ("documents", "bytes", 3)
    assert [doc.astype(np.uint8).tobytes() for doc in data.documents] == [t.encode() for t in texts]
    assert data.num_tokens == sum(len(t.encode()) for t in texts)


def test_jsonl_text_field_is_a_parameter(tmp_path):
    path = _write(tmp_path / "d.jsonl", json.dumps({"body": "abc", "text": 1}) + "\n")
    data = load_tokens(path, BYTES, text_field="body")
    np.testing.assert_array_equal(data.stream(), _utf8("abc"))


def test_directory_reads_text_files_in_sorted_relative_order(tmp_path):
    root = tmp_path / "corpus"
    contents = {  # in the order expected: sorted by relative path parts
        "a/c.txt": "cc",
        "a/z.md": "zz",
        "b.txt": "bb",
        "sub/d.jsonl": json.dumps({"text": "d1"}) + "\n" + json.dumps({"text": "d2"}),
    }
    for rel in reversed(list(contents)):
        _write(root / rel, contents[rel])
    _write(root / "ignored.bin", b"\xff\xfe")
    _write(root / "a" / "ignored.npy", b"not read")

    data = load_tokens(root, BYTES)

    assert [BYTES.decode(doc) for doc in data.documents] == ["cc", "zz", "bb", "d1", "d2"]


def test_plain_text_file_is_one_document(tmp_path):
    text = "any suffix at all\nis text ☃"
    data = load_tokens(_write(tmp_path / "notes.log", text), BYTES)
    assert data.num_documents == 1
    np.testing.assert_array_equal(data.documents[0], _utf8(text))


def test_sequences_take_long_documents_first(tmp_path):
    texts = ["0123456789", "abc", "ABCDEFGH"]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
    data = load_tokens(path, BYTES)

    seqs = data.sequences(2, 5)

    np.testing.assert_array_equal(seqs, np.stack([_utf8("01234"), _utf8("ABCDE")]))


def test_sequences_fall_back_to_windows_of_the_stream(tmp_path):
    texts = ["0123456789", "abc", "ABCDEFGH"]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
    data = load_tokens(path, BYTES)
    stream = _utf8("".join(texts))

    seqs = data.sequences(3, 6)  # only two documents hold 6 tokens

    assert seqs.dtype == np.int64
    np.testing.assert_array_equal(seqs, np.stack([stream[0:6], stream[6:12], stream[12:18]]))
    np.testing.assert_array_equal(data.stream(), stream)


def test_sequences_from_a_1d_npy_are_windows(tmp_path):
    tokens = np.arange(20, dtype=np.int32)
    np.save(tmp_path / "t.npy", tokens)
    data = load_tokens(tmp_path / "t.npy", None)

    np.testing.assert_array_equal(data.sequences(3, 6, seed=7), tokens[:18].reshape(3, 6))


def test_too_few_tokens_for_sequences(tmp_path):
    path = _write(tmp_path / "short.txt", "abcdefg")
    data = load_tokens(path, BYTES)

    with pytest.raises(DataError) as info:
        data.sequences(2, 4)
    message = str(info.value)
    assert str(path) in message
    assert "asked for 2 sequences of length 4 (8 tokens) but the data holds only 7 tokens" in message


def test_iter_stream_pieces_concatenate_to_the_stream(tmp_path):
    tokens = np.arange(23, dtype=np.int16)
    np.save(tmp_path / "t.npy", tokens)
    npy = load_tokens(tmp_path / "t.npy", None)
    docs = load_tokens(_write(tmp_path / "d.jsonl", '{"text": "abcde"}\n{"text": "fgh"}'), BYTES)

    for data, expected in [(npy, tokens), (docs, _utf8("abcdefgh"))]:
        pieces = list(data.iter_stream(4))
        assert all(p.dtype == np.int64 for p in pieces)
        sizes = [min(4, expected.size - start) for start in range(0, expected.size, 4)]
        assert [p.size for p in pieces] == sizes
        np.testing.assert_array_equal(np.concatenate(pieces), expected)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=6),
    chunk=st.integers(1, 9),
    n=st.integers(1, 4),
    length=st.integers(1, 8),
)
def test_stream_and_sequences_agree_with_numpy(lengths, chunk, n, length):
    rng = np.random.default_rng(sum(lengths) + chunk)
    documents = [rng.integers(0, 256, size=k, dtype=np.int64) for k in lengths]
    data = TokenData(source=Path("mem"), kind="documents", tokenizer_name="bytes", documents=documents)
    stream = np.concatenate(documents)

    np.testing.assert_array_equal(np.concatenate([np.zeros(0, np.int64), *data.iter_stream(chunk)]), stream)
    long_docs = [d[:length] for d in documents if d.size >= length]
    if len(long_docs) >= n:
        np.testing.assert_array_equal(data.sequences(n, length), np.stack(long_docs[:n]))
    elif stream.size >= n * length:
        np.testing.assert_array_equal(data.sequences(n, length), stream[: n * length].reshape(n, length))
    else:
        with pytest.raises(DataError, match="holds only"):
            data.sequences(n, length)


# --- bad inputs --------------------------------------------------------------------------------------


class _TouchOnUnpickle:
    """Unpickling this creates a file, so a test can tell whether a pickle was ever loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _object_npy(tmp_path: Path) -> Path:
    array = np.array([_TouchOnUnpickle(tmp_path / "unpickled"), 1], dtype=object)
    np.save(tmp_path / "obj.npy", array, allow_pickle=True)
    assert pickle.loads(pickle.dumps(array[0])) is None and (tmp_path / "unpickled").exists()
    (tmp_path / "unpickled").unlink()  # the marker works; remove it before the real test
    return tmp_path / "obj.npy"


def _npy(tmp_path: Path, array: np.ndarray) -> Path:
    np.save(tmp_path / "bad.npy", array)
    return tmp_path / "bad.npy"


BAD_INPUTS = {
    "missing": (lambda p: p / "nope.txt", "no such file or directory"),
    "non-utf8": (lambda p: _write(p / "latin.txt", b"abc\xe9def"), "not valid UTF-8 at byte offset 3"),
    "bad-json": (
        lambda p: _write(p / "d.jsonl", '{"text": "ok"}\n{"text": oops}\n'),
        "line 2: bad JSON",
    ),
    "missing-field": (lambda p: _write(p / "d.jsonl", '{"body": "x"}\n'), "line 1: expected a JSON object"),
    "non-string-field": (
        lambda p: _write(p / "d.jsonl", '\n{"text": 3}\n'),
        "line 2: expected a JSON object",
    ),
    "float-npy": (lambda p: _npy(p, np.ones(4, dtype=np.float32)), "dtype is float32"),
    "object-npy": (_object_npy, "not a .npy array of integer token ids"),
    "3d-npy": (lambda p: _npy(p, np.zeros((2, 2, 2), dtype=np.int64)), "got shape (2, 2, 2)"),
    "negative-ids": (lambda p: _npy(p, np.array([3, -1, 2], dtype=np.int64)), "negative token ids"),
    "empty-npy": (lambda p: _npy(p, np.zeros((0, 3), dtype=np.int32)), "empty"),
    "truncated-npy": (lambda p: _write(p / "zero.npy", b""), "not a .npy array"),
    "empty-text": (lambda p: _write(p / "empty.txt", b""), "no text"),
    "empty-jsonl": (lambda p: _write(p / "empty.jsonl", "\n\n"), "no text"),
    "empty-dir": (lambda p: (p / "corpus").mkdir() or p / "corpus", "no .txt, .md, .jsonl files"),
    "dir-without-text": (lambda p: _write(p / "corpus" / "x.bin", b"1").parent, "no .txt, .md, .jsonl files"),
    "bad-file-in-dir": (
        lambda p: _write(p / "corpus" / "b" / "x.md", b"\xff").parent.parent,
        "byte offset 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_data_error_naming_the_file(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)

    with pytest.raises(DataError) as info:
        load_tokens(path, BYTES)

    message = str(info.value)
    assert expected in message
    bad_file = path / "b" / "x.md" if case == "bad-file-in-dir" else path
    assert str(bad_file) in message
    assert "\n" not in message
    assert not (tmp_path / "unpickled").exists()


def test_text_without_a_tokenizer_raises(tmp_path):
    path = _write(tmp_path / "t.txt", "hello")
    with pytest.raises(DataError, match="text needs a tokenizer") as info:
        load_tokens(path, None)
    assert str(path) in str(info.value)


def test_encoding_errors_name_the_file(tmp_path):
    _train_word_level(["x y z"]).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, 1)
    path = _write(tmp_path / "t.txt", "z y x")

    with pytest.raises(DataError) as info:
        load_tokens(path, tok)
    assert str(path) in str(info.value) and tok.name in str(info.value)
