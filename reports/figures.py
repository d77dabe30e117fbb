"""Figures: one function per figure, each taking the tidy DataFrames the analyses return.

Start with :func:`perplexity_figure` (the simplest); every other function follows the same shape::

    fig = perplexity_figure(df, train_len=2048, label="base")   # a new Figure
    perplexity_figure(df_post, train_len=2048, label="post", ax=fig.axes[0])   # overlay a second checkpoint
    save(fig, "out/perplexity")   # out/perplexity.png (150 dpi) and out/perplexity.svg

Conventions shared by every function here:

- Arguments: DataFrames (columns named in each docstring), then ``train_len`` where a training length
  means something, then keyword-only ``label`` (the checkpoint's name, shown in the legend), ``color``
  (the checkpoint's colour, see :func:`checkpoint_colors`) and ``ax``. With ``ax=None`` a new
  :class:`~matplotlib.figure.Figure` is made (never through ``pyplot``, so nothing is registered or
  shown); with ``ax`` given the function draws into it and returns that Axes' figure. The return value
  is always a ``Figure``.
- Two checkpoints overlay by calling a function twice on the same ``ax`` with different ``label`` and
  ``color``; the legend is rebuilt on each call and shows both labels, and the training-length line is
  drawn once. Without ``color`` the first colorblind-palette colour not yet used on the Axes is taken.
  Heatmaps (state norm per layer, passkey) cannot overlay; draw one per checkpoint side by side.
- Lines over layers use shades of the checkpoint's colour: lighter for shallower layers, the deepest
  layer in the colour itself.
- Non-finite values (inf, NaN) are a finding, not a crash: they are left out of lines, marked with
  ``^`` markers on the top edge at their x position, and stated in a text ("non-finite (not drawn)
  from position P") in the Axes' top-left corner; in heatmaps their cells are blank and crossed, and
  the title says where. Every such marker and text has ``gid == "nonfinite"``. Values <= 0 on a log y
  axis cannot be drawn either: they are marked with ``v`` markers on the bottom edge
  (``gid == "nonpositive"``); positions <= 0 (the initial state) are left out of log-x axes.
- An empty DataFrame gives labelled, empty axes with the text "no data" (``gid == "nodata"``). A
  non-empty DataFrame without the documented columns raises ``ValueError`` naming them.
- Styling comes from ``seaborn.axes_style("whitegrid")`` and ``seaborn.plotting_context("notebook")``
  used as context managers around each call; no global setting is changed.

Artists carry a ``gid`` so that tests and the report can find them: data lines ``"layer {l}"``,
``"L{l}H{h}"``, ``"mean"``, ``"perplexity"``, ``"effrem T={T}"``; bands ``"band"``; the training
length line ``"train_len"``.
"""

from __future__ import annotations

import contextlib
import functools
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.collections import QuadMesh
from matplotlib.colors import LogNorm, Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator
from matplotlib.typing import ColorType

from statelens.analysis.coverage import HEAD_COLUMNS as COVERAGE_COLUMNS
from statelens.analysis.coverage import SCATTER_COLUMNS as COVERAGE_POINTS_COLUMNS
from statelens.analysis.decay import COLUMNS as DECAY_COLUMNS
from statelens.analysis.logits_drift import COLUMNS as LOGITS_DRIFT_COLUMNS
from statelens.analysis.positionwise import COLUMNS as PERPLEXITY_COLUMNS
from statelens.analysis.remembrance import COLUMNS as REMEMBRANCE_COLUMNS
from statelens.analysis.states import COLUMNS as STATE_STATS_COLUMNS
from statelens.errors import ParameterError
from statelens.monitor import COLUMNS as MONITOR_COLUMNS
from statelens.tasks.passkey import COLUMNS as PASSKEY_COLUMNS

#: The columns of collapse.csv the state-norm figure reads.
COLLAPSE_COLUMNS = ("layer", "head", "collapsed")

#: EffRem below this is drawn at this value on the log axis: a total variation below 1e-6 is at the
#: level of float32 round-off in a sum over a vocabulary, so nothing measurable is hidden.
EFFREM_FLOOR = 1e-6
#: The most collapsed heads drawn in the state-norm lines panel.
MAX_HEADS = 8
#: Heads drawn when none is flagged as collapsed: those with the largest final norm.
FALLBACK_HEADS = 4

#: The attribute each data line carries for the report's hover titles: its name with the checkpoint's
#: ("base: layer 3"); :mod:`statelens.reports.svg` reads it beside the line's points and Axes labels.
HOVER_NAME = "statelens_hover_name"
#: Legends with more entries than this go outside the Axes.
LEGEND_INSIDE = 3
#: Retention below this is outside the retention axis: a weight of 1e-6 on the initial state is gone.
RETENTION_FLOOR = 1e-6
_RETENTION_FLOOR_TEXT = "1e-6"
#: Characters that fit on one title line of a panel 6.4 inches wide with a colour bar.
TITLE_CHARS = 60
#: Tick labels on a heatmap's position axis.
HEATMAP_TICKS = 6

_SINGLE = (6.4, 4.2)
_DOUBLE = (12.8, 4.4)
_DOUBLE_GRID = (12.8, 8.4)  # two rows of two panels
_TOKENS = "position (tokens)"


# --- colours ----------------------------------------------------------------------------------------


