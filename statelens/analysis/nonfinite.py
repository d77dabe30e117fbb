"""Where an analysis's values went non-finite: a finding to report, never a crash.

A model whose state overflows, or whose weights hold NaN, still gets every table written; the tables
then hold inf/NaN from some row on. :func:`first_nonfinite` finds the first such row of each table
(in the order the analysis wrote it: by position, then layer and head), and :func:`describe` says it
in one line, e.g. ``state_stats.csv: first non-finite at position 68, layer 1, head 5 (norm)``.

Only the columns where inf/NaN means the model's numbers broke are looked at (each table declares its
``watched`` columns, :class:`statelens.analysis.spec.Table`; :func:`statelens.analysis.watched` lists them): NaN
that a table holds by definition (a standard error over one sequence, an empty bucket's fraction) and
inf that means something (a horizon of inf: alpha == 1) are not findings.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


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


def find_nonfinite(tables: dict[str, pd.DataFrame],
                   watched: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> dict[str, dict]:
    """:func:`first_nonfinite` of every table in ``tables`` that has one among its ``watched`` columns
    (table name -> (key columns, watched columns)), by table name."""
    found = {}
    for name, table in tables.items():
        if name in watched and (hit := first_nonfinite(table, *watched[name])) is not None:
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
