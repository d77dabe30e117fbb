"""BABILong: bAbI question answering with the supporting facts hidden in long filler text.

Two sources of samples, both giving :class:`Sample` (context, question, target):

* :func:`load_babilong` reads local files in the public BABILong layout (the Hugging Face dataset
  ``RMT-team/babilong``: configurations "0k", "1k", ..., "128k", splits "qa1" .. "qa20"; records with
  ``input``, ``question`` and ``target``). Any of these paths is accepted under the directory, as a JSON
  list or as JSONL (one record per line)::

      {split}/{task}.json[l]      e.g. 4k/qa1.json
      {task}/{split}.json[l]      e.g. qa1/4k.jsonl
      {task}_{split}.json[l]      e.g. qa1_4k.json

* :func:`make_story` generates qa1-style ("single supporting fact": "Where is Mary?") and qa2-style
  ("two supporting facts": "Where is the football?") stories at any length, with the facts placed in
  order between sentences of the passkey filler. Each supporting fact occurs exactly once.

The prompt is ``context + " " + question + " Answer:"``; the model greedy-decodes a few tokens and is
right when the first word of its answer (lowercased, punctuation stripped) equals the target.
"""
from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from statelens.analysis.spec import TASK_SHARED, Analysis, Outcome, Plot, Section, Table, option
from statelens.data.tokenizer import Tokenizer
from statelens.errors import BadInput, DataError
from statelens.models.base import RecurrentLM
from statelens.tasks import tasks
from statelens.tasks.cells import parse_lengths
from statelens.tasks.decode import greedy_continue
from statelens.tasks.passkey import FILLER

if TYPE_CHECKING:
    from statelens.runs import Run, RunSettings

COLUMNS = ["task", "length", "accuracy", "n"]
FIELDS = ("input", "question", "target")
GENERATED = ("qa1", "qa2")

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("bathroom", "hallway", "garden", "office", "kitchen", "bedroom")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
OBJECTS = ("football", "apple", "milk")
FILLER_SENTENCES = tuple(" " + s.strip() + "." for s in FILLER.split(".") if s.strip())
ANSWER_TOKENS = 2  # tokens decoded beyond the target's own encoding


@dataclass(frozen=True)
class Sample:
    """One question: ``context`` (story in filler), ``question``, ``target`` (one word), and for
    generated stories the ``facts`` that support the answer."""

    context: str
    question: str
    target: str
    facts: tuple[str, ...] = field(default=())

    def prompt(self) -> str:
        return f"{self.context} {self.question} Answer:"


# -- local files -----------------------------------------------------------------------------------
def split_name(length: int) -> str:
    """The BABILong split of a context length in tokens: 4096 -> "4k", 0 -> "0k"."""
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def find_file(directory: Path, task: str, split: str) -> Path:
    """The file holding ``task`` at ``split`` under ``directory``; DataError listing the tried paths."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--data {directory}: not a directory")
    stems = [Path(split) / task, Path(task) / split, Path(f"{task}_{split}")]
    tried = [directory / stem.with_name(stem.name + ext) for stem in stems for ext in (".json", ".jsonl")]
    for path in tried:
        if path.is_file():
            return path
    raise DataError(f"{directory}: no BABILong file for {task} at {split} (looked for "
                    f"{', '.join(str(p.relative_to(directory)) for p in tried)})")


def read_records(path: Path) -> list[dict]:
    """Records of a JSON list or JSONL file, each checked for ``input``, ``question``, ``target``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    try:
        stripped = text.lstrip()
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}: line {line_no} is not JSON ({err.msg})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a JSON list ({err.msg} at line {err.lineno})") from None
    if not records:
        raise DataError(f"{path}: no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is not a JSON object")
        missing = [name for name in FIELDS if not isinstance(record.get(name), str)]
        if missing:
            raise DataError(f"{path}: record {index} has no string field {', '.join(map(repr, missing))}")
    return records


def load_babilong(directory: str | Path, task: str, length: int) -> list[Sample]:
    """The samples of ``task`` (e.g. "qa1") at context ``length`` tokens (split ``split_name(length)``)."""
    path = find_file(Path(directory), task, split_name(length))
    return [Sample(r["input"], r["question"], r["target"]) for r in read_records(path)]