def checkpoint_colors(labels: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per checkpoint label from seaborn's "colorblind" palette, in order of first
    appearance (the same list always gives the same colours; the palette repeats after 10 labels)."""
    palette = [tuple(float(v) for v in c) for c in sns.color_palette("colorblind")]
    unique = list(dict.fromkeys(labels))
    return {lab: palette[i % len(palette)] for i, lab in enumerate(unique)}


def _checkpoint_color(ax: Axes, color: ColorType | None) -> tuple[float, float, float]:
    """``color`` as RGB, or the first palette colour that no line on ``ax`` uses yet."""
    if color is not None:
        return to_rgb(color)
    palette = [tuple(float(v) for v in c) for c in sns.color_palette("colorblind")]
    used = {to_rgb(line.get_color()) for line in ax.get_lines()}
    return next((c for c in palette if c not in used), palette[0])


def _shades(color: ColorType, n: int) -> list[tuple[float, float, float]]:
    """``n`` shades of ``color``, from 60% mixed with white to the colour itself (the last one)."""
    rgb = np.asarray(to_rgb(color))
    mix = np.linspace(0.6, 0.0, n) if n > 1 else np.zeros(1)
    return [tuple(float(v) for v in rgb * (1 - f) + f) for f in mix]


def _sequential_cmap(color: ColorType | None):
    """The colour map of a heatmap: viridis, or white to the checkpoint's colour when one is given."""
    return "viridis" if color is None else sns.light_palette(to_rgb(color), as_cmap=True)


# --- shared plumbing --------------------------------------------------------------------------------


def literal(text: str) -> str:
    """``text`` escaped for mathtext, so that matplotlib shows it as given: every ``$`` becomes ``\\$``
    (a string with two unescaped ``$`` would otherwise be parsed as math, and a malformed one raise).
    Mathtext itself stays on, for the axes' tick labels (``10^{2}`` on a log axis)."""
    return text.replace("$", r"\$")


@contextlib.contextmanager
def figure_style():
    """The style of every figure here (seaborn's whitegrid, notebook context at 0.9): a context manager,
    so rcParams are restored on exit. Axes made inside it (e.g. the report's grids) match the figures."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        yield


def _styled(fn):
    """Runs a figure function inside :func:`figure_style`, with its ``label`` (the one user string a
    figure function takes) escaped by :func:`literal`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("label"):
            kwargs["label"] = literal(kwargs["label"])
        with figure_style():
            return fn(*args, **kwargs)

    return wrapper


def _root_figure(ax: Axes) -> Figure:
    fig = ax.figure
    while not isinstance(fig, Figure):  # a SubFigure: its .figure is its parent
        fig = fig.figure
    return fig


def _one_axes(ax: Axes | None) -> tuple[Figure, Axes]:
    if ax is None:
        fig = Figure(figsize=_SINGLE, layout="constrained")
        return fig, fig.add_subplot()
    return _root_figure(ax), ax


def _two_axes(ax: Axes | Sequence[Axes] | None) -> tuple[Figure, Axes | None, Axes]:
    """``ax`` None (a new figure with two panels), a pair of Axes, or one Axes (the second panel only)."""
    if ax is None:
        fig = Figure(figsize=_DOUBLE, layout="constrained")
        first, second = fig.subplots(1, 2)
        return fig, first, second
    if isinstance(ax, Axes):
        return _root_figure(ax), None, ax
    first, second = ax
    return _root_figure(second), first, second


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ParameterError("df", f"{what}: the DataFrame lacks column(s) {missing}; it has {list(df.columns)}")


def _floats(values) -> np.ndarray:
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _with_label(title: str, label: str | None) -> str:
    """``title (label)`` when that fits a one-panel title (:data:`TITLE_CHARS`), else the label on
    lines of its own, wrapped: a long checkpoint name must not cut the title."""
    if not label:
        return title
    if len(title) + len(label) + 3 <= TITLE_CHARS:
        return f"{title} ({label})"
    return title + "\n" + "\n".join(textwrap.wrap(f"({label})", TITLE_CHARS, break_long_words=True))


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.4",
            gid="nodata")


