"""CPU efficiency: a Mamba-2 model's FLOPs per token, counted analytically, and the fp32 matmul rate
(``torch.mm``) at the model's own projection sizes, measured in the same process and thread count.

Efficiency = (tokens/s x FLOPs per token) / matmul FLOP/s: how close the whole forward comes to the
speed its largest GEMMs run at alone on this machine.
"""
from __future__ import annotations

import time

import torch

from statelens.models import Mamba2Config


def flops_per_token(cfg: Mamba2Config, q: int) -> dict[str, int]:
    """A forward's FLOPs per token by part, 2 FLOPs per multiply-add, with ``q`` the SSD block length
    the scan actually uses (``Mamba2LM.state_block``; a call of at least ``q`` tokens). With
    d = d_model, e = d_inner, s = d_ssm, h = nheads, p = headdim, n = d_state, g = ngroups,
    k = d_conv, V = vocab, per layer:

    - in_proj: 2 d (2e + 2gn + h); out_proj: 2 e d;
    - convolution (depthwise, k taps): 2 (s + 2gn) k;
    - SSD, chunked, each block's q x q matrices counted dense (the masked upper half is computed
      too): C B^T within the block 2 q g n; the intra-block output (C B^T * decay) x: 2 q s; the
      block's own state B^T x: 2 s n; the state carried from block to block: 2 s n / q; the output
      read from the carried state C h: 2 s n;

    plus the LM head, 2 d V, at every position (the benchmarks compute logits for every token).
    Assumptions: fp32 throughout; elementwise work (norms, softplus, exp, the segment sums and the
    decay mask, gating, D skip, residual adds) and the embedding lookup are not counted: they are
    O(d + q h) per token per layer against O(d^2) for the projections.
    """
    d, e, s, n, g, k = cfg.d_model, cfg.d_inner, cfg.d_ssm, cfg.d_state, cfg.ngroups, cfg.d_conv
    per_layer = {
        "in_proj": 2 * d * cfg.d_in_proj,
        "conv": 2 * cfg.conv_dim * k,
        "ssd_intra": 2 * q * g * n + 2 * q * s,
        "ssd_state": 2 * s * n + 2 * s * n // q + 2 * s * n,
        "out_proj": 2 * e * d,
    }
    counts = {name: cfg.n_layer * f for name, f in per_layer.items()}
    counts["lm_head"] = 2 * d * cfg.vocab_size
    return counts


def projection_gemms(cfg: Mamba2Config, tokens: int) -> list[tuple[int, int, int, int]]:
    """The model's dense GEMMs for a call of ``tokens`` tokens: (M, K, N, times per forward)."""
    return [(tokens, cfg.d_model, cfg.d_in_proj, cfg.n_layer),
            (tokens, cfg.d_inner, cfg.d_model, cfg.n_layer),
            (tokens, cfg.d_model, cfg.vocab_size, 1)]


class MatmulRate:
    """fp32 ``torch.mm`` at the model's projection sizes (``x @ W.T``, as ``nn.Linear`` calls it).
    Call it to time one pass of each GEMM (keep the fastest of several, interleaved with the model's
    runs); ``rate()`` is their FLOPs over their time, each GEMM weighted by how often a forward runs it."""

    def __init__(self, cfg: Mamba2Config, tokens: int):
        gen = torch.Generator().manual_seed(0)
        self.gemms = [(torch.randn(m, k, generator=gen), torch.randn(cols, k, generator=gen), times)
                      for m, k, cols, times in projection_gemms(cfg, tokens)]
        self.best = [float("inf")] * len(self.gemms)

    def __call__(self) -> None:
        for i, (x, w, _) in enumerate(self.gemms):
            start = time.perf_counter()
            torch.mm(x, w.t())
            self.best[i] = min(self.best[i], time.perf_counter() - start)

    def rate(self) -> float:
        flops = sum(2 * x.shape[0] * x.shape[1] * w.shape[0] * times for x, w, times in self.gemms)
        return flops / sum(t * times for t, (_, _, times) in zip(self.best, self.gemms))
