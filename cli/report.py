"""``statelens report`` and ``statelens compare``: every analysis of one or two checkpoints in one
self-contained HTML page (``--out``/index.html).

Per checkpoint, the outputs of earlier commands are reused with ``--from DIR`` (nothing recomputed);
what is missing is computed when a ``--ckpt`` is given, and written under ``--out``/<label>/<command>/
exactly as the commands write it, so that folder can be passed to ``--from`` later."""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from statelens.cli.options import (Backend, BackendName, Chunk, Compile, CompileMode, Data, Device, DType, Dtype, Group,
                                   Length, MitigationSpec, NumSeqs, Out, Resume, Seed, TextField, TokenizerOpt,
                                   TrainLen)

Ckpts = Annotated[Optional[list[Path]], typer.Option(
    "--ckpt", help="Checkpoint directory; repeat for a second checkpoint.", show_default=False)]
Labels = Annotated[Optional[list[str]], typer.Option(
    "--label", help="Name of each checkpoint in the report, in --ckpt order. Default: the folder names.",
    show_default=False)]
From = Annotated[Optional[list[Path]], typer.Option(
    "--from", help="Folder of earlier command outputs (runs/ with runs/perplexity/positionwise.csv, ..., or the "
                   "CSVs themselves), one per checkpoint in order; reused, not recomputed.", show_default=False)]
ReportBuckets = Annotated[int, typer.Option("--buckets", min=1, help="Position buckets of perplexity and decay.")]
Stride = Annotated[Optional[int], typer.Option(
    "--stride", min=1, help="Record states every N tokens (states, coverage). Default: training length // 16.",
    show_default=False)]


#: (name, annotation, default) of the options report and compare share, after their checkpoints.
SHARED = [("label", Labels, None), ("from_", From, None), ("data", Data, None), ("tokenizer", TokenizerOpt, None),
          ("text_field", TextField, "text"), ("train_len", TrainLen, None), ("length", Length, None),
          ("num_seqs", NumSeqs, 8), ("buckets", ReportBuckets, 32), ("stride", Stride, None), ("chunk", Chunk, 2048),
          ("device", Device, "cpu"), ("backend", Backend, BackendName.auto), ("dtype", Dtype, DType.float32),
          ("seed", Seed, 0), ("out", Out, None), ("mitigation", MitigationSpec, None), ("group", Group, 1),
          ("resume", Resume, False), ("compile", Compile, CompileMode.auto)]


def _command(name: str, checkpoints: list[inspect.Parameter], doc: str):
    """The typer command ``name``: its ``checkpoints`` parameters, then :data:`SHARED`; it runs :func:`build`
    with the checkpoints in order and the rest as the analyses' options."""
    def run(**given) -> None:
        ckpts = [p for c in checkpoints for p in ([given.pop(c.name)] if c.default is inspect.Parameter.empty
                                                  else given.pop(c.name) or [])]
        build(ckpts, list(given.pop("label") or []), list(given.pop("from_") or []),
              given.pop("out") or Path("runs") / name, given)

    run.__signature__ = inspect.Signature(checkpoints + [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in SHARED])
    run.__doc__, run.__name__ = doc, name
    return run


report = _command("report", [inspect.Parameter("ckpt", inspect.Parameter.KEYWORD_ONLY, default=None,
                                               annotation=Ckpts)],
                  """The HTML report of one or two checkpoints: summary cards with verdicts, every figure (two
    checkpoints overlaid) with its table, the differences in words, and the run manifests; writes
    index.html (and each computed checkpoint's outputs under OUT/<label>/).""")
compare = _command("compare", [
    inspect.Parameter("a", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        Path, typer.Argument(help="First checkpoint (the baseline).", show_default=False)]),
    inspect.Parameter("b", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        Path, typer.Argument(help="Second checkpoint.", show_default=False)])],
    """The report of two checkpoints, A and B, side by side (as `report --ckpt A --ckpt B`).""")


def build(ckpts: list[Path], labels: list[str], froms: list[Path], out: Path, options: dict) -> None:
    """Loads or computes each checkpoint's results, renders the page and writes it."""
    from rich.console import Console

    from statelens import distributed
    from statelens.runs import check_writable
    from statelens.errors import BadInput
    from statelens.reports.html import load_results, render, write_report

    check_writable(out)
    count = max(len(ckpts), len(froms))
    if count == 0:
        raise BadInput("give at least one --ckpt (or --from)")
    if ckpts and froms and len(ckpts) != len(froms):
        raise BadInput(f"--from given {len(froms)} times for {len(ckpts)} --ckpt: give one per checkpoint")
    if labels and len(labels) != count:
        raise BadInput(f"--label given {len(labels)} times for {count} checkpoint(s): give one per checkpoint")
    if count > 2:
        raise BadInput(f"{count} checkpoints: the report shows one or two")
    if not labels:
        labels = [(ckpts[i] if ckpts else froms[i]).resolve().name or f"checkpoint {i + 1}" for i in range(count)]
        if len(set(labels)) != len(labels):
            labels = [f"{lab} ({i + 1})" for i, lab in enumerate(labels)]
    if len(set(labels)) != len(labels):
        raise BadInput(f"--label: the labels must differ, got {labels}")
    if any(not lab.strip() for lab in labels):
        raise BadInput("--label: a label must not be empty")

    results, train_lens = [], []
    for i in range(count):
        loaded = load_results(froms[i]) if froms else None
        if ckpts:
            folder = out / folder_name(labels[i], i)
            if loaded is None and options.get("resume") and any(folder.glob("*/run.json")):
                loaded = load_results(folder)  # the analyses an interrupted run finished
            loaded, tl = compute_missing(ckpts[i], loaded, folder, options)
        else:
            tl = options["train_len"] or loaded.train_len or 2048
        results.append(loaded)
        train_lens.append(tl)
    if not distributed.is_main():  # under torchrun, rank 0 renders
        return
    path = write_report(render(results, labels, train_lens), out)
    Console(highlight=False).print(f"[bold]report[/] {' vs '.join(labels)}: wrote {path}")


