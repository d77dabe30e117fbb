"""--resume and SIGINT for the long-context tasks: one group per cell (passkey: a (length, depth); babilong:
a (task, length)), and a resumed run writes the CSV of an uninterrupted one, computing only the missing cells."""
from __future__ import annotations

import signal
import sys

import pytest

from conftest import run_cli
from pausing import interrupt

TASKS = {  # (options, the per-cell function, cells): a second or so per cell on the tiny checkpoint
    "passkey": (["--lengths", "200,300", "--depths", "0.1,0.9", "--samples", 1], "passkey_cell", 4),
    "babilong": (["--tasks", "qa1", "--lengths", "100,200,300", "--samples", 1], "babilong_cell", 3),
}


def count_cells(monkeypatch, task: str) -> list:
    """Calls of the task's per-cell function from now on."""
    module, name = sys.modules[f"statelens.tasks.{task}"], TASKS[task][1]
    original, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("task", ["passkey", "babilong"])
def test_interrupted_task_resumes_to_the_same_csv(byte_vocab_ckpt, tmp_path, monkeypatch, capsys, task):
    options, _, cells = TASKS[task]
    args = [task, "--ckpt", byte_vocab_ckpt, *options]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err

    out = tmp_path / "split"
    stopped = interrupt([*args, "--out", out], f"{out}/.partial/group-*.npz", signal.SIGINT)   # after the first cell
    assert stopped.returncode == 130, stopped.stderr
    assert len(stopped.stderr.strip().splitlines()) == 1
    assert "interrupted by SIGINT" in stopped.stderr and "--resume" in stopped.stderr
    saved = len(list((out / ".partial").glob("group-*.npz")))
    assert saved == 1 and f"1 of {cells} groups saved" in stopped.stderr
    assert not (out / f"{task}.csv").exists()

    calls = count_cells(monkeypatch, task)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", out, "--resume")
    assert code == 0, err
    assert len(calls) == cells - saved
    assert (out / f"{task}.csv").read_bytes() == (tmp_path / "whole" / f"{task}.csv").read_bytes()
    assert not (out / ".partial").exists()


def test_passkey_resume_with_other_lengths_is_bad_input(byte_vocab_ckpt, tmp_path, monkeypatch, capsys):
    import statelens.tasks.passkey as passkey_mod

    original, calls = passkey_mod.passkey_cell, []

    def stop_after_one(*args, **kwargs):  # Ctrl-C during the second cell: the first stays saved
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(passkey_mod, "passkey_cell", stop_after_one)
    args = ["passkey", "--ckpt", byte_vocab_ckpt, "--depths", "0.5", "--samples", 1, "--out", tmp_path / "out"]
    code, _, _ = run_cli(monkeypatch, capsys, *args, "--lengths", "200,300")
    assert code == 130 and (tmp_path / "out" / ".partial" / "group-00000.npz").is_file()

    code, _, err = run_cli(monkeypatch, capsys, *args, "--lengths", "200,400", "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--resume" in err and "lengths" in err and "rerun without --resume" in err
    assert len(calls) == 2 and not (tmp_path / "out" / "passkey.csv").exists()
