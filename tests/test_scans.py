"""The chunked scans against their one-step-per-token references, in float64."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from statelens.models.selective_scan import selective_scan_chunked, selective_scan_sequential
from statelens.models.ssd import ssd_chunked, ssd_sequential


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), l=st.integers(1, 80), g=st.integers(1, 3), r=st.integers(1, 3),
       p=st.integers(1, 4), n=st.integers(1, 5), chunk=st.integers(1, 96), seed=st.integers(0, 2**16))
def test_ssd_chunked_equals_sequential(b, l, g, r, p, n, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    h = g * r
    x = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    log_a = -3 * torch.rand(b, l, h, generator=gen, dtype=torch.float64)
    B, C = (torch.randn(b, l, g, n, generator=gen, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    y_ref, s_ref = ssd_sequential(x, log_a, B, C, h0)
    y, s = ssd_chunked(x, log_a, B, C, h0, chunk)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), l=st.integers(1, 80), d=st.integers(1, 6), n=st.integers(1, 5),
       block=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_selective_scan_chunked_equals_sequential(b, l, d, n, block, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, l, d, generator=gen, dtype=torch.float64)
    dt = 2 * torch.rand(b, l, d, generator=gen, dtype=torch.float64)
    A = -4 * torch.rand(d, n, generator=gen, dtype=torch.float64)
    B, C = (torch.randn(b, l, n, generator=gen, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(b, d, n, generator=gen, dtype=torch.float64)
    y_ref, s_ref = selective_scan_sequential(u, dt, A, B, C, h0)
    y, s = selective_scan_chunked(u, dt, A, B, C, h0, block=block)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-12)


def test_patched_decay_replaces_dt_times_A():
    """``log_decay`` given explicitly must be used instead of dt * A: halving alpha == log 0.5 added."""
    gen = torch.Generator().manual_seed(0)
    u, dt = torch.randn(1, 30, 4, generator=gen, dtype=torch.float64), torch.rand(1, 30, 4, generator=gen, dtype=torch.float64)
    A = -torch.rand(4, 3, generator=gen, dtype=torch.float64)
    B, C = (torch.randn(1, 30, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    h0 = torch.zeros(1, 4, 3, dtype=torch.float64)
    y, _ = selective_scan_chunked(u, dt, A, B, C, h0, log_decay=dt[..., None] * A + math.log(0.5))
    h, ys = h0, []  # the recurrence written out with alpha halved
    for t in range(30):
        h = 0.5 * torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    torch.testing.assert_close(y, torch.stack(ys, 1), rtol=0, atol=1e-12)


def test_float64_model_chunked_equals_one_shot_tightly(tmp_path, tokens):
    from conftest import hf_mamba2
    from statelens.models import load_checkpoint
    from statelens.record import rollout

    hf_mamba2(tmp_path, dtype=torch.float64)
    model = load_checkpoint(tmp_path, dtype=torch.float64).model
    one_shot, _ = model(tokens)
    chunked = torch.cat([c.logits() for c in rollout(model, tokens, chunk=7)], dim=1)
    assert (chunked - one_shot).abs().max().item() <= 1e-11
