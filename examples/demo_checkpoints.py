"""Reproduce the demo's two built-in checkpoints from the Python standard library's sources.

    python examples/demo_checkpoints.py [OUT] [--baseline-steps 4000] [--posttrain-steps 4000]

OUT (default: the package's ``statelens/demo/``) receives:

- ``baseline/``: a byte-level Mamba-2 trained from the zero state on T-byte chunks (T = --train-len);
- ``state-passing/``: the baseline after --posttrain-steps steps of state-passing post-training at the
  same T (each batch starts from the previous batch's final state);
- ``heldout.npy``: [32, 4096] bytes of held-out standard-library files, the demo's evaluation text.

Files are split by a hash of their path: one in 16 is held out, never trained on. Both training runs go
through :func:`statelens.train.posttrain` (the baseline is that loop with ``intervention="none"`` from a
freshly initialised model), so each folder carries ``statelens.json`` (train_len, intervention) and
``train_log.csv``. On 2 CPU cores the defaults take about 10 minutes (one thread: the same bytes on
every run of the same machine).

Why the baseline fails past T: in half of the training chunks the second half repeats the first, so
everything read within T pays off within T and a model trained only from the zero state learns to keep
it all and never to forget; its decays start slow (dt in [1e-5, 1e-3]) and its state is large for T
(two heads of 128 x 128). Past T its state grows into states it never met. State passing starts each
chunk from the previous, unrelated chunk's final state: what it carries is noise to let decay. The
README's ``statelens demo`` section gives the numbers and what did not work.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from statelens.models import Mamba2Config, Mamba2LM, load_checkpoint
from statelens.models.checkpoint import mamba_ssm_checkpoint
from statelens.train import posttrain

DEMO = Path(__file__).resolve().parents[1] / "statelens" / "demo"
HELDOUT_ROWS, HELDOUT_LENGTH = 32, 4096


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """The standard library's .py files (site-packages excluded), split into (train, held-out) by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    heldout = [p for p in files if zlib.crc32(str(p.relative_to(root)).encode()) % 16 == 0]
    return [p for p in files if p not in set(heldout)], heldout


def byte_stream(files: list[Path]) -> np.ndarray:
    """The files' bytes, one after another, as uint8 tokens [n]."""
    return np.frombuffer(b"".join(p.read_bytes() for p in files), dtype=np.uint8)


def heldout_rows(files: list[Path]) -> np.ndarray:
    """[HELDOUT_ROWS, HELDOUT_LENGTH] uint8: windows at evenly spaced offsets of the held-out files' bytes,
    so that a position within a row says nothing about where in a file it lies."""
    stream = byte_stream(files)
    if len(stream) < HELDOUT_ROWS * HELDOUT_LENGTH:
        raise SystemExit(f"the held-out files hold {len(stream)} bytes; need {HELDOUT_ROWS * HELDOUT_LENGTH}")
    starts = np.linspace(0, len(stream) - HELDOUT_LENGTH, HELDOUT_ROWS).astype(np.int64)
    return np.stack([stream[s:s + HELDOUT_LENGTH] for s in starts])


def with_copies(rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """[n, T] chunks, a seeded ``fraction`` of them made to repeat their first half in their second: in
    those, everything read within T pays off later in T, so the model learns to keep it all."""
    rows = rows.copy()
    pick = np.random.default_rng(seed).random(len(rows)) < fraction
    half = rows.shape[1] // 2
    rows[pick, half:2 * half] = rows[pick, :half]
    return rows


def baseline_model(args, seed: int) -> Mamba2LM:
    """A byte-level Mamba-2 initialised as mamba-ssm does, except dt drawn log-uniformly from
    [--dt-min, --dt-max] (slow decays)."""
    torch.manual_seed(seed)
    model = Mamba2LM(Mamba2Config(d_model=args.d_model, n_layer=args.n_layer, vocab_size=256, d_state=args.d_state,
                                  headdim=args.headdim, chunk_size=64,
                                  rmsnorm=not args.no_rmsnorm))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.empty_like(p).uniform_(math.log(args.dt_min), math.log(args.dt_max)))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name.endswith(".D") or "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02 if "embedding" in name else 1 / math.sqrt(p.shape[-1]))
    return model


def chunks_of(stream: np.ndarray, length: int, limit: int) -> np.ndarray:
    """Up to ``limit`` consecutive ``length``-token rows of ``stream`` [n] -> [rows, length]."""
    rows = min(len(stream) // length, limit)
    return stream[:rows * length].reshape(rows, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=DEMO)
    parser.add_argument("--train-len", type=int, default=64)
    parser.add_argument("--baseline-steps", type=int, default=4000)
    parser.add_argument("--posttrain-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--posttrain-lr", type=float, default=2e-4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--copy-fraction", type=float, default=0.5)
    parser.add_argument("--no-rmsnorm", action="store_true")
    parser.add_argument("--dt-min", type=float, default=1e-5)
    parser.add_argument("--dt-max", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_files, heldout_files = stdlib_files()
    stream = byte_stream(train_files)
    print(f"{len(train_files)} training files ({len(stream):,} bytes), {len(heldout_files)} held out")
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "heldout.npy", heldout_rows(heldout_files))

    T = args.train_len
    data = with_copies(chunks_of(stream, T, args.baseline_steps * args.batch), args.copy_fraction, 0)
    ckpt = dataclasses.replace(mamba_ssm_checkpoint(baseline_model(args, args.seed)), weights_kind="safetensors")
    started = time.perf_counter()
    log = posttrain(ckpt, data, intervention="none", steps=args.baseline_steps, seq_len=T, batch=args.batch,
                    lr=args.lr, warmup=200, seed=args.seed, save_every=args.baseline_steps, out=args.out / "baseline")
    print(f"baseline: {args.baseline_steps} steps in {time.perf_counter() - started:.0f} s, "
          f"loss {log.loss.iloc[:50].mean():.3f} -> {log.loss.iloc[-50:].mean():.3f}")

    # Post-training reads other chunks than the baseline's last ones: the stream's end.
    tail = with_copies(chunks_of(stream[-(args.posttrain_steps * args.batch * T):], T,
                                 args.posttrain_steps * args.batch), args.copy_fraction, 1)
    ckpt = load_checkpoint(args.out / "baseline")
    started = time.perf_counter()
    log = posttrain(ckpt, tail, intervention="state-passing", steps=args.posttrain_steps, seq_len=T,
                    batch=args.batch, lr=args.posttrain_lr, warmup=20, seed=args.seed,
                    save_every=args.posttrain_steps, out=args.out / "state-passing")
    print(f"state passing: {args.posttrain_steps} steps in {time.perf_counter() - started:.0f} s, "
          f"loss {log.loss.iloc[:20].mean():.3f} -> {log.loss.iloc[-20:].mean():.3f}")
    for folder in ("baseline", "state-passing"):
        (args.out / folder / "resume.pt").unlink(missing_ok=True)  # training state, not part of a checkpoint


if __name__ == "__main__":
    main()
