"""``statelens demo``: the length-generalization failure and its fix, on the built-in tiny checkpoints.

No checkpoint or data of the user's: the package ships a byte-level Mamba-2 trained from the zero state
at T = 64 and the same model after 4000 steps of state-passing post-training, plus held-out text
(:mod:`statelens.demo`). The demo runs every analysis on both, as ``statelens compare`` would, and
checks the findings the report must show."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from statelens.cli.options import Device, Seed

LABELS = ("baseline", "state-passing")


def demo(
    out: Annotated[Path, typer.Option("--out", help="Output directory: baseline/ and state-passing/ (each command's "
                                                    "CSVs and run.json), findings.csv and index.html.")] = Path(
        "runs/demo"),
    num_seqs: Annotated[int, typer.Option("--num-seqs", min=1, max=16,
                                          help="Held-out sequences to average over (at most 16).")] = 16,
    length_factor: Annotated[int, typer.Option("--length-factor", min=2,
                                               help="Rollout length, in training lengths.")] = 32,
    device: Device = "cpu",
    seed: Seed = 0,
) -> None:
    """The demo: baseline vs state-passing post-training on the built-in tiny checkpoints; writes OUT/baseline/,
    OUT/state-passing/, OUT/findings.csv and the comparison report OUT/index.html."""
    import time

    from rich.console import Console

    from statelens import demo as built_in
    from statelens import distributed
    from statelens.runs import check_writable
    from statelens.cli.options import BackendName, DType
    from statelens.cli.report import compute_missing
    from statelens.outputs import write_table
    from statelens.reports.html import render, write_report

    check_writable(out)
    console = Console(highlight=False, soft_wrap=True)  # one finding a line, whatever the width
    started = time.perf_counter()
    options = dict(data=built_in.HELDOUT, train_len=None, length=None, num_seqs=num_seqs, buckets=32, stride=None,
                   chunk=2048, device=device, dtype=DType.float32, seed=seed, backend=BackendName.native,
                   group=num_seqs)  # one batch: twice as fast on a CPU as one sequence at a time
    results, train_lens = [], []
    for label, ckpt in zip(LABELS, (built_in.BASELINE, built_in.POSTTRAINED)):
        console.print(f"[bold]{label}[/]: {ckpt}")
        found, tl = compute_missing(ckpt, None, out / label, options | {"length_factor": length_factor})
        results.append(found)
        train_lens.append(tl)
    if not distributed.is_main():  # under torchrun, rank 0 writes the findings and the report
        return
    table = built_in.findings(results[0].tables, results[1].tables, train_lens[0])
    written = [*write_table(table, out / "findings.csv"), write_report(render(results, list(LABELS), train_lens, table), out)]
    console.print(f"[bold]demo[/] in {time.perf_counter() - started:.0f} s; training length {train_lens[0]}, "
                  f"rollouts of {length_factor * train_lens[0]} tokens over {num_seqs} held-out sequences")
    for row in table.itertuples():
        mark = "[green]holds[/]" if row.holds else "[red]does not hold[/]"
        console.print(f"  {row.finding}: {row.value:.3f} (required {row.required}) {mark}")
    console.print(f"wrote {', '.join(str(p) for p in written)} and {out / LABELS[0]}/, {out / LABELS[1]}/")
