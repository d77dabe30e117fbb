"""Tokenizers: text to token ids for one model, loaded from local files only.

Start with :func:`load_tokenizer`. It picks, in order:

1. ``tokenizer.json`` in the checkpoint directory, read with the ``tokenizers`` library;
2. other layouts ``transformers.AutoTokenizer`` reads (``tokenizer_config.json``, ``vocab.json`` +
   ``merges.txt``, ...), with ``local_files_only=True`` and ``trust_remote_code=False``;
3. a byte tokenizer (id = one UTF-8 byte, 0..255) when the model has at least 256 ids.

Nothing here touches the network. Every tokenizer checks that the ids it produces fit the model's
vocabulary, so a mismatched tokenizer fails at encoding time with a :class:`DataError`, not later with
an index error inside the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from statelens.errors import DataError

#: Files whose presence means ``transformers.AutoTokenizer`` may be able to read the directory.
_HF_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")

BYTE_VOCAB_SIZE = 256


class Tokenizer(ABC):
    """Text -> 1-D int64 token ids, checked against the model's vocabulary.

    Attributes:
        name: what the CLI shows, e.g. ``"bytes"`` or ``"tokenizer.json at ckpt/tokenizer.json"``.
        vocab_size: number of ids the tokenizer itself can produce (0 .. vocab_size - 1).
        model_vocab_size: number of ids the model accepts; :meth:`encode` refuses ids at or above it.
    """

    def __init__(self, name: str, vocab_size: int, model_vocab_size: int) -> None:
        self.name = name
        self.vocab_size = vocab_size
        self.model_vocab_size = model_vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``: int64 array of shape ``[num_tokens]``.

        Raises:
            DataError: an id is >= ``model_vocab_size`` (the tokenizer does not match the model).
        """
        ids = np.asarray(self._encode(text), dtype=np.int64).reshape(-1)
        if ids.size and int(ids.max()) >= self.model_vocab_size:
            raise DataError(
                f"{self.name}: produced token id {int(ids.max())}, but the model's vocabulary has only "
                f"{self.model_vocab_size} ids (tokenizer and model do not match)"
            )
        return ids

    @abstractmethod
    def _encode(self, text: str) -> Sequence[int] | np.ndarray:
        """Raw token ids of ``text``, before the vocabulary check."""

    @abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids`` (shape ``[num_tokens]``); special tokens are kept."""


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: ids 0..255. Decoding replaces invalid byte sequences with U+FFFD."""

    def __init__(self, model_vocab_size: int) -> None:
        super().__init__("bytes", BYTE_VOCAB_SIZE, model_vocab_size)

    def _encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= BYTE_VOCAB_SIZE):
            bad = ids[(ids < 0) | (ids >= BYTE_VOCAB_SIZE)][0]
            raise DataError(f"{self.name}: cannot decode id {int(bad)}, which is not a byte (0..255)")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class JsonTokenizer(Tokenizer):
    """A ``tokenizer.json`` read with the ``tokenizers`` library (special tokens added as it says)."""

    def __init__(self, path: Path, model_vocab_size: int) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises its own exception types for bad JSON / models
            raise DataError(f"{path}: cannot read tokenizer: {_first_line(err)}") from err
        super().__init__(f"tokenizer.json at {path}", self._tok.get_vocab_size(with_added_tokens=True),
                         model_vocab_size)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


class TransformersTokenizer(Tokenizer):
    """A tokenizer ``transformers.AutoTokenizer`` reads from local files (no network, no remote code)."""

    def __init__(self, directory: Path, model_vocab_size: int) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok: Any = AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
        except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for bad layouts
            raise DataError(f"{directory}: cannot load tokenizer: {_first_line(err)}") from err
        super().__init__(f"transformers tokenizer at {directory}", len(self._tok), model_vocab_size)

    def _encode(self, text: str) -> list[int]:
        return self._tok(text)["input_ids"]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def load_tokenizer(ckpt_dir: str | Path | None, vocab_size: int) -> Tokenizer:
    """The tokenizer for a model with ``vocab_size`` ids whose checkpoint is ``ckpt_dir``.

    Reads ``ckpt_dir/tokenizer.json`` if present, else any layout ``transformers.AutoTokenizer`` reads
    from local files, else falls back to bytes when ``vocab_size >= 256``.

    Raises:
        DataError: the tokenizer files cannot be read, or there are none and ``vocab_size < 256``.
    """
    if ckpt_dir is not None:
        directory = Path(ckpt_dir)
        if (directory / "tokenizer.json").is_file():
            return JsonTokenizer(directory / "tokenizer.json", vocab_size)
        if any((directory / name).is_file() for name in _HF_TOKENIZER_FILES):
            return TransformersTokenizer(directory, vocab_size)
    if vocab_size >= BYTE_VOCAB_SIZE:
        return ByteTokenizer(vocab_size)
    where = ckpt_dir if ckpt_dir is not None else "no checkpoint directory"
    raise DataError(
        f"{where}: no tokenizer, and the vocabulary ({vocab_size} ids) is smaller than 256 bytes, so text "
        "cannot be tokenized (token .npy files still work)"
    )


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, to keep DataError messages one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
