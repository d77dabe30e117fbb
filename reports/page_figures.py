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
#: (id, title, tables: the first is the one drawn) of each analysis figure, in page order.
ANALYSES = [("perplexity", "Loss by position", ["positionwise"]),
            ("remembrance", "Effective Remembrance", ["remembrance"]),
            ("state-norm", "State norm and collapse", ["state_stats", "collapse"]),
            ("state-std", "State standard deviation", ["state_stats"]),
            ("decay", "Decay: retention and memory horizon", ["decay"]),
            ("coverage", "Coverage: states outside the training support", ["coverage", "coverage_buckets"])]
#: (table, title, x column) of each long-context task figure.
TASKS = [("passkey", "Passkey retrieval", "length"), ("copying", "Copying", "n"), ("babilong", "BABILong", "length")]


def _shared_train_len(train_lens: list[int]) -> int | None:
    """The dashed training-length line is drawn only when every checkpoint has the same one."""
    return train_lens[0] if len(set(train_lens)) == 1 else None


def _state_norm(have: list, colors: dict, train_len: int | None) -> Figure:
    """One heatmap per checkpoint (heatmaps cannot overlay) and the collapsed heads of all in one panel:
    for one checkpoint a row of two panels; for two, the heatmaps on a row and the lines panel below."""
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
        F.state_norm_figure(r.tables["state_stats"], r.tables.get("collapse"), train_len, label=lab,
                            color=colors[lab], ax=(ax, lines))
    return fig


def report_figures(results_list: list, labels: list[str], train_lens: list[int]) -> list[dict]:
    """Every analysis figure whose table some checkpoint (a :class:`~statelens.reports.html.Results`)
    has, in :data:`ANALYSES` order."""
    colors = F.checkpoint_colors(labels)
    train_len = _shared_train_len(train_lens)
    draw = {"perplexity": lambda df, **kw: F.perplexity_figure(df, train_len, **kw),
            "remembrance": F.remembrance_figure,
            "state-std": lambda df, **kw: F.state_std_figure(df, train_len, **kw),
            "decay": lambda df, **kw: F.decay_figure(df, train_len, **kw),
            "coverage": lambda df, **kw: F.coverage_figure(df, train_len, **kw)}
    shown = []
    for fig_id, title, names in ANALYSES:
        have = [(r, lab) for r, lab in zip(results_list, labels) if names[0] in r.tables]
        if not have:
            continue
        if fig_id == "state-norm":
            fig = _state_norm(have, colors, train_len)
        else:
            panels = 2 if fig_id == "decay" else 1
            with F.figure_style():
                fig = Figure(figsize=(panels * PANEL[0], PANEL[1]), layout="constrained")
                ax = fig.subplots(1, 2) if panels == 2 else fig.add_subplot()
            for r, lab in have:
                draw[fig_id](r.tables[names[0]], label=lab, color=colors[lab], ax=ax)
        tables = [(f"{lab}: {name}.csv", r.tables[name]) for r, lab in have for name in names if name in r.tables]
        shown.append({"id": fig_id, "title": title, "figure": fig, "tables": tables})
    return shown


def task_figures(results_list: list, labels: list[str], train_lens: list[int]) -> list[dict]:
    """The long-context task figures, like :func:`report_figures`: the passkey heatmap of each checkpoint
    side by side, copying accuracy by string length and BABILong accuracy by context length overlaid."""
    colors = F.checkpoint_colors(labels)
    train_len = _shared_train_len(train_lens)
    shown = []
    for name, title, x in TASKS:
        have = [(r.tables[name], lab) for r, lab in zip(results_list, labels) if name in r.tables]
        if not have:
            continue
        panels = len(have) if name == "passkey" else 1
        with F.figure_style():
            fig = Figure(figsize=(panels * PANEL[0], PANEL[1] + 0.4 * (name == "passkey")), layout="constrained")
            axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
        for i, (df, lab) in enumerate(have):
            if name == "passkey":  # heatmaps cannot overlay: one per checkpoint
                F.passkey_figure(df, train_len, label=lab, color=colors[lab], ax=axes[i])
            else:
                F.accuracy_figure(df, x, title=f"{title} accuracy", label=lab, color=colors[lab], ax=axes[0])
        shown.append({"id": name, "title": title, "figure": fig,
                      "tables": [(f"{lab}: {name}.csv", df) for df, lab in have]})
    return shown
