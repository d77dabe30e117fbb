"""Position buckets shared by the analyses that report "per position bucket"."""
from __future__ import annotations

from enum import Enum

import numpy as np

from statelens.errors import ParameterError


class Scale(str, Enum):
    """Bucket spacing: ``log`` (geometric) or ``linear``."""

    log = "log"
    linear = "linear"


def bucket_edges(start: int, stop: int, n: int, scale: str = "log") -> np.ndarray:
    """Integer edges e_0 = start < e_1 < ... < e_k = stop (k <= n) splitting positions [start, stop).

    ``scale="log"``: geometric spacing (equal width on a log axis; small buckets early, where the
    loss changes fastest); ``"linear"``: equal widths. Duplicate edges from rounding are merged.
    """
    if scale not in ("log", "linear"):
        raise ParameterError("scale", f"bucket scale must be 'log' or 'linear', got {scale!r}")
    if stop <= start:
        raise ParameterError("stop", f"empty position range [{start}, {stop})")
    if scale == "log":
        edges = np.geomspace(max(start, 1), stop, n + 1)
        edges[0] = start
    else:
        edges = np.linspace(start, stop, n + 1)
    return np.unique(np.rint(edges).astype(np.int64))


def bucket_index(positions: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """For each position the bucket i with edges[i] <= position < edges[i + 1] (-1 outside)."""
    index = np.searchsorted(edges, positions, side="right") - 1
    index[(positions < edges[0]) | (positions >= edges[-1])] = -1
    return index
