"""Chunked forward against token by token, per native backend family, at a small shape (issue 18).

``FAMILIES`` maps a family to a builder of a small random model; :func:`chunked_vs_steps` times the
backend's rollout in 1024-token calls (its chunked scan) against the same tokens fed one token per call,
in one run, and checks that both gave the same last logits.

    python benchmarks/families.py [--tokens 4096]
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from diagnostics import best_of

from statelens.models.base import RecurrentLM
from statelens.models.rwkv7 import RWKV7Config, RWKV7LM
from statelens.record import rollout


def small_rwkv7() -> RWKV7LM:
    """RWKV-7 with d 128, 2 layers, 4 heads of 32, vocab 256; every parameter random."""
    torch.manual_seed(0)
    model = RWKV7LM(RWKV7Config(hidden_size=128, num_hidden_layers=2, head_dim=32, vocab_size=256,
                                decay_low_rank_dim=32, gate_low_rank_dim=32, a_low_rank_dim=32, v_low_rank_dim=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


FAMILIES: dict[str, Callable[[], RecurrentLM]] = {"rwkv7": small_rwkv7}


def chunked_vs_steps(family: str, tokens: int = 4096) -> dict:
    """tok/s of the rollout in 1024-token calls and one token per call; ``ratio`` = chunked / steps,
    ``gap`` the largest difference of the last logits."""
    model = FAMILIES[family]()
    stream = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    last = {}

    def run(chunk: int) -> Callable[[], None]:
        def go() -> None:
            for c in rollout(model, stream, chunk=chunk):
                pass
            last[chunk] = c.logits()[:, -1]
        return go

    chunked, steps = best_of(run(1024), run(1), repeats=1)
    return {"tokens": tokens, "chunked": tokens / chunked, "steps": tokens / steps, "ratio": steps / chunked,
            "gap": (last[1024] - last[1]).abs().max().item()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    for name in FAMILIES:
        r = chunked_vs_steps(name, args.tokens)
        print(f"{name}: chunked {r['chunked']:.0f} tok/s, token by token {r['steps']:.0f} tok/s, "
              f"ratio {r['ratio']:.1f}, last logits differ by {r['gap']:.1e}")
