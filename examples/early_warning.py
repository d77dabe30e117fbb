"""The monitor's early warning, shown: the demo baseline post-trained with state passing, and the same
baseline continued from the zero state, each watched by a StateMonitor.

    python examples/early_warning.py [OUT] [--steps 2000] [--every 100] [--probe-length 256] [--figure PNG]

Both runs start from the shipped baseline (``statelens.demo.BASELINE``, trained from the zero state on
64-byte chunks) and read the same post-training chunks the demo's state-passing checkpoint was made from
(``examples/demo_checkpoints.py``: the training stream's end, half the chunks repeating their first half),
with the demo's settings (batch 16, lr 2e-4, 20 warm-up steps). Only the initial state of each training
chunk differs: the previous chunk's final state (``state-passing``) or zero (``none``). The probe is the
demo's held-out text, 8 sequences of ``--probe-length`` bytes (default 4 T = 256), which neither run
trains on.

Prints, per run and per monitored number, its value at the first and last step and Spearman's rank
correlation with the step (-1: falls at every measurement), and draws both runs' monitor figures
overlaid (``statelens.reports.figures.monitor_figure``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from demo_checkpoints import byte_stream, chunks_of, stdlib_files, with_copies
from statelens.demo import BASELINE, HELDOUT
from statelens.models import load_checkpoint
from statelens.reports.figures import checkpoint_colors, monitor_curves, monitor_figure
from statelens.train import PosttrainConfig, posttrain

TRAIN_LEN, BATCH, PROBE_SEQS = 64, 16, 8
RUNS = {"state-passing": "state passing", "none": "zero-state continuation"}


def monitored_run(intervention: str, chunks: np.ndarray, probe: np.ndarray, steps: int, every: int,
                  out: Path) -> pd.DataFrame:
    """The monitor's table of ``steps`` post-training steps of the baseline under ``intervention`` (a run
    already finished in ``out`` with as many steps is read back, so the figure can be redrawn)."""
    folder = out / intervention
    if (folder / "monitor.csv").exists() and (folder / "train_log.csv").exists():
        if len(pd.read_csv(folder / "train_log.csv")) == steps:
            return pd.read_csv(folder / "monitor.csv")
    config = PosttrainConfig(intervention=intervention, steps=steps, seq_len=TRAIN_LEN, batch=BATCH, lr=2e-4,
                             warmup=20, save_every=steps, monitor_every=every)
    posttrain(load_checkpoint(BASELINE), chunks, config, out=folder, monitor_probe=probe)
    return pd.read_csv(folder / "monitor.csv")


def trends(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run and curve of :func:`monitor_curves`: first, last, and Spearman's rho against the step."""
    rows = []
    for run, df in tables.items():
        for name, series in monitor_curves(df).items():
            rho = spearmanr(series.index, series.to_numpy()).statistic
            rows.append((run, name, series.iloc[0], series.iloc[-1], rho))
    return pd.DataFrame(rows, columns=["run", "curve", "first", "last", "spearman_rho"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("runs/early-warning"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--figure", type=Path, default=None, help="default: OUT/early-warning.png")
    parser.add_argument("--probe-length", type=int, default=4 * TRAIN_LEN, help="probe tokens per sequence (default 4 T)")
    parser.add_argument("--only", choices=list(RUNS), default=None, help="run this intervention alone (no table, no figure)")
    args = parser.parse_args()

    train_files, _ = stdlib_files()
    stream = byte_stream(train_files)
    tokens = args.steps * BATCH * TRAIN_LEN                 # the stream's end, as the demo's post-training
    chunks = with_copies(chunks_of(stream[-tokens:], TRAIN_LEN, args.steps * BATCH), 0.5, 1).astype(np.int64)
    probe = np.load(HELDOUT)[:PROBE_SEQS, :args.probe_length].astype(np.int64)
    tables = {RUNS[i]: monitored_run(i, chunks, probe, args.steps, args.every, args.out)
              for i in RUNS if args.only in (None, i)}
    if args.only:
        return

    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 120):
        print(trends(tables).to_string(index=False))
    colors = checkpoint_colors(list(tables))
    figure = None
    for label, df in tables.items():
        figure = monitor_figure(df, label=label, color=colors[label], ax=None if figure is None else figure.axes)
    path = args.figure or args.out / "early-warning.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
