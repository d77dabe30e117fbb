"""Analyses: each a module computing tidy DataFrames from a model and token sequences, and registering
one :class:`~statelens.analysis.spec.Analysis` (its command, options, tables, figures and report
sections) in :data:`analyses`. Everything that lists the analyses reads that registry.

The registration order is the report's order.
"""
from statelens.registry import Registry

analyses: Registry = Registry("analysis")

from statelens.analysis import positionwise, remembrance, states, decay, coverage, logits_drift  # noqa: E402,F401,I001


def table_owners(specs=None) -> dict[str, str]:
    """Every table of ``specs`` (default: the analyses) -> the command that writes it (its folder under a
    run directory)."""
    return {table.name: spec.name for spec in (analyses if specs is None else specs) for table in spec.tables}


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

    from statelens.models import fused
    from statelens.runs import start

    s = settings
    given = {"data": str(s.data) if s.data else None, "train_len": s.train_len, "length": s.length,
             "num_seqs": s.num_seqs, "chunk": s.chunk, "group": s.group}
    config = ({k: given[k] for k in ("data", "train_len", "length", "num_seqs") if k in spec.shared}
              | dataclasses.asdict(options) | {k: given[k] for k in ("chunk", "group") if k in spec.shared})
    run = start(spec.name, settings, config, draws_sequences=spec.draws_sequences)
    run.watched = watched()
    with fused.mode(run.compile):
        outcome = spec.compute(run, settings, options)
    run.lap("compute")
    return run, outcome
