"""The examples run on tiny checkpoints, so they never rot; what they print or write is checked."""
from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_tiny_checkpoint_and_state_norms(tmp_path):
    from statelens.models import load_checkpoint

    run("tiny_checkpoint.py", tmp_path / "ckpt", cwd=tmp_path)
    model = load_checkpoint(tmp_path / "ckpt").model
    out = run("state_norms.py", tmp_path / "ckpt", "--length", 4096, "--chunk", 1024, cwd=tmp_path)
    last = out.strip().splitlines()[-1].split()
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=4096)
    with torch.no_grad():
        _, state = model(torch.tensor(tokens)[None])
    assert int(last[0]) == 4096
    np.testing.assert_allclose([float(v) for v in last[1:]], [s[0].norm().item() for s in state.ssm], atol=1e-3)


def test_quickstart_writes_its_figures(tmp_path):
    out = run("quickstart.py", "--out", tmp_path / "qs", cwd=tmp_path)
    assert "layer 0 state norm per head" in out
    for name in ("remembrance", "states"):
        assert (tmp_path / "qs" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_report_builds_a_report_for_two_checkpoints(tmp_path):
    run("compare_report.py", "--out", tmp_path / "cr", cwd=tmp_path)
    page = (tmp_path / "cr" / "index.html").read_text()
    HTMLParser().feed(page)
    assert "tiny-0" in page and "tiny-1" in page and "Comparison" in page


def test_early_warning_prints_each_runs_trend_from_its_monitor_csv(tmp_path):
    """Two steps of each run, monitored at every one: the printed first, last and rank correlation of each
    curve are those of the run's monitor.csv, recomputed here (Pearson's correlation of pandas' ranks)."""
    import pandas as pd

    from statelens.reports.figures import monitor_curves

    out = run("early_warning.py", tmp_path / "ew", "--steps", 2, "--every", 1, cwd=tmp_path)
    assert (tmp_path / "ew" / "early-warning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = [line.split() for line in out.splitlines()[1:] if line.split()[:1] in (["state"], ["zero-state"])]
    runs = {"state passing": "state-passing", "zero-state continuation": "none"}
    expected = []
    for label, folder in runs.items():
        df = pd.read_csv(tmp_path / "ew" / folder / "monitor.csv")
        assert sorted(df.step.unique()) == [0, 1, 2]
        for name, series in monitor_curves(df).items():
            ranks = series.rank(), pd.Series(series.index, dtype=float).rank()
            with np.errstate(invalid="ignore", divide="ignore"):   # a constant curve: no correlation (NaN)
                rho = np.corrcoef(ranks[0].to_numpy(), ranks[1].to_numpy())[0, 1]
            expected.append([series.iloc[0], series.iloc[-1], rho])
    values = [[float(v) for v in line[-3:]] for line in printed]
    np.testing.assert_allclose(values, expected, atol=5e-5)   # printed to 4 decimals
