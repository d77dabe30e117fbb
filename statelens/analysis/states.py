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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from statelens.analysis.spec import Analysis, Outcome, Plot, Section, Table, option
from statelens.errors import BadInput, ParameterError
from statelens.models.base import RecurrentLM
from statelens.record.recorder import Recording, record, resolve_positions
from statelens.record.rollout import as_batch

if TYPE_CHECKING:
    from statelens.runs import Run, RunSettings

COLUMNS = ["position", "layer", "head", "norm", "mean", "std", "absmax", "finite"]


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
        raise ParameterError("positions", f"no recording position in 1..{sequences.shape[1]} (positions={positions!r})")
    on_chunk = None if progress is None else (lambda piece: progress(n_seqs * (piece.end - piece.start)))
    rec = record(model, sequences, names="blocks.*.hook_state", positions=positions, chunk=chunk,
                 on_chunk=on_chunk)
    return recording_cubes(rec, n_seqs)


def recording_cubes(rec: Recording, n_seqs: int) -> dict[str, np.ndarray]:
    """The :func:`state_cubes` of a recording of every layer's ``hook_state`` over ``n_seqs`` sequences."""
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


# --- the command: statelens states -------------------------------------------------------------------------


@dataclass
class Options:
    stride: int | None = option(None, "Record the state every N tokens. Default: the training length / 16 (at "
                                      "least 1).", min=1, show_default=False)
    k: float = option(2.0, "A head collapses when a statistic past the training length exceeds k x its maximum "
                           "within it (k > 0).")


def compute(run: Run, settings: RunSettings, options: Options) -> Outcome:
    """State statistics every ``stride`` tokens over ``settings.num_seqs`` sequences, and the heads that
    collapse past the training length (:func:`statelens.analysis.collapse.collapse`)."""
    from statelens.analysis.collapse import collapse

    k = options.k
    if not k > 0:
        raise BadInput(f"--k {k}: must be positive")
    length = settings.length or 4 * run.train_len
    stride = options.stride or max(1, run.train_len // 16)
    run.config["stride"] = stride
    if stride > length:
        raise BadInput(f"--stride {stride} exceeds --length {length}: no state would be recorded")
    if stride > run.train_len:
        raise BadInput(f"--stride {stride} exceeds the training length {run.train_len}: no state would be "
                       "recorded within it to compare against")
    if length <= run.train_len:
        raise BadInput(f"--length {length} does not exceed the training length {run.train_len}: nothing to "
                       "compare past it")
    run.config["length"] = length
    sequences = run.sequences(settings.data, settings.num_seqs, length)
    run.lap("data")
    parts = run.sequence_groups(settings.num_seqs, settings.group, lambda rows, advance: state_cubes(
        run.model, sequences[rows], positions=stride, chunk=settings.chunk, progress=advance),
        tokens_per_seq=length, description=f"states L={length}")
    stats = stats_from_cubes(parts)
    try:
        heads = collapse(stats, run.train_len, k=k)
    except ParameterError as e:
        if e.parameter != "positions":  # a setting this function made itself, not the user: a bug
            raise RuntimeError(f"collapse refused its {e.parameter}: {e}") from e
        raise BadInput(f"--stride {stride}, --length {length}: {e}") from None  # nothing to compare
    return Outcome({"state_stats": stats, "collapse": heads},
                   *_summary(heads, run.model, run.train_len, k, settings.num_seqs, length, stride))


def _summary(heads: pd.DataFrame, model: RecurrentLM, train_len: int, k: float, num_seqs: int, length: int,
             stride: int) -> tuple[dict, list[str]]:
    """run.json's results and the printed lines: how many heads collapse, and the top five."""
    found = heads[heads.collapsed]
    unit = "heads"
    if hasattr(model, "head_channels"):  # DESIGN.md: Mamba-1 has no heads; say what a "head" is
        unit = f"heads (Mamba-1 has none: groups of {model.head_channels} channels)"
    results = {"collapsed_heads": len(found), "heads": len(heads), "head_unit": unit,
               "top": [plain(row) for row in heads.head(5).to_dict("records")]}
    lines = [(f"{len(found)} of {len(heads)} {unit} collapse past the training length {train_len} "
              f"(a statistic > {k:g} x its in-training max, or non-finite); {num_seqs} sequences of {length} "
              f"tokens, recorded every {stride}")]
    for row in (found if len(found) else heads).head(5).itertuples():
        change = "non-finite" if row.nonfinite else f"x {row.ratio:.2f}"
        where = f" from position {row.start_position}" if row.collapsed else " (not collapsed; the largest ratio)"
        lines.append(f"layer {row.layer} head {row.head}: {row.statistic} {change}{where}")
    return results, lines


def plain(record: dict) -> dict:
    """A DataFrame row as JSON-ready Python values; non-finite floats become "inf", "-inf" or "nan"."""
    values = {}
    for key, value in record.items():
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        values[key] = value
    return values


_NORM = Plot("state_norm_figure", ("state_stats", "collapse"))
SPEC = Analysis(
    "states", "State statistics (norm, mean, std, absmax per layer and head) by position, and state collapse: "
              "heads whose statistics past the training length exceed k x their in-training maximum or turn "
              "non-finite; writes state_stats.csv, collapse.csv, states.png and run.json.",
    Options, compute,
    tables=(Table("state_stats", tuple(COLUMNS), keys=("position", "layer", "head"),
                  watched=("norm", "mean", "std", "absmax")),
            Table("collapse", ("layer", "head", "collapsed", "statistic", "ratio", "start_position", "nonfinite",
                               "within_max", "beyond_max"))),
    plot=_NORM,
    sections=(Section("state-norm", "State norm and collapse", _NORM, layout="maps-and-lines"),
              Section("state-std", "State standard deviation", Plot("state_std_figure", ("state_stats",)))),
    report=lambda plan: Options(stride=plan.stride)).register()