def _legend(ax: Axes) -> None:
    """(Re)builds the legend from every labelled artist on ``ax``, the training length last. Up to
    :data:`LEGEND_INSIDE` entries it sits inside, where it covers least; a longer one would cover data,
    so it goes below the figure in two columns when ``ax`` is the figure's only Axes (a figure legend,
    which constrained layout makes room for), else to the right of ``ax``."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    last = [h.get_gid() == "train_len" for h in handles]
    order = sorted(range(len(handles)), key=lambda i: last[i])  # stable: data first
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    fig = _root_figure(ax)
    for old in [*fig.legends]:  # an overlay rebuilds the figure legend of the first call
        old.remove()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    style = {"fontsize": "small", "framealpha": 0.85}
    if len(handles) <= LEGEND_INSIDE:
        ax.legend(handles, labels, loc="best", **style)
    elif len(fig.axes) == 1 and isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine):
        # two columns when two of the longest entries fit side by side (~0.07 inch a character at
        # "small", plus the handle), else one
        ncols = 2 if 2 * (0.07 * max(map(len, labels)) + 0.6) <= fig.get_figwidth() else 1
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, **style)
    else:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **style)


def _log_scale(ax: Axes, axis: str, values, *, span: float) -> None:
    """Sets a log scale on ``axis`` when the positive finite ``values`` span more than ``span`` times;
    an axis already on a log scale stays there (an overlay never undoes the first call's choice)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size and v.max() > span * v.min():
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _train_len_line(ax: Axes, train_len: int | None, x: float | None = None) -> None:
    """A dashed vertical line at ``x`` (default ``train_len``), drawn once per Axes and value."""
    if train_len is None:
        return
    x = float(train_len) if x is None else float(x)
    for line in ax.get_lines():
        if line.get_gid() == "train_len" and float(line.get_xdata()[0]) == x:
            return
    ax.axvline(x, color="0.2", ls="--", lw=1.2, zorder=3, gid="train_len",
               label=f"training length ({_fmt(train_len)} tokens)",
               path_effects=[withStroke(linewidth=2.5, foreground="white")])


def _legend_label(label: str | None) -> str:
    """``label`` as matplotlib will show it: none is hidden; one starting with "_", which matplotlib
    would hide too (its convention for internal artists), gets a leading space."""
    if not label:
        return "_nolegend_"
    return f" {label}" if label.startswith("_") else label


def _hover_name(artist, checkpoint: str | None, name: str) -> None:
    """Names a data artist for the report's hover titles (:data:`HOVER_NAME`)."""
    setattr(artist, HOVER_NAME, f"{checkpoint}: {name}" if checkpoint else name)


def _plot_line(ax: Axes, x, y, *, color, label: str | None, gid: str, logx: bool, logy: bool,
               checkpoint: str | None = None, floor: float | None = None, lw: float = 1.6, alpha: float = 1.0,
               ls: str = "-", zorder: float = 2) -> float | None:
    """Draws ``y`` against ``x`` without its non-finite (and, on a log y axis, non-positive) values,
    marking those on the top (bottom) edge. Returns the first x whose y is non-finite, or None.

    ``checkpoint``: the checkpoint's label, for the line's hover name ("{checkpoint}: {gid}").
    ``floor``: finite values below it are drawn at it (used where a documented floor replaces zero).
    """
    x, y = _floats(x), _floats(y)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    xok = np.isfinite(x) & (x > 0) if logx else np.isfinite(x)
    x, y = x[xok], y[xok]
    finite = np.isfinite(y)
    if floor is not None:
        y = np.where(finite, np.maximum(y, floor), y)
    drawable = finite & (y > 0) if logy else finite
    (line,) = ax.plot(x[drawable], y[drawable], color=color, lw=lw, alpha=alpha, ls=ls, zorder=zorder, gid=gid,
                      label=_legend_label(label))
    _hover_name(line, checkpoint, gid)
    edge = ax.get_xaxis_transform()  # x in data, y in axes fraction
    nonpositive = finite & ~drawable
    if nonpositive.any():
        ax.plot(x[nonpositive], np.zeros(nonpositive.sum()), transform=edge, ls="none", marker="v", ms=5,
                color=color, clip_on=False, gid="nonpositive", label="_nolegend_")
    if finite.all():
        return None
    ax.plot(x[~finite], np.ones((~finite).sum()), transform=edge, ls="none", marker="^", ms=6,
            color=color, clip_on=False, gid="nonfinite", label="_nolegend_")
    return float(x[~finite].min())


def _band(ax: Axes, x, lo, hi, *, color, logx: bool, logy: bool) -> None:
    """A shaded band between ``lo`` and ``hi`` where both are finite (and positive on a log y axis)."""
    x, lo, hi = _floats(x), _floats(lo), _floats(hi)
    order = np.argsort(x, kind="stable")
    x, lo, hi = x[order], lo[order], hi[order]
    ok = np.isfinite(x) & np.isfinite(lo) & np.isfinite(hi)
    if logx:
        ok &= x > 0
    if logy:
        ok &= (lo > 0) & (hi > 0)
    if ok.sum() >= 1:
        ax.fill_between(x[ok], lo[ok], hi[ok], color=color, alpha=0.2, lw=0, gid="band", label="_nolegend_")


def _note_nonfinite(ax: Axes, first_bad: dict[str, float], *, label: str | None, color,
                    where: str = "position") -> None:
    """One text per call stating where non-finite values start: ``first_bad`` maps a line's name
    (possibly "") to the first x with a non-finite value."""
    if not first_bad:
        return
    start = min(first_bad.values())
    names = [n for n in first_bad if n]
    which = ""
    if names:
        which = ": " + ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    prefix = f"{label}: " if label else ""
    stacked = sum(1 for t in ax.texts if t.get_gid() == "nonfinite")
    ax.text(0.02, 0.97 - 0.08 * stacked, f"{prefix}non-finite (not drawn) from {where} {_fmt(start)}{which}",
            transform=ax.transAxes, ha="left", va="top", fontsize="small", color=color, gid="nonfinite",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"})


def _group_mean(df: pd.DataFrame, keys: list[str], column: str, bad: pd.Series | None = None) -> pd.Series:
    """Mean of ``column`` per group, NaN for a group holding any non-finite value (or ``bad`` row):
    averaging over the finite heads only would hide the finding."""
    values = df[column].astype(float)
    nonfinite = ~np.isfinite(values)
    if bad is not None:
        nonfinite |= bad
    frame = pd.DataFrame({k: df[k] for k in keys}).assign(_v=values.where(~nonfinite), _bad=nonfinite)
    grouped = frame.groupby(keys, sort=True)
    mean = grouped["_v"].mean()
    return mean.where(~grouped["_bad"].any())


def _heatmap(ax: Axes, table: pd.DataFrame, *, cmap, norm, cbar_label: str, annot: bool = False,
             xticklabels="auto", yticklabels="auto") -> None:
    """``table`` (rows top to bottom, columns left to right) as a heatmap; NaN cells are blank. The
    cells are rasterized: in an SVG hundreds of abutting cells show seams, and weigh more than a PNG."""
    kws = {"norm": norm} if norm is not None else {}
    sns.heatmap(table, ax=ax, cmap=cmap, annot=annot, fmt=".2f", cbar_kws={"label": cbar_label},
                xticklabels=xticklabels, yticklabels=yticklabels, linewidths=0, **kws)
    for mesh in ax.collections:
        if isinstance(mesh, QuadMesh):
            mesh.set_rasterized(True)
    ax.grid(False)  # whitegrid's lines would run through blank (NaN) cells


def _position_ticks(ax: Axes, positions) -> None:
    """At most :data:`HEATMAP_TICKS` level tick labels on a heatmap's position (x) axis, at round
    positions, each placed between the columns' centres where its position falls (the columns are
    the recorded positions, in order, not necessarily evenly spaced)."""
    pos = np.asarray(positions, dtype=float)
    if pos.size < 2 or not np.all(np.diff(pos) > 0):
        return
    values = MaxNLocator(nbins=HEATMAP_TICKS, integer=True).tick_values(pos[0], pos[-1])
    values = values[(values >= pos[0]) & (values <= pos[-1])]
    ax.set_xticks(np.interp(values, pos, np.arange(pos.size)) + 0.5, [_fmt(v) for v in values], rotation=0)


def _heatmap_note(ax: Axes, text: str) -> None:
    """A second title line: a note inside a heatmap would cover its cells."""
    ax.set_title(f"{ax.get_title()}\n{text}", fontsize="medium")


def _cross_cells(ax: Axes, bad: np.ndarray) -> None:
    """A red cross on each heatmap cell where ``bad`` (rows, columns) is True."""
    rows, cols = np.nonzero(bad)
    if rows.size:
        ax.scatter(cols + 0.5, rows + 0.5, marker="x", s=18, color="tab:red", linewidths=1.2, zorder=4,
                   gid="nonfinite", label="_nolegend_")


# --- 1. Effective Remembrance -----------------------------------------------------------------------


@_styled
def remembrance_figure(df: pd.DataFrame, *, label: str | None = None,
                       color: ColorType | None = None, ax: Axes | None = None) -> Figure:
    """EffRem_T(t) against t, log y, with a +-1 s.e.m. band.

    ``df``: one row per (T, t): ``t`` (tokens dropped from the start of the context), ``T`` (context
    length), ``effrem`` (mean total variation over sequences), ``effrem_sem`` (its standard error),
    ``n_seqs``. One line per T. x is linear from 0 to T. The row t = 0 is not drawn (EffRem_T(0) is 0
    by definition and has no place on a log axis); other values below :data:`EFFREM_FLOOR` are drawn
    at the floor, as is the lower edge of the band.
    """
    fig, ax = _one_axes(ax)
    ax.set_xlabel("t: tokens dropped from the start of the context (tokens)")
    ax.set_ylabel("EffRem_T(t) (total variation)")
    if df.empty:
        ax.set_title("Effective remembrance")
        _no_data(ax)
        return fig
    _require(df, REMEMBRANCE_COLUMNS, "remembrance_figure")
    color = _checkpoint_color(ax, color)
    overlay = any(str(line.get_gid()).startswith("effrem") for line in ax.get_lines())
    right = ax.get_xlim()[1] if overlay else 0.0  # an overlay keeps the first call's 0..T
    lengths = sorted(df["T"].dropna().unique())
    if not lengths:
        _no_data(ax)
        return fig
    bad: dict[str, float] = {}
    for T, shade in zip(lengths, _shades(color, len(lengths))):
        g = df[(df["T"] == T) & (df["t"] != 0)].sort_values("t")
        name = f"T = {_fmt(T)}"
        line_label = label if len(lengths) == 1 else f"{label}, {name}" if label else name
        y, sem = _floats(g["effrem"]), np.nan_to_num(_floats(g["effrem_sem"]), nan=0.0)
        _band(ax, g["t"], np.maximum(y - sem, EFFREM_FLOOR), np.maximum(y + sem, EFFREM_FLOOR),
              color=shade, logx=False, logy=True)
        first = _plot_line(ax, g["t"], y, color=shade, label=line_label, gid=f"effrem T={_fmt(T)}", checkpoint=label,
                           logx=False, logy=True, floor=EFFREM_FLOOR)
        if first is not None:
            bad[name if len(lengths) > 1 else ""] = first
    _note_nonfinite(ax, bad, label=label, color=color, where="t =")
    ax.set_yscale("log")
    ax.set_xlim(0, max(float(max(lengths)), right))
    n = df["n_seqs"].max()
    n_text = f"\nmean over {_fmt(n)} sequences, band ± s.e.m." if np.isfinite(n) else ""
    ax.set_title(f"Effective remembrance, T = {', '.join(_fmt(T) for T in lengths)} tokens{n_text}",
                 fontsize="medium")
    _legend(ax)
    return fig


# --- 2. Position-wise perplexity --------------------------------------------------------------------


@_styled
def perplexity_figure(df: pd.DataFrame, train_len: int | None = None, *, label: str | None = None,
                      color: ColorType | None = None, ax: Axes | None = None) -> Figure:
    """Perplexity per bucket of token positions against the bucket midpoint, log x.

    ``df``: one row per bucket ``[pos_start, pos_end)``: ``loss`` (mean cross-entropy, nats), ``ppl``
    (its exp), ``n_tokens``. Buckets with no token are skipped. The y axis is log when the perplexity
    spans more than 10x (or the Axes is already log), else linear.
    """
    fig, ax = _one_axes(ax)
    ax.set_xlabel("position in the context, bucket midpoint (tokens)")
    ax.set_ylabel("perplexity (exp of mean cross-entropy)")
    ax.set_title("Position-wise perplexity", fontsize="medium")
    if df.empty:
        _no_data(ax)
        return fig
    _require(df, PERPLEXITY_COLUMNS, "perplexity_figure")
    color = _checkpoint_color(ax, color)
    g = df[_floats(df["n_tokens"]) > 0].sort_values("pos_start")
    x = (_floats(g["pos_start"]) + _floats(g["pos_end"])) / 2
    ax.set_xscale("log")
    _log_scale(ax, "y", g["ppl"], span=10)
    first = _plot_line(ax, x, g["ppl"], color=color, label=label, gid="perplexity", checkpoint=label, logx=True,
                       logy=ax.get_yscale() == "log", lw=1.8)
    _note_nonfinite(ax, {"": first} if first is not None else {}, label=label, color=color)
    _train_len_line(ax, train_len)
    _legend(ax)
    return fig


# --- 3. State norm: heatmap per layer and collapsed heads -------------------------------------------


def _nonfinite_rows(df: pd.DataFrame, column: str) -> pd.Series:
    """Rows whose ``column`` is non-finite or whose state was recorded as not finite."""
    bad = ~np.isfinite(df[column].astype(float))
    if "finite" in df.columns:
        bad |= ~df["finite"].fillna(False).astype(bool)
    return bad


def _pick_heads(df: pd.DataFrame, collapse: pd.DataFrame | None) -> tuple[list[tuple[int, int]], str]:
    """The heads to draw and a note for the panel's title: the flagged heads (most collapsed first: non-finite,
    then by ``ratio``), at most :data:`MAX_HEADS`; else the :data:`FALLBACK_HEADS` heads with the
    largest final norm (non-finite counts as largest)."""
    present = set(map(tuple, df[["layer", "head"]].drop_duplicates().to_numpy().tolist()))
    if collapse is not None and not collapse.empty:
        _require(collapse, COLLAPSE_COLUMNS, "state_norm_figure (collapse)")
        flagged = collapse[collapse["collapsed"].fillna(False).astype(bool)].copy()
        flagged["_nonfinite"] = (flagged["nonfinite"].fillna(0).astype(bool) if "nonfinite" in flagged
                                 else False)
        flagged["_ratio"] = _floats(flagged["ratio"]) if "ratio" in flagged else 0.0
        flagged = flagged.sort_values(["_nonfinite", "_ratio"], ascending=False, na_position="last")
        heads = [h for h in map(tuple, flagged[["layer", "head"]].to_numpy().tolist()) if h in present]
        if heads:
            shown = heads[:MAX_HEADS]
            more = f", {len(shown)} of {len(heads)} shown" if len(heads) > len(shown) else ""
            return shown, f"{len(heads)} flagged{more}"
    last = df.sort_values("position").groupby(["layer", "head"], sort=True).tail(1)
    final = _floats(last["norm"])
    key = np.where(np.isfinite(final), final, np.inf)
    order = np.argsort(-key, kind="stable")[:FALLBACK_HEADS]
    heads = [tuple(last[["layer", "head"]].to_numpy()[i].tolist()) for i in order]
    return heads, f"none flagged, the {len(heads)} with the largest final norm"


def _collapsed_title(ax: Axes, note: str, label: str | None) -> None:
    """"Collapsed heads (note)"; an overlay adds its checkpoint's part to the first call's:
    "Collapsed heads (base: 3 flagged; post: 1 flagged)"."""
    part = f"{label}: {note}" if label else note
    previous, head = ax.get_title(), "Collapsed heads ("
    if previous.startswith(head) and previous.endswith(")"):
        part = f"{previous[len(head):-1]}; {part}"
    ax.set_title(f"{head}{part})", fontsize="medium")


def _norm_heatmap(ax_map: Axes, df: pd.DataFrame, bad_rows: pd.Series, cmap, train_len: int | None) -> None:
    """Panel (a) of :func:`state_norm_figure`: the state norm per layer and position, mean over heads;
    a cell with any non-finite head blank and crossed; the training length as a line between columns."""
    cells = _group_mean(df, ["layer", "position"], "norm", bad_rows).unstack("position")
    bad_cells = (df.assign(_bad=bad_rows).groupby(["layer", "position"])["_bad"].any()
                 .unstack("position").reindex_like(cells).fillna(False).to_numpy(dtype=bool))
    values = cells.to_numpy(dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    norm = None
    if positive.size and positive.max() > 100 * positive.min():
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
    _heatmap(ax_map, cells, cmap=cmap, norm=norm,
             cbar_label="state norm (Frobenius), mean over heads" + (", log scale" if norm else ""))
    ax_map.set_xlabel(_TOKENS)
    ax_map.set_ylabel("layer")
    ax_map.tick_params(axis="y", labelrotation=0)
    _position_ticks(ax_map, cells.columns)
    _cross_cells(ax_map, bad_cells)
    if bad_cells.any():
        columns = np.nonzero(bad_cells.any(axis=0))[0]
        layers = [str(cells.index[i]) for i in np.nonzero(bad_cells.any(axis=1))[0]]
        _heatmap_note(ax_map, f"non-finite (crossed) from position {_fmt(cells.columns[columns[0]])}: "
                              f"layer {', '.join(layers)}")
    if train_len is not None:
        positions = cells.columns.to_numpy(dtype=float)
        boundary = int(np.searchsorted(positions, train_len, side="right"))
        if 0 < boundary < positions.size:
            _train_len_line(ax_map, train_len, x=boundary)


@_styled
def state_norm_figure(df: pd.DataFrame, collapse: pd.DataFrame | None = None, train_len: int | None = None,
                      *, label: str | None = None, color: ColorType | None = None,
                      ax: Axes | Sequence[Axes] | None = None) -> Figure:
    """(a) Heatmap of the state norm per layer (rows) and position (columns, in order), mean over
    heads; (b) the norm against position of the collapsed heads, log x and log y.

    ``df``: one row per (position, layer, head): ``norm`` (Frobenius norm of the head's state),
    ``mean``, ``std``, ``absmax``, ``finite`` (whether every entry of the state is finite).
    ``collapse``: one row per (layer, head) with ``collapsed`` (bool) and optionally ``ratio``,
    ``nonfinite``, ...; see :func:`_pick_heads` for which heads are drawn in (b).
    The heatmap's colour scale is log when the positive values span more than 100x (cells <= 0 are
    then blank). A cell with any non-finite head is blank and crossed.
    ``ax``: None, a pair of Axes (heatmap, lines), or one Axes, which then gets only the lines panel
    (the one two checkpoints can share).
    """
    fig, ax_map, ax_lines = _two_axes(ax)
    if ax_map is not None:
        ax_map.set_title(_with_label("State norm per layer, mean over heads", label), fontsize="medium")
        ax_map.set_xlabel(_TOKENS)
        ax_map.set_ylabel("layer")
    ax_lines.set_xlabel(_TOKENS)
    ax_lines.set_ylabel("state norm (Frobenius)")
    if df.empty:
        for a in (ax_map, ax_lines):
            if a is not None:
                _no_data(a)
        ax_lines.set_title("Collapsed heads", fontsize="medium")
        return fig
    _require(df, STATE_STATS_COLUMNS, "state_norm_figure")
    bad_rows = _nonfinite_rows(df, "norm")
    color_given = color is not None
    cmap = _sequential_cmap(color)
    color = _checkpoint_color(ax_lines, color)

    if ax_map is not None:
        _norm_heatmap(ax_map, df, bad_rows, cmap, train_len)

    heads, note = _pick_heads(df, collapse)
    _collapsed_title(ax_lines, note, label)
    ax_lines.set_xscale("log")
    ax_lines.set_yscale("log")
    # No colour given: a distinct colour per head. A colour given (an overlay): its shades (the most
    # collapsed head in the colour itself) and line styles to tell the heads apart.
    head_colors = (_shades(color, len(heads))[::-1] if color_given
                   else [tuple(c) for c in sns.color_palette("colorblind", len(heads))])
    styles = ["-", "--", ":", "-."]
    bad: dict[str, float] = {}
    for i, ((layer, head), c) in enumerate(zip(heads, head_colors)):
        g = df[(df["layer"] == layer) & (df["head"] == head)].sort_values("position")
        name = f"L{layer}H{head}"
        y = _floats(g["norm"]).copy()
        y[bad_rows.loc[g.index].to_numpy()] = np.nan
        first = _plot_line(ax_lines, g["position"], y, color=c, gid=name, checkpoint=label, logx=True, logy=True,
                           label=f"{label}: {name}" if label else name,
                           ls=styles[i % len(styles)] if color_given else "-")
        if first is not None:
            bad[name] = first
    _note_nonfinite(ax_lines, bad, label=label, color=color)
    _train_len_line(ax_lines, train_len)
    _legend(ax_lines)
    return fig


# --- 4. State std per layer -------------------------------------------------------------------------


def _per_layer_lines(ax: Axes, table: pd.Series, *, label: str | None, color, logx: bool, logy: bool,
                     lw: float = 1.5, alpha: float = 1.0, legend: str = "ends",
                     band: tuple[pd.Series, pd.Series] | None = None) -> dict[str, float]:
    """One line per layer from ``table`` (a Series indexed by (layer, x)), in shades of ``color``.

    ``legend``: "ends" names the shallowest and deepest layers (every layer when there are at most 6),
    "deepest" names only the deepest one as the per-layer lines ("layers (darker = deeper)").
    Returns the first non-finite x per line name, for :func:`_note_nonfinite`.
    """
    layers = sorted(table.index.get_level_values(0).unique())
    prefix = f"{label}: " if label else ""
    bad: dict[str, float] = {}
    for i, (layer, shade) in enumerate(zip(layers, _shades(color, len(layers)))):
        series = table.xs(layer, level=0)
        name = f"layer {layer}"
        if legend == "ends":
            shown = len(layers) <= 6 or i in (0, len(layers) - 1)
            line_label = f"{prefix}{name}" if shown else None
        else:
            line_label = f"{prefix}layers (darker = deeper)" if i == len(layers) - 1 else None
        if band is not None:
            lo, hi = band[0].xs(layer, level=0), band[1].xs(layer, level=0)
            _band(ax, lo.index, lo.to_numpy(), hi.reindex(lo.index).to_numpy(), color=shade, logx=logx,
                  logy=logy)
        first = _plot_line(ax, series.index, series.to_numpy(), color=shade, label=line_label, gid=name,
                           checkpoint=label, logx=logx, logy=logy, lw=lw, alpha=alpha)
        if first is not None:
            bad[name] = first
    return bad


@_styled
def state_std_figure(df: pd.DataFrame, train_len: int | None = None, *, label: str | None = None,
                     color: ColorType | None = None, ax: Axes | None = None) -> Figure:
    """Standard deviation of the state's entries against position, one line per layer (mean over
    heads; NaN for a position where any head is non-finite), log x and log y.

    ``df``: the state statistics of :func:`state_norm_figure`.
    """
    fig, ax = _one_axes(ax)
    ax.set_xlabel(_TOKENS)
    ax.set_ylabel("std of state entries, mean over heads")
    ax.set_title("State standard deviation per layer", fontsize="medium")
    if df.empty:
        _no_data(ax)
        return fig
    _require(df, STATE_STATS_COLUMNS, "state_std_figure")
    color = _checkpoint_color(ax, color)
    table = _group_mean(df, ["layer", "position"], "std", _nonfinite_rows(df, "std"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    bad = _per_layer_lines(ax, table, label=label, color=color, logx=True, logy=True)
    _note_nonfinite(ax, bad, label=label, color=color)
    _train_len_line(ax, train_len)
    _legend(ax)
    return fig


# --- 5. Decay: retention and memory horizon ---------------------------------------------------------


def _median_min_max(df: pd.DataFrame, column: str) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Median (non-finite values included: an infinite horizon is a horizon) and min/max over the
    finite values, over heads, per (layer, pos_end)."""
    values = df[column].astype(float)
    frame = pd.DataFrame({"layer": df["layer"], "pos_end": df["pos_end"], "v": values,
                          "finite": values.where(np.isfinite(values))})
    grouped = frame.groupby(["layer", "pos_end"], sort=True)
    return grouped["v"].median(), grouped["finite"].min(), grouped["finite"].max()


@_styled
def decay_figure(df: pd.DataFrame, train_len: int | None = None, *, label: str | None = None,
                 color: ColorType | None = None, ax: Axes | Sequence[Axes] | None = None) -> Figure:
    """(a) Retention and (b) memory horizon against position (``pos_end``), log x and log y: one line
    per layer (median over heads) with a band from the smallest to the largest head.

    ``df``: one row per (position bucket, layer, head): ``mean_alpha`` (mean decay), ``horizon``
    (memory horizon, tokens; inf when the decay is 1), ``retention`` (weight left on the initial state
    at ``pos_end - 1``). An infinite horizon or NaN is marked as non-finite; a retention that
    underflowed to 0 is marked on the bottom edge.
    ``ax``: None, a pair of Axes (retention, horizon), or one Axes (retention only).
    """
    fig, ax_ret, ax_hor = _two_axes(ax)
    if ax_ret is None:  # one Axes given: the retention panel only
        ax_ret, ax_hor = ax_hor, None
    ax_ret.set_xlabel(_TOKENS)
    ax_ret.set_ylabel(f"retention of the initial state (axis from {_RETENTION_FLOOR_TEXT})")
    ax_ret.set_title("Retention per layer (median; band: min–max over heads)", fontsize="medium")
    if ax_hor is not None:
        ax_hor.set_xlabel(_TOKENS)
        ax_hor.set_ylabel("memory horizon (tokens)")
        ax_hor.set_title("Memory horizon per layer (median over heads)", fontsize="medium")
    if df.empty:
        for a in (ax_ret, ax_hor):
            if a is not None:
                _no_data(a)
        return fig
    _require(df, DECAY_COLUMNS, "decay_figure")
    color = _checkpoint_color(ax_ret, color)
    panels = [(ax_ret, "retention")] + ([(ax_hor, "horizon")] if ax_hor is not None else [])
    for a, column in panels:
        median, low, high = _median_min_max(df, column)
        a.set_xscale("log")
        a.set_yscale("log")
        bad = _per_layer_lines(a, median, label=label, color=color, logx=True, logy=True,
                               band=(low, high))
        raw = _floats(df[column])
        hidden = ~np.isfinite(raw)
        if hidden.any() and not bad:  # a finite median can hide an infinite head: say so
            where = _floats(df["pos_end"])[hidden]
            bad[f"{int(hidden.sum())} head value(s), outside the bands"] = float(np.nanmin(where))
        _note_nonfinite(a, bad, label=label, color=color)
        _train_len_line(a, train_len)
    ax_ret.set_ylim(RETENTION_FLOOR, 1.5)  # retention is at most 1; below the floor nothing is left
    _legend(ax_ret)
    return fig


# --- 6. Coverage of long-position states ------------------------------------------------------------


@_styled
def coverage_figure(df: pd.DataFrame, train_len: int | None = None, *, label: str | None = None,
                    color: ColorType | None = None, ax: Axes | None = None) -> Figure:
    """Fraction of states outside the training-length support against position (bucket midpoint,
    log x): thin lines per layer (mean over heads), a bold line for the mean over all layers and heads.

    ``df``: one row per (position bucket, layer, head): ``oos_fraction`` (0..1), ``maha_median``,
    ``maha_p95``, ``norm_ratio``, ``n_query``, ``n_reference``.
    """
    fig, ax = _one_axes(ax)
    ax.set_xlabel("position, bucket midpoint (tokens)")
    ax.set_ylabel("out-of-support fraction (0–1)")
    ax.set_title("States outside the training distribution", fontsize="medium")
    ax.set_ylim(-0.02, 1.02)
    if df.empty:
        _no_data(ax)
        return fig
    _require(df, COVERAGE_COLUMNS, "coverage_figure")
    color = _checkpoint_color(ax, color)
    frame = df.assign(midpoint=(_floats(df["pos_start"]) + _floats(df["pos_end"])) / 2)
    ax.set_xscale("log")
    per_layer = _group_mean(frame, ["layer", "midpoint"], "oos_fraction")
    bad = _per_layer_lines(ax, per_layer, label=label, color=color, logx=True, logy=False, lw=0.9,
                           alpha=0.7, legend="deepest")
    overall = _group_mean(frame, ["midpoint"], "oos_fraction")
    mean_label = f"{label}: mean over layers, heads" if label else "mean over layers, heads"
    first = _plot_line(ax, overall.index, overall.to_numpy(), color=color, gid="mean", checkpoint=label, logx=True,
                       logy=False, lw=2.8, zorder=3, label=mean_label)
    if first is not None:
        bad["mean"] = first
    _note_nonfinite(ax, bad, label=label, color=color)
    _train_len_line(ax, train_len)
    _legend(ax)
    return fig


@_styled
def coverage_scatter_figure(points: pd.DataFrame, *, label: str | None = None,
                            color: ColorType | None = None, ax: Axes | None = None) -> Figure:
    """States projected on two principal components: the reference set (states within the training
    length) in grey, the query states coloured by position (log colour scale when positions span more
    than 100x). ``color`` sets the query colour map (white to it); the default is viridis.

    ``points``: one row per state: ``pc1``, ``pc2``, ``position``, ``set`` ("reference" or "query").
    Points with a non-finite coordinate are not drawn and their number is stated.
    """
    fig, ax = _one_axes(ax)
    ax.set_xlabel("PC 1 (state units)")
    ax.set_ylabel("PC 2 (state units)")
    ax.set_title(_with_label("State coverage, PCA projection", label), fontsize="medium")
    if points.empty:
        _no_data(ax)
        return fig
    _require(points, COVERAGE_POINTS_COLUMNS, "coverage_scatter_figure")
    pc1, pc2, position = _floats(points["pc1"]), _floats(points["pc2"]), _floats(points["position"])
    finite = np.isfinite(pc1) & np.isfinite(pc2)
    kind = points["set"].astype(str).to_numpy()
    prefix = f"{label}: " if label else ""
    ref = finite & (kind == "reference")
    ax.scatter(pc1[ref], pc2[ref], s=6, color="0.65", alpha=0.5, linewidths=0, gid="reference",
               label=f"{prefix}reference (within the training length)")
    query = finite & (kind == "query")
    if query.any():
        p = position[query]
        positive = p[np.isfinite(p) & (p > 0)]
        norm = (LogNorm(positive.min(), positive.max())
                if positive.size and positive.max() > 100 * positive.min() else Normalize())
        mappable = ax.scatter(pc1[query], pc2[query], c=p, s=10, cmap=_sequential_cmap(color), norm=norm,
                              linewidths=0, gid="query", label=f"{prefix}query")
        ax.figure.colorbar(mappable, ax=ax, label="position (tokens)")
    dropped = int((~finite).sum())
    if dropped:
        stacked = sum(1 for t in ax.texts if t.get_gid() == "nonfinite")
        ax.text(0.02, 0.97 - 0.08 * stacked,
                f"{prefix}{dropped} point(s) with non-finite coordinates not drawn",
                transform=ax.transAxes, ha="left", va="top", fontsize="small", gid="nonfinite",
                color="tab:red", bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"})
    _legend(ax)
    return fig


# --- 7. Logits drift past the window ------------------------------------------------------------------


@_styled
def logits_drift_figure(df: pd.DataFrame, train_len: int | None = None, *, label: str | None = None,
                        color: ColorType | None = None, ax: Axes | None = None) -> Figure:
    """Logits drift (TV between the full-context prediction and the last W tokens' alone) against the
    position bucket's midpoint, log x, with a +-1 s.e.m. band; log y when it spans more than 10x.

    ``df``: one row per bucket ``[pos_start, pos_end)`` past the window: ``window`` (W), ``tv`` (mean
    over the bucket's positions and the sequences), ``tv_sem``, ``n_positions``, ``n_seqs``.
    """
    fig, ax = _one_axes(ax)
    ax.set_xlabel("position in the context, bucket midpoint (tokens)")
    ax.set_ylabel("TV(full context, last W tokens only)")
    if df.empty:
        ax.set_title("Logits drift", fontsize="medium")
        _no_data(ax)
        return fig
    _require(df, LOGITS_DRIFT_COLUMNS, "logits_drift_figure")
    color = _checkpoint_color(ax, color)
    g = df.sort_values("pos_start")
    x = (_floats(g["pos_start"]) + _floats(g["pos_end"])) / 2
    y, sem = _floats(g["tv"]), np.nan_to_num(_floats(g["tv_sem"]), nan=0.0)
    ax.set_xscale("log")
    _log_scale(ax, "y", y, span=10)
    logy = ax.get_yscale() == "log"
    _band(ax, x, y - sem, y + sem, color=color, logx=True, logy=logy)
    first = _plot_line(ax, x, y, color=color, label=label, gid="logits drift", checkpoint=label, logx=True,
                       logy=logy, lw=1.8)
    _note_nonfinite(ax, {"": first} if first is not None else {}, label=label, color=color)
    windows = sorted({int(w) for w in g["window"].dropna()})
    ax.set_title(f"Logits drift past W = {', '.join(_fmt(w) for w in windows)} tokens\nmean over "
                 f"{_fmt(g['n_seqs'].max())} sequences, band ± s.e.m.", fontsize="medium")
    _train_len_line(ax, train_len)
    _legend(ax)
    return fig


# --- 8. Passkey retrieval ---------------------------------------------------------------------------


@_styled
def passkey_figure(df: pd.DataFrame, train_len: int | None = None, *, label: str | None = None,
                   color: ColorType | None = None, ax: Axes | None = None) -> Figure:
    """Passkey retrieval accuracy as a heatmap: depth (rows) x context length (columns), each cell
    annotated, colours fixed to 0..1 (viridis, or white to ``color``).

    ``df``: one row per (length, depth): ``accuracy`` (0..1) over ``n`` trials. Repeated cells are
    pooled, weighted by ``n``. A cell without a finite accuracy is blank and crossed. ``train_len``
    draws a line after the last length within the training length.
    """
    fig, ax = _one_axes(ax)
    ax.set_title(_with_label("Passkey retrieval accuracy", label), fontsize="medium")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth (fraction of the context)")
    if df.empty:
        _no_data(ax)
        return fig
    _require(df, PASSKEY_COLUMNS, "passkey_figure")
    acc, n = _floats(df["accuracy"]), _floats(df["n"])
    weight = np.where(np.isfinite(acc) & np.isfinite(n) & (n > 0), n, 0.0)
    frame = pd.DataFrame({"depth": df["depth"], "length": df["length"], "w": weight,
                          "wa": np.where(weight > 0, acc * weight, 0.0)})
    sums = frame.groupby(["depth", "length"], sort=True)[["w", "wa"]].sum()
    table = (sums["wa"] / sums["w"].where(sums["w"] > 0)).unstack("length").sort_index().sort_index(axis=1)
    _heatmap(ax, table, cmap=_sequential_cmap(color), norm=Normalize(0.0, 1.0),
             cbar_label="accuracy (fraction of trials)", annot=True,
             xticklabels=[_fmt(v) for v in table.columns], yticklabels=[_fmt(v) for v in table.index])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth (fraction of the context)")
    bad = ~np.isfinite(table.to_numpy(dtype=float))
    _cross_cells(ax, bad)
    if bad.any():
        _heatmap_note(ax, f"{int(bad.sum())} cell(s) without a finite accuracy (crossed)")
    if train_len is not None:
        boundary = int(np.searchsorted(table.columns.to_numpy(dtype=float), train_len, side="right"))
        if 0 < boundary < table.shape[1]:
            _train_len_line(ax, train_len, x=boundary)
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    return fig


# --- 9. Task accuracy (copying, BABILong) -----------------------------------------------------------


@_styled
def accuracy_figure(df: pd.DataFrame, x: str = "length", *, title: str = "Accuracy", label: str | None = None,
                    color: ColorType | None = None, ax: Axes | None = None) -> Figure:
    """Task accuracy against ``x`` (log2 x): the mean over the rows at each ``x``, with markers; one
    line per ``task`` when that column exists, line styles telling the tasks apart.

    ``df``: ``x`` (``"length"``: context length, or ``"n"``: string length, tokens), ``accuracy`` (0..1),
    optionally ``task``. Task names are data and are shown literally.
    """
    fig, ax = _one_axes(ax)
    ax.set_xlabel("string length (tokens)" if x == "n" else "context length (tokens)")
    ax.set_ylabel("accuracy (fraction of trials)")
    ax.set_title(literal(title), fontsize="medium")
    ax.set_ylim(-0.02, 1.02)
    if df.empty:
        _no_data(ax)
        return fig
    _require(df, (x, "accuracy"), "accuracy_figure")
    color = _checkpoint_color(ax, color)
    groups = df.groupby("task", sort=True) if "task" in df.columns else [(None, df)]
    styles = ["-", "--", ":", "-."]
    for i, (task, rows) in enumerate(groups):
        acc = rows.groupby(x)["accuracy"].mean()
        names = [n for n in (label, None if task is None else literal(str(task))) if n]
        gid = "accuracy" if task is None else f"task {literal(str(task))}"
        (line,) = ax.plot(_floats(acc.index), _floats(acc), marker="o", color=color, ls=styles[i % len(styles)],
                          gid=gid, label=_legend_label(": ".join(names)))
        _hover_name(line, label, gid)
    ax.set_xscale("log", base=2)
    _legend(ax)
    return fig


# --- saving -----------------------------------------------------------------------------------------


# --- 10. During training: the monitor's CSV -----------------------------------------------------------


def monitor_curves(df: pd.DataFrame) -> dict[str, pd.Series]:
    """The monitor's rows (:mod:`statelens.monitor`) -> one series per panel of :func:`monitor_figure`, each
    indexed by step: ``loss_gap`` (loss_beyond - loss_in_context, nats), ``norm_ratio`` (the largest
    state_norm_ratio over layers and heads), ``oos`` (the mean oos_fraction over heads), and
    ``effrem t={t}`` for each t."""
    _require(df, MONITOR_COLUMNS, "monitor_figure")
    wide = df[df.layer.isna() & df.t.isna()].pivot(index="step", columns="metric", values="value")
    heads = df[df.layer.notna()].groupby(["metric", "step"]).value
    curves = {"loss_gap": wide["loss_beyond"] - wide["loss_in_context"],
              "norm_ratio": heads.max()["state_norm_ratio"], "oos": heads.mean()["oos_fraction"]}
    for t, rows in df[df.metric == "effrem"].groupby("t"):
        curves[f"effrem t={_fmt(t)}"] = rows.set_index("step").value
    return curves


@_styled
def monitor_figure(df: pd.DataFrame, *, label: str | None = None, color: ColorType | None = None,
                   ax: Sequence[Axes] | None = None) -> Figure:
    """The state during training, against the optimizer step, four panels (``ax``: four Axes, or None for
    a new 2 x 2 figure): the loss past the training length minus the loss within it; the largest state
    norm ratio (position L over T) of any head; EffRem at each monitored t (shades of one colour);
    the mean out-of-support fraction of the heads' end-of-probe states.

    ``df``: the monitor's table (columns step, metric, layer, head, t, value; :mod:`statelens.monitor`).
    """
    if ax is None:
        fig = Figure(figsize=_DOUBLE_GRID, layout="constrained")
        axes = list(fig.subplots(2, 2).ravel())
    else:
        axes = list(ax)
        fig = _root_figure(axes[0])
    color = _checkpoint_color(axes[0], color)
    curves = monitor_curves(df)
    effrem = [name for name in curves if name.startswith("effrem")]
    panels = [("loss_gap", ["loss_gap"], "loss past T - loss within T (nats)", "Loss gap past the training length"),
              ("norm_ratio", ["norm_ratio"], "largest state norm ratio, L / T", "State norm growth (worst head)"),
              ("effrem", effrem, "EffRem_L(t)", "Effective Remembrance"),
              ("oos", ["oos"], "out-of-support fraction", "End-of-probe states out of support")]
    for axis, (gid, names, ylabel, title) in zip(axes, panels):
        shades = _shades(color, len(names))
        for name, shade in zip(names, shades):
            series = curves[name]
            tag = name.removeprefix("effrem ") if gid == "effrem" else None
            legend = f"{label}, {tag}" if label and tag else (tag or label)
            _plot_line(axis, series.index, series.to_numpy(), color=shade, label=legend, gid=f"monitor {name}",
                       checkpoint=label, logx=False, logy=False)
        if gid == "loss_gap":
            axis.axhline(0.0, color="0.5", lw=0.8, ls="--", gid="zero")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.set_title(title, fontsize="medium")
        _legend(axis)
    return fig


def draw(plot, tables: dict[str, pd.DataFrame], train_len: int | None = None, **style) -> Figure:
    """The figure an analysis spec names (a :class:`statelens.analysis.spec.Plot`): its function here,
    called with the plot's tables in order (a missing one as None), ``train_len`` where the function
    takes one, the plot's own ``style`` and ``style`` (``label``, ``color``, ``ax``)."""
    import inspect

    function = globals()[plot.function]
    if "train_len" in inspect.signature(function).parameters:
        style["train_len"] = train_len
    return function(*(tables.get(name) for name in plot.tables), **plot.style, **style)


def save(fig: Figure, path_without_suffix: str | Path) -> list[Path]:
    """Writes ``fig`` as ``<path>.png`` (150 dpi) and ``<path>.svg``, creating the folder; returns both
    paths. The SVG is reproducible: no date, and element ids from a fixed salt."""
    from statelens.outputs import atomic_write

    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    png, svg = base.with_name(base.name + ".png"), base.with_name(base.name + ".svg")
    # Each under a temporary name, then renamed: a killed run never leaves a truncated figure.
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=150))
    with mpl.rc_context({"svg.hashsalt": "statelens"}):
        atomic_write(svg, lambda f: fig.savefig(f, format="svg", metadata={"Date": None}))
    return [png, svg]
