"""What every command shares at the edge: running an analysis spec and saying what it found.

The work itself (loading, the resumable groups, writing the outputs) is :mod:`statelens.runs`; the
analyses are :mod:`statelens.analysis` specs. Here: one call to the library, the figures drawn, one
summary printed."""
from __future__ import annotations

from pathlib import Path


def execute(spec, settings, options) -> None:
    """Runs the analysis ``spec`` (a :class:`statelens.analysis.spec.Analysis`) with the shared
    ``settings`` (:class:`statelens.runs.RunSettings`) and its ``options``; writes its tables, its figure
    and run.json, and prints its summary."""
    from statelens.analysis import analyse

    run, outcome = analyse(spec, settings, options)
    save = None
    if spec.plot is not None:
        from statelens.reports.figures import draw, save as save_figure

        figure = draw(spec.plot, outcome.tables, run.train_len)
        save = lambda stem: save_figure(figure, stem)  # noqa: E731
    written = run.finish(outcome.tables, save, outcome.results)
    report(run, written, outcome.lines)


def report(run, written: list[Path], lines: list[str]) -> None:
    """Prints what a command found and where it wrote it (on torchrun's rank 0 only)."""
    from rich.console import Console

    from statelens import distributed
    from statelens.analysis.nonfinite import describe

    if not distributed.is_main():
        return
    console = Console(highlight=False)
    console.print(f"[bold]{run.command}[/] {run.ckpt.describe()} ({run.model.arch}, {run.ckpt.backend} backend); "
                  f"training length {run.train_len} ({run.train_len_source}); data: {run.data_description}")
    for line in lines + [describe(name, found) for name, found in run.nonfinite.items()]:
        console.print(f"  {line}")
    console.print(f"wrote {', '.join(str(p) for p in written)}")
