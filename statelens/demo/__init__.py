"""The demo's built-in checkpoints, its evaluation text, and the findings it checks.

Made by ``examples/demo_checkpoints.py`` from the Python standard library's sources (byte-level):

- :data:`BASELINE`: a tiny Mamba-2 trained from the zero state on 64-byte chunks (half of them
  repeating their first 32 bytes in their second 32);
- :data:`POSTTRAINED`: the baseline after 4000 steps of state-passing post-training at the same length;
- :data:`HELDOUT`: [rows, length] bytes of standard-library files neither run trained on.

:func:`findings` states the length-generalization story the demo must show, as numbers with the
margin each must clear.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from statelens.analysis.positionwise import in_context_loss

ROOT = Path(__file__).resolve().parent
BASELINE = ROOT / "baseline"
POSTTRAINED = ROOT / "state-passing"
HELDOUT = ROOT / "heldout.npy"

FINDING_COLUMNS = ["finding", "baseline", "state_passing", "value", "required", "holds"]


def _weighted_loss(positionwise: pd.DataFrame, start: int) -> float:
    """Mean loss over the buckets starting at or after ``start``, weighted by their tokens."""
    rows = positionwise[positionwise.pos_start >= start]
    return float((rows.loss * rows.n_tokens).sum() / rows.n_tokens.sum()) if len(rows) else float("nan")


def findings(baseline: dict[str, pd.DataFrame], posttrained: dict[str, pd.DataFrame], train_len: int) -> pd.DataFrame:
    """The demo's claims, each a comparison of the two checkpoints' tables (``positionwise``,
    ``remembrance``, ``coverage_buckets``, ``logits_drift``, as the commands write them) with the margin it must clear.

    Rows (columns as FINDING_COLUMNS; ``value`` is what ``required`` bounds):

    - loss beyond 8T, ratio: mean loss over position buckets starting at >= 8 x train_len, baseline /
      post-trained, required >= 1.15;
    - baseline loss beyond 8T minus its in-context loss (buckets ending <= train_len), >= 0.15 nats;
    - in-context loss, ratio post-trained / baseline, <= 1.03;
    - EffRem for t in [T/8, T/2] (T the EffRem horizon), mean, ratio baseline / post-trained, >= 2.5;
    - out-of-support fraction past the training length (mean over buckets, each model under its own
      training regime), ratio baseline / post-trained, >= 2;
    - logits drift past 8 x train_len (``logits_drift``: mean TV over the buckets starting at or after
      it, between the full-context prediction and the last train_len tokens' alone), ratio baseline /
      post-trained, >= 3.
    """
    def beyond(tables):
        return _weighted_loss(tables["positionwise"], 8 * train_len)

    def in_context(tables):
        return in_context_loss(tables["positionwise"], train_len)

    def effrem(tables):
        rem = tables["remembrance"]
        T = int(rem["T"].max())
        return float(rem[(rem["T"] == T) & (rem.t >= T / 8) & (rem.t <= T / 2)].effrem.mean())

    def oos(tables):
        return float(tables["coverage_buckets"].oos_fraction.mean())

    def drift(tables):
        rows = tables["logits_drift"]
        return float(rows[rows.pos_start >= 8 * train_len].tv.mean())

    rows = []
    for name, measure, value, required, holds in [
        ("loss beyond 8T (nats): baseline / state-passing", beyond, lambda a, b: a / b, ">= 1.15", lambda v: v >= 1.15),
        ("in-context loss (nats): state-passing / baseline", in_context, lambda a, b: b / a, "<= 1.03",
         lambda v: v <= 1.03),
        ("EffRem, t in [T/8, T/2]: baseline / state-passing", effrem, lambda a, b: a / b, ">= 2.5", lambda v: v >= 2.5),
        ("out-of-support fraction beyond T: baseline / state-passing", oos, lambda a, b: a / b, ">= 2",
         lambda v: v >= 2),
        ("logits drift beyond 8T (TV): baseline / state-passing", drift, lambda a, b: a / b, ">= 3",
         lambda v: v >= 3),
    ]:
        a, b = measure(baseline), measure(posttrained)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = float(value(np.float64(a), np.float64(b)))
        rows.append((name, a, b, v, required, bool(holds(v))))
    gap = beyond(baseline) - in_context(baseline)
    rows.insert(1, ("baseline loss beyond 8T minus its in-context loss (nats)", gap, float("nan"), gap, ">= 0.15",
                    bool(gap >= 0.15)))
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)
