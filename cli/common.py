"""What every analysis command shares: the model, the tokens, a progress bar, and the outputs
(tables, the main figure, run.json) written atomically at the end, so a failed run leaves nothing."""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from statelens.cli.options import BackendName, DType, load

DEFAULT_TRAIN_LEN = 2048
METADATA = "statelens.json"  # written next to a checkpoint by `statelens posttrain`
PARTIAL = ".partial"          # under --out: the finished groups of an interrupted run (statelens.resumable)


@dataclass
class Run:
    """One analysis command's context: model, training length, tokens, and the manifest it fills."""

    command: str
    ckpt: object                      # statelens.models.Checkpoint
    train_len: int
    train_len_source: str
    seed: int
    out: Path
    config: dict
    started: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)
    data_description: str = ""
    resume: bool = False              # --resume: load the groups an interrupted run saved
    partials: object = None           # statelens.resumable.Partials of the grouped computation, if any
    nonfinite: dict = field(default_factory=dict)  # table -> its first non-finite row (set by finish)
    mitigation: object = None         # --mitigation: the parsed spec (statelens.interventions.mitigations)
    mitigated: object = None          # ... and its Applied handle, once applied (the cap: at the first sequences)
    tokenizer_spec: str | None = None  # --tokenizer (None: chosen by statelens.data.load_tokenizer)
    text_field: str = "text"          # --text-field
    tokenizer_record: dict | None = None  # the tokenizer used, for run.json (statelens.data.Tokenizer.record)
    data_hub: dict | None = None      # --data hf:ORG/NAME: the dataset's id, revision, commit and split

    @property
    def model(self):
        return self.ckpt.model

    def tokenizer(self):
        """The tokenizer text is read with: --tokenizer, else the checkpoint's own, bytes for a byte-sized
        vocabulary, or its family's (statelens.data.load_tokenizer); recorded for run.json."""
        from statelens.data import load_tokenizer
        from statelens.data.tokenizer import family_tokenizer

        found = load_tokenizer(self.ckpt.path, self.model.config.vocab_size, spec=self.tokenizer_spec,
                               family=family_tokenizer(self.ckpt.raw_config))
        self.tokenizer_record = found.record()
        return found

    def sequences(self, data: Path | None, n: int, length: int):
        """[n, length] int64 tokens from ``data`` (or seeded random tokens), checked against the vocabulary."""
        import numpy as np

        from statelens.data import load_tokens

        vocab = self.model.config.vocab_size
        if data is None:
            self.data_description = f"uniformly random tokens over the {vocab}-token vocabulary (seed {self.seed})"
            drawn = np.random.default_rng(self.seed).integers(0, vocab, size=(n, length), dtype=np.int64)
            return self._calibrate(drawn)
        tokenizer = self.tokenizer() if not str(data).endswith(".npy") else None
        tokens = load_tokens(data, tokenizer, text_field=self.text_field)
        tokens.check_vocab(vocab)
        self.data_hub = tokens.hub
        self.data_description = f"{data} ({tokens.kind}; " + (
            f"tokenized with {tokens.tokenizer_name})" if tokens.tokenizer_name else "token ids)")
        return self._calibrate(tokens.sequences(n, length, seed=self.seed))

    def _calibrate(self, sequences):
        """Applies a pending --mitigation cap, calibrated on the first train_len tokens of ``sequences``."""
        if self.mitigation is not None and self.mitigated is None:
            from statelens.interventions.mitigations import apply_mitigation

            self.mitigated = apply_mitigation(self.model, self.mitigation, calibration=sequences,
                                              train_len=self.train_len, chunk=self.config.get("chunk") or 2048)
            self.lap("calibrate")
        return sequences

    def groups(self, work: list, *, tokens: list[int], description: str) -> list[dict]:
        """Runs ``work`` (one callable per group of sequences, given ``advance``, returning a dict of
        numpy arrays) resumably and shared over torchrun ranks (statelens.resumable); returns every
        group's result in group order. The finished groups are saved under ``OUT/.partial`` until
        :meth:`finish`. SIGINT/SIGTERM: exits 130/143 with a line saying to rerun with --resume.
        Ranks other than 0 exit here once their groups are sent: rank 0 alone combines and writes."""
        from statelens import distributed
        from statelens.models.checkpoint import content_hash
        from statelens.resumable import Interrupted, Partials, run_groups

        self.partials = Partials(self.out / PARTIAL, {"command": self.command, "config": self.config,
                                                      "checkpoint_sha256": content_hash(self.ckpt.path)})
        self.partials.open(self.resume)
        mine = range(distributed.rank(), len(work), distributed.world_size())
        try:
            with progress(sum(tokens[i] for i in mine), description) as advance:
                results = run_groups(work, self.partials, costs=tokens, advance=advance)
        except Interrupted as e:
            exit_interrupted(e, f"{self.partials.count()} of {len(work)} groups saved in {self.partials.folder}")
        if results is None:
            raise SystemExit(0)
        return results

    def sequence_groups(self, n: int, size: int, compute: Callable, *, tokens_per_seq: int,
                        description: str) -> list[dict]:
        """:meth:`groups` over sequences 0 .. n - 1 in groups of ``size``: ``compute(rows, advance)``, rows
        a slice of the sequences, returns the group's dict of arrays."""
        import functools

        from statelens.resumable import groups

        parts = groups(n, size)
        return self.groups([functools.partial(compute, rows) for rows in parts],
                           tokens=[(rows.stop - rows.start) * tokens_per_seq for rows in parts], description=description)

    def lap(self, name: str) -> None:
        self.timings[f"{name}_s"] = round(time.perf_counter() - self.started - sum(self.timings.values()), 3)

    def finish(self, tables: dict[str, object], figure=None, results: dict | None = None) -> list[Path]:
        """Writes each table as CSV, the figure as PNG (and SVG), and run.json; returns the paths (on
        torchrun ranks other than 0: writes nothing). Then removes the saved groups of :meth:`groups`."""
        from statelens import distributed
        from statelens.analysis.nonfinite import find_nonfinite
        from statelens.models.checkpoint import content_hash
        from statelens.outputs import command_line, versions, write_json, write_table

        if not distributed.is_main():
            return []
        if self.mitigation is not None and self.mitigated is None:  # a cap no sequences calibrated: a bug
            raise RuntimeError("--mitigation was never applied: the command drew no sequences to calibrate it on")
        self.out.mkdir(parents=True, exist_ok=True)
        written = []
        self.nonfinite = find_nonfinite(tables)  # inf/NaN values are a finding: said in run.json and the summary
        for name, df in tables.items():
            written += write_table(df, self.out / f"{name}.csv")
        if figure is not None:
            from statelens.reports.figures import save

            written += save(figure, self.out / self.command)
        self.timings["total_s"] = round(time.perf_counter() - self.started, 3)
        model = self.model
        manifest = {
            "command": self.command,
            "command_line": command_line(),
            "config": self.config,
            "checkpoint": {"path": str(self.ckpt.path.resolve()), "sha256": content_hash(self.ckpt.path),
                           "hub": self.ckpt.source.to_json() if self.ckpt.source else None,
                           "backend": self.ckpt.backend, "format": self.ckpt.format, "arch": model.arch,
                           "parameters": model.num_parameters(),
                           "n_layers": model.n_layers, "n_heads": model.n_heads, "vocab_size": model.config.vocab_size,
                           "state_size": model.zero_state(1, device="meta").numel_per_sequence()},
            "train_len": self.train_len,
            "train_len_source": self.train_len_source,
            "data": self.data_description,
            "data_hub": self.data_hub,
            "tokenizer": self.tokenizer_record,
            "seed": self.seed,
            "versions": versions(),
            "timings": self.timings,
            "results": (results or {}) | ({"nonfinite": self.nonfinite} if self.nonfinite else {}),
            "mitigation": self.mitigated.summary() if self.mitigated is not None else None,
            "outputs": [p.name for p in written],
        }
        written.append(write_json(manifest, self.out / "run.json"))
        if self.partials is not None:
            self.partials.remove()
        return written