# -- generated stories -----------------------------------------------------------------------------
def _moves(rng: np.random.Generator, n: int, people: Sequence[str], used: set[str]) -> list[str]:
    """``n`` distinct move sentences by ``people`` not in ``used`` (which they are added to)."""
    out = []
    while len(out) < n:
        sentence = f" {rng.choice(people)} {rng.choice(MOVES)} the {rng.choice(PLACES)}."
        if sentence not in used:
            used.add(sentence)
            out.append(sentence)
    return out


def story_facts(task: str, rng: np.random.Generator) -> tuple[list[str], str, str, tuple[str, ...]]:
    """(story sentences in order, question, target, supporting facts) of a qa1 or qa2 story."""
    person = str(rng.choice(PEOPLE))
    others = [p for p in PEOPLE if p != person]
    place = str(rng.choice(PLACES))
    if task == "qa1":
        support = f" {person} {rng.choice(MOVES)} the {place}."
        used = {support}
        story = _moves(rng, 2, PEOPLE, used) + [support] + _moves(rng, int(rng.integers(0, 3)), others, used)
        return story, f"Where is {person}?", place, (support,)
    if task == "qa2":
        thing = str(rng.choice(OBJECTS))
        pick = f" {person} {rng.choice(('picked up', 'got', 'grabbed'))} the {thing}."
        move = f" {person} {rng.choice(MOVES)} the {place}."
        used = {pick, move}
        story = (_moves(rng, 2, PEOPLE, used) + [pick] + _moves(rng, 1, others, used) + [move]
                 + _moves(rng, int(rng.integers(0, 2)), others, used))
        return story, f"Where is the {thing}?", place, (pick, move)
    raise BadInput(f"--tasks: the built-in generator makes {', '.join(GENERATED)}, not {task!r} "
                   "(pass --data for the other BABILong tasks)")


def make_story(tokenizer: Tokenizer, task: str, length: int, seed: int) -> Sample:
    """A qa1 or qa2 story whose prompt is about ``length`` tokens (never more, unless the story alone
    is longer): the facts in order, each after a random number of whole filler sentences."""
    rng = np.random.default_rng(seed)
    story, question, target, facts = story_facts(task, rng)
    sizes = [len(tokenizer.encode(s)) for s in FILLER_SENTENCES]
    budget = length - len(tokenizer.encode(" ".join(["".join(story).lstrip(), question, "Answer:"])))
    filler = []
    while budget - sizes[len(filler) % len(sizes)] >= 0:
        budget -= sizes[len(filler) % len(sizes)]
        filler.append(FILLER_SENTENCES[len(filler) % len(sizes)])
    slots = np.sort(rng.integers(0, len(filler) + 1, size=len(story)))   # filler sentences before each fact
    pieces, taken = [], 0
    for fact, slot in zip(story, slots):
        pieces += filler[taken:slot] + [fact]
        taken = slot
    pieces += filler[taken:]
    return Sample("".join(pieces).lstrip(), question, target, facts)


# -- the task ---------------------------------------------------------------------------------------
def first_word(text: str) -> str:
    """The first word of ``text``, lowercased, punctuation stripped ("" if none)."""
    words = text.split()
    return words[0].strip(string.punctuation).lower() if words else ""


def babilong_samples(tokenizer: Tokenizer, task: str, length: int, samples: int, seed: int,
                     data: str | Path | None = None) -> list[Sample]:
    """The first ``samples`` records of the local file, or ``samples`` generated stories."""
    if data is not None:
        return load_babilong(data, task, length)[:samples]
    seeds = np.random.default_rng([seed, length]).integers(0, 2**31 - 1, size=samples)
    return [make_story(tokenizer, task, length, int(s)) for s in seeds]


