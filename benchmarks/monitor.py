"""The training monitor's cost (issue 19): the demo baseline's state-passing post-training (T = 64,
batch 8) for ``steps`` steps with a :class:`~statelens.monitor.StateMonitor` at its default cadence (every
200 steps, and before the first) on the posttrain command's default probe (4 sequences of 4 T = 256
held-out bytes), against the same run without it; run by ``benchmarks/run.py``, or alone:

    python benchmarks/monitor.py [STEPS]

2000 steps by default, half the demo's post-training: a short run is dominated by what the monitor
pays once (its first call, which also fits the out-of-support reference, and the imports it triggers);
at 400 steps the ratio was 1.12, at 2000 steps 1.008 (2026-11-30, idle machine, one run each).

The runs are interleaved and the fastest of each kept (:func:`diagnostics.best_of`); returns the ratio.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from diagnostics import best_of

from statelens.demo import BASELINE, HELDOUT
from statelens.models import load_checkpoint
from statelens.train import PosttrainConfig, posttrain

TRAIN_LEN, BATCH, EVERY, PROBE_SEQS = 64, 8, 200, 4


def monitor_overhead(steps: int = 2000, repeats: int = 2) -> float:
    """Wall time of ``steps`` post-training steps monitored every 200 / the same unmonitored."""
    held = np.load(HELDOUT).astype(np.int64)                                  # [rows, length] bytes
    probe, tokens = held[:PROBE_SEQS, :4 * TRAIN_LEN], held[PROBE_SEQS:]
    out = Path(tempfile.mkdtemp(prefix="statelens-monitor-bench-"))

    def run(every: int):
        config = PosttrainConfig(intervention="state-passing", steps=steps, seq_len=TRAIN_LEN, batch=BATCH,
                                 lr=3e-4, warmup=10, save_every=steps, monitor_every=every)
        return lambda: posttrain(load_checkpoint(BASELINE), tokens, config, out=out / f"every-{every}",
                                 monitor_probe=probe if every else None)

    plain, monitored = best_of(run(0), run(EVERY), repeats=repeats)
    return monitored / plain


if __name__ == "__main__":
    print(f"monitored / plain post-training wall time: {monitor_overhead(*map(int, sys.argv[1:2])):.3f}")
