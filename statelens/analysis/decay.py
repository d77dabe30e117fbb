"""Decay: how fast each head forgets, from the decay ``alpha_t = exp(dt_t * A)`` it applies to its state.

The SSM state evolves as ``h_p = alpha_p * h_{p-1} + (input at p)``, elementwise, so after ``p`` tokens
the initial state survives with weight ``prod_{q=1..p} alpha_q`` (its *retention*). A head whose typical
decay is ``alpha`` forgets with time constant ``-1 / log(alpha)`` tokens (its *horizon*): Stuffed Mamba
(Chen et al., 2024) traces state collapse to heads whose horizon exceeds the training length, so they
cannot forget what they saw; its training-free mitigation scales ``alpha`` down.

Positions follow the package convention: the token at index ``i`` takes the state from position ``i``
to ``i + 1``, so its alpha belongs to position ``i + 1`` (positions 1 .. L).

Axis letters: ``N`` sequences, ``l`` tokens of a chunk, ``H`` heads, ``k`` decay elements per head
(:meth:`~statelens.models.base.RecurrentLM.by_head`: Mamba-2 one per head; Mamba-1, whose heads are
groups of ``head_channels`` channels, channels-per-head x d_state).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from statelens.analysis import analyses
from statelens.analysis.buckets import bucket_edges
from statelens.models.base import RecurrentLM
from statelens.models.hooks import HookPoint, hooks
from statelens.record.rollout import as_batch, rollout

COLUMNS = ["pos_start", "pos_end", "layer", "head", "mean_alpha", "horizon", "retention"]


def horizon(mean_alpha: np.ndarray) -> np.ndarray:
    """Time constant ``-1 / log(alpha)`` in tokens: inf where alpha == 1, 0 where alpha == 0."""
    with np.errstate(divide="ignore"):
        # -1 / log(1) would be -1 / 0.0 = -inf: a head that never forgets has an infinite horizon.
        return np.where(mean_alpha == 1, np.inf, -1.0 / np.log(mean_alpha))


@analyses.register("decay")
def decay(model: RecurrentLM, sequences: np.ndarray | torch.Tensor, *, buckets: int = 32, scale: str = "log",
          chunk: int = 2048, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """sequences [N, L] -> per position bucket, layer and head: mean decay, horizon and retention.

    Buckets are :func:`bucket_edges` ``(1, L + 1, buckets, scale)`` over positions 1 .. L. The rollout is
    cut at every bucket edge, so each forward call lies in one bucket; ``progress(n)`` is told each time
    n more tokens have been consumed. Memory is one chunk plus the per-bucket results, whatever L.

    Columns: pos_start, pos_end (bucket [pos_start, pos_end) of positions), layer, head (Mamba-1: the
    channel group ``head``, :attr:`head_channels` consecutive channels), mean_alpha (alpha averaged over
    the bucket's positions, the head's elements and the sequences), horizon (-1 / log(mean_alpha) in
    tokens; inf when mean_alpha == 1), retention (at position pos_end - 1, the weight
    ``prod_{q=1..pos_end-1} alpha_q`` the initial state still has, per element, averaged over the head's
    elements and the sequences; non-increasing in position since alpha <= 1).
    """
    n_seqs, length = as_batch(sequences).shape
    edges = bucket_edges(1, length + 1, buckets, scale)
    n_buckets, n_layers, n_heads = len(edges) - 1, model.n_layers, model.n_heads
    mean_alpha = np.zeros((n_buckets, n_layers, n_heads))
    retention = np.zeros((n_buckets, n_layers, n_heads))

    # Per layer, for the bucket in progress: the sum of alpha over positions, sequences and elements
    # [H], and (over the whole sequence so far) the summed log alpha per element [N, H, k], float64.
    alpha_sum: dict[int, torch.Tensor] = {}
    log_retention: dict[int, torch.Tensor] = {}

    def observe(alpha: torch.Tensor, *, hook: HookPoint) -> None:
        a = model.by_head(hook.name, alpha)                             # [N, l, H, k]
        # Summed in float64 without a float64 copy of a chunk (Mamba-1's alpha is already large).
        alpha_sum[hook.layer] = alpha_sum.get(hook.layer, 0) + a.sum(dim=(0, 1, 3), dtype=torch.float64)
        log_retention[hook.layer] = log_retention.get(hook.layer, 0) + a.log().sum(dim=1, dtype=torch.float64)

    # Bucket [lo, hi) of positions is produced by tokens lo - 1 .. hi - 2. Stopping the rollout after
    # hi - 1 tokens for every edge hi makes each call lie in one bucket, and the call that ends there
    # closes it: the carried log retention is then that of the bucket's last position hi - 1.
    bucket = 0
    with hooks(model, {"blocks.*.hook_decay": observe}):
        for piece in rollout(model, sequences, chunk=chunk, stops=(edges[1:] - 1).tolist()):
            if progress is not None:
                progress(n_seqs * (piece.end - piece.start))
            if piece.end != edges[bucket + 1] - 1:
                continue
            count = n_seqs * (edges[bucket + 1] - edges[bucket])
            for layer in range(n_layers):
                k = log_retention[layer].shape[-1]
                mean_alpha[bucket, layer] = (alpha_sum.pop(layer) / (count * k)).cpu().numpy()
                retention[bucket, layer] = log_retention[layer].exp().mean(dim=(0, 2)).cpu().numpy()
            bucket += 1

    b, layer, head = np.meshgrid(np.arange(n_buckets), np.arange(n_layers), np.arange(n_heads), indexing="ij")
    b, layer, head = b.ravel(), layer.ravel(), head.ravel()
    flat = mean_alpha.ravel()
    return pd.DataFrame({"pos_start": edges[b], "pos_end": edges[b + 1], "layer": layer, "head": head,
                         "mean_alpha": flat, "horizon": horizon(flat), "retention": retention.ravel()},
                        columns=COLUMNS)
