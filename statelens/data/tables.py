"""Text stored in tables: ``.parquet`` files, ``datasets`` folders (``save_to_disk``), hub datasets.

Start with :func:`table_texts`, which yields one document (a string) per row of the text column,
streaming: a parquet file is read by record batch within its row groups (``ParquetFile.iter_batches``),
a ``datasets`` folder by record batch of its Arrow files, so no table is held in memory whole.

- ``*.parquet``: the column ``text_field`` (a string column).
- a ``datasets`` folder: ``state.json`` + ``dataset_info.json`` + the Arrow stream files ``state.json``
  lists (``_data_files``), as ``Dataset.save_to_disk`` writes them; read with pyarrow alone, so the
  ``datasets`` library is not needed. A ``DatasetDict`` folder (``dataset_dict.json``) is refused with
  its splits named: pass ``DIR/SPLIT``.
- ``hf:ORG/NAME[:SPLIT]``: a dataset repository on the Hugging Face Hub, resolved like a checkpoint
  (the local cache first, ``HF_HUB_OFFLINE`` respected; :mod:`statelens.hub`), fetching only the
  parquet files of the split (default ``train``: files named ``SPLIT-*.parquet``, ``SPLIT.parquet``
  or under a ``SPLIT/`` folder, as the Hub's parquet conversion names them).

A null in the text column is an empty document (dropped, as an empty line of text is). Every problem
raises :class:`~statelens.errors.DataError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from statelens.data.tokenizer import _first_line
from statelens.errors import DataError

BATCH_ROWS = 1024  # rows per record batch read at a time
_HUB_DATASET = re.compile(r"hf:(?P<repo>[^:]+?)(?::(?P<split>[\w.-]+))?")


def is_datasets_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def table_texts(path: Path, text_field: str) -> Iterator[tuple[Path, str]]:
    """(file, text) for each row of a ``.parquet`` file or a ``datasets`` folder, in order."""
    if path.is_dir():
        yield from _datasets_folder_texts(path, text_field)
    else:
        yield from ((path, text) for text in _parquet_texts(path, text_field))


def hub_dataset_files(spec: str) -> tuple[list[Path], dict]:
    """The parquet files of ``hf:ORG/NAME[:SPLIT]``'s split, sorted, and the hub source as run.json keeps
    it. Raises BadInput when the repository cannot be resolved, DataError when the split has no parquet."""
    from statelens import hub

    match = _HUB_DATASET.fullmatch(spec)
    if match is None or hub.parse_hub_id(match["repo"]) is None:
        raise DataError(f"{spec}: expected hf:ORG/NAME or hf:ORG/NAME:SPLIT")
    split = match["split"] or "train"
    patterns = [f"{split}-*.parquet", f"**/{split}-*.parquet", f"{split}.parquet", f"**/{split}.parquet",
                f"{split}/*.parquet", f"**/{split}/*.parquet"]
    folder, source = hub.resolve(match["repo"], patterns, what="dataset", required=(), repo_type="dataset")
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise DataError(f"{spec}: the dataset has no parquet files for split {split!r} "
                        f"(looked for {split}-*.parquet, {split}.parquet, {split}/*.parquet)")
    return files, source.to_json() | {"split": split}


def _parquet_texts(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file}: not a parquet file ({_first_line(err)})") from None
    _check_column(file, table.schema_arrow, text_field)
    for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=[text_field]):
        yield from (text or "" for text in batch.column(0).to_pylist())


def _datasets_folder_texts(folder: Path, text_field: str) -> Iterator[tuple[Path, str]]:
    import pyarrow as pa

    if (folder / "dataset_dict.json").is_file():
        splits = _read_json(folder / "dataset_dict.json").get("splits", [])
        raise DataError(f"{folder}: a datasets DatasetDict with splits {', '.join(map(str, splits))}; pass "
                        f"--data {folder}/SPLIT")
    state = _read_json(folder / "state.json")
    files = [entry.get("filename") for entry in state.get("_data_files", []) if isinstance(entry, dict)]
    if not files or not all(isinstance(name, str) and (folder / name).is_file() for name in files):
        raise DataError(f"{folder}: state.json lists no Arrow data files that exist (_data_files); not a "
                        "folder written by datasets' save_to_disk")
    for name in files:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(folder / name)))
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{folder / name}: not an Arrow stream file ({_first_line(err)})") from None
        _check_column(folder / name, reader.schema, text_field)
        for batch in reader:
            yield from ((folder / name, text or "") for text in batch.column(text_field).to_pylist())


def _check_column(file: Path, schema, text_field: str) -> None:
    """DataError unless ``schema`` has a string column ``text_field``."""
    import pyarrow as pa

    if text_field not in schema.names:
        raise DataError(f"{file}: no column {text_field!r} (columns: {', '.join(schema.names)}); name the text "
                        "column with --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{file}: column {text_field!r} holds {kind}, not text; name the text column with --text-field")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{file}: not a readable JSON file ({_first_line(err)})") from None
    if not isinstance(data, dict):
        raise DataError(f"{file}: expected a JSON object")
    return data
