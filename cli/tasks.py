"""``statelens passkey``, ``statelens copying``, ``statelens babilong``: task accuracy by context length,
scored by greedy decoding after a chunked rollout of the prompt."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from statelens.cli.options import TokenizerOpt
from statelens.cli.options import (Backend, BackendName, Chunk, Ckpt, Device, DType, Dtype, MitigationSpec, Out,
                                   Resume, Seed, TrainLen)

Lengths = Annotated[str, typer.Option("--lengths", help="Context lengths in tokens, comma-separated (4096 or 4k).")]
Depths = Annotated[str, typer.Option("--depths", help="Key depths, fractions of the context in [0, 1], "
                                                      "comma-separated.")]
Samples = Annotated[int, typer.Option("--samples", min=1, help="Trials per cell.")]
Tasks = Annotated[str, typer.Option("--tasks", help="BABILong tasks, comma-separated (qa1..qa20 with --data; "
                                                    "qa1, qa2 generated).")]
BabiData = Annotated[Path | None, typer.Option(
    "--data", help="A local BABILong directory ({split}/{task}.json, {task}/{split}.json or {task}_{split}.json; "
                   ".jsonl too). Default: generated qa1/qa2 stories (seeded).", show_default=False)]


def parse_lengths(text: str, *, minimum: int = 1) -> list[int]:
    """"1024,4k" -> [1024, 4096]; BadInput naming --lengths otherwise."""
    from statelens.errors import BadInput

    lengths = []
    for item in (part.strip() for part in text.split(",")):
        scale = 1024 if item.lower().endswith("k") else 1
        digits = item[:-1] if scale > 1 else item
        if not digits.isdigit() or int(digits) * scale < minimum:
            raise BadInput(f"--lengths: {item!r} is not an integer >= {minimum} (e.g. --lengths 1024,2048,4096)")
        lengths.append(int(digits) * scale)
    return lengths


def parse_depths(text: str) -> list[float]:
    """"0.1,0.5" -> [0.1, 0.5]; BadInput naming --depths otherwise (range checked by the library)."""
    from statelens.errors import BadInput

    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInput(f"--depths: {text!r} is not a comma-separated list of numbers (e.g. 0.1,0.5,0.9)") from None


def passkey(
    ckpt: Ckpt,
    lengths: Lengths = "1024,2048,4096,8192",
    depths: Depths = "0.1,0.5,0.9",
    samples: Samples = 4,
    train_len: TrainLen = None,
    chunk: Chunk = 2048,
    resume: Resume = False,
    device: Device = "cpu",
    backend: Backend = BackendName.auto,
    dtype: Dtype = DType.float32,
    seed: Seed = 0,
    out: Out = None,
    mitigation: MitigationSpec = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """Passkey retrieval: a 5-digit key hidden at each depth of filler text of each length; writes
    passkey.csv, passkey.png and run.json (with the passkey capacity and the state size). One
    (length, depth) cell is the unit of work that --resume keeps and torchrun shares out."""
    import pandas as pd

    from statelens.cli.common import report
    from statelens.runs import RunSettings, start
    from statelens.reports.figures import passkey_figure, save

    from statelens.tasks.passkey import COLUMNS, capacity, check_depths, make_passkey, passkey_cell, sample_seeds

    sizes, fractions = parse_lengths(lengths), parse_depths(depths)
    check_depths(fractions)
    run = start("passkey", RunSettings(ckpt, train_len=train_len, chunk=chunk, resume=resume, device=device,
                                       backend=backend.value, dtype=dtype.value, seed=seed, out=out,
                                       mitigation=mitigation, tokenizer=tokenizer), draws_sequences=False,
                config={"lengths": sizes, "depths": fractions, "samples": samples, "train_len": train_len,
                        "chunk": chunk})
    tokenizer = run.tokenizer()
    run.data_description = f"5-digit passkeys in repeated filler text (seed {seed}), tokenized with {tokenizer.name}"
    for length in sizes:  # a length too short for the key and question: BadInput before anything is written
        for key_seed in sample_seeds(seed, samples):
            make_passkey(tokenizer, length, fractions[0], key_seed)
    cells = [(length, depth) for length in sizes for depth in fractions]

    def cell(length: int, depth: float, advance) -> dict:
        accuracy = passkey_cell(run.model, tokenizer, length, depth, samples=samples, seed=seed, chunk=chunk)
        advance(samples * length)
        return {"accuracy": accuracy}

    parts = run.groups([functools.partial(cell, *c) for c in cells],
                       tokens=[samples * length for length, _ in cells], description="passkey")
    df = pd.DataFrame([(length, depth, float(part["accuracy"]), samples)
                       for (length, depth), part in zip(cells, parts)], columns=COLUMNS)
    run.lap("compute")
    found = capacity(df)
    state_size = run.model.zero_state(1, device="meta").numel_per_sequence()
    figure = passkey_figure(df, train_len=run.train_len)
    written = run.finish({"passkey": df}, lambda stem: save(figure, stem),
                         results={"capacity": found, "state_size": state_size})
    by_length = df.groupby("length")["accuracy"].mean()
    report(run, written, [f"length {length}: accuracy {acc:.2f} (mean over depths)" for length, acc in by_length.items()]
           + [f"passkey capacity: {found} tokens (mean accuracy >= 0.9); state size {state_size} numbers"])


def copying(
    ckpt: Ckpt,
    lengths: Lengths = "16,64,256,1024",
    samples: Samples = 4,
    chunk: Chunk = 2048,
    resume: Resume = False,
    device: Device = "cpu",
    backend: Backend = BackendName.auto,
    dtype: Dtype = DType.float32,
    seed: Seed = 0,
    out: Out = None,
    mitigation: MitigationSpec = None,
) -> None:
    """Synthetic copying: a random token string of each length, a separator, then the model repeats the
    string by greedy decoding; writes copying.csv (token accuracy) and run.json. One length is the unit
    of work that --resume keeps and torchrun shares out."""
    import pandas as pd

    from statelens.cli.common import report
    from statelens.runs import RunSettings, start

    from statelens.tasks.copying import COLUMNS, copying_cell, separator

    sizes = parse_lengths(lengths)
    run = start("copying", RunSettings(ckpt, chunk=chunk, resume=resume, device=device, backend=backend.value,
                                       dtype=dtype.value, seed=seed, out=out, mitigation=mitigation),
                draws_sequences=False, config={"lengths": sizes, "samples": samples, "chunk": chunk})
    vocab = run.model.config.vocab_size
    run.data_description = (f"uniformly random strings over ids 0..{vocab - 2}, separator id {separator(vocab)} "
                            f"(seed {seed})")

    def cell(n: int, advance) -> dict:
        accuracy = copying_cell(run.model, n, samples=samples, seed=seed, chunk=chunk)
        advance(samples * 2 * n)
        return {"accuracy": accuracy}

    parts = run.groups([functools.partial(cell, n) for n in sizes], tokens=[samples * 2 * n for n in sizes],
                       description="copying")
    df = pd.DataFrame([(n, float(part["accuracy"]), samples) for n, part in zip(sizes, parts)], columns=COLUMNS)
    run.lap("compute")
    written = run.finish({"copying": df})
    report(run, written, [f"n {int(row.n)}: token accuracy {row.accuracy:.3f}" for row in df.itertuples()])


def babilong(
    ckpt: Ckpt,
    tasks: Tasks = "qa1,qa2",
    lengths: Lengths = "1024,2048,4096,8192",
    samples: Samples = 4,
    data: BabiData = None,
    chunk: Chunk = 2048,
    resume: Resume = False,
    device: Device = "cpu",
    backend: Backend = BackendName.auto,
    dtype: Dtype = DType.float32,
    seed: Seed = 0,
    out: Out = None,
    mitigation: MitigationSpec = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """BABILong: bAbI questions with the facts hidden in long filler text (local files with --data, else
    generated qa1/qa2 stories); writes babilong.csv and run.json. One (task, length) cell is the unit of
    work that --resume keeps and torchrun shares out."""
    import pandas as pd

    from statelens.cli.common import report
    from statelens.runs import RunSettings, start

    from statelens.tasks.babilong import COLUMNS, babilong_cell, babilong_samples

    sizes = parse_lengths(lengths, minimum=0)
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    run = start("babilong", RunSettings(ckpt, chunk=chunk, resume=resume, device=device, backend=backend.value,
                                        dtype=dtype.value, seed=seed, out=out, mitigation=mitigation,
                                        tokenizer=tokenizer), draws_sequences=False, config={"tasks": names, "lengths": sizes, "samples": samples,
                                       "data": str(data) if data else None, "chunk": chunk})
    tokenizer = run.tokenizer()
    source = f"BABILong files in {data}" if data else f"generated qa1/qa2 stories in filler text (seed {seed})"
    run.data_description = f"{source}, tokenized with {tokenizer.name}"
    cells = [(name, length) for name in names for length in sizes]
    # every cell's questions before the work starts, so that bad --data or --tasks writes nothing
    questions = [babilong_samples(tokenizer, name, length, samples, seed, data) for name, length in cells]

    def cell(found: list, advance) -> dict:
        accuracy, n = babilong_cell(run.model, tokenizer, found, chunk=chunk, progress=advance)
        return {"accuracy": accuracy, "n": n}

    parts = run.groups([functools.partial(cell, found) for found in questions], description="babilong",
                       tokens=[max(length, 1) * len(found) for (_, length), found in zip(cells, questions)])
    df = pd.DataFrame([(name, length, float(part["accuracy"]), int(part["n"]))
                       for (name, length), part in zip(cells, parts)], columns=COLUMNS)
    run.lap("compute")
    written = run.finish({"babilong": df})
    report(run, written, [f"{row.task} at {int(row.length)}: accuracy {row.accuracy:.2f} over {int(row.n)}"
                          for row in df.itertuples()])
