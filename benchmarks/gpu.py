"""The CUDA measurements of issue 7, on a 130M-shaped random Mamba-2 (d_model 768, 24 layers, d_state
128, headdim 64, vocab 50288); run by ``benchmarks/run.py`` where CUDA is available, or alone:

    python benchmarks/gpu.py [--tokens 131072] [--dtype bfloat16]

- a ``--tokens`` rollout (batch 1, 8192-token calls) recording per-head state statistics every 1024
  tokens, against the same rollout without recording: tokens/s of both and their ratio (target >= 0.90);
- EffRem at T = 8192 with 32 points x 16 sequences: tokens/s over the tokens it runs;
- mamba-ssm's own ``MambaLMHeadModel`` forward on the same weights over [1, 8192]-token calls (it
  carries no state between calls): tokens/s, and the ratios of the two above to it.

Every statelens path here runs on the kernels (:mod:`statelens.models.kernels`); timings are taken
after a warm-up call, with ``torch.cuda.synchronize``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diagnostics import SHAPE_130M, small_model

from statelens.analysis.remembrance import effrem_grid, remembrance
from statelens.models.checkpoint import mamba_ssm_module
from statelens.record import rollout
from statelens.record.recorder import record

CALL, STRIDE = 8192, 1024


def timed(fn) -> float:
    """Seconds of one call of ``fn`` after a warm-up call (Triton compiles and autotunes on the first)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(tokens: int = 131072, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """tokens/s of: ``plain`` (rollout), ``recorded`` (recording every 1024), ``effrem``, ``mamba_ssm``."""
    model = small_model(**SHAPE_130M).to("cuda", dtype)
    stream = torch.from_numpy(np.random.default_rng(0).integers(0, 50288, (1, tokens))).cuda()
    out = {}
    out["plain"] = tokens / timed(lambda: [None for _ in rollout(model, stream, chunk=CALL)])
    out["recorded"] = tokens / timed(lambda: record(model, stream, positions=STRIDE, chunk=CALL))
    T, n_seqs, ts = 8192, 16, effrem_grid(8192, 32)
    seqs = np.random.default_rng(1).integers(0, 50288, (n_seqs, T))
    run_tokens = sum(T - t for t in ts) * n_seqs              # the rows EffRem runs: from each t to T
    out["effrem"] = run_tokens / timed(lambda: remembrance(model, seqs, T=T, ts=ts, chunk=CALL))
    twin = mamba_ssm_module(model)
    with torch.no_grad():
        out["mamba_ssm"] = tokens / timed(lambda: [twin(stream[:, s:s + CALL]) for s in range(0, tokens, CALL)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    r = measure(args.tokens, getattr(torch, args.dtype))
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, {args.tokens} tokens")
    for name, value in r.items():
        print(f"{name:10} {value:12.0f} tok/s" + ("" if name == "mamba_ssm" else f"  ({value / r['mamba_ssm']:.2f}x mamba-ssm)"))
    print(f"recording / plain: {r['recorded'] / r['plain']:.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
