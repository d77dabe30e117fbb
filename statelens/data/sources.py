"""Token sources: a ``.npy`` of token ids, a ``.jsonl``, a text file, a directory of them, or tables.

Start with :func:`load_tokens`, which returns a :class:`TokenData`. What a path means:

- ``*.npy``: integer token ids, 1-D (one stream, ``kind="stream"``) or 2-D ``[n, len]`` (``n``
  sequences, ``kind="matrix"``). Memory-mapped, never read whole; no tokenizer needed.
- ``*.jsonl``: one JSON object per line; its ``text`` field is one document.
- a directory: every ``.txt``, ``.md`` and ``.jsonl`` file under it, sorted by relative path; each
  text file is one document.
- ``*.parquet``, a ``datasets`` folder (``save_to_disk``), ``hf:ORG/NAME[:SPLIT]``: one document per
  row of the text column, streamed (:mod:`statelens.data.tables`).
- any other file: one UTF-8 text document.

Text is tokenized with the :class:`~statelens.data.tokenizer.Tokenizer` given (``kind="documents"``).
Every problem raises :class:`~statelens.errors.DataError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from statelens.data.tokenizer import Tokenizer
from statelens.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")  # files a directory source reads
SCAN_BLOCK = 1 << 20  # elements read at a time when scanning a memory-mapped array
SEQUENCE_POLICIES = ("cut",)  # values of ``TokenData.sequences(min_doc=...)``


@dataclass(frozen=True, eq=False)
class TokenData:
    """Token ids from one source, as documents.

    Attributes:
        source: the file or directory they came from.
        kind: ``"stream"`` (1-D ``.npy``), ``"matrix"`` (2-D ``.npy``) or ``"documents"`` (text).
        tokenizer_name: how text was tokenized (``"bytes"``, a tokenizer's name), None for ``.npy``.
        documents: 1-D integer arrays, each ``[doc_len]``. One memmap for a stream, row views of the
            memmap for a matrix, int64 arrays for text.
        matrix: the ``[n, len]`` memmap for ``kind="matrix"``, else None.
        hub: for ``hf:ORG/NAME[:SPLIT]``, the dataset's id, revision, resolved commit and split; else None.
    """

    source: Path
    kind: str
    tokenizer_name: str | None
    documents: list[np.ndarray] = field(repr=False)
    matrix: np.ndarray | None = field(default=None, repr=False)
    hub: dict | None = None

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all documents."""
        return sum(int(doc.size) for doc in self._parts())

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    def stream(self) -> np.ndarray:
        """All documents concatenated: shape ``[num_tokens]``.

        A 1-D ``.npy`` (and a C-ordered 2-D one) comes back as a view of the memmap, in the file's
        dtype, without copying; text comes back as a new int64 array.
        """
        parts = self._parts()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def iter_stream(self, chunk: int) -> Iterator[np.ndarray]:
        """Consecutive int64 pieces of :meth:`stream`, each ``[<= chunk]``; all but the last are full.

        Only one piece is in memory at a time, so a large memmap is never read whole.
        """
        if chunk < 1:
            raise DataError(f"{self.source}: chunk must be at least 1, got {chunk}")
        pending: list[np.ndarray] = []
        filled = 0
        for part in self._parts():
            start = 0
            while start < part.size:
                take = min(chunk - filled, part.size - start)
                pending.append(part[start:start + take])
                filled += take
                start += take
                if filled == chunk:
                    yield _join_int64(pending)
                    pending, filled = [], 0
        if pending:
            yield _join_int64(pending)

    def sequences(self, n: int, length: int, *, seed: int = 0, min_doc: str = "cut") -> np.ndarray:
        """``n`` sequences of exactly ``length`` tokens: int64 ``[n, length]``.

        A matrix gives the first ``length`` columns of its first ``n`` rows. Documents give, in order,
        the first ``length`` tokens of each document holding at least ``length``; when fewer than
        ``n`` documents are that long, the sequences are instead consecutive non-overlapping windows
        of :meth:`stream`, ignoring document boundaries (``min_doc="cut"``, the only policy so far).

        The choice is deterministic. ``seed`` is reserved for random sampling and does not change the
        result yet.

        Raises:
            DataError: the data holds too few rows, columns or tokens.
        """
        del seed  # reserved: sampling is deterministic for now
        if min_doc not in SEQUENCE_POLICIES:
            raise DataError(f"{self.source}: unknown min_doc {min_doc!r}; choose from {SEQUENCE_POLICIES}")
        if n < 1 or length < 1:
            raise DataError(f"{self.source}: asked for {n} sequences of length {length}; both must be >= 1")
        if self.matrix is not None:
            rows, cols = self.matrix.shape
            if rows < n or cols < length:
                raise DataError(
                    f"{self.source}: asked for {n} sequences of length {length}, but the file holds "
                    f"{rows} sequences of length {cols}"
                )
            return np.array(self.matrix[:n, :length], dtype=np.int64)
        long_docs = [doc for doc in self.documents if doc.size >= length]
        if len(long_docs) >= n:
            return np.stack([np.asarray(doc[:length], dtype=np.int64) for doc in long_docs[:n]])
        needed = n * length
        available = self.num_tokens
        if available < needed:
            raise DataError(
                f"{self.source}: asked for {n} sequences of length {length} ({needed} tokens) but the "
                f"data holds only {available} tokens"
            )
        head = np.concatenate(list(_take(self._parts(), needed)))
        return head.astype(np.int64, copy=False).reshape(n, length)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise DataError if any token id is >= ``vocab_size``; memmaps are scanned in blocks."""
        offset = 0  # position in the stream of the current block's first token
        for part in self._parts():
            for start in range(0, part.size, SCAN_BLOCK):
                block = part[start:start + SCAN_BLOCK]
                if int(block.max()) >= vocab_size:
                    first = int(np.argmax(block >= vocab_size))
                    raise DataError(
                        f"{self.source}: token id {int(block[first])} at stream position {offset + first} "
                        f"does not fit the model's vocabulary of {vocab_size} ids"
                    )
                offset += block.size

    def _parts(self) -> list[np.ndarray]:
        """1-D arrays whose concatenation is the stream, without copying a C-ordered matrix."""
        if self.matrix is not None and self.matrix.flags.c_contiguous:
            return [self.matrix.reshape(-1)]
        return self.documents


def load_tokens(path: str | Path, tokenizer: Tokenizer | None, *, text_field: str = "text") -> TokenData:
    """Read the token source at ``path`` (see the module docstring for what each kind of path means).

    Args:
        path: a ``.npy``, ``.jsonl``, ``.parquet``, text file, directory, ``datasets`` folder, or
            ``hf:ORG/NAME[:SPLIT]``.
        tokenizer: turns text into ids; may be None for ``.npy`` files only.
        text_field: the string field of each ``.jsonl`` object (the column of a table) that holds the document.

    Raises:
        DataError: the path is missing, unreadable, empty, of the wrong dtype or shape, or holds text
            while ``tokenizer`` is None.
    """
    spec, path, hub = str(path), Path(path), None
    if spec.startswith("hf:"):
        from statelens.data.tables import hub_dataset_files

        files, hub = hub_dataset_files(spec)
        texts = _texts_of_files(files, text_field)
    elif not path.exists():
        raise DataError(f"{path}: no such file or directory")
    elif path.is_file() and path.suffix == ".npy":
        return _load_npy(path)
    else:
        texts = _texts_of(path, text_field)
    if tokenizer is None:
        raise DataError(f"{path}: text needs a tokenizer, and none was given (token .npy files need none)")
    documents = []
    for file, text in texts:
        try:
            ids = tokenizer.encode(text)
        except DataError as err:
            raise DataError(f"{file}: {err}") from err
        if ids.size:  # empty documents are dropped
            documents.append(ids)
    if not documents:
        raise DataError(f"{path}: no text (no document holds any token)")
    return TokenData(source=path, kind="documents", tokenizer_name=tokenizer.name, documents=documents, hub=hub)


def _texts_of(path: Path, text_field: str) -> Iterator[tuple[Path, str]]:
    """(file, document text) of a text source that exists; a directory without text files fails at once."""
    from statelens.data.tables import is_datasets_folder, table_texts

    if is_datasets_folder(path) or (path.is_file() and path.suffix == ".parquet"):
        return table_texts(path, text_field)
    files = _text_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no {', '.join(TEXT_SUFFIXES)} files in this directory")
    return _texts_of_files(files, text_field)


def _texts_of_files(files: list[Path], text_field: str) -> Iterator[tuple[Path, str]]:
    """(file, document text) of text, ``.jsonl`` and ``.parquet`` files, in order, read one file at a time."""
    from statelens.data.tables import table_texts

    for file in files:
        if file.suffix == ".parquet":
            yield from table_texts(file, text_field)
            continue
        text = _read_utf8(file)
        for document in _jsonl_texts(file, text, text_field) if file.suffix == ".jsonl" else [text]:
            yield file, document


def _load_npy(path: Path) -> TokenData:
    """Memory-map a 1-D or 2-D integer ``.npy`` and check it holds no negative id."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # object arrays, bad header, truncated file
        raise DataError(f"{path}: not a .npy array of integer token ids ({err})") from err
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: token ids must be integers, but the array's dtype is {array.dtype}")
    if array.ndim not in (1, 2):
        raise DataError(f"{path}: expected a 1-D or 2-D array of token ids, got shape {array.shape}")
    if array.size == 0:
        raise DataError(f"{path}: the array is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.signedinteger):
        flat = array.reshape(-1, order="A")  # a view for C- and Fortran-ordered files alike
        for start in range(0, flat.size, SCAN_BLOCK):
            if int(flat[start:start + SCAN_BLOCK].min()) < 0:
                raise DataError(f"{path}: holds negative token ids")
    if array.ndim == 1:
        return TokenData(source=path, kind="stream", tokenizer_name=None, documents=[array])
    return TokenData(source=path, kind="matrix", tokenizer_name=None, documents=list(array), matrix=array)


def _text_files(directory: Path) -> list[Path]:
    """Regular files under ``directory`` with a suffix in TEXT_SUFFIXES, sorted by relative path."""
    files = [p for p in directory.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(directory).parts)


def _read_utf8(file: Path) -> str:
    """The file's text; DataError with the offset of the first byte that is not UTF-8."""
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise DataError(f"{file}: cannot read: {err.strerror or err}") from err
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{file}: not valid UTF-8 at byte offset {err.start} (text must be UTF-8)") from err


def _jsonl_texts(file: Path, text: str, text_field: str) -> list[str]:
    """The ``text_field`` string of each non-blank line of a ``.jsonl`` file."""
    texts = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{file} line {number}: bad JSON: {err.msg} at column {err.colno}") from err
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(
                f"{file} line {number}: expected a JSON object with a string field {text_field!r}"
            )
        texts.append(record[text_field])
    return texts


def _take(parts: list[np.ndarray], count: int) -> Iterator[np.ndarray]:
    """The first ``count`` elements of the concatenation of ``parts``, as slices of them."""
    for part in parts:
        if count <= 0:
            return
        piece = part[:count]
        count -= piece.size
        yield piece


def _join_int64(pieces: list[np.ndarray]) -> np.ndarray:
    """A new 1-D int64 array holding ``pieces`` end to end."""
    return np.concatenate([np.asarray(piece, dtype=np.int64) for piece in pieces])
