"""``statelens remembrance``: Effective Remembrance EffRem_T(t) of a checkpoint."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from statelens.cli.options import (Backend, BackendName, Chunk, Ckpt, Data, Device, DType, Dtype, Group, Length,
                                   MitigationSpec, NumSeqs, Out, Resume, Seed, TOption, TrainLen)
from statelens.cli.options import TextField, TokenizerOpt


def remembrance(
    ckpt: Ckpt,
    data: Data = None,
    train_len: TrainLen = None,
    length: Length = None,
    T: TOption = None,
    num_seqs: NumSeqs = 8,
    points: Annotated[int, typer.Option(help="Truncation points t on the default grid (log + linear).",
                                        min=2)] = 32,
    t: Annotated[Optional[str], typer.Option(help="Explicit truncation points, comma-separated (0 is added).",
                                             show_default=False)] = None,
    batch: Annotated[int, typer.Option(help="Rows (sequence, t) per forward.", min=1)] = 32,
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
    """Effective Remembrance: TV distance between the next-token distributions after x[0:T] and after
    x[t:T], for t on a grid; writes remembrance.csv, remembrance.png and run.json."""
    import numpy as np

    from statelens.analysis.remembrance import effrem_matrix, summarize, truncation_points
    from statelens.cli.common import report, start
    from statelens.errors import BadInput
    from statelens.reports.figures import remembrance_figure

    ts = None
    if t is not None:
        try:
            ts = [int(v) for v in t.split(",") if v.strip()]
        except ValueError:
            raise BadInput(f"--t {t!r}: expected comma-separated integers") from None
    run = start("remembrance", tokenizer=tokenizer, text_field=text_field, ckpt=ckpt, device=device, dtype=dtype,
                backend=backend, seed=seed, out=out, train_len=train_len, resume=resume, mitigation=mitigation,
                config={"data": str(data) if data else None, "train_len": train_len, "T": T, "num_seqs": num_seqs,
                        "points": points, "t": ts, "batch": batch, "chunk": chunk, "group": group})
    T = T or length or 4 * run.train_len
    if ts is not None and any(not 0 <= v < T for v in ts):
        raise BadInput(f"--t: truncation points must lie in [0, T - 1] = [0, {T - 1}]")
    run.config["T"] = T
    sequences = run.sequences(data, num_seqs, T)
    run.lap("data")
    ts = truncation_points(T, ts, points)
    parts = run.sequence_groups(num_seqs, group, lambda rows, advance: {"effrem": effrem_matrix(
        run.model, sequences[rows], T=T, ts=ts, chunk=chunk, batch=batch, progress=advance)},
        tokens_per_seq=len(ts) * T, description=f"EffRem T={T}")
    df = summarize(np.concatenate([part["effrem"] for part in parts]), ts, T)
    run.lap("compute")
    half = df.iloc[(df.t - T // 2).abs().argmin()]
    written = run.finish({"remembrance": df}, remembrance_figure(df),
                         results={"effrem_at_half_T": {"t": int(half.t), "effrem": float(half.effrem)}})
    report(run, written, [f"EffRem_T(t) at T = {T} over {num_seqs} sequences, {len(df)} points of t",
                          f"EffRem at t = {int(half.t)} (~T/2): {half.effrem:.4f} ± {half.effrem_sem:.4f}"])
