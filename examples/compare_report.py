"""A report for two checkpoints, built from the library: analyses in, one HTML file out.

    python examples/compare_report.py CKPT_A CKPT_B [--out runs/compare] [--train-len 64]

Without checkpoints, two tiny built-in ones (different seeds) stand in. The command-line equivalent is
`statelens compare A B`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from statelens.analysis.collapse import collapse
from statelens.analysis.positionwise import positionwise
from statelens.analysis.remembrance import remembrance
from statelens.analysis.states import state_stats
from statelens.models import load_checkpoint, save_checkpoint
from statelens.models.checkpoint import mamba_ssm_checkpoint
from statelens.reports.html import Results, render, write_report


def analyse(ckpt: Path, train_len: int) -> Results:
    model = load_checkpoint(ckpt).model
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(4, 4 * train_len))
    stats = state_stats(model, tokens, positions=train_len // 8)
    return Results(tables={
        "positionwise": positionwise(model, tokens, buckets=12),
        "remembrance": remembrance(model, tokens, T=4 * train_len, points=16),
        "state_stats": stats,
        "collapse": collapse(stats, train_len=train_len),
    })


def main(ckpts: list[Path], out: Path, train_len: int) -> Path:
    if not ckpts:
        from tiny_checkpoint import tiny_model

        ckpts = [save_checkpoint(mamba_ssm_checkpoint(tiny_model("Mamba2", seed)), out / f"tiny-{seed}")
                 for seed in (0, 1)]
    results = [analyse(c, train_len) for c in ckpts]
    html = render(results, labels=[c.name for c in ckpts], train_lens=[train_len, train_len])
    return write_report(html, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpts", type=Path, nargs="*")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--train-len", type=int, default=64)
    args = parser.parse_args()
    print("wrote", main(args.ckpts, args.out, args.train_len))
