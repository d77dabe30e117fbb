"""``statelens check``: what a checkpoint is, and whether its backend is exact on it."""
from __future__ import annotations

from typing import Annotated

import typer

from statelens.cli.options import Backend, BackendName, Ckpt, Compile, CompileMode, Device, DType, Dtype, Seed


def check(
    ckpt: Ckpt,
    length: Annotated[int, typer.Option(help="Random tokens to verify on.", min=2)] = 300,
    chunk: Annotated[int, typer.Option(help="Chunk length for the chunked run (best not dividing --length).",
                                       min=1)] = 37,
    device: Device = "cpu",
    backend: Backend = BackendName.auto,
    dtype: Dtype = DType.float32,
    seed: Seed = 0,
    compile: Compile = CompileMode.off,
) -> None:
    """Print a checkpoint's architecture, parameters and state sizes, then verify on random tokens that
    one-shot, chunked and token-by-token logits agree. Exits 1 when they do not. With --compile on the
    one-shot run takes the compiled path, so that path is verified against the two eager runs."""
    from rich.console import Console
    from rich.table import Table

    from statelens.models import fused
    from statelens.models.verify import check_agreement
    from statelens.runs import open_checkpoint

    loaded = open_checkpoint(ckpt, device, dtype.value, backend.value)
    model = loaded.model
    compile_mode = fused.resolve(compile.value, model.num_parameters(), length)
    out = Console(highlight=False)
    out.print(f"[bold]{loaded.describe()}[/] ({loaded.format} layout, {loaded.weights_kind} weights, "
              f"{loaded.backend} backend)")
    width = getattr(model.config, "d_model", None) or getattr(model.config, "hidden_size", "?")
    kind = f" ({model.config.model_type} through transformers)" if model.arch == "hf" else ""
    out.print(f"architecture  {model.arch}{kind}, {model.n_layers} recurrent layers, d_model {width}, "
              f"vocab {model.config.vocab_size}")
    for note in getattr(model, "notes", []):
        out.print(f"note          {note}")
    out.print(f"parameters    {model.num_parameters():,}")
    shapes = Table("layer", "ssm state", "conv state", "numbers", box=None, pad_edge=False)
    for i, s in enumerate(model.state_shapes()):
        numel = 1
        for n in s["ssm"]:
            numel *= n
        shapes.add_row(str(i), str(list(s["ssm"])), str(list(s["conv"])), f"{numel:,}")
    out.print(shapes)
    total = model.zero_state(1, device="meta").numel_per_sequence()
    out.print(f"state size    {total:,} numbers per sequence (SSM states, all layers; "
              f"{total * 4 / 2**20:.2f} MiB in float32)")

    result = check_agreement(model, length=length, chunk=chunk, seed=seed, compile_mode=compile_mode)
    out.print(f"\nverification on {length} random tokens (seed {seed}, {dtype.value}), "
              f"tolerance {result.tolerance:.1e}:")
    if compile_mode == "on":
        out.print(f"  the one-shot run took the compiled path: {result.compiled_pieces} pieces (the others run eager)"
                  if result.compiled_pieces else
                  "  the compiled path did not run: a call shorter than one piece (--length 1024 covers every "
                  "backend's), or a backend without one")
    out.print(f"  one-shot vs chunked ({chunk} per call)  max |logit diff| {result.chunked_logits:.3e}   "
              f"state {result.chunked_state:.3e}")
    out.print(f"  one-shot vs token by token        max |logit diff| {result.stepwise_logits:.3e}   "
              f"state {result.stepwise_state:.3e}")
    if not result.ok:
        out.print("[bold red]FAILED[/]: the runs disagree beyond tolerance")
        raise typer.Exit(1)
    out.print("[bold green]ok[/]: one-shot, chunked and token-by-token runs agree")
