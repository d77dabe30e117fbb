"""Synthetic copying: a random token string, a separator, then the model must repeat the string.

The string's ids are drawn uniformly from ``0 .. vocab_size - 2``; the separator is the last id,
``vocab_size - 1``, which never occurs in the string. The model greedy-decodes ``n`` tokens after the
separator; token accuracy is the fraction of positions equal to the string.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from statelens.analysis.spec import TASK_SHARED, Analysis, Outcome, Plot, Section, Table, option
from statelens.errors import ParameterError
from statelens.models.base import RecurrentLM
from statelens.tasks import tasks
from statelens.tasks.cells import parse_lengths
from statelens.tasks.decode import greedy_continue

if TYPE_CHECKING:
    from statelens.runs import Run, RunSettings

COLUMNS = ["n", "accuracy", "n_samples"]


def separator(vocab_size: int) -> int:
    """The separator id: the last id of the vocabulary."""
    return vocab_size - 1


def make_copy(vocab_size: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt [n + 1] = string then separator, target [n] = the string), int64; deterministic for ``seed``."""
    if vocab_size < 2:
        raise ParameterError("vocab_size", f"vocab_size must be >= 2, got {vocab_size}")
    target = np.random.default_rng(seed).integers(0, vocab_size - 1, size=n, dtype=np.int64)
    return np.append(target, separator(vocab_size)), target


def copying_cell(model: RecurrentLM, n: int, *, samples: int = 4, seed: int = 0, chunk: int = 2048) -> float:
    """The token accuracy of one string length ``n`` of :func:`copying` over its ``samples`` strings (the
    same seeds at every length)."""
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=samples)
    built = [make_copy(model.config.vocab_size, n, int(s)) for s in seeds]
    targets = np.stack([t for _, t in built])                    # [samples, n]
    copied = greedy_continue(model, np.stack([p for p, _ in built]), n, chunk=chunk)
    return float((copied == targets).mean())


def copying(model: RecurrentLM, lengths: Sequence[int], *, samples: int = 4, seed: int = 0, chunk: int = 2048,
            progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Copying accuracy per string length, one :func:`copying_cell` each.

    Columns: ``n`` (string length in tokens), ``accuracy`` (fraction of the ``n * n_samples`` copied
    tokens that are right), ``n_samples`` (strings). ``vocab_size`` is the model's.
    """
    rows = []
    for n in lengths:
        rows.append((n, copying_cell(model, n, samples=samples, seed=seed, chunk=chunk), samples))
        if progress is not None:
            progress(samples * 2 * n)
    return pd.DataFrame(rows, columns=COLUMNS)


# --- the command: statelens copying -------------------------------------------------------------------------


@dataclass
class Options:
    lengths: str = option("16,64,256,1024", "String lengths in tokens, comma-separated (4096 or 4k).")
    samples: int = option(4, "Trials per cell.", min=1)


def compute(run: Run, settings: RunSettings, options: Options) -> Outcome:
    """Every string length, one resumable group each."""
    lengths = parse_lengths(options.lengths)
    run.config["lengths"] = lengths
    samples, seed, chunk = options.samples, settings.seed, settings.chunk
    vocab = run.model.config.vocab_size
    run.data_description = (f"uniformly random strings over ids 0..{vocab - 2}, separator id {separator(vocab)} "
                            f"(seed {seed})")

    def cell(n: int, advance) -> dict:
        accuracy = copying_cell(run.model, n, samples=samples, seed=seed, chunk=chunk)
        advance(samples * 2 * n)
        return {"accuracy": accuracy}

    parts = run.groups([functools.partial(cell, n) for n in lengths], tokens=[samples * 2 * n for n in lengths],
                       description="copying")
    df = pd.DataFrame([(n, float(part["accuracy"]), samples) for n, part in zip(lengths, parts)], columns=COLUMNS)
    return Outcome({"copying": df}, lines=[f"n {int(row.n)}: token accuracy {row.accuracy:.3f}"
                                           for row in df.itertuples()])


SPEC = Analysis(
    "copying", "Synthetic copying: a random token string of each length, a separator, then the model repeats the "
               "string by greedy decoding; writes copying.csv (token accuracy) and run.json. One length is the unit "
               "of work that --resume keeps and torchrun shares out.",
    Options, compute, tables=(Table("copying", tuple(COLUMNS)),),
    sections=(Section("copying", "Copying", Plot("accuracy_figure", ("copying",),
                                                 {"x": "n", "title": "Copying accuracy"})),),
    shared=TASK_SHARED, draws_sequences=False).register(tasks)
