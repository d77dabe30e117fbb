"""Determinism: the same seed and thread count give byte-identical CSVs, in separate processes; other
thread counts agree within the tolerance the README states (|a - b| <= 1e-6 |a| + 1e-8)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

RTOL, ATOL = 1e-6, 1e-8  # README, "Determinism"


def run_all(runs: dict[str, tuple[list, int]], cwd: Path) -> None:
    """``statelens ARGS`` for each name -> (args, threads), as processes running side by side."""
    script = Path(sys.executable).with_name("statelens")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "statelens.cli.main"]
    procs = {}
    for name, (args, threads) in runs.items():
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        procs[name] = subprocess.Popen([*command, *map(str, args)], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err)


def test_same_seed_and_threads_give_identical_bytes(byte_vocab_ckpt, tmp_path):
    """decay (float32 alphas summed per bucket, horizons and retentions derived from them) over random
    tokens drawn from --seed: twice with one thread, once with two."""
    args = ["decay", "--ckpt", byte_vocab_ckpt, "--train-len", 64, "--length", 512, "--num-seqs", 2, "--buckets", 8,
            "--seed", 7]
    run_all({name: ([*args, "--out", tmp_path / name], threads) for name, threads in (("a", 1), ("b", 1), ("c", 2))},
            tmp_path)
    first, again, _ = ((tmp_path / name / "decay.csv").read_bytes() for name in "abc")
    assert first == again
    a, c = (pd.read_csv(tmp_path / name / "decay.csv") for name in "ac")
    pd.testing.assert_frame_equal(a[["pos_start", "pos_end", "layer", "head"]], c[["pos_start", "pos_end", "layer", "head"]])
    for column in ("mean_alpha", "horizon", "retention"):
        np.testing.assert_allclose(c[column], a[column], rtol=RTOL, atol=ATOL)
