"""``make bench-long``: ``statelens perplexity`` over one sequence of ``--tokens`` tokens (default 1048576) on a
random 130M-shaped Mamba-2 (``throughput.SHAPES``), end to end through the CLI in a fresh process, with the
compiled path (``--compile on``, the compile included in the time) in 4096-token calls. Prints tokens/s
(issue 21's target: >= 560 on 2 cores, 1M tokens in under 30 minutes), the fp32 matmul rate measured in this
process just before and after (so the figure can be read on other machines: tokens/s x model FLOPs per token
/ matmul rate is the efficiency), and the run's peak RSS against the same command over 32768 tokens (target:
at most 1.2x).

    python benchmarks/long.py [--tokens 1048576] [--chunk 4096] [--compile on]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from efficiency import MatmulRate, flops_per_token
from throughput import SHAPES

from statelens.models import Mamba2Config, Mamba2LM
from statelens.models.checkpoint import mamba_ssm_checkpoint, save_checkpoint


def checkpoint(folder: Path) -> Mamba2Config:
    """A random 130M-shaped Mamba-2 written in mamba-ssm's layout to ``folder``."""
    d, n_layer, d_state, headdim, vocab = SHAPES["130m"]
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=d, n_layer=n_layer, vocab_size=vocab, d_state=d_state, headdim=headdim)
    save_checkpoint(mamba_ssm_checkpoint(Mamba2LM(cfg)), folder)
    return cfg


def perplexity(ckpt: Path, out: Path, tokens: int, chunk: int, compile_mode: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``statelens perplexity`` in a child process."""
    command = [sys.executable, "-m", "statelens.cli.main", "perplexity", "--ckpt", str(ckpt), "--length", str(tokens),
               "--num-seqs", "1", "--chunk", str(chunk), "--train-len", "2048", "--compile", compile_mode,
               "--out", str(out)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, in KiB
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(command)} failed")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--compile", default="on", choices=("on", "off"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = checkpoint(Path(tmp) / "ckpt")
        mm = MatmulRate(cfg, 1024)
        for _ in range(3):
            mm()
        short_s, short_rss = perplexity(Path(tmp) / "ckpt", Path(tmp) / "short", 32768, args.chunk, args.compile)
        long_s, long_rss = perplexity(Path(tmp) / "ckpt", Path(tmp) / "long", args.tokens, args.chunk, args.compile)
        for _ in range(3):
            mm()
    rate = args.tokens / long_s
    flops = sum(flops_per_token(cfg, 64).values())
    print(f"perplexity, 130M-shaped Mamba-2, {args.tokens} tokens in {args.chunk}-token calls, --compile "
          f"{args.compile}, torch threads {torch.get_num_threads()}")
    print(f"  wall {long_s:.0f} s (compile and load included): {rate:.0f} tokens/s (target >= 560)")
    print(f"  torch.mm {mm.rate() / 1e9:.1f} GFLOP/s at the model's projection sizes; {flops / 1e6:.1f} MFLOP/token: "
          f"efficiency {rate * flops / mm.rate():.2f}")
    print(f"  peak RSS {long_rss:.0f} MiB against {short_rss:.0f} MiB over 32768 tokens ({short_s:.0f} s): "
          f"{long_rss / short_rss:.2f}x (target <= 1.20)")


if __name__ == "__main__":
    main()
