"""Passkey retrieval: a 5-digit key stated once inside filler text, asked for at the end.

A prompt of exactly ``length`` tokens is

    filler ... " The pass key is 71432. Remember it. 71432 is the pass key." filler ...
    " What is the pass key? The pass key is"

built in token space: the filler before the key sentence ends at the end of a filler paragraph and the
filler after it starts a paragraph, so the key sentence never splits a filler sentence. The key's
first statement starts at token ``round(depth * length)`` (clamped to the positions the prompt
allows), so it lies within 1% of ``depth * length`` whenever that position is reachable.

The model answers by greedy decoding; a trial is correct when the decoded text, stripped, starts with
the key's five digits.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from statelens.analysis.spec import TASK_SHARED, Analysis, Outcome, Plot, Section, Table, option
from statelens.data.tokenizer import Tokenizer
from statelens.errors import BadInput
from statelens.models.base import RecurrentLM
from statelens.tasks import tasks
from statelens.tasks.cells import parse_depths, parse_lengths
from statelens.tasks.decode import greedy_continue

if TYPE_CHECKING:
    from statelens.runs import Run, RunSettings

COLUMNS = ["length", "depth", "accuracy", "n"]
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"


def filler_tokens(tokenizer: Tokenizer, n: int, *, end_aligned: bool = False) -> np.ndarray:
    """``n`` tokens of repeated :data:`FILLER` [n]: its first ``n`` tokens, or with ``end_aligned``
    its last ``n`` (so that the piece ends where a paragraph ends)."""
    unit = tokenizer.encode(FILLER)
    tiled = np.tile(unit, -(-n // len(unit)))
    return tiled[len(tiled) - n:] if end_aligned else tiled[:n]


def check_depths(depths: Sequence[float]) -> None:
    for depth in depths:
        if not 0.0 <= float(depth) <= 1.0:
            raise BadInput(f"--depths: depth {depth} is outside [0, 1]")


def random_key(seed: int) -> str:
    """The 5-digit key (10000 .. 99999) for ``seed``."""
    return str(int(np.random.default_rng(seed).integers(10_000, 100_000)))


def make_passkey(tokenizer: Tokenizer, length: int, depth: float, seed: int) -> tuple[np.ndarray, str, int]:
    """One passkey prompt: (prompt tokens [length] int64, the key, token position of the key).

    The key position is the index of the key's first token (``tokenizer.encode(" " + key)``) in its
    first statement. Deterministic for ``seed``.

    Raises:
        BadInput: ``depth`` is outside [0, 1], or ``length`` cannot hold the key sentence and question.
    """
    check_depths([depth])
    key = random_key(seed)
    prefix = tokenizer.encode(" The pass key is")
    key_ids = tokenizer.encode(" " + key)
    rest = tokenizer.encode(f". Remember it. {key} is the pass key.")
    question = tokenizer.encode(QUESTION)
    sentence = np.concatenate([prefix, key_ids, rest])
    n_filler = length - len(sentence) - len(question)
    if n_filler < 0:
        raise BadInput(f"--lengths: {length} tokens cannot hold the passkey sentence and the question "
                       f"({len(sentence) + len(question)} tokens)")
    start = int(np.clip(round(depth * length) - len(prefix), 0, n_filler))
    prompt = np.concatenate([filler_tokens(tokenizer, start, end_aligned=True), sentence,
                             filler_tokens(tokenizer, n_filler - start), question]).astype(np.int64)
    return prompt, key, start + len(prefix)


def sample_seeds(seed: int, samples: int) -> list[int]:
    """One seed per trial; the same keys are used at every (length, depth) so cells compare."""
    return [int(s) for s in np.random.default_rng(seed).integers(0, 2**31 - 1, size=samples)]


def passkey_cell(model: RecurrentLM, tokenizer: Tokenizer, length: int, depth: float, *, samples: int = 4,
                 seed: int = 0, chunk: int = 2048) -> float:
    """The accuracy of one (length, depth) cell of :func:`passkey`: the fraction of its ``samples`` trials
    (keys from :func:`sample_seeds`, the same in every cell) whose greedy answer starts with the key."""
    built = [make_passkey(tokenizer, length, depth, s) for s in sample_seeds(seed, samples)]
    keys = [key for _, key, _ in built]
    n_new = max(len(tokenizer.encode(" " + key)) for key in keys)
    answers = greedy_continue(model, np.stack([p for p, _, _ in built]), n_new, chunk=chunk)
    correct = [tokenizer.decode(a).strip().startswith(key) for a, key in zip(answers, keys)]
    return float(np.mean(correct))


def passkey(model: RecurrentLM, tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], *,
            samples: int = 4, seed: int = 0, chunk: int = 2048,
            progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Passkey retrieval accuracy per (length, depth), one :func:`passkey_cell` each.

    Columns: ``length`` (prompt tokens), ``depth`` (key position / length), ``accuracy`` (fraction of
    the ``n`` trials whose greedy answer starts with the key). ``progress(n)`` is told the prompt
    tokens of each batch.
    """
    check_depths(depths)
    rows = []
    for length in lengths:
        for depth in depths:
            accuracy = passkey_cell(model, tokenizer, length, depth, samples=samples, seed=seed, chunk=chunk)
            rows.append((length, depth, accuracy, samples))
            if progress is not None:
                progress(samples * length)
    return pd.DataFrame(rows, columns=COLUMNS)


