"""The analysis spec: everything statelens needs to know about an analysis, declared once in its file.

An analysis module defines an options dataclass and a ``compute`` function, and registers one
:class:`Analysis`::

    @dataclass
    class Options:
        buckets: int = option(32, "Position buckets.", min=1)

    def compute(run: Run, settings: RunSettings, options: Options) -> Outcome: ...

    SPEC = Analysis("decay", "Decay per layer and head ...", Options, compute,
                    tables=(Table("decay", COLUMNS, keys=(...), watched=(...)),),
                    plot=Plot("decay_figure", ("decay",)),
                    sections=(Section("decay", "Decay: ...", Plot("decay_figure", ("decay",)), panels=2),),
                    report=lambda plan: Options(buckets=plan.buckets)).register()

From the registry (:data:`statelens.analysis.analyses`) the rest is generated: the command and its
options (``statelens.cli.analysis``), the resumable and torchrun grouping (through :class:`statelens.runs.Run`),
what ``report``/``compare``/``demo`` compute (``report``), the report's sections and the tables it reads
(``statelens.reports``), and which columns are watched for inf/NaN (:func:`watched`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from statelens.runs import Run, RunSettings


def option(default: Any, help: str, *, flag: str | None = None, min: int | float | None = None,
           choices: type[Enum] | None = None, show_default: bool = True) -> Any:
    """A field of an analysis' options dataclass: its default and the command line's help. ``flag``
    (default ``--name-with-dashes``), ``min`` (the smallest value the command line accepts) and
    ``choices`` (an Enum whose values the option takes; the field holds the value, a str)."""
    return field(default=default, metadata={"help": help, "flag": flag, "min": min, "choices": choices,
                                            "show_default": show_default})


@dataclass(frozen=True)
class Table:
    """One output table: ``name`` (its CSV is NAME.csv), its documented ``columns`` in order, the
    ``keys`` that locate a row and the ``watched`` columns whose inf/NaN means the model's numbers
    broke (:mod:`statelens.analysis.nonfinite`)."""

    name: str
    columns: tuple[str, ...]
    keys: tuple[str, ...] = ()
    watched: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plot:
    """A figure: the function of ``statelens.reports.figures`` that draws it, called with these tables
    in order (then ``train_len`` where the function takes one)."""

    function: str
    tables: tuple[str, ...]


@dataclass(frozen=True)
class Section:
    """A section of the HTML report: a figure (every checkpoint overlaid, in ``panels`` panels side by
    side; ``per_checkpoint``: a row of one panel per checkpoint, for heatmaps, then the shared panel
    below) and the ``tables`` shown under it (default: the plot's)."""

    id: str
    title: str
    plot: Plot
    panels: int = 1
    per_checkpoint: bool = False
    tables: tuple[str, ...] = ()

    @property
    def shown(self) -> tuple[str, ...]:
        return self.tables or self.plot.tables


@dataclass(frozen=True)
class ReportPlan:
    """The settings ``report``/``compare``/``demo`` run every analysis with: the rollout ``length``,
    the recording ``stride``, position ``buckets``, coverage's reference ``regime`` and the checkpoint's
    training length ``train_len``."""

    length: int
    stride: int
    buckets: int
    regime: str
    train_len: int


@dataclass
class Outcome:
    """What an analysis' ``compute`` returns: its tables by name, the ``results`` for run.json and the
    summary ``lines`` the command prints."""

    tables: dict[str, pd.DataFrame]
    results: dict = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Analysis:
    """One analysis, declared once: its command ``name`` and ``summary`` (the command's help), its
    ``options`` dataclass, ``compute(run, settings, options) -> Outcome``, its ``tables``, the command's
    figure ``plot``, its report ``sections``, and ``report(plan) -> options`` when report/compare/demo
    run it (None: they do not)."""

    name: str
    summary: str
    options: type
    compute: Callable[[Run, RunSettings, Any], Outcome]
    tables: tuple[Table, ...]
    plot: Plot | None = None
    sections: tuple[Section, ...] = ()
    report: Callable[[ReportPlan], Any] | None = None

    def register(self) -> Analysis:
        from statelens.analysis import analyses

        return analyses.register(self.name)(self)

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    @property
    def shows(self) -> str:
        """The table whose presence shows the analysis ran (its first)."""
        return self.tables[0].name


def option_fields(options: type) -> list[tuple[str, type, Any, dict]]:
    """``(name, type, default, metadata)`` of each field of an options dataclass, in order, types resolved."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(options)
    return [(f.name, hints[f.name], None if f.default is MISSING else f.default, dict(f.metadata))
            for f in dataclasses.fields(options)]


def watched(specs) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """table name -> (key columns, watched columns) of every table of ``specs`` that watches any."""
    return {t.name: (t.keys, t.watched) for spec in specs for t in spec.tables if t.watched}
