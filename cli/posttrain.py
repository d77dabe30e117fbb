"""``statelens posttrain``: a short post-training from other initial states (state passing, TBTT, noise)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

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
    device: Device = "cpu",
    dtype: Dtype = DType.float32,
    seed: Seed = 0,
) -> None:
    """Post-trains a checkpoint with an initial-state intervention; writes the checkpoint in its own format
    plus statelens.json (training length, intervention), train_log.csv and run.json to --out."""
    from statelens.cli.common import report
    from statelens.errors import DataError
    from statelens.resumable import Interrupted
    from statelens.runs import RunSettings, progress, start
    from statelens.train import PosttrainConfig
    from statelens.train import posttrain as train
    from statelens.train.posttrain import LOG_WATCHED, training_draw

    settings = PosttrainConfig(intervention=intervention.value, steps=steps, seq_len=seq_len, batch=batch, lr=lr,
                               warmup=warmup, clip=clip, seed=seed, save_every=save_every, fsdp=fsdp)  # checked
    run = start("posttrain", RunSettings(ckpt, tokenizer=tokenizer, text_field=text_field, device=device,
                                         dtype=dtype.value, backend="native", seed=seed, out=out, train_len=seq_len),
                config={"data": str(data) if data else None, "intervention": intervention.value, "steps": steps,
                        "seq_len": seq_len, "batch": batch, "lr": lr, "warmup": warmup, "clip": clip,
                        "save_every": save_every, "resume": resume, "fsdp": fsdp})
    n, length = training_draw(settings)
    try:
        tokens = run.sequences(data, n, length)
    except DataError:  # less data than asked for: one batch is the least that trains
        tokens = run.sequences(data, batch, length)
    run.lap("data")
    try:
        with progress(steps, f"{intervention.value} post-training, {batch} x {seq_len} tokens a step",
                      "steps") as advance:
            log = train(run.ckpt, tokens, settings, out=out, resume=resume, progress=advance)
    except Interrupted as e:
        e.saved = f"training saved in {out}"
        raise
    run.lap("train")
    run.watched = LOG_WATCHED
    first, last = log.iloc[0], log.iloc[-1]
    written = run.finish({"train_log": log}, results={"first_loss": float(first.loss), "final_loss": float(last.loss)})
    report(run, [out, *written], [
        f"loss {first.loss:.4f} at step {int(first.step)} -> {last.loss:.4f} at step {int(last.step)}",
        (f"checkpoint in {out} ({run.ckpt.format}); statelens.json: train_len {seq_len}, "
         f"intervention {intervention.value}")])
