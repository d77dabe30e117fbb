"""The analysis commands: what they write equals the library's answer; bad input leaves nothing."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from statelens.analysis.positionwise import positionwise
from statelens.analysis.remembrance import remembrance
from statelens.models import load_checkpoint
from statelens.models.checkpoint import content_hash


@pytest.fixture(scope="module")
def ckpt(byte_vocab_ckpt):
    return byte_vocab_ckpt


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, np.random.default_rng(5).integers(0, 64, (4, 300)))
    return path


def test_remembrance_command_writes_the_analysis(ckpt, token_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(monkeypatch, capsys, "remembrance", "--ckpt", ckpt, "--data", token_file,
                              "--train-len", 50, "--T", 200, "--num-seqs", 3, "--points", 8, "--chunk", 64,
                              "--out", out)
    assert code == 0
    written = pd.read_csv(out / "remembrance.csv")
    expected = remembrance(load_checkpoint(ckpt).model, np.load(token_file)[:3, :200], T=200, points=8)
    assert list(written.columns) == ["t", "T", "effrem", "effrem_sem", "n_seqs"]
    np.testing.assert_allclose(written.effrem, expected.effrem, atol=1e-6)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["checkpoint"]["sha256"] == content_hash(ckpt)
    assert manifest["config"]["T"] == 200 and manifest["seed"] == 0 and manifest["train_len"] == 50
    assert "torch" in manifest["versions"] and manifest["timings"]["total_s"] > 0
    assert (out / "remembrance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "EffRem" in stdout


def test_perplexity_command_writes_the_analysis(ckpt, token_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, _, _ = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", ckpt, "--data", token_file,
                         "--train-len", 50, "--length", 300, "--num-seqs", 4, "--buckets", 6, "--out", out)
    assert code == 0
    written = pd.read_csv(out / "positionwise.csv")
    expected = positionwise(load_checkpoint(ckpt).model, np.load(token_file), buckets=6)
    np.testing.assert_allclose(written.loss, expected.loss, atol=1e-6)
    assert list(written.pos_end) == list(expected.pos_end)


def test_random_tokens_are_the_seeded_default(ckpt, tmp_path, monkeypatch, capsys):
    runs = []
    for name in ("a", "b"):
        run_cli(monkeypatch, capsys, "perplexity", "--ckpt", ckpt, "--train-len", 20, "--num-seqs", 2,
                "--buckets", 4, "--seed", 3, "--out", tmp_path / name)
        runs.append(pd.read_csv(tmp_path / name / "positionwise.csv"))
    pd.testing.assert_frame_equal(runs[0], runs[1])
    assert "random tokens" in json.loads((tmp_path / "a" / "run.json").read_text())["data"]


def bad(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("command", ["remembrance", "perplexity"])
@pytest.mark.parametrize("case", ["T larger than the data", "fewer sequences", "empty file", "non-UTF-8",
                                  "train length 0"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(command, case, ckpt, token_file, tmp_path,
                                                          monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--ckpt", ckpt, "--out", out, "--train-len", 50]
    size = "--T" if command == "remembrance" else "--length"
    if case == "T larger than the data":
        args += ["--data", token_file, size, 5000, "--num-seqs", 2]
        needle = "tokens"
    elif case == "fewer sequences":
        args += ["--data", token_file, size, 300, "--num-seqs", 40]
        needle = "40"
    elif case == "empty file":
        args += ["--data", bad(tmp_path, "empty.txt", b""), "--num-seqs", 1]
        needle = "empty.txt"
    elif case == "non-UTF-8":
        args += ["--data", bad(tmp_path, "latin.txt", b"caf\xe9 " * 100), "--num-seqs", 1]
        needle = "latin.txt"
    else:
        args[-1] = 0
        needle = "--train-len"
    code, _, err = run_cli(monkeypatch, capsys, command, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statelens: error:") and needle in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("content, needle", [('{"train_len": 96}', None), ("not json", "statelens.json"),
                                             ('{"train_len": 0}', "positive integer")])
def test_training_length_from_the_checkpoint_metadata(content, needle, ckpt, tmp_path, monkeypatch, capsys):
    import shutil

    local = tmp_path / "ckpt"
    shutil.copytree(ckpt, local)
    (local / "statelens.json").write_text(content)
    code, _, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", local, "--num-seqs", 1, "--buckets", 3,
                           "--out", tmp_path / "out")
    if needle is None:
        assert code == 0
        manifest = json.loads((tmp_path / "out" / "run.json").read_text())
        assert manifest["train_len"] == 96 and manifest["train_len_source"] == "statelens.json"
        assert manifest["config"]["length"] == 4 * 96
    else:
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["perplexity", "report"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(command, ckpt, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(monkeypatch, capsys, command, "--ckpt", ckpt, "--train-len", 20, "--num-seqs", 1,
                           "--out", blocker / "out")
    assert code == 2 and "--out" in err and "not a directory" in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a directory"


def test_the_hf_backend_gives_the_native_answer(ckpt, token_file, tmp_path, monkeypatch, capsys):
    """--backend hf runs the checkpoint's own transformers modules; on Mamba-2 it must agree with statelens'."""
    tables = {}
    for backend in ("native", "hf"):
        code, _, _ = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", ckpt, "--data", token_file, "--backend",
                             backend, "--train-len", 50, "--length", 200, "--num-seqs", 2, "--buckets", 5,
                             "--chunk", 64, "--out", tmp_path / backend)
        assert code == 0
        tables[backend] = pd.read_csv(tmp_path / backend / "positionwise.csv")
    np.testing.assert_allclose(tables["hf"].loss, tables["native"].loss, atol=1e-5)
    assert json.loads((tmp_path / "hf" / "run.json").read_text())["config"]["backend"] == "hf"

