"""A transformers model held in a notebook, diagnosed without saving it: ``statelens.wrap``.

    python examples/wrap_transformers.py [--out runs/wrap]

Builds a small random ``Mamba2ForCausalLM`` in the script (any transformers model whose cache holds
recurrent states works the same way: Mamba, Falcon-Mamba, Bamba, Zamba2, ...), wraps it, and runs
Effective Remembrance and the per-head state statistics on it; writes both tables as CSV and prints
them. ``statelens.load("ORG/NAME")`` gives the same kind of model from a directory or a hub id.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import transformers

import statelens
from statelens.analysis.remembrance import remembrance
from statelens.analysis.states import state_stats


def main(out: Path, T: int = 128) -> None:
    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16,
                                       head_dim=16, num_heads=8, n_groups=1, expand=2, chunk_size=64)
    hf_model = transformers.Mamba2ForCausalLM(config).eval()

    model = statelens.wrap(hf_model)  # the native Mamba-2 backend holding hf_model's tensors (not copied)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(4, T))

    effrem = remembrance(model, tokens, T=T, points=8)  # columns t, T, effrem, effrem_sem, n_seqs
    stats = state_stats(model, tokens, positions=T // 4)  # columns position, layer, head, norm, mean, std, ...
    out.mkdir(parents=True, exist_ok=True)
    effrem.to_csv(out / "remembrance.csv", index=False)
    stats.to_csv(out / "state_stats.csv", index=False)
    print(f"{type(hf_model).__name__} wrapped as {type(model).__name__}")
    print(effrem.to_string(index=False, float_format="%.3e"))
    print(stats.groupby(["position", "layer"]).norm.mean().to_string(float_format="%.4f"))
    print("wrote", out / "remembrance.csv", out / "state_stats.csv")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/wrap"))
    main(parser.parse_args().out)
