"""``statelens decay``: per-head decay alpha = exp(dt * A), its horizon and the retention of the initial state."""
from __future__ import annotations

from statelens.cli.options import (Backend, BackendName, BucketScale, Buckets, Chunk, Ckpt, Data, Device, DType,
                                   Dtype, Group, Length, MitigationSpec, NumSeqs, Out, Resume, Scale, Seed, TrainLen)
from statelens.cli.options import TextField, TokenizerOpt


def decay(
    ckpt: Ckpt,
    data: Data = None,
    train_len: TrainLen = None,
    length: Length = None,
    num_seqs: NumSeqs = 8,
    buckets: Buckets = 32,
    scale: BucketScale = Scale.log,
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
    """Decay per layer and head: mean alpha = exp(dt * A) per position bucket, its horizon -1 / log(alpha)
    in tokens, and the retention of the initial state; writes decay.csv, decay.png and run.json."""
    import math

    from statelens.analysis.decay import decay_from_sums, decay_sums
    from statelens.cli.common import report, start
    from statelens.reports.figures import decay_figure

    run = start("decay", tokenizer=tokenizer, text_field=text_field, ckpt=ckpt, device=device, dtype=dtype,
                backend=backend, seed=seed, out=out, train_len=train_len, resume=resume, mitigation=mitigation,
                config={"data": str(data) if data else None, "train_len": train_len, "length": length,
                        "num_seqs": num_seqs, "buckets": buckets, "scale": scale.value, "chunk": chunk,
                        "group": group})
    length = length or 4 * run.train_len
    run.config["length"] = length
    sequences = run.sequences(data, num_seqs, length)
    run.lap("data")
    df = decay_from_sums(run.sequence_groups(num_seqs, group, lambda rows, advance: decay_sums(
        run.model, sequences[rows], buckets=buckets, scale=scale.value, chunk=chunk, progress=advance),
        tokens_per_seq=length, description=f"decay L={length}"))
    run.lap("compute")

    last = df[df.pos_start == df.pos_start.max()]
    horizons = last.groupby("layer").horizon.median()
    at_train = df[df.pos_end - 1 <= run.train_len]
    at_train = at_train[at_train.pos_end == at_train.pos_end.max()] if len(at_train) else at_train
    # JSON has no infinity: a horizon of inf (alpha == 1, never forgets) is written as null.
    results = {"last_bucket": [int(last.pos_start.iloc[0]), int(last.pos_end.iloc[0])],
               "median_horizon_by_layer": {int(k): (float(v) if math.isfinite(v) else None)
                                           for k, v in horizons.items()}}
    lines = [(f"decay over {num_seqs} sequences of {length} tokens, {df.pos_start.nunique()} {scale.value} "
              f"position buckets, {run.model.n_layers} layers x {run.model.n_heads} heads")]
    if hasattr(run.model, "head_channels"):
        lines.append(f"{run.model.arch} has no heads: a head is a group of {run.model.head_channels} "
                     "consecutive channels (all their d_state elements)")
    short, long = horizons.idxmin(), horizons.idxmax()
    lines.append(f"median horizon over heads at positions [{results['last_bucket'][0]}, "
                 f"{results['last_bucket'][1]}): shortest layer {short} ({horizons[short]:.4g} tokens), "
                 f"longest layer {long} ({horizons[long]:.4g} tokens); training length {run.train_len}")
    if len(at_train):
        p = int(at_train.pos_end.iloc[0]) - 1
        by_layer = at_train.groupby("layer").retention.mean()
        results["retention_at_train_len"] = {"position": p, "mean_by_layer": {int(k): float(v)
                                                                               for k, v in by_layer.items()}}
        lines.append(f"retention of the initial state at position {p} (<= training length {run.train_len}), "
                     f"mean over heads: {by_layer.min():.3g} (layer {by_layer.idxmin()}) to "
                     f"{by_layer.max():.3g} (layer {by_layer.idxmax()})")
    written = run.finish({"decay": df}, decay_figure(df, train_len=run.train_len), results=results)
    report(run, written, lines)
