"""``statelens coverage``: do the states past the training length lie outside those met within it?"""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from statelens.cli.options import (Backend, BackendName, Chunk, Ckpt, Data, Device, DType, Dtype, Group, Length,
                                   MitigationSpec, NumSeqs, Out, Resume, Seed, TrainLen)
from statelens.cli.options import TextField, TokenizerOpt


class Regime(str, Enum):
    """Which states the model was trained on (the reference set): zero (from the zero state, positions
    <= the training length), state-passing (chains of unrelated training-length segments, each from the
    previous one's final state), tbtt (consecutive training-length chunks of one document)."""

    zero = "zero"
    state_passing = "state-passing"
    tbtt = "tbtt"


def default_regime(ckpt_path) -> Regime:
    """The regime of the checkpoint's ``statelens.json`` "intervention" (state-passing, tbtt), else zero."""
    import json
    from pathlib import Path

    try:
        intervention = json.loads((Path(ckpt_path) / "statelens.json").read_text()).get("intervention")
    except (OSError, ValueError, AttributeError):
        return Regime.zero
    return {"state-passing": Regime.state_passing, "tbtt": Regime.tbtt}.get(intervention, Regime.zero)


def draw(run, data, num_seqs: int, length: int, regime: Regime, chain: int):
    """The query sequences [num_seqs, length] and, for the state-passing and tbtt regimes, the reference
    sequences [max(num_seqs, chain), chain x train_len] (else None). One draw: the first num_seqs rows
    are the queries, the next rows (other tokens) feed the reference chains."""
    if regime == Regime.zero:
        return run.sequences(data, num_seqs, length), None
    drawn = run.sequences(data, num_seqs + max(num_seqs, chain), max(length, chain * run.train_len))
    return drawn[:num_seqs, :length], drawn[num_seqs:, :chain * run.train_len]


# The analysis names the parameter it refuses (CoverageInputError); these are the options that set it.
OPTIONS = {"sequences": "--length", "train_len": "--train-len", "stride": "--stride", "k": "--k-nn",
           "components": "--components", "projection_dim": "--projection-dim",
           "reference": "--num-seqs/--stride/--k-nn", "chain": "--chain",
           "reference_sequences": "--num-seqs/--chain"}


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
    regime: Annotated[Optional[Regime], typer.Option(
        help="The states the model was trained on, i.e. the reference set: zero (positions <= the training "
             "length from the zero state), state-passing (chains of --chain unrelated segments, each from the "
             "previous one's final state) or tbtt (--chain consecutive segments of one document). Default: "
             "the checkpoint's statelens.json intervention (state-passing, tbtt), else zero.",
        case_sensitive=False, show_default=False)] = None,
    chain: Annotated[int, typer.Option(
        help="Training-length segments per chain for the state-passing and tbtt reference sets.", min=1)] = 4,
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
    """State coverage: the share of each head's states past the training length that fall outside the
    states it met within it (k-NN in PCA space), per position bucket, and its Spearman correlation with
    the loss increase; writes coverage.csv, coverage_buckets.csv, coverage.png and run.json."""
    import math

    from statelens.analysis.coverage import CoverageInputError
    from statelens.analysis.coverage import coverage as analyse
    from statelens.cli.common import report, start
    from statelens.errors import BadInput
    from statelens.reports.figures import coverage_figure

    run = start("coverage", tokenizer=tokenizer, text_field=text_field, ckpt=ckpt, device=device, dtype=dtype,
                backend=backend, seed=seed, out=out, train_len=train_len, resume=resume, mitigation=mitigation,
                config={"data": str(data) if data else None, "train_len": train_len, "length": length,
                        "num_seqs": num_seqs, "buckets": buckets, "stride": stride, "k_nn": k_nn,
                        "components": components, "projection_dim": projection_dim,
                        "regime": regime.value if regime else None, "chain": chain, "chunk": chunk, "group": group})
    length = length or 4 * run.train_len
    stride = stride or max(1, run.train_len // 16)
    regime = regime or default_regime(run.ckpt.path)
    run.config |= {"length": length, "stride": stride, "regime": regime.value}
    if length <= run.train_len:
        raise BadInput(f"--length {length}: must exceed the training length {run.train_len} "
                       f"(coverage compares states past it with those within it)")
    sequences, reference_sequences = draw(run, data, num_seqs, length, regime, chain)
    run.lap("data")
    try:
        per_head, per_bucket, results = analyse(
            run.model, sequences, train_len=run.train_len, buckets=buckets, stride=stride, k=k_nn,
            components=components, projection_dim=projection_dim, chunk=chunk, seed=seed, regime=regime.value,
            chain=chain, reference_sequences=reference_sequences, group=group,
            run_groups=lambda work, costs: run.groups(work, tokens=costs, description=f"coverage L={length}"))
    except CoverageInputError as e:
        if e.parameter not in OPTIONS:  # a setting the command makes itself, not the user: a bug
            raise RuntimeError(f"coverage refused its own {e.parameter}: {e}") from e
        raise BadInput(f"{OPTIONS[e.parameter]}: {e}") from None
    run.lap("compute")
    written = run.finish({"coverage": per_head, "coverage_buckets": per_bucket},
                         coverage_figure(per_head, train_len=run.train_len),
                         results={name: None if isinstance(v, float) and math.isnan(v) else v  # JSON has no NaN
                                  for name, v in results.items()})
    reference = (f"positions <= {run.train_len}" if regime == Regime.zero else
                 f"{regime.value} chains of {chain} x {run.train_len} tokens over {len(reference_sequences)} "
                 f"other sequences")
    lines = [(f"states every {stride} tokens over {num_seqs} sequences of {length}; reference: {reference}; "
              f"out of support: k-NN distance ({k_nn}-th neighbour, {components} PCA "
              f"components) above the reference's 99th percentile")]
    lines += [f"positions [{row.pos_start}, {row.pos_end}): out of support {row.oos_fraction:.3f}, "
              f"loss {row.loss:.4f} ({row.loss_increase:+.4f} vs in-context)" for row in per_bucket.itertuples()]
    lines.append(f"Spearman rho (out of support vs loss increase, {results['n_buckets']} buckets): "
                 f"{results['spearman_rho']:.3f} (p = {results['spearman_p']:.3g})")
    if bad := results.get("first_nonfinite_state"):
        lines.append(f"states first non-finite at position {bad['position']}, layer {bad['layer']}, head {bad['head']}")
    report(run, written, lines)
