"""What every analysis command shares: the model, the tokens, a progress bar, and the outputs
(tables, the main figure, run.json) written atomically at the end, so a failed run leaves nothing."""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from statelens.cli.options import BackendName, DType, load

DEFAULT_TRAIN_LEN = 2048
METADATA = "statelens.json"  # written next to a checkpoint by `statelens posttrain`


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

    @property
    def model(self):
        return self.ckpt.model

    def sequences(self, data: Path | None, n: int, length: int):
        """[n, length] int64 tokens from ``data`` (or seeded random tokens), checked against the vocabulary."""
        import numpy as np

        from statelens.data import load_tokenizer, load_tokens

        vocab = self.model.config.vocab_size
        if data is None:
            self.data_description = f"uniformly random tokens over the {vocab}-token vocabulary (seed {self.seed})"
            return np.random.default_rng(self.seed).integers(0, vocab, size=(n, length), dtype=np.int64)
        tokenizer = load_tokenizer(self.ckpt.path, vocab) if not str(data).endswith(".npy") else None
        tokens = load_tokens(data, tokenizer)
        tokens.check_vocab(vocab)
        self.data_description = f"{data} ({tokens.kind}; " + (
            f"tokenized with {tokens.tokenizer_name})" if tokens.tokenizer_name else "token ids)")
        return tokens.sequences(n, length, seed=self.seed)

    def lap(self, name: str) -> None:
        self.timings[f"{name}_s"] = round(time.perf_counter() - self.started - sum(self.timings.values()), 3)

    def finish(self, tables: dict[str, object], figure=None, results: dict | None = None) -> list[Path]:
        """Writes each table as CSV, the figure as PNG (and SVG), and run.json; returns the paths."""
        from statelens.models.checkpoint import content_hash
        from statelens.outputs import command_line, versions, write_json, write_table

        self.out.mkdir(parents=True, exist_ok=True)
        written = []
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
                           "format": self.ckpt.format, "arch": model.arch, "parameters": model.num_parameters(),
                           "n_layers": model.n_layers, "n_heads": model.n_heads, "vocab_size": model.config.vocab_size,
                           "state_size": model.zero_state(1, device="meta").numel_per_sequence()},
            "train_len": self.train_len,
            "train_len_source": self.train_len_source,
            "data": self.data_description,
            "seed": self.seed,
            "versions": versions(),
            "timings": self.timings,
            "results": results or {},
            "outputs": [p.name for p in written],
        }
        written.append(write_json(manifest, self.out / "run.json"))
        return written


def start(command: str, *, ckpt: Path, device: str, dtype: DType, seed: int, out: Path | None,
          train_len: int | None, config: dict, backend: BackendName = BackendName.native) -> Run:
    """Loads the checkpoint and settles the training length; nothing is written yet."""
    import torch

    torch.manual_seed(seed)
    started = time.perf_counter()
    check_writable(out or Path("runs") / command)
    loaded = load(ckpt, device, dtype, backend)
    source = "--train-len"
    if train_len is None:
        meta = loaded.path / METADATA
        if meta.is_file():
            train_len, source = _train_len_from(meta), METADATA
        else:
            train_len, source = DEFAULT_TRAIN_LEN, "assumed (pass --train-len)"
    run = Run(command, loaded, train_len, source, seed, out or Path("runs") / command,
              config | {"device": device, "dtype": dtype.value, "seed": seed, "backend": backend.value},
              started=started)
    run.lap("load")
    return run


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
    Shown only on a terminal, so piped or logged output stays clean."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True, console=console,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def report(run: Run, written: list[Path], lines: list[str]) -> None:
    """Prints what a command found and where it wrote it."""
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"[bold]{run.command}[/] {run.ckpt.path} ({run.model.arch}); training length {run.train_len} "
                  f"({run.train_len_source}); data: {run.data_description}")
    for line in lines:
        console.print(f"  {line}")
    console.print(f"wrote {', '.join(str(p) for p in written)}")
