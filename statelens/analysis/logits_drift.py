"""Logits drift: how far past a window of W tokens the model's prediction still depends on older context.

At position ``p`` (tokens consumed), the full-context prediction ``q(. | x[0:p])`` is compared with the
prediction from the last W tokens alone, run from the initial state, ``q(. | x[p-W:p])``:

    drift_W(p) = TV( q(. | x[0:p]), q(. | x[p-W:p]) ),    TV(a, b) = 0.5 * sum_v |a_v - b_v|

For p <= W the two contexts are the same and the drift is 0, so only p > W is measured. With W the
training length, a drift near 0 says the model ignores everything older than the length it was trained
on; a drift that stays high far past W says the old context still moves the prediction, whether it is
used (a model that reads long context) or misread (a collapsed state the model never met in training:
compare with ``perplexity`` and ``states`` to tell the two apart).

Positions ``p`` in (W, L] are split into position buckets (:func:`~statelens.analysis.buckets.bucket_edges`);
``points`` positions evenly spread in each bucket are measured, each once per sequence. The
full-context predictions come from one chunked rollout of each sequence, cut at those positions; the
windows run as batches of ``[batch, W]`` token rows from the zero state. Only the last position of
each is projected to the vocabulary.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from statelens.analysis.buckets import Scale, bucket_edges
from statelens.analysis.spec import Analysis, Outcome, Plot, Section, Table, option
from statelens.errors import BadInput
from statelens.models.base import RecurrentLM
from statelens.record.rollout import as_batch, rollout

if TYPE_CHECKING:
    from statelens.runs import Run, RunSettings

COLUMNS = ["pos_start", "pos_end", "window", "tv", "tv_sem", "n_positions", "n_seqs"]


def drift_positions(window: int, length: int, *, buckets: int = 16, points: int = 4,
                    scale: str = "log") -> tuple[np.ndarray, np.ndarray]:
    """The bucket edges over positions (window, length] and the measured positions [P], sorted: up to
    ``points`` per bucket, evenly spread over it (every position of a bucket narrower than that)."""
    if window < 1:
        raise BadInput(f"--window {window}: must be at least 1")
    if length <= window:
        raise BadInput(f"--length {length} does not exceed the window {window}: the truncated context would be "
                       "the whole context")
    edges = bucket_edges(window + 1, length + 1, buckets, scale)
    chosen = [np.unique(np.rint(np.linspace(lo, hi - 1, min(points, hi - lo))).astype(np.int64))
              for lo, hi in zip(edges[:-1], edges[1:])]
    return edges, np.concatenate(chosen)


def _probs(model: RecurrentLM, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [rows, d_model] -> next-token probabilities [rows, vocab], float64."""
    with torch.no_grad():
        return torch.softmax(model.unembed(hidden[:, None])[:, 0].double(), dim=-1)


