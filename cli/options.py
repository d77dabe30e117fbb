"""Options shared by the commands, declared once."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class CompileMode(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class BackendName(str, Enum):
    auto = "auto"
    native = "native"
    hf = "hf"


Backend = Annotated[BackendName, typer.Option(
    "--backend", help="auto: native where statelens has a backend for the checkpoint, else hf where transformers "
                      "runs it with recurrent states; native: statelens' own exact implementation (mamba, mamba2, "
                      "gla); hf: run the checkpoint's own transformers modules (any model whose cache holds "
                      "recurrent states; the KV cache of a hybrid's attention layers is carried, not analysed). "
                      "The output and run.json say which ran.")]
Ckpt = Annotated[Path, typer.Option("--ckpt", help="Checkpoint directory (mamba-ssm or Hugging Face layout), or a "
                                                   "hub id ORG/NAME[@REVISION] (the local Hugging Face cache first; "
                                                   "a local directory of the same name wins).",
                                    show_default=False)]
Device = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda:0.")]
Dtype = Annotated[DType, typer.Option("--dtype", help="Compute dtype; float64 for verification.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
Compile = Annotated[CompileMode, typer.Option(
    "--compile", help="The Mamba-2, Mamba-1 and GLA mixers' compiled CPU path (torch.compile; the same numbers to float rounding): on, "
                      "off, or auto: on when the run's forward work (2 x parameters x tokens >= 1.2e13) repays the "
                      "10-25 s of compiling. run.json says when it ran.")]


Data = Annotated[Optional[Path], typer.Option(
    "--data", help="Tokens: .npy (1-D stream or 2-D \\[n, len]), a text file, a .jsonl with a text field "
                   "(--text-field), a directory of them, a .parquet (its --text-field column), a folder written by "
                   "datasets' save_to_disk, or a hub dataset hf:ORG/NAME\\[:SPLIT]. Default: uniformly random tokens "
                   "(seeded).", show_default=False)]
TokenizerOpt = Annotated[Optional[str], typer.Option(
    "--tokenizer", help="How text is tokenized: a tokenizer.json, a directory with a tokenizer, a hub id ORG/NAME "
                        "(the local Hugging Face cache first), or bytes. Default: the checkpoint's own; else bytes for "
                        "byte-sized vocabularies (up to 512 ids); else its family's (mamba-ssm checkpoints: "
                        "EleutherAI/gpt-neox-20b); else refused.", show_default=False)]
TextField = Annotated[str, typer.Option(
    "--text-field", help="The field of each .jsonl record (the column of a .parquet file) that holds the text.")]
TrainLen = Annotated[Optional[int], typer.Option(
    "--train-len", min=1, help="The length the model was trained on, in tokens. Default: the checkpoint's "
                               "statelens.json, else 2048 (said so in the output).", show_default=False)]
Length = Annotated[Optional[int], typer.Option(
    "--length", min=2, help="Tokens per sequence to roll out. Default: 4 x the training length.",
    show_default=False)]
TOption = Annotated[Optional[int], typer.Option(
    "--T", min=2, help="Context length T of Effective Remembrance. Default: 4 x the training length.",
    show_default=False)]
NumSeqs = Annotated[int, typer.Option("--num-seqs", min=1, help="Sequences to average over.")]
Chunk = Annotated[int, typer.Option("--chunk", min=1, help="Tokens per forward call of the rollout.")]
Group = Annotated[int, typer.Option(
    "--group", min=1, help="Sequences per group: the unit of work that --resume keeps and torchrun shares out "
                           "(also the batch of the rollout). Results do not depend on the number of processes.")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue an interrupted run from the work it saved in --out (same options).")]
Out = Annotated[Optional[Path], typer.Option("--out", help="Output directory. Default: runs/COMMAND.",
                                             show_default=False)]
MitigationSpec = Annotated[Optional[str], typer.Option(
    "--mitigation", help="A training-free mitigation of state collapse applied to the model: "
                         "scale:alpha=A,B=S (alpha_t and B_t times constants), cap:multiplier=M\\[,at=token|call] "
                         "(each head's state norm capped at M x its largest norm within the training length, "
                         "calibrated on the command's sequences), or window:r=R (the state read is "
                         "h_t - alpha_{t-r+1:t} h_{t-r}). Default: none.", show_default=False)]

