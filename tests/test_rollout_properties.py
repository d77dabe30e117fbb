"""The rollout engine against one forward per row, on random shapes (hypothesis), in float64.

For a random batch, length, chunk length, stop positions, initial state and per-row reset positions,
the chunked rollout's logits and final state must equal, row by row, a one-shot forward of the row
from its initial state, restarted from that initial state at its reset position (two forwards:
``x[:r]`` then ``x[r:]``). Mamba-2, Mamba-1 and GLA, each tiny with every parameter randomised.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statelens.models import (
    GLALM,
    GLAConfig,
    Mamba1Config,
    Mamba1LM,
    Mamba2Config,
    Mamba2LM,
    State,
)
from statelens.record.rollout import rollout

VOCAB = 32
TOL = 1e-10


@functools.cache
def tiny(arch: str) -> torch.nn.Module:
    """A float64 model with every parameter drawn at random (decays included, so no state is trivially
    forgotten or kept); the SSD block and GLA chunk lengths are small so that calls span several."""
    torch.manual_seed({"mamba2": 0, "mamba1": 1, "gla": 2}[arch])
    if arch == "mamba2":
        model = Mamba2LM(Mamba2Config(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4, headdim=8, ngroups=2,
                                      chunk_size=8))
    elif arch == "mamba1":
        model = Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4))
    else:
        model = GLALM(GLAConfig(hidden_size=16, num_hidden_layers=2, vocab_size=VOCAB, num_heads=2,
                                intermediate_size=32, chunk_size=4))
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return model


def random_state(model, batch: int, seed: int) -> State:
    gen = torch.Generator().manual_seed(seed)
    return model.zero_state(batch).map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype))


@st.composite
def cases(draw):
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 32))
    return {"batch": batch, "length": length, "chunk": draw(st.integers(1, 36)),
            "resets": draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch)),
            "stops": draw(st.lists(st.integers(-2, length + 2), max_size=3)),
            "zero": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


@pytest.mark.parametrize("arch", ["mamba2", "mamba1", "gla"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_chunked_rollout_equals_one_forward_per_row(arch, case):
    model = tiny(arch)
    batch, length = case["batch"], case["length"]
    tokens = torch.as_tensor(np.random.default_rng(case["seed"]).integers(0, VOCAB, (batch, length)))
    initial = model.zero_state(batch) if case["zero"] else random_state(model, batch, case["seed"])

    chunks = list(rollout(model, tokens, chunk=case["chunk"], state=initial, resets=case["resets"],
                          stops=case["stops"]))
    assert [c.start for c in chunks] == [0] + [c.end for c in chunks[:-1]] and chunks[-1].end == length
    got = torch.cat([c.logits() for c in chunks], dim=1)                        # [batch, length, vocab]

    for i, r in enumerate(case["resets"]):
        row, start = tokens[i:i + 1], initial.rows(slice(i, i + 1))
        with torch.no_grad():
            if 0 < r < length:  # x[:r] from the initial state, then x[r:] from it again
                before, _ = model(row[:, :r], start)
                after, final = model(row[:, r:], start)
                expected = torch.cat([before, after], dim=1)
            else:  # no reset inside the row (0: the initial state itself; length: nothing left to run)
                expected, final = model(row, start)
        torch.testing.assert_close(got[i:i + 1], expected, rtol=0, atol=TOL)
        # the final state too (a reset at r == length restarts nothing the rollout runs: the state is carried)
        for mine, theirs in zip(chunks[-1].state.rows(slice(i, i + 1)).ssm, final.ssm):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=TOL)
