"""Options shared by the commands, declared once."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


Ckpt = Annotated[Path, typer.Option("--ckpt", help="Checkpoint directory (mamba-ssm or Hugging Face layout).",
                                    show_default=False)]
Device = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda:0.")]
Dtype = Annotated[DType, typer.Option("--dtype", help="Compute dtype; float64 for verification.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]


def torch_dtype(dtype: DType):
    import torch

    return {DType.float32: torch.float32, DType.float64: torch.float64}[dtype]


def load(ckpt: Path, device: str, dtype: DType):
    """Loads a checkpoint for a command; a bad device is bad input."""
    import torch

    from statelens.errors import BadInput
    from statelens.models import load_checkpoint

    try:
        usable = torch.empty(0, device=device).device.type != "meta"
    except (RuntimeError, AssertionError) as e:
        raise BadInput(f"--device {device}: {str(e).strip().splitlines()[0]}") from None
    if not usable:
        raise BadInput(f"--device {device}: the meta device holds no data; use cpu or cuda")
    return load_checkpoint(ckpt, device=device, dtype=torch_dtype(dtype))
