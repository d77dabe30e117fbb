"""Corpora as people store them: the same documents as .txt files, .jsonl, .parquet, a ``datasets`` folder
and a hub dataset (``hf:ORG/NAME:SPLIT``, from a cache built by hand) give byte-identical CSVs."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from hubcache import cache, no_network, publish  # noqa: F401  (fixtures)
from statelens.data import ByteTokenizer, load_tokens

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DOCS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (6 + 3 * i) for i in range(3)]
OPTIONS = ["--train-len", 16, "--length", 64, "--num-seqs", 4, "--buckets", 4, "--chunk", 32]


def write_parquet(path, column="text", values=DOCS):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: values, "id": list(range(len(values)))}), path, row_group_size=1)
    return path


def write_datasets_folder(path, values=DOCS, column="text"):
    """What ``Dataset.save_to_disk`` writes: an Arrow stream file, state.json naming it, dataset_info.json."""
    path.mkdir(parents=True)
    table = pa.table({column: values})
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
        for batch in table.to_batches(max_chunksize=2):
            out.write_batch(batch)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                 "_split": "train"}))
    (path / "dataset_info.json").write_text(json.dumps({"features": {column: {"dtype": "string", "_type": "Value"}}}))
    return path


@pytest.fixture
def corpora(tmp_path, cache):
    """The hub dataset's commit, and name -> the --data value holding DOCS in that format."""
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "txt" / f"{i}.txt").write_text(doc)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    write_parquet(tmp_path / "docs.parquet")
    write_datasets_folder(tmp_path / "saved")
    write_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    write_parquet(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet", values=["other"])
    commit = publish(cache, "org/corpus", tmp_path / "repo", repo_type="dataset")
    return commit, {"txt": tmp_path / "txt", "jsonl": tmp_path / "docs.jsonl", "parquet": tmp_path / "docs.parquet",
            "datasets": tmp_path / "saved", "hub": "hf:org/corpus:train"}


def test_every_format_gives_the_same_documents_and_the_same_csv(corpora, byte_vocab_ckpt, tmp_path, monkeypatch,
                                                               capsys):
    tok = ByteTokenizer(256)
    want = [tok.encode(d).tolist() for d in DOCS]
    csvs = {}
    commit, corpora = corpora
    for name, data in corpora.items():
        assert [d.tolist() for d in load_tokens(data, tok).documents] == want, name
        code, _, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", byte_vocab_ckpt, "--data", data, *OPTIONS,
                               "--out", tmp_path / "out" / name)
        assert code == 0, (name, err)
        csvs[name] = (tmp_path / "out" / name / "positionwise.csv").read_bytes()
    run = json.loads((tmp_path / "out" / "hub" / "run.json").read_text())
    assert run["data_hub"] == {"id": "org/corpus", "revision": "main", "commit": commit, "split": "train"}
    assert len(set(csvs.values())) == 1, {k: len(v) for k, v in csvs.items()}


def test_parquet_is_streamed_by_batches_never_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("the whole table was read"))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the whole table was read"))
    docs = load_tokens(write_parquet(tmp_path / "d.parquet"), ByteTokenizer(256)).documents
    assert len(docs) == 3


def test_text_field_names_the_column(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", column="body")
    assert len(load_tokens(path, ByteTokenizer(256), text_field="body").documents) == 3


def test_a_real_save_to_disk_folder_reads_the_same(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    tok = ByteTokenizer(256)
    assert [d.tolist() for d in load_tokens(tmp_path / "saved", tok).documents] == [tok.encode(d).tolist() for d in DOCS]


def _bad_parquet_column(tmp_path):
    return write_parquet(tmp_path / "d.parquet", column="body")


def _int_column(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    return path


def _dataset_dict(tmp_path):
    write_datasets_folder(tmp_path / "dd" / "train")
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    return tmp_path / "dd"


def _other_datasets_folder(tmp_path):
    path = write_datasets_folder(tmp_path / "img", values=["x"], column="image")
    return path


def _broken_datasets_folder(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "gone.arrow"}]}))
    return tmp_path / "broken"


def _not_parquet(tmp_path):
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    return tmp_path / "fake.parquet"


BAD = {
    "parquet-without-text-column": (_bad_parquet_column, ["d.parquet", "no column 'text'", "columns: body, id",
                                                          "--text-field"]),
    "parquet-text-column-not-strings": (_int_column, ["ints.parquet", "column 'text' holds int64, not text"]),
    "parquet-garbage": (_not_parquet, ["fake.parquet", "not a parquet file"]),
    "datasets-dict-root": (_dataset_dict, ["dd", "DatasetDict with splits train, test", "/SPLIT"]),
    "datasets-folder-of-another-kind": (_other_datasets_folder, ["no column 'text'", "columns: image"]),
    "datasets-folder-without-its-files": (_broken_datasets_folder, ["broken", "not a folder written by datasets"]),
    "hub-dataset-not-cached": (lambda tmp: "hf:org/absent", ["hf download org/absent --repo-type dataset"]),
    "hub-dataset-split-missing": (lambda tmp: "hf:org/corpus:validation",
                                  ["hf:org/corpus:validation", "no parquet files for split 'validation'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_corpora_are_one_line_exit_2_nothing_written(case, corpora, byte_vocab_ckpt, tmp_path, monkeypatch,
                                                         capsys):
    make, needles = BAD[case]
    data = make(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", byte_vocab_ckpt, "--data", data, *OPTIONS,
                             "--out", tmp_path / "out")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in out + err, err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "out").exists()