def drift_matrix(model: RecurrentLM, sequences: np.ndarray | torch.Tensor, *, window: int, positions: np.ndarray,
                 chunk: int = 2048, batch: int = 32, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """sequences [N, >= max(positions)] -> drift_W(p) of each sequence at each position [N, P], float64.

    ``positions`` [P], sorted, each in (window, length]."""
    sequences = as_batch(sequences if isinstance(sequences, np.ndarray) else sequences.cpu().numpy())
    n_seqs = sequences.shape[0]
    positions = [int(p) for p in positions]
    wanted = set(positions)
    found = []
    for piece in rollout(model, sequences[:, :positions[-1]], chunk=chunk, stops=positions):
        if piece.end in wanted:
            found.append(_probs(model, piece.hidden[:, -1]).cpu())                       # [N, vocab]
        if progress is not None:
            progress(n_seqs * (piece.end - piece.start))
    full = torch.stack(found, dim=1)                                                      # [N, P, vocab]
    drift = np.zeros((n_seqs, len(positions)))
    rows = [(n, j) for n in range(n_seqs) for j in range(len(positions))]
    for first in range(0, len(rows), batch):
        group = rows[first:first + batch]
        windows = np.stack([sequences[n, positions[j] - window:positions[j]] for n, j in group])  # [b, W]
        last = None
        for piece in rollout(model, windows, chunk=chunk):
            last = piece
        if progress is not None:
            progress(len(group) * window)
        truncated = _probs(model, last.hidden[:, -1]).cpu()                               # [b, vocab]
        for (n, j), q in zip(group, truncated):
            drift[n, j] = 0.5 * (full[n, j] - q).abs().sum().item()
    return drift


def summarize(drift: np.ndarray, positions: np.ndarray, edges: np.ndarray, window: int) -> pd.DataFrame:
    """Per-sequence drift [N, P] at ``positions`` -> one row per bucket of ``edges`` (columns COLUMNS):
    the mean over the bucket's positions and the sequences, and the standard error over sequences of
    their bucket means (NaN for one sequence)."""
    n_seqs = drift.shape[0]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (positions >= lo) & (positions < hi)
        per_seq = drift[:, inside].mean(axis=1)                                           # [N]
        sem = per_seq.std(ddof=1) / np.sqrt(n_seqs) if n_seqs > 1 else np.nan
        rows.append((int(lo), int(hi), window, float(per_seq.mean()), float(sem), int(inside.sum()), n_seqs))
    return pd.DataFrame(rows, columns=COLUMNS)


def logits_drift(model: RecurrentLM, sequences: np.ndarray | torch.Tensor, *, window: int, buckets: int = 16,
                 points: int = 4, scale: str = "log", chunk: int = 2048, batch: int = 32,
                 progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """sequences [N, L] -> the drift table over positions (window, L] (columns COLUMNS): pos_start, pos_end
    (bucket [pos_start, pos_end) of positions p), window (W), tv (mean drift_W(p) over the bucket's measured
    positions and the sequences), tv_sem (its standard error over sequences), n_positions (positions
    measured in the bucket), n_seqs."""
    edges, positions = drift_positions(window, as_batch(sequences).shape[1], buckets=buckets, points=points,
                                       scale=scale)
    drift = drift_matrix(model, sequences, window=window, positions=positions, chunk=chunk, batch=batch,
                         progress=progress)
    return summarize(drift, positions, edges, window)


# --- the command: statelens logits-drift ------------------------------------------------------------------


@dataclass
class Options:
    window: int | None = option(None, "W: the tokens of context the truncated prediction keeps. Default: the "
                                      "training length.", min=1, show_default=False)
    buckets: int = option(16, "Position buckets over (W, --length].", min=1)
    points: int = option(4, "Positions measured per bucket, evenly spread.", min=1)
    scale: str = option("log", "Bucket spacing: log or linear.", choices=Scale)
    batch: int = option(32, "Truncated windows per forward.", min=1)


def compute(run: Run, settings: RunSettings, options: Options) -> Outcome:
    """The drift over ``settings.num_seqs`` sequences of the rollout length, one resumable group of
    sequences at a time."""
    o = options
    length = settings.length or 4 * run.train_len
    window = o.window or run.train_len
    run.config |= {"length": length, "window": window}
    edges, positions = drift_positions(window, length, buckets=o.buckets, points=o.points, scale=o.scale)
    sequences = run.sequences(settings.data, settings.num_seqs, length)
    run.lap("data")
    parts = run.sequence_groups(settings.num_seqs, settings.group, lambda rows, advance: {"drift": drift_matrix(
        run.model, sequences[rows], window=window, positions=positions, chunk=settings.chunk, batch=o.batch,
        progress=advance)}, tokens_per_seq=int(positions[-1]) + len(positions) * window,
        description=f"logits drift W={window}")
    df = summarize(np.concatenate([part["drift"] for part in parts]), positions, edges, window)
    first, last = df.iloc[0], df.iloc[-1]
    results = {"window": window, "first_bucket_tv": float(first.tv), "last_bucket_tv": float(last.tv)}
    lines = [f"TV between the full-context prediction and the last {window} tokens' alone, over "
             f"{settings.num_seqs} sequences of {length} tokens, {len(positions)} positions in {len(df)} buckets",
             f"positions [{int(first.pos_start)}, {int(first.pos_end)}): {first.tv:.4f}; "
             f"[{int(last.pos_start)}, {int(last.pos_end)}): {last.tv:.4f}"]
    return Outcome({"logits_drift": df}, results, lines)


PLOT = Plot("logits_drift_figure", ("logits_drift",))
SPEC = Analysis(
    "logits-drift", "Logits drift: per position bucket past a window of W tokens (default: the training length), "
                    "the TV distance between the full-context prediction and the prediction from the last W tokens "
                    "alone; writes logits_drift.csv, logits-drift.png and run.json.",
    Options, compute, tables=(Table("logits_drift", tuple(COLUMNS), keys=("pos_start", "pos_end"), watched=("tv",)),),
    plot=PLOT, sections=(Section("logits-drift", "Logits drift: old context's pull past the training length", PLOT),),
    report=lambda plan: Options(buckets=16)).register()
