"""The compiled CPU path (``--compile``, ``statelens.models.fused``) against eager, one mixer at a time: one
forward call of ``--tokens`` tokens over ``--batch`` rows, from the zero state, without hooks, the fastest of
``--repeats`` runs of each path, the two interleaved (the graph compiled in an untimed warm-up). Random weights at
the 130M shape with decays spread as trained models have them:

- mamba1: d_model 768, d_inner 1536, d_state 16, dt_rank 48, d_conv 4 (state-spaces/mamba-130m); A = -(1 .. 16)
  per channel, dt log-uniform in [1e-3, 1e-1];
- gla: hidden 768, 4 heads (fla's default), key dim 384, value dim 768; gate bias uniform in [-8, 4], so that
  alpha = sigmoid(z) ** (1 / 16) spreads from about 0.6 to 1;
- mamba2: d_model 768, 24 heads of 64, d_state 128 (state-spaces/mamba2-130m); A_log uniform in [0, 2.5],
  dt_bias normal(-2, 1).

Run it on one thread for a number comparable across machines:

    OMP_NUM_THREADS=1 python benchmarks/fused_mixers.py [--family mamba1 gla mamba2] [--tokens 4096] [--batch 1]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from statelens.models import fused
from statelens.models.gla import GLABlock, GLAConfig
from statelens.models.mamba1 import Mamba1Config, Mamba1Mixer
from statelens.models.mamba2 import Mamba2Config, Mamba2Mixer


def mixer(family: str):
    """(run(u, mode) -> out [b, l, d], d_model) for a random 130M-shaped layer of ``family``."""
    torch.manual_seed(0)
    with torch.no_grad():
        if family == "mamba1":
            m = Mamba1Mixer(Mamba1Config(d_model=768, n_layer=1, vocab_size=8, d_state=16, dt_rank=48), 0).eval()
            m.A_log.copy_(torch.arange(1, 17.0).log().expand_as(m.A_log))
            dt = torch.empty(m.dt_proj.bias.shape).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            return lambda u: m(u, torch.zeros(u.shape[0], 1536, 16), torch.zeros(u.shape[0], 1536, 3))[0]
        if family == "gla":
            block = GLABlock(GLAConfig(hidden_size=768, num_hidden_layers=1, vocab_size=8), 0).eval()
            block.attn.gk_proj[1].bias.uniform_(-8.0, 4.0)
            return lambda u: block.attn(u, torch.zeros(u.shape[0], 4, 96, 192), block)[0]
        cfg = Mamba2Config(d_model=768, n_layer=1, vocab_size=8, d_state=128, headdim=64)
        m = Mamba2Mixer(cfg, 0).eval()
        m.A_log.uniform_(0.0, 2.5)
        m.dt_bias.normal_(-2.0, 1.0)
        return lambda u: m(u, torch.zeros(u.shape[0], cfg.nheads, 64, 128), torch.zeros(u.shape[0], cfg.conv_dim, 3))[0]


def measure(family: str, tokens: int, batch: int, repeats: int) -> dict:
    """Fastest eager and compiled time (ms) of one call, and the outputs' largest difference relative to their
    largest magnitude."""
    run = mixer(family)
    u = torch.randn(batch, tokens, 768, generator=torch.Generator().manual_seed(1))
    best, outs = {"off": math.inf, "on": math.inf}, {}
    with torch.inference_mode():
        with fused.mode("on"):
            run(u)                                        # compiles
        for _ in range(repeats):
            for mode in ("off", "on"):
                with fused.mode(mode):
                    start = time.perf_counter()
                    outs[mode] = run(u)
                    best[mode] = min(best[mode], time.perf_counter() - start)
    diff = (outs["on"] - outs["off"]).abs().max() / outs["off"].abs().max()
    return {"eager_ms": 1e3 * best["off"], "compiled_ms": 1e3 * best["on"], "rel_diff": float(diff)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=["mamba1", "gla", "mamba2"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, {args.tokens} tokens at batch {args.batch}")
    for family in args.family:
        r = measure(family, args.tokens, args.batch, args.repeats)
        print(f"{family:7s} eager {r['eager_ms']:7.0f} ms   compiled {r['compiled_ms']:7.0f} ms   "
              f"{r['eager_ms'] / r['compiled_ms']:.2f}x   outputs rel. diff {r['rel_diff']:.1e}", flush=True)


if __name__ == "__main__":
    main()
