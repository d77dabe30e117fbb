"""Where an analysis's values went non-finite: a finding to report, never a crash.

A model whose state overflows, or whose weights hold NaN, still gets every table written; the tables
then hold inf/NaN from some row on. :func:`first_nonfinite` finds the first such row of each table
(in the order the analysis wrote it: by position, then layer and head), and :func:`describe` says it
in one line, e.g. ``state_stats.csv: first non-finite at position 68, layer 1, head 5 (norm)``.

Only the columns where inf/NaN means the model's numbers broke are looked at (:data:`WATCHED`): NaN
that a table holds by definition (a standard error over one sequence, an empty bucket's fraction) and
inf that means something (a horizon of inf: alpha == 1) are not findings.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

#: table name -> (columns that locate a row, columns whose inf/NaN is a finding)
WATCHED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "remembrance": (("t",), ("effrem",)),
    "positionwise": (("pos_start", "pos_end"), ("loss",)),
    "state_stats": (("position", "layer", "head"), ("norm", "mean", "std", "absmax")),
    "decay": (("pos_start", "pos_end", "layer", "head"), ("mean_alpha", "retention")),
    "train_log": (("step",), ("loss", "grad_norm", "mean_state_norm")),
}


def first_nonfinite(table: pd.DataFrame, keys: tuple[str, ...], values: tuple[str, ...]) -> dict | None:
    """The first row (in table order) where a column of ``values`` is inf or NaN: ``{key: value, ...,
    "column": the first such column}``; None when every value is finite."""
    present = [c for c in values if c in table.columns]
    if not present or table.empty:
        return None
    bad = ~np.isfinite(table[present].to_numpy(dtype=np.float64))                      # [rows, columns]
    rows = np.flatnonzero(bad.any(axis=1))
    if not len(rows):
        return None
    row = rows[0]
    found = {k: table[k].iloc[row].item() for k in keys if k in table.columns}
    return found | {"column": present[int(bad[row].argmax())]}


def find_nonfinite(tables: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """:func:`first_nonfinite` of every watched table in ``tables`` that has one, by table name."""
    found = {}
    for name, table in tables.items():
        if name in WATCHED and (hit := first_nonfinite(table, *WATCHED[name])) is not None:
            found[name] = hit
    return found


def first_nonfinite_position(per_position: np.ndarray) -> int | None:
    """per_position [L] (entry p: a value at position p; entry 0 unused) -> the first p >= 1 where it
    is inf or NaN, or None."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(per_position[1:], dtype=np.float64)))
    return int(bad[0]) + 1 if len(bad) else None


def describe(name: str, found: dict) -> str:
    """``{name}.csv: first non-finite at position 68, layer 1, head 5 (norm)``"""
    parts = {k: v for k, v in found.items() if k != "column"}
    if "pos_start" in parts:  # a bucket: [pos_start, pos_end)
        parts = {"positions": f"[{parts.pop('pos_start')}, {parts.pop('pos_end', '?')})"} | parts
    where = ", ".join(f"{key} {value}" for key, value in parts.items())
    return f"{name}.csv: first non-finite at {where} ({found['column']})"