def babilong_cell(model: RecurrentLM, tokenizer: Tokenizer, found: Sequence[Sample], *, chunk: int = 2048,
                  progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """One (task, length) cell of :func:`babilong`, its samples ``found`` by :func:`babilong_samples`:
    (accuracy, questions asked). ``progress(n)`` is told each prompt's tokens."""
    correct = []
    for sample in found:
        prompt = tokenizer.encode(sample.prompt())
        n_new = len(tokenizer.encode(" " + sample.target)) + ANSWER_TOKENS
        answer = greedy_continue(model, prompt[None], n_new, chunk=chunk)[0]
        correct.append(first_word(tokenizer.decode(answer)) == first_word(sample.target))
        if progress is not None:
            progress(len(prompt))
    return float(np.mean(correct)), len(found)


def babilong(model: RecurrentLM, tokenizer: Tokenizer, task_names: Sequence[str], lengths: Sequence[int], *,
             samples: int = 4, seed: int = 0, chunk: int = 2048, data: str | Path | None = None,
             progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """BABILong accuracy per (task, length), one :func:`babilong_cell` each: generated qa1/qa2 stories,
    or local files with ``data``.

    Columns: ``task``, ``length`` (context length in tokens; local files are read from split ``split_name(length)``),
    ``accuracy`` (fraction of the ``n`` questions whose first answer word is the target).
    """
    rows = []
    for task in task_names:
        for length in lengths:
            found = babilong_samples(tokenizer, task, length, samples, seed, data)
            accuracy, n = babilong_cell(model, tokenizer, found, chunk=chunk, progress=progress)
            rows.append((task, length, accuracy, n))
    return pd.DataFrame(rows, columns=COLUMNS)


# --- the command: statelens babilong ------------------------------------------------------------------------


@dataclass
class Options:
    tasks: str = option("qa1,qa2", "BABILong tasks, comma-separated (qa1..qa20 with --data; qa1, qa2 generated).")
    lengths: str = option("1024,2048,4096,8192", "Context lengths in tokens, comma-separated (4096 or 4k).")
    samples: int = option(4, "Trials per cell.", min=1)
    data: Path | None = option(None, "A local BABILong directory ({split}/{task}.json, {task}/{split}.json or "
                                     "{task}_{split}.json; .jsonl too). Default: generated qa1/qa2 stories (seeded).",
                               show_default=False)


def compute(run: Run, settings: RunSettings, options: Options) -> Outcome:
    """Every (task, length) cell, one resumable group each; every cell's questions are read (or made)
    before the work starts, so bad --data or --tasks writes nothing."""
    lengths = parse_lengths(options.lengths, minimum=0)
    names = [name.strip() for name in options.tasks.split(",") if name.strip()]
    data, samples, chunk = options.data, options.samples, settings.chunk
    run.config |= {"tasks": names, "lengths": lengths, "data": str(data) if data else None}
    tokenizer = run.tokenizer()
    source = f"BABILong files in {data}" if data else f"generated qa1/qa2 stories in filler text (seed {settings.seed})"
    run.data_description = f"{source}, tokenized with {tokenizer.name}"
    cells = [(name, length) for name in names for length in lengths]
    questions = [babilong_samples(tokenizer, name, length, samples, settings.seed, data) for name, length in cells]

    def cell(found: list, advance) -> dict:
        accuracy, n = babilong_cell(run.model, tokenizer, found, chunk=chunk, progress=advance)
        return {"accuracy": accuracy, "n": n}

    parts = run.groups([functools.partial(cell, found) for found in questions], description="babilong",
                       tokens=[max(length, 1) * len(found) for (_, length), found in zip(cells, questions)])
    df = pd.DataFrame([(name, length, float(part["accuracy"]), int(part["n"]))
                       for (name, length), part in zip(cells, parts)], columns=COLUMNS)
    return Outcome({"babilong": df}, lines=[f"{row.task} at {int(row.length)}: accuracy {row.accuracy:.2f} over "
                                            f"{int(row.n)}" for row in df.itertuples()])


SPEC = Analysis(
    "babilong", "BABILong: bAbI questions with the facts hidden in long filler text (local files with --data, else "
                "generated qa1/qa2 stories); writes babilong.csv and run.json. One (task, length) cell is the unit of "
                "work that --resume keeps and torchrun shares out.",
    Options, compute, tables=(Table("babilong", tuple(COLUMNS)),),
    sections=(Section("babilong", "BABILong", Plot("accuracy_figure", ("babilong",),
                                                   {"x": "length", "title": "BABILong accuracy"})),),
    shared=TASK_SHARED + ("tokenizer",), draws_sequences=False).register(tasks)
