"""Remembrance through the transformers adapter (``--backend hf``) against statelens' own Mamba-2 backend on
the same weights (issue 17: at most 3x); run by ``benchmarks/run.py``, or alone:

    python benchmarks/adapter.py [T] [SEQS]

A random ``Mamba2ForCausalLM`` at the small shape with the released configs' chunk_size (256), the same
weights loaded into :class:`~statelens.models.Mamba2LM` (``throughput.pair``); Effective Remembrance at
``T`` (128 by default) over ``SEQS`` (2) sequences on the default 32-point grid, batch 32, through each.
The runs are interleaved and the fastest of each kept (:func:`diagnostics.best_of`); the two tables must
agree (a check that both computed the same thing).
"""
from __future__ import annotations

import sys

import numpy as np

from diagnostics import best_of
from throughput import SHAPES, pair

from statelens.analysis.remembrance import remembrance
from statelens.models.hf_adapter import HFRecurrentAdapter


def adapter_ratio(T: int = 128, n_seqs: int = 2, repeats: int = 2) -> tuple[float, float]:
    """(time through the adapter / time through the native backend, largest EffRem difference)."""
    hf, native = pair("mamba2", *SHAPES["small"])
    adapter = HFRecurrentAdapter(hf)
    sequences = np.random.default_rng(0).integers(0, SHAPES["small"][-1], (n_seqs, T))
    tables = {}

    def run(name, model):
        def go():
            tables[name] = remembrance(model, sequences, T=T)
        return go

    remembrance(native, sequences[:, :16], T=16)  # warm-up
    native_time, adapter_time = best_of(run("native", native), run("adapter", adapter), repeats=repeats)
    gap = float((tables["native"].effrem - tables["adapter"].effrem).abs().max())
    return adapter_time / native_time, gap


if __name__ == "__main__":
    ratio, gap = adapter_ratio(*map(int, sys.argv[1:3]))
    print(f"remembrance through the adapter / native: {ratio:.2f} (EffRem difference {gap:.1e})")