def start(command: str, *, ckpt: Path, device: str, dtype: DType, seed: int, out: Path | None,
          train_len: int | None, config: dict, backend: BackendName = BackendName.native,
          resume: bool = False, mitigation: str | None = None, draws_sequences: bool = True,
          tokenizer: str | None = None, text_field: str = "text") -> Run:
    """Loads the checkpoint and settles the training length; nothing is written yet. Under torchrun,
    joins the process group first (statelens.distributed).

    ``mitigation`` (--mitigation) is applied to the model here, except the cap, which is calibrated on
    the command's sequences when :meth:`Run.sequences` first draws them; a command that makes its own
    inputs (``draws_sequences=False``: the tasks) refuses the cap."""
    import torch

    from statelens import distributed
    from statelens.interventions.mitigations import Cap, apply_mitigation, parse_mitigation, spec

    mitigation = parse_mitigation(mitigation) if mitigation is not None else None
    if isinstance(mitigation, Cap) and not draws_sequences:
        from statelens.errors import BadInput

        raise BadInput(f"--mitigation {spec(mitigation)}: the cap is calibrated on a command's sequences and "
                       f"{command} has none; use scale or window")

    torch.manual_seed(seed)
    started = time.perf_counter()
    check_writable(out or Path("runs") / command)
    distributed.init(device)
    loaded = load(ckpt, distributed.device_for(device), dtype, backend)
    train_len, source = resolve_train_len(loaded.path, train_len)
    run = Run(command, loaded, train_len, source, seed, out or Path("runs") / command,
              config | {"device": device, "dtype": dtype.value, "seed": seed, "backend": backend.value},
              started=started, resume=resume, mitigation=mitigation, tokenizer_spec=tokenizer, text_field=text_field)
    run.config["mitigation"] = spec(mitigation) if mitigation is not None else None
    if tokenizer is not None or text_field != "text":  # only when given, so earlier runs' configs still match
        run.config |= {"tokenizer": tokenizer, "text_field": text_field}
    if mitigation is not None and not isinstance(mitigation, Cap):
        run.mitigated = apply_mitigation(run.model, mitigation)
    run.lap("load")
    return run


