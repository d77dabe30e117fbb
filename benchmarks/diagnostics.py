"""Costs of the diagnostics relative to a plain rollout, measured in one run (ratios only); run by
``benchmarks/run.py``, which prints them in its table.

- ``recording_overhead``: a rollout recording state statistics every 256 tokens vs the same rollout
  without (hidden states only, no logits), at the small shape (32k tokens) and the 130M shape (4k tokens);
- ``effrem_cost``: Effective Remembrance over K truncation points vs one plain forward over the same
  number of tokens (the rows it actually runs, summed);
- ``rss_ratio``: peak RSS of a rollout recording statistics at 32k tokens vs at ``tokens`` (1M by
  default), each in a fresh process (``python benchmarks/diagnostics.py TOKENS``).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from statelens.analysis.remembrance import effrem_grid, remembrance
from statelens.models import Mamba2Config, Mamba2LM
from statelens.record import rollout
from statelens.record.recorder import record


def small_model(d_model: int = 256, n_layer: int = 4, d_state: int = 64, headdim: int = 32,
                vocab: int = 256) -> Mamba2LM:
    """A random Mamba-2 with mamba-ssm's A initialisation; defaults: the small shape."""
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=vocab, d_state=d_state,
                                  headdim=headdim))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
    return model.eval()


def best_of(*fns, repeats: int = 3) -> list[float]:
    """The fastest of ``repeats`` runs of each function, the runs interleaved so that a slow spell of
    the machine falls on all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, kept in zip(fns, times):
            start = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - start)
    return [min(kept) for kept in times]


def rss_child(tokens: int) -> None:
    """In a fresh process: a rollout of ``tokens`` recording statistics every 256; prints peak RSS (MiB)."""
    model = small_model()
    stream = np.random.default_rng(0).integers(0, 256, tokens)
    rec = record(model, stream, positions=256, chunk=4096)
    assert len(rec.positions) == tokens // 256
    print(json.dumps({"rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident memory. /proc's VmHWM starts afresh at exec; getrusage's ru_maxrss
    would carry the parent's peak into the child."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SHAPE_130M = dict(d_model=768, n_layer=24, d_state=128, headdim=64, vocab=50288)


def recording_overhead() -> dict[str, tuple[int, float]]:
    """shape -> (tokens, time recording / time plain)."""
    overheads = {}
    for shape, kwargs, tokens, repeats in (("small", {}, 32768, 5), ("130m", SHAPE_130M, 4096, 2)):
        big = small_model(**kwargs)
        stream = np.random.default_rng(0).integers(0, 256, tokens)
        plain, recorded = best_of(lambda: [None for _ in rollout(big, stream, chunk=4096)],
                                  lambda: record(big, stream, positions=256, chunk=4096), repeats=repeats)
        overheads[shape] = tokens, recorded / plain
    return overheads


def effrem_cost() -> tuple[str, float]:
    """(what ran, time of Effective Remembrance / time of a plain forward over as many tokens)."""
    model = small_model()
    T, n_seqs = 2048, 4
    ts = effrem_grid(T, 32)
    seqs = np.random.default_rng(1).integers(0, 256, (n_seqs, T))
    rows = sorted((t, n) for n in range(n_seqs) for t in ts)
    batch = 32
    run_tokens = sum((T - rows[i][0]) * len(rows[i:i + batch]) for i in range(0, len(rows), batch))
    same_tokens = np.random.default_rng(2).integers(0, 256, (batch, run_tokens // batch))
    effrem, forward = best_of(lambda: remembrance(model, seqs, T=T, ts=ts, batch=batch, chunk=2048),
                              lambda: [None for _ in rollout(model, same_tokens, chunk=2048)], repeats=2)
    return f"{len(ts)} points x {n_seqs} seqs of {T}", effrem / forward


def rss_ratio(tokens: int = 1_000_000) -> tuple[float, float]:
    """Peak RSS (MiB) of a recording rollout over 32768 tokens and over ``tokens``, each in a fresh process."""
    def rss(n: int) -> float:
        out = subprocess.run([sys.executable, __file__, str(n)], check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["rss_mib"]

    return rss(32768), rss(tokens)


if __name__ == "__main__":
    rss_child(int(sys.argv[1]))
