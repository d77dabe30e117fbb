"""Logits drift, against a brute-force computation with transformers: one separate forward of x[0:p] and
one of x[p-W:p] per position p, every position of every bucket."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import hf_mamba1, hf_mamba2, run_cli
from statelens.analysis.logits_drift import drift_positions, logits_drift
from statelens.models import load_checkpoint


@pytest.fixture(params=["mamba2", "mamba1"])
def pair(request, tmp_path):
    hf = (hf_mamba2 if request.param == "mamba2" else hf_mamba1)(tmp_path)
    return hf, load_checkpoint(tmp_path).model


def brute_force(hf, seqs: np.ndarray, window: int, lo: int, hi: int) -> list[float]:
    """Per sequence, the mean over every position p in [lo, hi) of TV(q(. | x[0:p]), q(. | x[p-W:p]))."""
    means = []
    for row in seqs:
        values = []
        for p in range(lo, hi):
            with torch.no_grad():
                full = torch.softmax(hf(torch.tensor(row[None, :p])).logits[0, -1].double(), -1)
                cut = torch.softmax(hf(torch.tensor(row[None, p - window:p])).logits[0, -1].double(), -1)
            values.append(0.5 * (full - cut).abs().sum().item())
        means.append(np.mean(values))
    return means


def test_drift_equals_brute_force_with_transformers(pair):
    hf, model = pair
    seqs, window = np.random.default_rng(1).integers(0, 64, (2, 60)), 20
    # points above every bucket's width: every position is measured, so the means are over all of them
    df = logits_drift(model, seqs, window=window, buckets=3, points=64, chunk=16, batch=5)
    assert list(df.columns) == ["pos_start", "pos_end", "window", "tv", "tv_sem", "n_positions", "n_seqs"]
    assert df.pos_start.iloc[0] == window + 1 and df.pos_end.iloc[-1] == 61
    assert (df.n_positions == df.pos_end - df.pos_start).all() and (df.window == window).all()
    for row in df.itertuples():
        per_seq = brute_force(hf, seqs, window, row.pos_start, row.pos_end)
        assert abs(np.mean(per_seq) - row.tv) <= 1e-6, row.pos_start
        assert abs(np.std(per_seq, ddof=1) / np.sqrt(2) - row.tv_sem) <= 1e-6
    assert df.tv.max() > 1e-3  # the tiny model does read context older than 20 tokens: not a vacuous match


def test_drift_is_zero_when_the_window_holds_the_whole_context(pair):
    """Positions are measured past W only; and at position p a window of p tokens is the whole context,
    so the two predictions are the same run and drift by 0."""
    _, model = pair
    seqs = np.random.default_rng(2).integers(0, 64, (1, 40))
    edges, positions = drift_positions(30, 40, buckets=2, points=3)
    assert positions.min() > 30 and positions.max() <= 40 and edges[0] == 31 and edges[-1] == 41
    from statelens.analysis.logits_drift import drift_matrix

    same = drift_matrix(model, seqs, window=31, positions=np.array([31]))
    assert same[0, 0] <= 1e-6


def test_command_writes_the_table_and_names_its_refusals(monkeypatch, capsys, tmp_path):
    hf_mamba2(tmp_path / "ckpt")
    code, out, _ = run_cli(monkeypatch, capsys, "logits-drift", "--ckpt", str(tmp_path / "ckpt"), "--train-len", "16",
                           "--length", "48", "--num-seqs", "2", "--buckets", "3", "--out", str(tmp_path / "out"))
    assert code == 0, out
    df = pd.read_csv(tmp_path / "out" / "logits_drift.csv")
    assert df.window.unique().tolist() == [16] and df.pos_start.iloc[0] == 17 and df.pos_end.iloc[-1] == 49
    assert json.loads((tmp_path / "out" / "run.json").read_text())["results"]["window"] == 16
    assert (tmp_path / "out" / "logits-drift.png").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "logits-drift", "--ckpt", str(tmp_path / "ckpt"), "--train-len", "16",
                           "--length", "16", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--length 16 does not exceed the window 16" in err
    assert not (tmp_path / "bad").exists()
