"""The native backends of the newer families: the chunked forward against the same model fed token by
token, at a small shape, in one run (issue 18: chunked >= 5x token by token at 4k tokens).

    FAMILIES[family]() -> a small random model;   chunked_vs_steps(family, tokens=4096) -> dict
"""
from __future__ import annotations

import time

import torch

from statelens.models import Mamba3Config, Mamba3LM
from statelens.record import rollout


def _mamba3() -> Mamba3LM:
    cfg = Mamba3Config(d_model=128, n_layer=2, vocab_size=1024, d_state=64, headdim=64, chunk_size=64)
    return Mamba3LM(cfg).eval()


FAMILIES = {"mamba3": _mamba3}


def chunked_vs_steps(family: str, tokens: int = 4096, chunk: int = 1024, seed: int = 0) -> dict:
    """tok/s of ``family``'s model run over ``tokens`` tokens (batch 1) in calls of ``chunk`` tokens, and
    one token per call; their ratio, and the largest logit difference between the two."""
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    x = torch.randint(0, model.config.vocab_size, (1, tokens))
    with torch.inference_mode():
        start = time.perf_counter()
        chunked = torch.cat([c.logits() for c in rollout(model, x, chunk=chunk)], dim=1)
        chunked_s = time.perf_counter() - start
        state, steps = model.zero_state(1), []
        start = time.perf_counter()
        for t in range(tokens):
            logits, state = model(x[:, t:t + 1], state)
            steps.append(logits)
        steps_s = time.perf_counter() - start
    gap = (torch.cat(steps, dim=1) - chunked).abs().max().item()
    return {"tokens": tokens, "chunked": tokens / chunked_s, "steps": tokens / steps_s,
            "ratio": steps_s / chunked_s, "gap": gap}


if __name__ == "__main__":
    for name in FAMILIES:
        print(name, chunked_vs_steps(name))
