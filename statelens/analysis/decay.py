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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from statelens.analysis.buckets import Scale, bucket_edges
from statelens.analysis.spec import Analysis, Outcome, Plot, Section, Table, option
from statelens.models.base import RecurrentLM
from statelens.models.hooks import HookPoint, hooks
from statelens.record.rollout import as_batch, rollout
from statelens.resumable import sum_in_order

if TYPE_CHECKING:
    from statelens.runs import Run, RunSettings

COLUMNS = ["pos_start", "pos_end", "layer", "head", "mean_alpha", "horizon", "retention"]


def horizon(mean_alpha: np.ndarray) -> np.ndarray:
    """Time constant ``-1 / log(alpha)`` in tokens: inf where alpha == 1, 0 where alpha == 0."""
    with np.errstate(divide="ignore"):
        # -1 / log(1) would be -1 / 0.0 = -inf: a head that never forgets has an infinite horizon.
        return np.where(mean_alpha == 1, np.inf, -1.0 / np.log(mean_alpha))


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
    return decay_from_sums([decay_sums(model, sequences, buckets=buckets, scale=scale, chunk=chunk,
                                       progress=progress)])


def decay_sums(model: RecurrentLM, sequences: np.ndarray | torch.Tensor, *, buckets: int = 32, scale: str = "log",
               chunk: int = 2048, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """sequences [N, L] -> what :func:`decay` reduces over sequences: ``edges`` [B + 1], ``alpha_sum``
    [B, layers, H] (alpha summed over the bucket's positions, the sequences and the head's elements, float64),
    ``elements`` [layers] (elements per head), ``retention`` [N, B, layers, H] (each sequence's retention at
    the bucket's last position, averaged over the head's elements). :func:`decay_from_sums` combines them."""
    n_seqs, length = as_batch(sequences).shape
    edges = bucket_edges(1, length + 1, buckets, scale)
    n_buckets, n_layers, n_heads = len(edges) - 1, model.n_layers, model.n_heads
    alpha_total = np.zeros((n_buckets, n_layers, n_heads))
    retention = np.zeros((n_seqs, n_buckets, n_layers, n_heads))
    elements = np.zeros(n_layers, dtype=np.int64)

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
            for layer in range(n_layers):
                elements[layer] = log_retention[layer].shape[-1]
                alpha_total[bucket, layer] = alpha_sum.pop(layer).cpu().numpy()
                retention[:, bucket, layer] = log_retention[layer].exp().mean(dim=2).cpu().numpy()
            bucket += 1
    return {"edges": edges, "alpha_sum": alpha_total, "elements": elements, "retention": retention}


def decay_from_sums(parts: Sequence[dict[str, np.ndarray]]) -> pd.DataFrame:
    """The table of :func:`decay` from the :func:`decay_sums` of consecutive groups of sequences."""
    edges, elements = parts[0]["edges"], parts[0]["elements"]
    retention = np.concatenate([part["retention"] for part in parts]).mean(axis=0)     # [B, layers, H]
    n_seqs = sum(len(part["retention"]) for part in parts)
    count = n_seqs * np.diff(edges)[:, None, None] * elements[None, :, None]            # alphas summed
    mean_alpha = sum_in_order([part["alpha_sum"] for part in parts]) / count
    n_buckets, n_layers, n_heads = mean_alpha.shape
    b, layer, head = np.meshgrid(np.arange(n_buckets), np.arange(n_layers), np.arange(n_heads), indexing="ij")
    b, layer, head = b.ravel(), layer.ravel(), head.ravel()
    flat = mean_alpha.ravel()
    return pd.DataFrame({"pos_start": edges[b], "pos_end": edges[b + 1], "layer": layer, "head": head,
                         "mean_alpha": flat, "horizon": horizon(flat), "retention": retention.ravel()},
                        columns=COLUMNS)


# --- the command: statelens decay -------------------------------------------------------------------------


@dataclass
class Options:
    buckets: int = option(32, "Position buckets.", min=1)
    scale: str = option("log", "Bucket spacing: log or linear.", choices=Scale)


def compute(run: Run, settings: RunSettings, options: Options) -> Outcome:
    """Decay over ``settings.num_seqs`` sequences of the rollout length; the median horizon per layer at
    the last bucket and the retention at the training length."""
    length = settings.length or 4 * run.train_len
    run.config["length"] = length
    sequences = run.sequences(settings.data, settings.num_seqs, length)
    run.lap("data")
    df = decay_from_sums(run.sequence_groups(settings.num_seqs, settings.group, lambda rows, advance: decay_sums(
        run.model, sequences[rows], buckets=options.buckets, scale=options.scale, chunk=settings.chunk,
        progress=advance), tokens_per_seq=length, description=f"decay L={length}"))
    return Outcome({"decay": df}, *_summary(df, run, settings.num_seqs, length, options.scale))


def _summary(df: pd.DataFrame, run: Run, num_seqs: int, length: int, scale: str) -> tuple[dict, list[str]]:
    """run.json's results and the printed lines: horizons at the last bucket, retention at train_len."""
    last = df[df.pos_start == df.pos_start.max()]
    horizons = last.groupby("layer").horizon.median()
    at_train = df[df.pos_end - 1 <= run.train_len]
    at_train = at_train[at_train.pos_end == at_train.pos_end.max()] if len(at_train) else at_train
    # JSON has no infinity: a horizon of inf (alpha == 1, never forgets) is written as null.
    results = {"last_bucket": [int(last.pos_start.iloc[0]), int(last.pos_end.iloc[0])],
               "median_horizon_by_layer": {int(k): (float(v) if math.isfinite(v) else None)
                                           for k, v in horizons.items()}}
    model = run.model
    lines = [(f"decay over {num_seqs} sequences of {length} tokens, {df.pos_start.nunique()} {scale} "
              f"position buckets, {model.n_layers} layers x {model.n_heads} heads")]
    if hasattr(model, "head_channels"):
        lines.append(f"{model.arch} has no heads: a head is a group of {model.head_channels} "
                     "consecutive channels (all their d_state elements)")
    short, long = horizons.idxmin(), horizons.idxmax()
    lines.append(f"median horizon over heads at positions [{results['last_bucket'][0]}, "
                 f"{results['last_bucket'][1]}): shortest layer {short} ({horizons[short]:.4g} tokens), "
                 f"longest layer {long} ({horizons[long]:.4g} tokens); training length {run.train_len}")
    if len(at_train):
        p = int(at_train.pos_end.iloc[0]) - 1
        by_layer = at_train.groupby("layer").retention.mean()
        results["retention_at_train_len"] = {"position": p, "mean_by_layer": {int(k): float(v)
                                                                               for k, v in by_layer.items()}}
        lines.append(f"retention of the initial state at position {p} (<= training length {run.train_len}), "
                     f"mean over heads: {by_layer.min():.3g} (layer {by_layer.idxmin()}) to "
                     f"{by_layer.max():.3g} (layer {by_layer.idxmax()})")
    return results, lines


PLOT = Plot("decay_figure", ("decay",))
SPEC = Analysis(
    "decay", "Decay per layer and head: mean alpha = exp(dt * A) per position bucket, its horizon -1 / log(alpha) "
             "in tokens, and the retention of the initial state; writes decay.csv, decay.png and run.json.",
    Options, compute, tables=(Table("decay", tuple(COLUMNS), keys=("pos_start", "pos_end", "layer", "head"),
                                    watched=("mean_alpha", "retention")),),
    plot=PLOT, sections=(Section("decay", "Decay: retention and memory horizon", PLOT, panels=2),),
    report=lambda plan: Options(buckets=plan.buckets)).register()
