"""Write a tiny random Mamba-2 (or Mamba-1) checkpoint in mamba-ssm's layout.

    python examples/tiny_checkpoint.py runs/tiny-mamba2 [--layer Mamba1]

The weights are random but initialised as mamba-ssm initialises them (A in [1, 16], dt in
[0.001, 0.1]), so states behave like an untrained model's. Useful to try statelens without a download.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from statelens.models import Mamba1Config, Mamba1LM, Mamba2Config, Mamba2LM, save_checkpoint
from statelens.models.checkpoint import mamba_ssm_checkpoint


def tiny_model(layer: str, seed: int = 0):
    torch.manual_seed(seed)
    if layer == "Mamba2":
        model = Mamba2LM(Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=64))
    else:
        model = Mamba1LM(Mamba1Config(d_model=64, n_layer=2, vocab_size=256, d_state=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                dt = torch.exp(torch.empty_like(p).uniform_(math.log(1e-3), math.log(1e-1)))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name.endswith(".D") or "norm" in name:
                p.fill_(1.0)
            elif p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02 if "embedding" in name else 1 / math.sqrt(p.shape[-1]))
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layer", choices=["Mamba2", "Mamba1"], default="Mamba2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    save_checkpoint(mamba_ssm_checkpoint(tiny_model(args.layer, args.seed)), args.out)
    print(f"wrote {args.out}")
