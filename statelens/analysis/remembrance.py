"""Effective Remembrance (Buitrago Ruiz & Gu, 2025):

    EffRem_T(t) = TV( q(. | x[0:T]), q(. | x[t:T]) ),    TV(p, q) = 0.5 * sum_v |p_v - q_v|

``q(. | c)`` is the next-token distribution after context ``c`` run from the initial state, so
EffRem_T(0) = 0. A model that length-generalizes stays near 0 until t approaches T; one that does not
still hinges on the first tokens at large t.

All (sequence, t) pairs run as rows of batches over the same tokens, each row reset to the initial
state after ``t`` tokens (the rollout engine's reset positions); only the last position is projected
to the vocabulary. Rows are sorted by ``t`` and each batch starts at its smallest ``t``, so the tokens
before it are not run at all.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from statelens.analysis.spec import Analysis, Outcome, Plot, Section, Table, option
from statelens.errors import BadInput, ParameterError
from statelens.models.base import RecurrentLM
from statelens.record.rollout import rollout

if TYPE_CHECKING:
    from statelens.runs import Run, RunSettings

COLUMNS = ["t", "T", "effrem", "effrem_sem", "n_seqs"]


def effrem_grid(T: int, points: int = 32) -> list[int]:
    """About ``points`` values of t in [0, T - 1]: half log-spaced, half linear; always 0."""
    if T < 2:
        raise ParameterError("T", f"T must be >= 2, got {T}")
    log = np.geomspace(1, T - 1, max(points // 2, 1))
    linear = np.linspace(0, T - 1, max(points - points // 2, 2))
    return sorted({0, *np.rint(log).astype(int).tolist(), *np.rint(linear).astype(int).tolist()})


def remembrance(
    model: RecurrentLM,
    sequences: np.ndarray | torch.Tensor,
    *,
    T: int,
    ts: Sequence[int] | None = None,
    points: int = 32,
    chunk: int = 2048,
    batch: int = 32,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """EffRem_T(t) averaged over sequences.

    sequences [N, >= T] int: the first T tokens of each are used. ``ts`` (default: :func:`effrem_grid`)
    are truncation points in [0, T - 1]; 0 is always added. ``batch`` rows run per forward;
    ``progress(n)`` is told each time n more tokens have been consumed.

    Columns: t, T, effrem (mean over sequences), effrem_sem (standard error of that mean; NaN for one
    sequence), n_seqs.
    """
    ts = truncation_points(T, ts, points)
    return summarize(effrem_matrix(model, sequences, T=T, ts=ts, chunk=chunk, batch=batch, progress=progress),
                     ts, T)


def truncation_points(T: int, ts: Sequence[int] | None = None, points: int = 32) -> list[int]:
    """The sorted truncation points: ``ts`` (default :func:`effrem_grid`) with 0 added, checked in [0, T - 1]."""
    ts = sorted({0, *(effrem_grid(T, points) if ts is None else (int(t) for t in ts))})
    if ts[-1] >= T or ts[0] < 0:
        raise ParameterError("ts", f"truncation points must lie in [0, T - 1] = [0, {T - 1}]")
    return ts


def effrem_matrix(model: RecurrentLM, sequences: np.ndarray | torch.Tensor, *, T: int, ts: Sequence[int],
                  chunk: int = 2048, batch: int = 32,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """sequences [N, >= T], ts (sorted, containing 0, from :func:`truncation_points`) -> EffRem_T(t) of
    each sequence [N, len(ts)], float64: the per-sequence values :func:`remembrance` averages."""
    sequences = sequences if isinstance(sequences, np.ndarray) else sequences.cpu().numpy()
    n_seqs, length = sequences.shape
    if length < T:
        raise ParameterError("sequences", f"sequences hold {length} tokens, fewer than T = {T}")
    rows = sorted((t, n) for n in range(n_seqs) for t in ts)   # t = 0 rows first: the references
    reference: dict[int, torch.Tensor] = {}                     # n -> q(. | x[0:T]) [vocab], float64
    effrem = np.zeros((n_seqs, len(ts)))
    column = {t: j for j, t in enumerate(ts)}
    for first in range(0, len(rows), batch):
        group = rows[first:first + batch]
        start = group[0][0]
        tokens = np.stack([sequences[n, start:T] for _, n in group])
        last = None
        for piece in rollout(model, tokens, chunk=chunk, resets=[t - start for t, _ in group]):
            last = piece
            if progress is not None:
                progress(piece.hidden.shape[0] * (piece.end - piece.start))
        with torch.no_grad():
            probs = torch.softmax(model.unembed(last.hidden[:, -1]).double(), dim=-1)  # [rows, vocab]
        for (t, n), q in zip(group, probs):
            if t == 0:
                reference[n] = q
            effrem[n, column[t]] = 0.5 * (reference[n] - q).abs().sum().item()
    return effrem


def summarize(effrem: np.ndarray, ts: Sequence[int], T: int) -> pd.DataFrame:
    """Per-sequence EffRem [N, len(ts)] -> the table of :func:`remembrance` (mean and its standard error)."""
    n_seqs = effrem.shape[0]
    sem = effrem.std(axis=0, ddof=1) / np.sqrt(n_seqs) if n_seqs > 1 else np.full(len(ts), np.nan)
    return pd.DataFrame({"t": ts, "T": T, "effrem": effrem.mean(axis=0), "effrem_sem": sem, "n_seqs": n_seqs},
                        columns=COLUMNS)


# --- the command: statelens remembrance --------------------------------------------------------------------


@dataclass
class Options:
    T: int | None = option(None, "Context length T of Effective Remembrance. Default: --length, else 4 x the "
                                 "training length.", flag="--T", min=2, show_default=False)
    points: int = option(32, "Truncation points t on the default grid (log + linear).", min=2)
    t: str | None = option(None, "Explicit truncation points, comma-separated (0 is added).", show_default=False)
    batch: int = option(32, "Rows (sequence, t) per forward.", min=1)


def compute(run: Run, settings: RunSettings, options: Options) -> Outcome:
    """EffRem_T(t) over ``settings.num_seqs`` sequences of T tokens, one resumable group of sequences at
    a time; EffRem at t ~ T/2 summarized."""
    ts = _parse_points(options.t)
    run.config["t"] = ts
    T = options.T or settings.length or 4 * run.train_len
    if ts is not None and any(not 0 <= v < T for v in ts):
        raise BadInput(f"--t: truncation points must lie in [0, T - 1] = [0, {T - 1}]")
    run.config["T"] = T
    sequences = run.sequences(settings.data, settings.num_seqs, T)
    run.lap("data")
    ts = truncation_points(T, ts, options.points)
    parts = run.sequence_groups(settings.num_seqs, settings.group, lambda rows, advance: {"effrem": effrem_matrix(
        run.model, sequences[rows], T=T, ts=ts, chunk=settings.chunk, batch=options.batch, progress=advance)},
        tokens_per_seq=len(ts) * T, description=f"EffRem T={T}")
    df = summarize(np.concatenate([part["effrem"] for part in parts]), ts, T)
    half = df.iloc[(df.t - T // 2).abs().argmin()]
    return Outcome({"remembrance": df}, {"effrem_at_half_T": {"t": int(half.t), "effrem": float(half.effrem)}},
                   [f"EffRem_T(t) at T = {T} over {settings.num_seqs} sequences, {len(df)} points of t",
                    f"EffRem at t = {int(half.t)} (~T/2): {half.effrem:.4f} ± {half.effrem_sem:.4f}"])


def _parse_points(text: str | None) -> list[int] | None:
    """--t "0,5,10" -> [0, 5, 10]; None when not given."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--t {text!r}: expected comma-separated integers") from None


PLOT = Plot("remembrance_figure", ("remembrance",))
SPEC = Analysis(
    "remembrance", "Effective Remembrance: TV distance between the next-token distributions after x[0:T] and "
                   "after x[t:T], for t on a grid; writes remembrance.csv, remembrance.png and run.json.",
    Options, compute, tables=(Table("remembrance", tuple(COLUMNS), keys=("t",), watched=("effrem",)),),
    plot=PLOT, sections=(Section("remembrance", "Effective Remembrance", PLOT),),
    report=lambda plan: Options(T=plan.length, points=32)).register()