def exit_interrupted(e, saved: str) -> NoReturn:
    """After SIGINT/SIGTERM (statelens.resumable.Interrupted): one line saying what was saved and how to
    continue, and exit code 130 or 143."""
    import sys

    print(f"statelens: interrupted by {e.name}: {saved}; rerun the same command with --resume to continue",
          file=sys.stderr)
    raise SystemExit(e.exit_code) from None


def check_writable(out: Path) -> None:
    """Refuses an --out that cannot be written, before hours of computation would be lost to it."""
    import os

    from statelens.errors import BadInput

    target = out.resolve()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise BadInput(f"--out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: {existing} is not writable")


def resolve_train_len(ckpt: Path, train_len: int | None) -> tuple[int, str]:
    """The training length and where it came from: --train-len, else the checkpoint's statelens.json,
    else the default (assumed)."""
    if train_len is not None:
        return train_len, "--train-len"
    from statelens.models.checkpoint import resolve_checkpoint

    meta = resolve_checkpoint(ckpt)[0] / METADATA  # a hub id: its snapshot in the cache
    if meta.is_file():
        return _train_len_from(meta), METADATA
    return DEFAULT_TRAIN_LEN, "assumed (pass --train-len)"


def _train_len_from(meta: Path) -> int:
    from statelens.errors import CheckpointError

    try:
        value = json.loads(meta.read_text())["train_len"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{meta}: expected a JSON object with an integer train_len") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{meta}: train_len must be a positive integer, got {value!r}")
    return value


@contextlib.contextmanager
def progress(total: int, description: str, unit: str = "tokens") -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` units (tokens by default) on stderr; yields ``advance(n)``.
    Shown only on a terminal, so piped or logged output stays clean, and only on torchrun's rank 0."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from statelens import distributed

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True, console=console,
                  disable=not console.is_terminal or not distributed.is_main()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def report(run: Run, written: list[Path], lines: list[str]) -> None:
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
