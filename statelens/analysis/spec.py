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
    in order, then ``train_len`` where the function takes one, and the keyword arguments ``style``."""

    function: str
    tables: tuple[str, ...]
    style: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    """A section of the HTML report: a figure and the ``tables`` shown under it (default: the plot's).
    ``layout``: "overlay" (every checkpoint drawn into the same ``panels`` panels), "side-by-side" (one
    panel per checkpoint: heatmaps cannot overlay) or "maps-and-lines" (a heatmap per checkpoint on a
    row, and below them one panel of lines every checkpoint draws into)."""

    id: str
    title: str
    plot: Plot
    panels: int = 1
    layout: str = "overlay"
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


#: The shared options (fields of statelens.runs.RunSettings) an analysis' command takes: all of them.
ANALYSIS_SHARED = ("ckpt", "data", "train_len", "length", "num_seqs", "chunk", "group", "resume", "device",
                   "backend", "dtype", "seed", "out", "mitigation", "tokenizer", "text_field", "compile")
#: ... and those every task's command takes (a task makes its own prompts).
TASK_SHARED = ("ckpt", "chunk", "resume", "device", "backend", "dtype", "seed", "out", "mitigation", "compile")


@dataclass(frozen=True)
class Analysis:
    """One analysis (or task), declared once: its command ``name`` and ``summary`` (the command's help),
    its ``options`` dataclass, ``compute(run, settings, options) -> Outcome``, its ``tables``, the
    command's figure ``plot``, its report ``sections``, ``report(plan) -> options`` when
    report/compare/demo run it (None: they do not), the ``shared`` options its command takes, and
    whether it draws its sequences from the data (``draws_sequences``; False: it makes its own
    prompts, and refuses the calibrated cap mitigation)."""

    name: str
    summary: str
    options: type
    compute: Callable[[Run, RunSettings, Any], Outcome]
    tables: tuple[Table, ...]
    plot: Plot | None = None
    sections: tuple[Section, ...] = ()
    report: Callable[[ReportPlan], Any] | None = None
    shared: tuple[str, ...] = ANALYSIS_SHARED
    draws_sequences: bool = True

    def register(self, registry=None) -> Analysis:
        """Registers the spec in ``registry`` (default: :data:`statelens.analysis.analyses`)."""
        if registry is None:
            from statelens.analysis import analyses as registry

        return registry.register(self.name)(self)

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
