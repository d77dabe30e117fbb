"""State statistics: per position, layer and head, the size of the SSM state over a long rollout.

For each recorded position ``p`` (tokens consumed; the state after ``x[0:p]``), each layer and each
head, the statistics of the head's SSM state (``blocks.{i}.hook_state`` in the backend's ``by_head``
layout: Mamba-2 heads are its ``nheads``; Mamba-1 has no heads and is grouped into channel groups of
``model.head_channels`` channels), averaged over the sequences:

    norm    Frobenius norm of the head's state            (mean over sequences)
    mean    mean of its entries                            (mean over sequences)
    std     population std of its entries                  (mean over sequences)
    absmax  largest |entry|                                (max over sequences)
    finite  every entry finite                             (all sequences)

Chen et al., 2024 ("Stuffed Mamba") read these past the training length: a few heads' statistics
explode there (state collapse, :mod:`statelens.analysis.collapse`). A non-finite state is a finding,
not an error: its statistics come out inf/NaN with ``finite`` False.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from statelens.analysis import analyses
from statelens.models.base import RecurrentLM
from statelens.record.recorder import record, resolve_positions
from statelens.record.rollout import as_batch

COLUMNS = ["position", "layer", "head", "norm", "mean", "std", "absmax", "finite"]


@analyses.register("states")
def state_stats(
    model: RecurrentLM,
    sequences: np.ndarray | torch.Tensor,
    *,
    positions: int | Sequence[int] = 256,
    chunk: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """sequences [N, L] int -> per-head SSM state statistics at the recorded positions.

    ``positions``: a stride s (positions s, 2s, ... <= L) or a list of positions in 1..L.
    ``progress(n)`` is told each time n more tokens have been consumed.

    Columns: position, layer, head, norm, mean, std (each the mean over the N sequences), absmax
    (max over sequences), finite (True when every sequence's state is finite). Sorted by position,
    layer, head. NaN in any sequence makes the aggregate NaN (never skipped).
    """
    return stats_from_cubes([state_cubes(model, sequences, positions=positions, chunk=chunk, progress=progress)])


def state_cubes(model: RecurrentLM, sequences: np.ndarray | torch.Tensor, *, positions: int | Sequence[int] = 256,
                chunk: int = 2048, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """sequences [N, L] -> each sequence's statistics before the reduction over sequences: ``position``
    [P], ``layer`` and ``head`` [G] (G = layers x heads), and ``norm``, ``mean``, ``std``, ``absmax``,
    ``finite`` [P, N, G] (float64; finite 0/1). :func:`stats_from_cubes` reduces them."""
    sequences = as_batch(sequences)
    n_seqs = sequences.shape[0]
    if not resolve_positions(positions, sequences.shape[1]):
        raise ValueError(f"no recording position in 1..{sequences.shape[1]} (positions={positions!r})")
    on_chunk = None if progress is None else (lambda piece: progress(n_seqs * (piece.end - piece.start)))
    rec = record(model, sequences, names="blocks.*.hook_state", positions=positions, chunk=chunk,
                 on_chunk=on_chunk)

    # rec.stats is complete and sorted by position, seq, layer, head: reshape to
    # [positions P, seqs N, layers * heads G] and reduce over N with numpy, where NaN propagates
    # (pandas' groupby would skip it and hide a non-finite sequence).
    stats = rec.stats[rec.stats["name"] == "hook_state"].sort_values(["position", "seq", "layer", "head"],
                                                                      kind="stable", ignore_index=True)
    P, N = len(rec.positions), n_seqs
    first = stats[(stats["position"] == rec.positions[0]) & (stats["seq"] == 0)]
    G = len(first)

    def cube(column: str) -> np.ndarray:
        return stats[column].to_numpy(dtype=np.float64).reshape(P, N, G)

    labels = {"position": np.asarray(rec.positions, dtype=np.int64), "layer": first["layer"].to_numpy(np.int64),
              "head": first["head"].to_numpy(np.int64)}
    return labels | {c: cube(c) for c in ("norm", "mean", "std", "absmax", "finite")}


def stats_from_cubes(parts: Sequence[dict[str, np.ndarray]]) -> pd.DataFrame:
    """The table of :func:`state_stats` from the :func:`state_cubes` of consecutive groups of sequences
    (their sequences joined in order, then reduced over sequences)."""
    positions, P, G = parts[0]["position"], len(parts[0]["position"]), len(parts[0]["layer"])

    def cube(column: str) -> np.ndarray:                                              # [P, N, G]
        return np.concatenate([part[column] for part in parts], axis=1)

    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in a mean is a finding, not a warning
        norm, mean, std = (cube(c).mean(axis=1).ravel() for c in ("norm", "mean", "std"))
    out = pd.DataFrame({
        "position": np.repeat(positions, G),
        "layer": np.tile(parts[0]["layer"], P),
        "head": np.tile(parts[0]["head"], P),
        "norm": norm,
        "mean": mean,
        "std": std,
        "absmax": cube("absmax").max(axis=1).ravel(),
        "finite": cube("finite").astype(bool).all(axis=1).ravel(),
    }, columns=COLUMNS)
    return out.astype({"position": np.int64, "layer": np.int64, "head": np.int64, "finite": bool})
