"""The newer recurrent families' backends: their chunked forward against the same model fed token by token
(each token one call, the state carried), timed in one run (``best_of``, interleaved). Both compute the
logits of every token; the last logits are compared, a check that both computed the same thing.

``FAMILIES`` maps a family to a builder of a small random model of it (batch 1).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from diagnostics import best_of

from statelens.models import DeltaNetConfig, DeltaNetLM, GatedDeltaNetConfig, GatedDeltaNetLM, Mamba3Config, Mamba3LM
from statelens.models.base import RecurrentLM
from statelens.models.rwkv7 import RWKV7Config, RWKV7LM


def _gated_deltanet() -> RecurrentLM:
    return GatedDeltaNetLM(GatedDeltaNetConfig(hidden_size=256, num_hidden_layers=4, vocab_size=256, num_heads=4,
                                               head_dim=48, expand_v=2.0))


def _delta_net() -> RecurrentLM:
    return DeltaNetLM(DeltaNetConfig(hidden_size=256, num_hidden_layers=4, vocab_size=256, num_heads=4))


def _mamba3() -> RecurrentLM:
    return Mamba3LM(Mamba3Config(d_model=128, n_layer=2, vocab_size=1024, d_state=64, headdim=64, chunk_size=64))


def _rwkv7() -> RecurrentLM:
    """d 128, 2 layers, 4 heads of 32, every parameter perturbed off its (often zero) initial value."""
    torch.manual_seed(0)
    model = RWKV7LM(RWKV7Config(hidden_size=128, num_hidden_layers=2, head_dim=32, vocab_size=256,
                                decay_low_rank_dim=32, gate_low_rank_dim=32, a_low_rank_dim=32, v_low_rank_dim=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


FAMILIES: dict[str, Callable[[], RecurrentLM]] = {"mamba3": _mamba3, "gated_deltanet": _gated_deltanet,
                                                  "delta_net": _delta_net, "rwkv7": _rwkv7}


def chunked_vs_steps(family: str, tokens: int = 4096) -> dict:
    """tokens/s of the one-call chunked forward and of token by token, and the last logits' largest
    difference relative to their scale (``gap``)."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    out = {}

    def chunked():
        out["chunked"] = model(x)[0][:, -1]

    def steps():
        state = model.zero_state(1)
        for t in range(tokens):
            logits, state = model(x[:, t:t + 1], state)
        out["steps"] = logits[:, -1]

    with torch.no_grad():
        fast, slow = best_of(chunked, steps, repeats=2)
    gap = ((out["chunked"] - out["steps"]).abs().max() / out["steps"].abs().max()).item()
    return {"tokens": tokens, "chunked": tokens / fast, "steps": tokens / slow, "gap": gap}


if __name__ == "__main__":
    for name in FAMILIES:
        print(name, chunked_vs_steps(name))
