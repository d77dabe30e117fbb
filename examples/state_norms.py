"""Roll a checkpoint over a long random token stream and tabulate per-layer state norms by position.

    python examples/state_norms.py runs/tiny-mamba2 --length 65536 --chunk 4096

Shows the library API end to end: load, stream in chunks with the state carried, read the state at
each chunk boundary, end in a tidy DataFrame.
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from statelens.models import load_checkpoint
from statelens.record import rollout


def state_norms(ckpt_dir: str, length: int, chunk: int, seed: int = 0) -> pd.DataFrame:
    """Columns: position (tokens consumed), layer, norm (Frobenius norm of the layer's SSM state)."""
    model = load_checkpoint(ckpt_dir).model
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=length)
    rows = []
    for piece in rollout(model, tokens, chunk=chunk):
        for layer, s in enumerate(piece.state.ssm):
            rows.append({"position": piece.end, "layer": layer, "norm": s[0].norm().item()})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=2048)
    args = parser.parse_args()
    table = state_norms(args.ckpt, args.length, args.chunk)
    print(table.pivot(index="position", columns="layer", values="norm").to_string(float_format="%.3f"))
