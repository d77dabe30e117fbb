"""Analyses: each a module computing tidy DataFrames from a model and token sequences, and registering
one :class:`~statelens.analysis.spec.Analysis` (its command, options, tables, figures and report
sections) in :data:`analyses`. Everything that lists the analyses reads that registry.

The registration order is the report's order.
"""
from statelens.registry import Registry

analyses: Registry = Registry("analysis")

from statelens.analysis import positionwise, remembrance, states, decay, coverage, logits_drift  # noqa: E402,F401,I001


def table_owners() -> dict[str, str]:
    """Every analysis table's name -> the command that writes it (its folder under a run directory)."""
    return {table.name: spec.name for spec in analyses for table in spec.tables}


def watched() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every analysis table watched for inf/NaN -> (its key columns, its watched columns)."""
    from statelens.analysis.spec import watched as of

    return of(analyses)


def analyse(spec, settings, options):
    """Runs the analysis ``spec`` (a registered :class:`~statelens.analysis.spec.Analysis`) with the shared
    ``settings`` (:class:`statelens.runs.RunSettings`) and its ``options`` (``spec.options``): loads the
    checkpoint, computes resumably in groups (shared over torchrun ranks) and returns ``(run, outcome)``;
    ``run.finish(outcome.tables, ...)`` writes the outputs. Nothing is written before that."""
    import dataclasses

    from statelens.runs import start

    s = settings
    config = ({"data": str(s.data) if s.data else None, "train_len": s.train_len, "length": s.length,
               "num_seqs": s.num_seqs} | dataclasses.asdict(options) | {"chunk": s.chunk, "group": s.group})
    run = start(spec.name, settings, config)
    run.watched = watched()
    outcome = spec.compute(run, settings, options)
    run.lap("compute")
    return run, outcome
