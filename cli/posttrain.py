"""``statelens posttrain``: a short post-training from other initial states (state passing, TBTT, noise)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from statelens.cli.options import Ckpt, Data, Device, DType, Dtype, Resume, Seed
from statelens.cli.options import TextField, TokenizerOpt


class Intervention(str, Enum):
    none = "none"
    noise = "noise"
    fitted_noise = "fitted-noise"
    state_passing = "state-passing"
    tbtt = "tbtt"


InterventionOption = Annotated[Intervention, typer.Option(
    "--intervention", help="Initial state of each training sequence: none (zero), noise (iid Gaussian), fitted-noise "
                           "(Gaussian fitted per layer and head), state-passing (previous batch's final state), "
                           "tbtt (consecutive chunks of the same documents).")]
Steps = Annotated[int, typer.Option("--steps", help="Optimizer steps.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per training sequence (the new training length).")]
Batch = Annotated[int, typer.Option("--batch", help="Sequences per step.")]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW), decayed along a cosine to 10%.")]
Warmup = Annotated[int, typer.Option("--warmup", help="Linear warm-up steps.")]
Clip = Annotated[float, typer.Option("--clip", help="Gradient-norm clipping threshold.")]
SaveEvery = Annotated[int, typer.Option("--save-every", help="Save the checkpoint and resume state every N steps.")]
RequiredOut = Annotated[Path, typer.Option("--out", help="Output directory: the post-trained checkpoint, "
                                                        "statelens.json, train_log.csv, run.json, resume.pt.",
                                           show_default=False)]
Fsdp = Annotated[bool, typer.Option(
    "--fsdp", help="Under torchrun: shard parameters, gradients and optimizer state across the processes (FSDP2) "
                   "instead of replicating them (DDP), for models whose training state does not fit one device. "
                   "No effect in a single process.")]
MonitorEvery = Annotated[int, typer.Option(
    "--monitor-every", help="Every N steps (and before the first), measure the state on a fixed probe "
                            "(statelens.monitor: losses within and beyond the training length, state norm and std "
                            "ratios and collapsed heads, EffRem, out-of-support fraction) into monitor.csv beside train_log.csv. "
                            "0: off.")]
MonitorData = Annotated[Optional[Path], typer.Option(
    "--monitor-data", help="Tokens of the monitor's probe, read as --data is (held-out text keeps the probe apart "
                           "from the training sequences). Default: --data.", show_default=False)]
MonitorSeqs = Annotated[int, typer.Option("--monitor-seqs", help="Probe sequences of the monitor.", min=1)]
MonitorLength = Annotated[int | None, typer.Option(
    "--monitor-length", help="Tokens per probe sequence (at least 2 x --seq-len). Default: 4 x --seq-len.",
    show_default=False)]


def posttrain(
    ckpt: Ckpt,
    out: RequiredOut,
    data: Data = None,
    text_field: TextField = "text",
    tokenizer: TokenizerOpt = None,
    intervention: InterventionOption = Intervention.state_passing,
    steps: Steps = 500,
    seq_len: SeqLen = 2048,
    batch: Batch = 8,
    lr: Lr = 3e-4,
    warmup: Warmup = 50,
    clip: Clip = 1.0,
    save_every: SaveEvery = 100,
    resume: Resume = False,
    fsdp: Fsdp = False,
    monitor_every: MonitorEvery = 0,
    monitor_data: MonitorData = None,
    monitor_seqs: MonitorSeqs = 4,
    monitor_length: MonitorLength = None,
    device: Device = "cpu",
    dtype: Dtype = DType.float32,
    seed: Seed = 0,
) -> None:
    """Post-trains a checkpoint with an initial-state intervention; writes the checkpoint in its own format
    plus statelens.json (training length, intervention), train_log.csv and run.json to --out (and monitor.csv
    with --monitor-every)."""
    from statelens.cli.common import report
    from statelens.errors import BadInput, DataError
    from statelens.resumable import Interrupted
    from statelens.runs import RunSettings, progress, start
    from statelens.train import PosttrainConfig
    from statelens.train import posttrain as train
    from statelens.train.posttrain import LOG_WATCHED, training_draw

    settings = PosttrainConfig(intervention=intervention.value, steps=steps, seq_len=seq_len, batch=batch, lr=lr,
                               warmup=warmup, clip=clip, seed=seed, save_every=save_every, fsdp=fsdp,
                               monitor_every=monitor_every)  # checked
    monitor_length = monitor_length or 4 * seq_len
    if monitor_every and monitor_length < 2 * seq_len:
        raise BadInput(f"--monitor-length {monitor_length} must be at least 2 x --seq-len = {2 * seq_len}")
    run = start("posttrain", RunSettings(ckpt, tokenizer=tokenizer, text_field=text_field, device=device,
                                         dtype=dtype.value, backend="native", seed=seed, out=out, train_len=seq_len),
                config={"data": str(data) if data else None, "intervention": intervention.value, "steps": steps,
                        "seq_len": seq_len, "batch": batch, "lr": lr, "warmup": warmup, "clip": clip,
                        "save_every": save_every, "resume": resume, "fsdp": fsdp, "monitor_every": monitor_every,
                        "monitor_data": str(monitor_data) if monitor_data else None, "monitor_seqs": monitor_seqs, "monitor_length": monitor_length})
    n, length = training_draw(settings)
    try:
        tokens = run.sequences(data, n, length)
    except DataError:  # less data than asked for: one batch is the least that trains
        tokens = run.sequences(data, batch, length)
    probe = run.sequences(monitor_data or data, monitor_seqs, monitor_length) if monitor_every else None
    run.lap("data")
    try:
        with progress(steps, f"{intervention.value} post-training, {batch} x {seq_len} tokens a step",
                      "steps") as advance:
            log = train(run.ckpt, tokens, settings, out=out, resume=resume, progress=advance, monitor_probe=probe)
    except Interrupted as e:
        e.saved = f"training saved in {out}"
        raise
    run.lap("train")
    run.watched = LOG_WATCHED
    first, last = log.iloc[0], log.iloc[-1]
    written = run.finish({"train_log": log}, results={"first_loss": float(first.loss), "final_loss": float(last.loss)})
    lines = [f"loss {first.loss:.4f} at step {int(first.step)} -> {last.loss:.4f} at step {int(last.step)}",
             (f"checkpoint in {out} ({run.ckpt.format}); statelens.json: train_len {seq_len}, "
              f"intervention {intervention.value}")]
    if monitor_every:
        lines.append(f"monitor.csv: the state every {monitor_every} steps on {monitor_seqs} probe sequences of "
                     f"{monitor_length} tokens")
    report(run, [out, *written], lines)