def folder_name(label: str, index: int) -> str:
    """A safe folder name for a label (which may hold any character): ``{index + 1}-{slug}``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "checkpoint"
    return f"{index + 1}-{slug[:60]}"


def compute_missing(ckpt: Path, loaded, folder: Path, options: dict):
    """Runs each analysis that report/compare run (the registered specs with a ``report`` plan) whose
    tables ``loaded`` lacks (all when None), in this process, writing under ``folder/<command>/`` exactly
    as the command does: so under torchrun the analyses share their groups over the ranks, and an
    interrupted report continues with --resume. Returns the results (None on torchrun ranks other than
    0) and the training length."""
    from statelens import distributed
    from statelens.analysis import analyses
    from statelens.cli.common import execute
    from statelens.models.checkpoint import content_hash, resolve_checkpoint
    from statelens.reports.html import Results, load_results

    o = options
    local, _ = resolve_checkpoint(ckpt)  # a hub id's snapshot: its statelens.json and content are read there
    plan, settings = report_plan(local, ckpt, o)
    if loaded is not None and loaded.folder == folder:
        check_resumed(loaded, {"train_len": o["train_len"], "length": plan.length, "num_seqs": o["num_seqs"],
                               "chunk": o["chunk"], "seed": o["seed"], "group": o.get("group", 1)}, content_hash(local))
    have = loaded.tables if loaded is not None else {}
    for spec in analyses:
        if spec.report is None or spec.shows in have:
            continue
        try:
            execute(spec, dataclasses.replace(settings, out=folder / spec.name), spec.report(plan))
        except distributed.RankDone:  # torchrun ranks other than 0 go on once their groups are sent
            pass
    if not distributed.is_main():
        return None, plan.train_len
    found = load_results(folder) if any(folder.glob("*/run.json")) else Results(folder=folder)
    if loaded is not None and loaded.folder != folder:  # what --from gave, beside what was computed here
        found.tables = loaded.tables | found.tables
        found.manifests = loaded.manifests | found.manifests
    return found, plan.train_len


def report_plan(local: Path, ckpt: Path, o: dict):
    """The :class:`~statelens.analysis.spec.ReportPlan` (with the training length as ``train_len``) and the
    :class:`~statelens.runs.RunSettings` every analysis of a report runs with, from report's options."""
    from statelens.analysis.coverage import default_regime
    from statelens.analysis.spec import ReportPlan
    from statelens.errors import BadInput
    from statelens.runs import RunSettings, resolve_train_len

    tl, _ = resolve_train_len(local, o["train_len"])  # each analysis loads the checkpoint itself
    length = o["length"] or o.get("length_factor", 4) * tl
    stride = o["stride"] or max(1, tl // 16)
    if length <= tl:
        raise BadInput(f"--length {length} does not exceed the training length {tl}: nothing to compare past it")
    if stride > tl:
        raise BadInput(f"--stride {stride} exceeds the training length {tl}: no state would be recorded within it")
    plan = ReportPlan(length=length, stride=stride, buckets=o["buckets"], regime=default_regime(local),
                      train_len=tl)
    settings = RunSettings(ckpt, data=o["data"], tokenizer=o.get("tokenizer"), text_field=o.get("text_field", "text"),
                           train_len=o["train_len"], length=length, num_seqs=o["num_seqs"], chunk=o["chunk"],
                           device=o["device"], backend=_value(o["backend"]), dtype=_value(o["dtype"]), seed=o["seed"],
                           mitigation=o.get("mitigation"), resume=bool(o.get("resume")), group=o.get("group", 1),
                           compile=_value(o.get("compile", "auto")))
    return plan, settings


def _value(choice) -> str:
    """An option's Enum member (typer) or its value (a caller's) as the value."""
    return getattr(choice, "value", choice)


def check_resumed(results, config: dict, sha256: str) -> None:
    """--resume: every analysis found in the output folder must have run on this checkpoint with this
    run's settings."""
    from statelens.errors import BadInput

    for command, manifest in results.manifests.items():
        if (manifest.get("checkpoint") or {}).get("sha256") != sha256:
            raise BadInput(f"--resume: {results.folder / command} was computed on another checkpoint; rerun "
                           f"without --resume (or with another --out)")
        saved = manifest.get("config") or {}
        for key, value in config.items():
            if key in saved and saved[key] != value:
                raise BadInput(f"--resume: {results.folder / command} was computed with {key} {saved[key]!r}, now "
                               f"{value!r}; rerun without --resume (or with another --out)")
