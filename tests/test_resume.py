"""Interruption and --resume: a command stopped by SIGINT or SIGTERM keeps its finished groups (analyses)
or its last step (posttrain), and the resumed run ends with the same outputs as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch

from conftest import run_cli
from pausing import interrupt

ANALYSES = {
    "perplexity": ["--train-len", 32, "--length", 256, "--num-seqs", 6, "--buckets", 6],
    "states": ["--train-len", 32, "--length", 256, "--num-seqs", 6, "--stride", 16],
}
OUTPUT = {"perplexity": ["positionwise.csv"], "states": ["state_stats.csv", "collapse.csv"]}


@pytest.mark.parametrize(("command", "signum"), [("perplexity", signal.SIGINT), ("states", signal.SIGTERM)],
                         ids=["perplexity-SIGINT", "states-SIGTERM"])
def test_interrupted_analysis_resumes_to_the_same_csv(byte_vocab_ckpt, tmp_path, monkeypatch, capsys, command,
                                                      signum):
    args = [command, "--ckpt", byte_vocab_ckpt, *ANALYSES[command]]
    code, _, _ = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "whole")
    assert code == 0

    out = tmp_path / "split"
    stopped = interrupt([*args, "--out", out], f"{out}/.partial/group-*.npz", signum)   # after the first group
    assert stopped.returncode == 128 + signum, stopped.stderr
    assert len(stopped.stderr.strip().splitlines()) == 1
    assert "interrupted by" in stopped.stderr and "--resume" in stopped.stderr
    saved = len(list((out / ".partial").glob("group-*.npz")))
    assert saved == 1 and not (out / OUTPUT[command][0]).exists()

    # The resumed run computes only the groups not saved.
    module = {"perplexity": "statelens.analysis.positionwise", "states": "statelens.analysis.states"}[command]
    name = {"perplexity": "position_losses", "states": "state_cubes"}[command]
    original, calls = getattr(sys.modules[module], name), []
    monkeypatch.setattr(sys.modules[module], name, lambda *a, **k: calls.append(1) or original(*a, **k))
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", out, "--resume")
    assert code == 0, err
    assert len(calls) == 6 - saved
    for name in OUTPUT[command]:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not (out / ".partial").exists()


def test_resume_with_other_settings_is_bad_input(byte_vocab_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    (out / ".partial").mkdir(parents=True)
    (out / ".partial" / "config.json").write_text(json.dumps({"command": "perplexity", "config": {"length": 1}}))
    code, _, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", byte_vocab_ckpt, *ANALYSES["perplexity"],
                           "--out", out, "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--resume" in err and "rerun without --resume" in err
    assert not (out / "positionwise.csv").exists()


def test_interrupted_posttrain_resumes_to_the_same_weights(byte_vocab_ckpt, tmp_path, monkeypatch, capsys):
    from statelens.models import load_checkpoint

    args = ["posttrain", "--ckpt", byte_vocab_ckpt, "--steps", 12, "--seq-len", 16, "--batch", 2, "--warmup", 2,
            "--save-every", 2]
    out = tmp_path / "split"
    stopped = interrupt([*args, "--out", out], f"{out}/resume.pt", signal.SIGINT)   # after the first save
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted by SIGINT" in stopped.stderr and "--resume" in stopped.stderr
    # the signal came at the step-2 save: the step in progress then (the third) ends, saved
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 3

    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", out, "--resume")
    assert code == 0, err
    code, _, _ = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "whole")
    assert code == 0
    resumed, whole = (load_checkpoint(p).model.state_dict() for p in (out, tmp_path / "whole"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert (out / "train_log.csv").read_bytes() == (tmp_path / "whole" / "train_log.csv").read_bytes()


def test_groups_are_the_same_whatever_the_world():
    from statelens.resumable import groups

    assert groups(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert groups(2, 8) == [slice(0, 2)]
    with pytest.raises(ValueError):
        groups(3, 0)


def test_posttrain_batch_must_divide_among_processes(byte_vocab_ckpt, tmp_path, monkeypatch):
    from statelens.errors import BadInput
    from statelens.models import load_checkpoint
    from statelens.train import posttrain

    monkeypatch.setitem(os.environ, "WORLD_SIZE", "2")
    tokens = torch.randint(0, 256, (4, 64)).numpy()
    with pytest.raises(BadInput, match="--batch 3 does not divide among 2 processes"):
        posttrain(load_checkpoint(byte_vocab_ckpt), tokens, steps=1, seq_len=32, batch=3, out=tmp_path)


def test_interrupted_report_resumes_with_the_analyses_it_finished(byte_vocab_ckpt, tmp_path, monkeypatch, capsys):
    args = ["report", "--ckpt", byte_vocab_ckpt, "--label", "m", "--train-len", 32, "--length", 128, "--num-seqs", 2]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err

    out = tmp_path / "split"
    stopped = interrupt([*args, "--out", out], f"{out}/1-m/remembrance/run.json", signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert not (out / "index.html").exists()
    first = (out / "1-m/remembrance/run.json").read_bytes()

    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", out, "--num-seqs", 3, "--resume")
    assert code == 2 and "--resume" in err and "num_seqs 2" in err and len(err.strip().splitlines()) == 1

    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", out, "--resume")
    assert code == 0, err
    assert (out / "1-m/remembrance/run.json").read_bytes() == first  # finished before the signal: not redone
    csvs = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.csv"))
    assert len(csvs) == 8
    for name in csvs:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert (out / "index.html").is_file()


def test_an_interrupt_outside_the_groups_is_one_line_exit_130(byte_vocab_ckpt, tmp_path, monkeypatch, capsys):
    import statelens.analysis.positionwise as positionwise

    def interrupted(*args, **kwargs):  # SIGINT once every group is done: while the table is combined
        raise KeyboardInterrupt

    monkeypatch.setattr(positionwise, "bucket_losses", interrupted)
    code, _, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", byte_vocab_ckpt, "--train-len", 32,
                           "--length", 64, "--num-seqs", 2, "--out", tmp_path / "out")
    assert code == 130 and err.strip() == "statelens: interrupted"
    assert not (tmp_path / "out" / "positionwise.csv").exists()
