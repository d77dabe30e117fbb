"""``statelens states``: per-head SSM state statistics over a long rollout, and the heads that collapse."""
from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from statelens.cli.options import (Backend, BackendName, Chunk, Ckpt, Data, Device, DType, Dtype, Group, Length,
                                   MitigationSpec, NumSeqs, Out, Resume, Seed, TrainLen)
from statelens.cli.options import TextField, TokenizerOpt


def states(
    ckpt: Ckpt,
    data: Data = None,
    train_len: TrainLen = None,
    length: Length = None,
    num_seqs: NumSeqs = 8,
    stride: Annotated[Optional[int], typer.Option(
        help="Record the state every N tokens. Default: the training length / 16 (at least 1).", min=1,
        show_default=False)] = None,
    k: Annotated[float, typer.Option(help="A head collapses when a statistic past the training length exceeds "
                                          "k x its maximum within it (k > 0).")] = 2.0,
    chunk: Chunk = 2048,
    group: Group = 1,
    resume: Resume = False,
    device: Device = "cpu",
    backend: Backend = BackendName.auto,
    dtype: Dtype = DType.float32,
    seed: Seed = 0,
    out: Out = None,
    mitigation: MitigationSpec = None,
    tokenizer: TokenizerOpt = None,
    text_field: TextField = "text",
) -> None:
    """State statistics (norm, mean, std, absmax per layer and head) by position, and state collapse:
    heads whose statistics past the training length exceed k x their in-training maximum or turn
    non-finite; writes state_stats.csv, collapse.csv, states.png and run.json."""
    from statelens.analysis.collapse import collapse
    from statelens.analysis.states import state_cubes, stats_from_cubes
    from statelens.cli.common import report, start
    from statelens.errors import BadInput
    from statelens.reports.figures import state_norm_figure

    if not k > 0:
        raise BadInput(f"--k {k}: must be positive")
    run = start("states", tokenizer=tokenizer, text_field=text_field, ckpt=ckpt, device=device, dtype=dtype,
                backend=backend, seed=seed, out=out, train_len=train_len, resume=resume, mitigation=mitigation,
                config={"data": str(data) if data else None, "train_len": train_len, "length": length,
                        "num_seqs": num_seqs, "stride": stride, "k": k, "chunk": chunk, "group": group})
    length = length or 4 * run.train_len
    stride = stride or max(1, run.train_len // 16)
    run.config["stride"] = stride
    if stride > length:
        raise BadInput(f"--stride {stride} exceeds --length {length}: no state would be recorded")
    if stride > run.train_len:
        raise BadInput(f"--stride {stride} exceeds the training length {run.train_len}: no state would be "
                       "recorded within it to compare against")
    if length <= run.train_len:
        raise BadInput(f"--length {length} does not exceed the training length {run.train_len}: nothing to "
                       "compare past it")
    run.config["length"] = length
    sequences = run.sequences(data, num_seqs, length)
    run.lap("data")
    parts = run.sequence_groups(num_seqs, group, lambda rows, advance: state_cubes(
        run.model, sequences[rows], positions=stride, chunk=chunk, progress=advance), tokens_per_seq=length,
        description=f"states L={length}")
    stats = stats_from_cubes(parts)
    try:
        heads = collapse(stats, run.train_len, k=k)
    except ValueError as e:
        raise BadInput(f"--stride {stride}, --length {length}: {e}") from None
    run.lap("compute")

    found = heads[heads.collapsed]
    top = heads.head(5)
    unit = "heads"
    if run.model.arch == "mamba1":  # DESIGN.md: Mamba-1 has no heads; say what a "head" is
        unit = f"heads (Mamba-1 has none: groups of {run.model.head_channels} channels)"
    figure = state_norm_figure(stats, collapse=heads, train_len=run.train_len)
    written = run.finish({"state_stats": stats, "collapse": heads}, figure,
                         results={"collapsed_heads": len(found), "heads": len(heads), "head_unit": unit,
                                  "top": [plain(row) for row in top.to_dict("records")]})
    lines = [(f"{len(found)} of {len(heads)} {unit} collapse past the training length {run.train_len} "
              f"(a statistic > {k:g} x its in-training max, or non-finite); {num_seqs} sequences of {length} "
              f"tokens, recorded every {stride}")]
    for row in (found if len(found) else heads).head(5).itertuples():
        change = "non-finite" if row.nonfinite else f"x {row.ratio:.2f}"
        where = f" from position {row.start_position}" if row.collapsed else " (not collapsed; the largest ratio)"
        lines.append(f"layer {row.layer} head {row.head}: {row.statistic} {change}{where}")
    report(run, written, lines)


def plain(record: dict) -> dict:
    """A DataFrame row as JSON-ready Python values; non-finite floats become "inf", "-inf" or "nan"."""
    values = {}
    for key, value in record.items():
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        values[key] = value
    return values
