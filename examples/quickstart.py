"""The Python API in the order a researcher uses it in a notebook.

    python examples/quickstart.py [CKPT_DIR] [--out runs/quickstart]

Loads a checkpoint (by default writes the tiny built-in one first), records per-head state norms
with hooks during a long rollout, computes Effective Remembrance and the state statistics with their
collapse flags, and draws two figures.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from statelens.analysis.collapse import collapse
from statelens.analysis.remembrance import remembrance
from statelens.analysis.states import state_stats
from statelens.models import hooks, load_checkpoint, save_checkpoint
from statelens.models.checkpoint import mamba_ssm_checkpoint
from statelens.record import rollout
from statelens.reports.figures import remembrance_figure, save, state_norm_figure


def main(ckpt: Path | None, out: Path, train_len: int = 64) -> None:
    if ckpt is None:  # the tiny built-in checkpoint: random weights, initialised as mamba-ssm does
        from tiny_checkpoint import tiny_model

        ckpt = save_checkpoint(mamba_ssm_checkpoint(tiny_model("Mamba2")), out / "tiny-mamba2")
    model = load_checkpoint(ckpt).model
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(4, 4 * train_len))

    # 1. Hooks: watch layer 0's state norm per head at the end of every chunk of a rollout.
    norms = []
    with hooks(model, {"blocks.0.hook_state": lambda s, hook: norms.append(s.flatten(2).norm(dim=-1).mean(0))}):
        for chunk in rollout(model, tokens, chunk=train_len):
            pass
    print("layer 0 state norm per head at each chunk end:\n", np.stack([n.numpy() for n in norms]).round(3))

    # 2. Effective Remembrance: does the prediction at T still hinge on the first tokens?
    effrem = remembrance(model, tokens, T=4 * train_len, points=16)
    print(effrem.to_string(index=False, float_format="%.2e"))

    # 3. State statistics and collapse flags.
    stats = state_stats(model, tokens, positions=train_len // 8)
    flagged = collapse(stats, train_len=train_len)
    print(flagged.head(4).to_string(index=False))

    # 4. Figures.
    out.mkdir(parents=True, exist_ok=True)
    written = save(remembrance_figure(effrem), out / "remembrance") + save(
        state_norm_figure(stats, collapse=flagged, train_len=train_len), out / "states")
    print("wrote", ", ".join(str(p) for p in written))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()
    main(args.ckpt, args.out)