def capacity(df: pd.DataFrame, threshold: float = 0.9) -> int:
    """The largest length whose accuracy, averaged over depths, is at least ``threshold`` (0 if none)."""
    by_length = df.groupby("length")["accuracy"].mean()
    passing = by_length[by_length >= threshold]
    return int(passing.index.max()) if len(passing) else 0


# --- the command: statelens passkey -------------------------------------------------------------------------


@dataclass
class Options:
    lengths: str = option("1024,2048,4096,8192", "Context lengths in tokens, comma-separated (4096 or 4k).")
    depths: str = option("0.1,0.5,0.9", "Key depths, fractions of the context in [0, 1], comma-separated.")
    samples: int = option(4, "Trials per cell.", min=1)


def compute(run: Run, settings: RunSettings, options: Options) -> Outcome:
    """Every (length, depth) cell, one resumable group each; the capacity and the state size."""
    lengths, depths = parse_lengths(options.lengths), parse_depths(options.depths)
    check_depths(depths)
    run.config |= {"lengths": lengths, "depths": depths}
    samples, seed, chunk = options.samples, settings.seed, settings.chunk
    tokenizer = run.tokenizer()
    run.data_description = f"5-digit passkeys in repeated filler text (seed {seed}), tokenized with {tokenizer.name}"
    for length in lengths:  # a length too short for the key and question: BadInput before any work
        for key_seed in sample_seeds(seed, samples):
            make_passkey(tokenizer, length, depths[0], key_seed)
    cells = [(length, depth) for length in lengths for depth in depths]

    def cell(length: int, depth: float, advance) -> dict:
        accuracy = passkey_cell(run.model, tokenizer, length, depth, samples=samples, seed=seed, chunk=chunk)
        advance(samples * length)
        return {"accuracy": accuracy}

    parts = run.groups([functools.partial(cell, *c) for c in cells],
                       tokens=[samples * length for length, _ in cells], description="passkey")
    df = pd.DataFrame([(length, depth, float(part["accuracy"]), samples)
                       for (length, depth), part in zip(cells, parts)], columns=COLUMNS)
    found = capacity(df)
    state_size = run.model.zero_state(1, device="meta").numel_per_sequence()
    by_length = df.groupby("length")["accuracy"].mean()
    return Outcome({"passkey": df}, {"capacity": found, "state_size": state_size},
                   [f"length {length}: accuracy {acc:.2f} (mean over depths)" for length, acc in by_length.items()]
                   + [f"passkey capacity: {found} tokens (mean accuracy >= 0.9); state size {state_size} numbers"])


PLOT = Plot("passkey_figure", ("passkey",))
SPEC = Analysis(
    "passkey", "Passkey retrieval: a 5-digit key hidden at each depth of filler text of each length; writes "
               "passkey.csv, passkey.png and run.json (with the passkey capacity and the state size). One (length, "
               "depth) cell is the unit of work that --resume keeps and torchrun shares out.",
    Options, compute, tables=(Table("passkey", tuple(COLUMNS)),), plot=PLOT,
    sections=(Section("passkey", "Passkey retrieval", PLOT, layout="side-by-side"),),
    shared=TASK_SHARED + ("train_len", "tokenizer"), draws_sequences=False).register(tasks)
