"""One command's run: the model, the training length, the tokens, the resumable groups of work, and the
outputs (tables, figures, run.json) written atomically at the end, so a failed run leaves nothing.

Every command (the analyses of :mod:`statelens.analysis`, the tasks, post-training) goes through it::

    run = start("decay", RunSettings(ckpt="ckpt/", train_len=2048), config={"buckets": 32})
    tokens = run.sequences(None, n=8, length=8192)                       # [8, 8192] int64
    parts = run.sequence_groups(8, 1, compute, tokens_per_seq=8192, description="decay")
    written = run.finish({"decay": df}, save_figures=None, results={...})

Interruptions surface as :class:`statelens.resumable.Interrupted` (its ``saved`` says what was kept);
on a torchrun rank other than 0, :meth:`Run.groups` raises :class:`statelens.distributed.RankDone` once
the rank's groups are sent. The library prints nothing: :mod:`statelens.cli` says both in one line.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from statelens.errors import BadInput, CheckpointError

DEFAULT_TRAIN_LEN = 2048
METADATA = "statelens.json"  # written next to a checkpoint by `statelens posttrain`
PARTIAL = ".partial"          # under --out: the finished groups of an interrupted run (statelens.resumable)
DTYPES = ("float32", "float64")


@dataclass
class RunSettings:
    """What every analysis command takes (its options other than the analysis' own), as the CLI passes
    them: a checkpoint, where the tokens come from, how the rollout is run and where the outputs go."""

    ckpt: Path
    data: Path | None = None
    train_len: int | None = None      # None: the checkpoint's statelens.json, else DEFAULT_TRAIN_LEN
    length: int | None = None         # tokens per sequence; None: 4 x the training length
    num_seqs: int = 8
    chunk: int = 2048
    group: int = 1
    resume: bool = False
    device: str = "cpu"
    backend: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    out: Path | None = None           # None: runs/COMMAND
    mitigation: str | None = None
    tokenizer: str | None = None
    text_field: str = "text"
    compile: str = "auto"             # the compiled CPU path (Mamba-2, Mamba-1, GLA): auto, on, off (statelens.models.fused)


@dataclass
class Run:
    """One command's context: model, training length, tokens, and the manifest it fills."""

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
    compile: str = "off"              # the compiled path, as --compile resolved for this run (on or off)
    watched: dict = field(default_factory=dict)    # table -> (key columns, watched columns), see finish
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
        :meth:`finish`. SIGINT/SIGTERM: :class:`~statelens.resumable.Interrupted`, its ``saved`` saying
        how many groups were kept. Ranks other than 0 raise :class:`~statelens.distributed.RankDone`
        once their groups are sent: rank 0 alone combines and writes."""
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
            e.saved = f"{self.partials.count()} of {len(work)} groups saved in {self.partials.folder}"
            raise
        if results is None:
            raise distributed.RankDone()
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

    def finish(self, tables: dict[str, object], save_figures: Callable[[Path], list[Path]] | None = None,
               results: dict | None = None) -> list[Path]:
        """Writes each table as CSV, the figures (``save_figures(OUT/COMMAND)`` returns the paths it wrote)
        and run.json; returns the paths (on torchrun ranks other than 0: writes nothing). Then removes the
        saved groups of :meth:`groups`. Non-finite values in the :attr:`watched` columns are a finding,
        said in run.json's results (:mod:`statelens.analysis.nonfinite`)."""
        from statelens import distributed
        from statelens.analysis.nonfinite import find_nonfinite
        from statelens.outputs import write_json, write_table

        if not distributed.is_main():
            return []
        if self.mitigation is not None and self.mitigated is None:  # a cap no sequences calibrated: a bug
            raise RuntimeError("--mitigation was never applied: the command drew no sequences to calibrate it on")
        self.out.mkdir(parents=True, exist_ok=True)
        written = []
        self.nonfinite = find_nonfinite(tables, self.watched)
        for name, df in tables.items():
            written += write_table(df, self.out / f"{name}.csv")
        if save_figures is not None:
            written += save_figures(self.out / self.command)
        self.timings["total_s"] = round(time.perf_counter() - self.started, 3)
        manifest = self.manifest(results) | {"outputs": [p.name for p in written]}
        written.append(write_json(manifest, self.out / "run.json"))
        if self.partials is not None:
            self.partials.remove()
        return written

    def manifest(self, results: dict | None) -> dict:
        """run.json without its ``outputs``: the command, its settings, the checkpoint, data and versions."""
        from statelens.models.checkpoint import content_hash
        from statelens.outputs import command_line, versions

        model = self.model
        return {
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
        }


def start(command: str, settings: RunSettings, config: dict, *, draws_sequences: bool = True) -> Run:
    """Loads the checkpoint and settles the training length; nothing is written yet. Under torchrun,
    joins the process group first (statelens.distributed). ``config`` (the command's own settings) goes
    to run.json with the device, dtype, seed, backend and mitigation added.

    ``settings.mitigation`` is applied to the model here, except the cap, which is calibrated on the
    command's sequences when :meth:`Run.sequences` first draws them; a command that makes its own inputs
    (``draws_sequences=False``: the tasks) refuses the cap."""
    import torch

    from statelens import distributed
    from statelens.interventions.mitigations import Cap, apply_mitigation, parse_mitigation, spec
    from statelens.models import fused

    s = settings
    mitigation = parse_mitigation(s.mitigation) if s.mitigation is not None else None
    if isinstance(mitigation, Cap) and not draws_sequences:
        raise BadInput(f"--mitigation {spec(mitigation)}: the cap is calibrated on a command's sequences and "
                       f"{command} has none; use scale or window")
    torch.manual_seed(s.seed)
    started = time.perf_counter()
    out = Path(s.out) if s.out is not None else Path("runs") / command
    check_writable(out)
    distributed.init(s.device)
    loaded = open_checkpoint(s.ckpt, distributed.device_for(s.device), s.dtype, s.backend)
    train_len, source = resolve_train_len(loaded.path, s.train_len)
    run = Run(command, loaded, train_len, source, s.seed, out,
              config | {"device": s.device, "dtype": s.dtype, "seed": s.seed, "backend": s.backend},
              started=started, resume=s.resume, mitigation=mitigation, tokenizer_spec=s.tokenizer,
              text_field=s.text_field)
    run.config["mitigation"] = spec(mitigation) if mitigation is not None else None
    if s.tokenizer is not None or s.text_field != "text":  # only when given, so earlier runs' configs still match
        run.config |= {"tokenizer": s.tokenizer, "text_field": s.text_field}
    if mitigation is not None and not isinstance(mitigation, Cap):
        run.mitigated = apply_mitigation(run.model, mitigation)
    run.compile = fused.resolve(s.compile, run.model.num_parameters(), s.num_seqs * (s.length or 4 * train_len))
    if run.compile == "on":  # only then, so that earlier runs' configs (--resume) still match
        run.config["compile"] = "on"
    run.lap("load")
    return run


def open_checkpoint(ckpt: Path, device: str, dtype: str = "float32", backend: str = "auto"):
    """Loads a checkpoint (a directory or a hub id) with ``backend`` in ``dtype`` ("float32" or
    "float64"); a device torch cannot use is bad input naming --device."""
    import torch

    from statelens.models.auto import load_model

    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    try:
        usable = torch.empty(0, device=device).device.type != "meta"
    except (RuntimeError, AssertionError) as e:
        raise BadInput(f"--device {device}: {str(e).strip().splitlines()[0]}") from None
    if not usable:
        raise BadInput(f"--device {device}: the meta device holds no data; use cpu or cuda")
    return load_model(ckpt, backend, device=device, dtype=getattr(torch, dtype))


def check_writable(out: Path) -> None:
    """Refuses an --out that cannot be written, before hours of computation would be lost to it."""
    import os

    target = Path(out).resolve()
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
