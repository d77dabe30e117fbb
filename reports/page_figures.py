"""The figures of the HTML report, as Figures: one per analysis (and per long-context task), every
checkpoint drawn into it (overlaid, heatmaps side by side), with the tables it was drawn from.

:func:`report_figures` and :func:`task_figures` return ``{"id", "title", "figure", "tables"}`` dicts,
``tables`` a list of ``(name, DataFrame)``; :mod:`statelens.reports.html` embeds them in the page. The
Axes are made inside :func:`~statelens.reports.figures.figure_style`, so the grids look like the figures
the commands write. Widths: one panel is :data:`PANEL` wide, two panels (or a grid) twice that, so a
page showing them at the same scale shows every text at the same size.
"""
from __future__ import annotations

from matplotlib.figure import Figure

from statelens.reports import figures as F

#: One panel's size (inches): the standalone figures' single size.
PANEL = (6.4, 4.2)


def _shared_train_len(train_lens: list[int]) -> int | None:
    """The dashed training-length line is drawn only when every checkpoint has the same one."""
    return train_lens[0] if len(set(train_lens)) == 1 else None


def _maps_and_lines(section, have: list, colors: dict, train_len: int | None) -> Figure:
    """One heatmap per checkpoint (heatmaps cannot overlay) and the shared lines panel of all: for one
    checkpoint a row of two panels; for two, the heatmaps on a row and the lines panel below."""
    n = len(have)
    with F.figure_style():
        if n == 1:
            fig = Figure(figsize=(2 * PANEL[0], PANEL[1]), layout="constrained")
            maps, lines = fig.subplots(1, 2)
            maps = [maps]
        else:  # two subfigures, laid out apart: the lines panel's legend must not squeeze a heatmap
            fig = Figure(figsize=(2 * PANEL[0], 2 * PANEL[1]), layout="constrained")
            top, bottom = fig.subfigures(2, 1)
            maps = list(top.subplots(1, n))
            lines = bottom.add_subplot()
    for ax, (r, lab) in zip(maps, have):
        F.draw(section.plot, r.tables, train_len, label=lab, color=colors[lab], ax=(ax, lines))
    return fig


def _side_by_side(section, have: list, colors: dict, train_len: int | None) -> Figure:
    """One panel per checkpoint, on a row (a little taller: heatmaps carry their colour bar's title)."""
    with F.figure_style():
        fig = Figure(figsize=(len(have) * PANEL[0], PANEL[1] + 0.4), layout="constrained")
        axes = [fig.add_subplot(1, len(have), i + 1) for i in range(len(have))]
    for ax, (r, lab) in zip(axes, have):
        F.draw(section.plot, r.tables, train_len, label=lab, color=colors[lab], ax=ax)
    return fig


def _overlaid(section, have: list, colors: dict, train_len: int | None) -> Figure:
    """Every checkpoint drawn into the same ``section.panels`` panels."""
    with F.figure_style():
        fig = Figure(figsize=(section.panels * PANEL[0], PANEL[1]), layout="constrained")
        ax = fig.subplots(1, section.panels) if section.panels > 1 else fig.add_subplot()
    for r, lab in have:
        F.draw(section.plot, r.tables, train_len, label=lab, color=colors[lab], ax=ax)
    return fig


LAYOUTS = {"overlay": _overlaid, "side-by-side": _side_by_side, "maps-and-lines": _maps_and_lines}


def _sections(specs, results_list: list, labels: list[str], train_lens: list[int]) -> list[dict]:
    """Every section of ``specs`` whose drawn table some checkpoint (a
    :class:`~statelens.reports.html.Results`) has, in registration order."""
    colors = F.checkpoint_colors(labels)
    train_len = _shared_train_len(train_lens)
    shown = []
    for section in (section for spec in specs for section in spec.sections):
        have = [(r, lab) for r, lab in zip(results_list, labels) if section.plot.tables[0] in r.tables]
        if not have:
            continue
        tables = [(f"{lab}: {name}.csv", r.tables[name]) for r, lab in have for name in section.shown
                  if name in r.tables]
        figure = LAYOUTS[section.layout](section, have, colors, train_len)
        shown.append({"id": section.id, "title": section.title, "figure": figure, "tables": tables})
    return shown


def report_figures(results_list: list, labels: list[str], train_lens: list[int]) -> list[dict]:
    """The analyses' sections (:data:`statelens.analysis.analyses`)."""
    from statelens.analysis import analyses

    return _sections(analyses, results_list, labels, train_lens)


def task_figures(results_list: list, labels: list[str], train_lens: list[int]) -> list[dict]:
    """The long-context tasks' sections (:data:`statelens.tasks.tasks`): the passkey heatmap of each
    checkpoint side by side, copying accuracy by string length and BABILong accuracy by context length
    overlaid."""
    from statelens.tasks import tasks

    return _sections(tasks, results_list, labels, train_lens)


def monitor_figures(results_list: list, labels: list[str]) -> list[dict]:
    """The "During training" section when some checkpoint's folder holds a monitor.csv
    (``statelens posttrain --monitor-every``): :func:`~statelens.reports.figures.monitor_figure` of each,
    overlaid on one 2 x 2 grid."""
    have = [(r, lab) for r, lab in zip(results_list, labels) if "monitor" in r.tables]
    if not have:
        return []
    colors = F.checkpoint_colors(labels)
    with F.figure_style():
        fig = Figure(figsize=(2 * PANEL[0], 2 * PANEL[1]), layout="constrained")
        axes = list(fig.subplots(2, 2).ravel())
    for r, lab in have:
        F.monitor_figure(r.tables["monitor"], label=lab, color=colors[lab], ax=axes)
    return [{"id": "monitor", "title": "During training", "figure": fig,
             "tables": [(f"{lab}: monitor.csv", r.tables["monitor"]) for r, lab in have]}]
