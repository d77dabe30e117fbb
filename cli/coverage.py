"""``statelens coverage``: do the states past the training length lie outside those met within it?"""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from statelens.cli.options import (Backend, BackendName, Chunk, Ckpt, Data, Device, DType, Dtype, Length, NumSeqs,
                                   Out, Seed, TrainLen)


class Regime(str, Enum):
    """How the rollouts start. Only from the zero state (the training regime of a baseline) for now;
    state-passing and TBTT regimes arrive with post-training."""

    zero = "zero"


# The analysis names the parameter behind a ValueError; these are the options that set it.
OPTIONS = {"sequences": "--length", "train_len": "--train-len", "stride": "--stride", "k": "--k-nn",
           "components": "--components", "projection_dim": "--projection-dim",
           "reference": "--num-seqs/--stride/--k-nn"}


def coverage(
    ckpt: Ckpt,
    data: Data = None,
    train_len: TrainLen = None,
    length: Length = None,
    num_seqs: NumSeqs = 8,
    buckets: Annotated[int, typer.Option(help="Position buckets past the training length (log-spaced).",
                                         min=1)] = 8,
    stride: Annotated[Optional[int], typer.Option(
        help="Record the state every this many tokens. Default: training length // 16.", min=1,
        show_default=False)] = None,
    k_nn: Annotated[int, typer.Option("--k-nn", help="Neighbours k of the k-NN support test.", min=1)] = 5,
    components: Annotated[int, typer.Option(help="PCA components fitted on the in-training states.", min=1)] = 16,
    projection_dim: Annotated[int, typer.Option(
        help="Random-projection size of each head's state (heads this small or smaller are kept whole).",
        min=1)] = 256,
    regime: Annotated[Regime, typer.Option(
        help="Initial state of the rollouts: zero (state-passing and TBTT arrive with post-training).",
        case_sensitive=False)] = Regime.zero,
    chunk: Chunk = 2048,
    device: Device = "cpu",
    backend: Backend = BackendName.native,
    dtype: Dtype = DType.float32,
    seed: Seed = 0,
    out: Out = None,
) -> None:
    """State coverage: the share of each head's states past the training length that fall outside the
    states it met within it (k-NN in PCA space), per position bucket, and its Spearman correlation with
    the loss increase; writes coverage.csv, coverage_buckets.csv, coverage.png and run.json."""
    import math

    from statelens.analysis.coverage import CoverageInputError
    from statelens.analysis.coverage import coverage as compute
    from statelens.cli.common import progress, report, start
    from statelens.errors import BadInput
    from statelens.reports.figures import coverage_figure

    run = start("coverage", ckpt=ckpt, device=device, dtype=dtype,
                backend=backend, seed=seed, out=out, train_len=train_len,
                config={"data": str(data) if data else None, "train_len": train_len, "length": length,
                        "num_seqs": num_seqs, "buckets": buckets, "stride": stride, "k_nn": k_nn,
                        "components": components, "projection_dim": projection_dim, "regime": regime.value,
                        "chunk": chunk})
    length = length or 4 * run.train_len
    stride = stride or max(1, run.train_len // 16)
    run.config |= {"length": length, "stride": stride}
    if length <= run.train_len:
        raise BadInput(f"--length {length}: must exceed the training length {run.train_len} "
                       f"(coverage compares states past it with those within it)")
    sequences = run.sequences(data, num_seqs, length)
    run.lap("data")
    try:
        with progress(num_seqs * length, f"coverage L={length}") as advance:
            per_head, per_bucket, results = compute(
                run.model, sequences, train_len=run.train_len, buckets=buckets, stride=stride, k=k_nn,
                components=components, projection_dim=projection_dim, chunk=chunk, seed=seed, progress=advance)
    except CoverageInputError as e:
        raise BadInput(f"{OPTIONS.get(e.parameter, '--' + e.parameter)}: {e}") from None
    except ValueError as e:
        raise BadInput(f"--length/--train-len/--buckets: {e}") from None
    run.lap("compute")
    written = run.finish({"coverage": per_head, "coverage_buckets": per_bucket},
                         coverage_figure(per_head, train_len=run.train_len),
                         results={name: None if isinstance(v, float) and math.isnan(v) else v  # JSON has no NaN
                                  for name, v in results.items()})
    lines = [(f"states every {stride} tokens over {num_seqs} sequences of {length}; reference: positions <= "
              f"{run.train_len}; out of support: k-NN distance ({k_nn}-th neighbour, {components} PCA "
              f"components) above the reference's 99th percentile")]
    lines += [f"positions [{row.pos_start}, {row.pos_end}): out of support {row.oos_fraction:.3f}, "
              f"loss {row.loss:.4f} ({row.loss_increase:+.4f} vs in-context)" for row in per_bucket.itertuples()]
    lines.append(f"Spearman rho (out of support vs loss increase, {results['n_buckets']} buckets): "
                 f"{results['spearman_rho']:.3f} (p = {results['spearman_p']:.3g})")
    report(run, written, lines)
