"""State collapse (Chen et al., 2024, "Stuffed Mamba"): heads whose state explodes past the training length.

For a head and a statistic s of :func:`statelens.analysis.states.state_stats` (norm and std by
default; absmax and |mean| on request):

    within_max(s) = max over recorded positions p <= T of s(p)        (T: the training length)
    beyond_max(s) = max over recorded positions p >  T of s(p)
    ratio(s)      = beyond_max(s) / within_max(s)

A head **collapses** when, at some position p > T, any statistic exceeds k * within_max(s) or the state
is non-finite there (inf/NaN statistics, or ``finite`` False). ``start_position`` is the first such p.

Why |mean| and absmax are not compared by default: a head's mean is often near zero, where a ratio of
maxima is noise (on tiny random models it flags steady heads at ratios 5-20), and absmax, a maximum
over the entries and the sequences, swings with one outlier (ratios 2-4 on steady heads of tiny
random models over a few sequences). A growth of either at the state's own scale shows in the norm,
since norm^2 = numel * (mean^2 + std^2) >= absmax^2.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from statelens.errors import ParameterError

STATISTICS = ("norm", "std", "absmax", "mean")  # what may be compared; "mean" as |mean|
DEFAULT_STATISTICS = ("norm", "std")
COLUMNS = ["layer", "head", "collapsed", "statistic", "ratio", "start_position", "nonfinite", "within_max",
           "beyond_max"]


def collapse(stats: pd.DataFrame, train_len: int, k: float = 2.0, *,
             statistics: Sequence[str] = DEFAULT_STATISTICS) -> pd.DataFrame:
    """stats (columns position, layer, head, norm, mean, std, absmax, finite; one row per position,
    layer and head, as :func:`~statelens.analysis.states.state_stats` returns) -> one row per head.

    Columns: layer, head, collapsed (bool), statistic (the one with the largest ratio; for a head that
    turned non-finite, the first statistic that did), ratio (beyond_max / within_max of that statistic;
    inf when non-finite; 0 / 0 counts as 1), start_position (first position > train_len where any
    statistic exceeds k x its within-training max or is non-finite; -1 when not collapsed), nonfinite
    (bool: non-finite at some position > train_len), within_max, beyond_max (of that statistic; as
    recorded, so NaN or inf for a non-finite head; for "mean" the maxima of |mean|).

    Ranked: collapsed heads first, non-finite ones first among them, then by ratio descending.
    Raises ParameterError (a BadInput, also a ValueError) when no position <= train_len or none > train_len was recorded.
    """
    statistics = tuple(statistics)
    if not statistics or any(s not in STATISTICS for s in statistics):
        raise ParameterError("statistics", f"statistics must be a non-empty subset of {STATISTICS}, got {statistics!r}")
    missing = [c for c in ("position", "layer", "head", *statistics, "finite") if c not in stats.columns]
    if missing:
        raise ParameterError("stats", f"state statistics lack the column(s) {', '.join(missing)}")
    if not k > 0:
        raise ParameterError("k", f"k must be positive, got {k}")
    if stats.duplicated(["position", "layer", "head"]).any():
        raise ParameterError("stats", "state statistics must have one row per position, layer and head "
                         "(aggregate over sequences first, as state_stats does)")
    positions = np.sort(stats["position"].unique())
    within = positions <= train_len
    if not within.any():
        raise ParameterError("positions", f"no state recorded at a position <= the training length {train_len} (first recorded: "
                         f"{positions[0] if len(positions) else 'none'}); the in-training maxima are undefined")
    if within.all():
        raise ParameterError("positions", f"no state recorded at a position > the training length {train_len} (last recorded: "
                         f"{positions[-1]}); nothing to compare")

    # Wide arrays [positions P, heads G]; a head missing at a position would show as NaN, so refuse it.
    wide = stats.pivot(index="position", columns=["layer", "head"])
    heads = wide["finite"].columns                                       # (layer, head) pairs, G of them
    if len(stats) != len(positions) * len(heads):
        raise ParameterError("stats", "state statistics must record every (layer, head) at every position")
    values = np.abs(np.stack([wide[s].to_numpy(dtype=np.float64) for s in statistics]))  # [S, P, G]
    finite = wide["finite"].to_numpy(dtype=bool)                                        # [P, G]

    with np.errstate(invalid="ignore", divide="ignore"):
        within_max = values[:, within].max(axis=1)                                      # [S, G]
        beyond_max = values[:, ~within].max(axis=1)                                     # [S, G]
        ratio = np.where(within_max > 0, beyond_max / np.where(within_max > 0, within_max, 1.0),
                         np.where(beyond_max > 0, np.inf, 1.0))
        crosses = (values > k * within_max[:, None])[:, ~within].any(axis=0)            # [Pb, G]; NaN: False
    inf_or_nan = ~np.isfinite(values[:, ~within])                                       # [S, Pb, G]
    bad = inf_or_nan.any(axis=0) | ~finite[~within]                                     # [Pb, G]
    beyond_positions = positions[~within]

    event = bad | crosses
    collapsed = event.any(axis=0)
    start = np.where(collapsed, beyond_positions[event.argmax(axis=0)], -1)
    nonfinite = bad.any(axis=0)

    # The reported statistic: for a non-finite head, the first (in ``statistics`` order) that is
    # non-finite at the first non-finite position (the first one when only ``finite`` says so); else
    # the one with the largest ratio.
    G = len(heads)
    at_first_bad = inf_or_nan[:, bad.argmax(axis=0), np.arange(G)]                      # [S, G]
    by_ratio = np.where(np.isnan(ratio), -np.inf, ratio).argmax(axis=0)
    chosen = np.where(nonfinite, at_first_bad.argmax(axis=0), by_ratio)
    pick = (chosen, np.arange(G))

    out = pd.DataFrame({
        "layer": heads.get_level_values("layer").to_numpy(dtype=np.int64),
        "head": heads.get_level_values("head").to_numpy(dtype=np.int64),
        "collapsed": collapsed,
        "statistic": np.asarray(statistics)[chosen],
        "ratio": np.where(nonfinite, np.inf, ratio[pick]),
        "start_position": start.astype(np.int64),
        "nonfinite": nonfinite,
        "within_max": within_max[pick],
        "beyond_max": beyond_max[pick],
    }, columns=COLUMNS)
    return out.sort_values(["collapsed", "nonfinite", "ratio", "layer", "head"],
                           ascending=[False, False, False, True, True], kind="stable", ignore_index=True)
