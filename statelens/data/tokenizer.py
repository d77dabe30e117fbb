"""Tokenizers: text to token ids for one model. Start with :func:`load_tokenizer`. It picks, in order:

1. the tokenizer asked for (``--tokenizer``): ``"bytes"``, a ``tokenizer.json`` file, a directory, or a
   hub id ``ORG/NAME[@REVISION]`` resolved through the local Hugging Face cache like a checkpoint;
2. ``tokenizer.json`` in the checkpoint directory, read with the ``tokenizers`` library;
3. other layouts ``transformers.AutoTokenizer`` reads (``tokenizer_config.json``, ``vocab.json`` +
   ``merges.txt``, ...), with ``local_files_only=True`` and ``trust_remote_code=False``;
4. a byte tokenizer (id = one UTF-8 byte, 0..255) when the vocabulary is byte-sized (256 to 512 ids);
5. the tokenizer the checkpoint's family was trained with (mamba-ssm's published checkpoints ship none:
   GPT-NeoX-20B's, ``EleutherAI/gpt-neox-20b``), through the hub cache;
6. else a refusal naming ``--tokenizer``: scoring text as bytes with a 50,280-token model would make
   every number meaningless.

Every tokenizer checks that the ids it produces fit the model's vocabulary, so a mismatched tokenizer
fails at encoding time with a :class:`DataError`, not later with an index error inside the model.
``Tokenizer.record()`` is what run.json keeps: the name, the hub id if any, and a sha256 of its files.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from statelens import hub
from statelens.errors import BadInput, DataError

#: Files whose presence means ``transformers.AutoTokenizer`` may be able to read the directory.
_HF_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")

BYTE_VOCAB_SIZE = 256
BYTE_SIZED = 512  # vocabularies up to this many ids are bytes (plus a few special ids, padded)
#: What a tokenizer hub id fetches, and the files of which it must hold one.
HUB_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", *_HF_TOKENIZER_FILES[1:]]
HUB_REQUIRED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
GPT_NEOX = "EleutherAI/gpt-neox-20b"  # mamba-ssm's published Mamba and Mamba-2 checkpoints were trained with it


class Tokenizer(ABC):
    """Text -> 1-D int64 token ids, checked against the model's vocabulary.

    Attributes:
        name: what the CLI shows, e.g. ``"bytes"`` or ``"tokenizer.json at ckpt/tokenizer.json"``.
        vocab_size: number of ids the tokenizer itself can produce (0 .. vocab_size - 1).
        model_vocab_size: number of ids the model accepts; :meth:`encode` refuses ids at or above it.
    """

    def __init__(self, name: str, vocab_size: int, model_vocab_size: int, files: Sequence[Path] = ()) -> None:
        self.name = name
        self.vocab_size = vocab_size
        self.model_vocab_size = model_vocab_size
        self.files = tuple(files)                  # the files it was read from (none for bytes)
        self.source: hub.HubSource | None = None   # the hub id it was resolved from, if any

    def record(self) -> dict:
        """What run.json keeps: name, hub id (or None) and sha256 over the files' names and bytes."""
        digest = hashlib.sha256()
        for file in sorted(self.files):
            digest.update(file.name.encode() + file.read_bytes())
        return {"name": self.name, "hub": self.source.to_json() if self.source else None,
                "sha256": digest.hexdigest() if self.files else None}

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
                         model_vocab_size, [path])

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
        files = [directory / name for name in HUB_FILES if (directory / name).is_file()]
        super().__init__(f"transformers tokenizer at {directory}", len(self._tok), model_vocab_size, files)

    def _encode(self, text: str) -> list[int]:
        return self._tok(text)["input_ids"]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def load_tokenizer(ckpt_dir: str | Path | None, vocab_size: int, *, spec: str | None = None,
                   family: str | None = None) -> Tokenizer:
    """The tokenizer for a model with ``vocab_size`` ids whose checkpoint is ``ckpt_dir``, in the order of
    the module docstring.

    Args:
        spec: ``--tokenizer``: "bytes", a ``tokenizer.json``, a directory or a hub id; None to choose.
        family: the hub id of the tokenizer the checkpoint's family uses (:func:`family_tokenizer`), tried
            when the checkpoint has none and its vocabulary is not byte-sized.

    Raises:
        DataError: the tokenizer cannot be read or resolved, or there is none the vocabulary allows.
    """
    if spec is not None:
        return _asked_for(spec, vocab_size)
    if ckpt_dir is not None:
        found = _in_directory(Path(ckpt_dir), vocab_size)
        if found is not None:
            return found
    where = ckpt_dir if ckpt_dir is not None else "no checkpoint directory"
    if vocab_size < BYTE_VOCAB_SIZE:
        raise DataError(f"{where}: no tokenizer, and the vocabulary ({vocab_size} ids) is smaller than 256 bytes, so "
                        "text cannot be tokenized (token .npy files still work)")
    if vocab_size <= BYTE_SIZED:
        return ByteTokenizer(vocab_size)
    if family is None:
        raise DataError(f"{where}: no tokenizer, and the vocabulary ({vocab_size} ids) is far larger than 256 bytes; "
                        "pass --tokenizer PATH_OR_HUB_ID (or --tokenizer bytes to score bytes anyway)")
    try:
        return _asked_for(family, vocab_size)
    except BadInput as error:
        raise DataError(f"{where}: no tokenizer; its family's is {family}, which cannot be used ({error}); pass "
                        "--tokenizer PATH_OR_HUB_ID") from None


def family_tokenizer(raw_config: dict) -> str | None:
    """The hub id of the tokenizer a checkpoint's family was trained with, from its config.json: mamba-ssm
    layouts (``d_model``, ``n_layer``, no ``model_type``) with GPT-NeoX's 50,277 ids (padded or not) ->
    ``EleutherAI/gpt-neox-20b``; else None."""
    mamba_ssm = "model_type" not in raw_config and "d_model" in raw_config and "n_layer" in raw_config
    vocab = raw_config.get("vocab_size")
    return GPT_NEOX if mamba_ssm and isinstance(vocab, int) and 50277 <= vocab <= 50288 else None


def _asked_for(spec: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """``--tokenizer``: bytes, a tokenizer.json file, a directory or a hub id."""
    if str(spec) == "bytes":
        if vocab_size < BYTE_VOCAB_SIZE:
            raise DataError(f"--tokenizer bytes: the model has only {vocab_size} ids, fewer than 256 bytes")
        return ByteTokenizer(vocab_size)
    path = Path(spec)
    if path.is_file():
        return JsonTokenizer(path, vocab_size)
    directory, source = hub.resolve(spec, HUB_FILES, what="tokenizer", required=HUB_REQUIRED)
    if not directory.is_dir():
        raise DataError(f"--tokenizer {spec}: no such file or directory, and not a hub id ORG/NAME")
    found = _in_directory(directory, vocab_size)
    if found is None:
        raise DataError(f"--tokenizer {spec}: no tokenizer files in {directory}")
    found.source = source
    if source is not None:
        found.name = f"{found.name.split(' at ')[0]} of {source.describe()}"
    return found


def _in_directory(directory: Path, vocab_size: int) -> Tokenizer | None:
    """The tokenizer stored in ``directory`` (tokenizer.json first), or None when it holds none."""
    if (directory / "tokenizer.json").is_file():
        return JsonTokenizer(directory / "tokenizer.json", vocab_size)
    if any((directory / name).is_file() for name in _HF_TOKENIZER_FILES):
        return TransformersTokenizer(directory, vocab_size)
    return None


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, to keep DataError messages one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
