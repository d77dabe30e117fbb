"""Effective Remembrance, position-wise loss and the recorder, against numbers computed another way."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import hf_mamba1, hf_mamba2
from statelens.analysis.buckets import bucket_edges, bucket_index
from statelens.analysis.positionwise import positionwise
from statelens.analysis.remembrance import effrem_grid, remembrance
from statelens.models import load_checkpoint
from statelens.record.recorder import record, resolve_positions


@pytest.fixture(params=["mamba2", "mamba1"])
def pair(request, tmp_path):
    hf = (hf_mamba2 if request.param == "mamba2" else hf_mamba1)(tmp_path)
    return hf, load_checkpoint(tmp_path).model


def sequences(n=3, length=160, seed=0):
    return np.random.default_rng(seed).integers(0, 64, (n, length))


def test_effrem_equals_brute_force_with_transformers(pair):
    """One separate transformers forward of x[t:T] per t, against the batched reset computation."""
    hf, model = pair
    seqs, T = sequences(), 120
    df = remembrance(model, seqs, T=T, points=10, chunk=32, batch=7)
    assert df.t.iloc[0] == 0 and df.effrem.iloc[0] == 0.0
    for row in df.itertuples():
        values = []
        for n in range(len(seqs)):
            with torch.no_grad():
                p = torch.softmax(hf(torch.tensor(seqs[n:n + 1, :T])).logits[0, -1].double(), -1)
                q = torch.softmax(hf(torch.tensor(seqs[n:n + 1, row.t:T])).logits[0, -1].double(), -1)
            values.append(0.5 * (p - q).abs().sum().item())
        assert abs(np.mean(values) - row.effrem) <= 1e-5, row.t
        assert abs(np.std(values, ddof=1) / np.sqrt(len(values)) - row.effrem_sem) <= 1e-5


def test_effrem_is_invariant_to_chunk_and_batch(pair):
    _, model = pair
    seqs = sequences()
    a = remembrance(model, seqs, T=100, ts=[0, 5, 50, 99], chunk=7, batch=2)
    b = remembrance(model, seqs, T=100, ts=[5, 50, 99], chunk=100, batch=64)
    np.testing.assert_allclose(a.effrem, b.effrem, atol=1e-6)
    assert list(a.t) == [0, 5, 50, 99]


def test_effrem_grid_spans_log_and_linear():
    grid = effrem_grid(4096, 32)
    assert grid[0] == 0 and grid[-1] == 4095 and len(grid) >= 28 and grid == sorted(set(grid))
    assert sum(t <= 16 for t in grid) >= 5         # log-spaced: dense early
    assert max(np.diff(grid)) <= 4095 / 15 + 1         # linear: no gap wider than T / 15


def test_positionwise_equals_transformers_one_shot_loss(pair):
    hf, model = pair
    seqs = sequences(length=200)
    df = positionwise(model, seqs, buckets=8, chunk=33)
    with torch.no_grad():
        logits = hf(torch.tensor(seqs)).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), torch.tensor(seqs[:, 1:]),
                                            reduction="none").double()  # column i is position i + 1
    for row in df.itertuples():
        expected = nll[:, row.pos_start - 1:row.pos_end - 1]
        assert abs(expected.mean().item() - row.loss) <= 1e-5
        assert row.n_tokens == expected.numel()
        assert abs(np.exp(row.loss) - row.ppl) <= 1e-9 * row.ppl
    assert df.pos_start.iloc[0] == 1 and df.pos_end.iloc[-1] == 200


def test_positionwise_is_invariant_to_chunk(pair):
    _, model = pair
    seqs = sequences(length=150)
    a, b = positionwise(model, seqs, buckets=6, chunk=1), positionwise(model, seqs, buckets=6, chunk=150)
    np.testing.assert_allclose(a.loss, b.loss, atol=1e-6)


def test_bucket_edges_cover_the_range_once():
    for scale in ("log", "linear"):
        edges = bucket_edges(1, 1000, 16, scale)
        assert edges[0] == 1 and edges[-1] == 1000 and (np.diff(edges) > 0).all()
        index = bucket_index(np.arange(0, 1001), edges)
        assert index[0] == -1 and index[-1] == -1 and set(index[1:-1]) == set(range(len(edges) - 1))


def test_recorder_stats_and_raw_equal_the_states(pair, tmp_path):
    """Recorded statistics and raw snapshots equal those of the state after the same prefix."""
    _, model = pair
    seqs = sequences(n=2, length=100)
    rec = record(model, seqs, names=["blocks.*.hook_state", "blocks.*.hook_dt"], positions=[10, 37, 100],
                 chunk=16, raw="blocks.1.hook_state", raw_dir=tmp_path / "raw")
    for p in (10, 37, 100):
        with torch.no_grad():
            _, state = model(torch.tensor(seqs[:, :p]))
        np.testing.assert_allclose(rec.raw["blocks.1.hook_state"][rec.positions.index(p)], state.ssm[1], atol=1e-6)
        for layer in range(model.n_layers):
            heads = model.by_head(f"blocks.{layer}.hook_state", state.ssm[layer]).double()
            got = rec.stats.query("name == 'hook_state' and position == @p and layer == @layer")
            np.testing.assert_allclose(got.norm, heads.norm(dim=-1).flatten(), rtol=1e-5)
            np.testing.assert_allclose(got.absmax, heads.abs().amax(-1).flatten(), rtol=1e-5)
            np.testing.assert_allclose(got["std"], heads.std(-1, correction=0).flatten(), rtol=1e-4, atol=1e-7)
    # hook_dt at position p is the step of the token that took the model from p - 1 to p.
    seen = {}
    from statelens.models import hooks
    with hooks(model, {"blocks.0.hook_dt": lambda t, hook: seen.setdefault("dt", t.clone())}):
        with torch.no_grad():
            model(torch.tensor(seqs[:, :37]))
    dt37 = model.by_head("blocks.0.hook_dt", seen["dt"])[:, 36].double()
    got = rec.stats.query("name == 'hook_dt' and position == 37 and layer == 0")
    np.testing.assert_allclose(got["mean"], dt37.mean(-1).flatten(), rtol=1e-5)


def test_recorder_reports_non_finite_states_without_raising(tmp_path):
    hf_mamba2(tmp_path)
    model = load_checkpoint(tmp_path).model
    with torch.no_grad():
        model.blocks[1].mixer.in_proj.weight.mul_(1e38)  # overflows layer 1's inputs
    rec = record(model, sequences(n=1, length=40), positions=20, chunk=16)
    layer1 = rec.stats.query("name == 'hook_state' and layer == 1")
    assert not layer1.finite.any()
    assert rec.stats.query("name == 'hook_state' and layer == 0").finite.all()


def test_resolve_positions():
    assert resolve_positions(25, 100) == [25, 50, 75, 100]
    assert resolve_positions([0, 5, 5, 300, 3], 100) == [3, 5]


def test_recording_on_ssd_block_boundaries_reads_states_inside_a_call(tmp_path):
    """Positions on SSD block boundaries are read from the blocks' states without cutting the rollout:
    the statistics and raw states still equal those of separate runs, and no extra calls are made."""
    hf_mamba2(tmp_path)  # chunk_size 16: SSD blocks of 16 tokens
    model = load_checkpoint(tmp_path).model
    seqs = sequences(n=2, length=150)
    calls, during = [], []

    def on_chunk(c):
        calls.append(c.end)
        during.append(sorted(p.name for p in (tmp_path / "raw").iterdir()))

    rec = record(model, seqs, names=["blocks.*.hook_state", "blocks.*.hook_dt"], positions=32, chunk=64,
                 raw="blocks.0.hook_state", raw_dir=tmp_path / "raw", on_chunk=on_chunk)
    assert calls == [64, 128, 150]
    # The raw array fills under a temporary name and takes its own only when complete.
    assert all(names == [f".blocks.0.hook_state.npy.tmp-{os.getpid()}"] for names in during), during
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["blocks.0.hook_state.npy"]
    assert rec.positions == [32, 64, 96, 128]
    for p in rec.positions:
        with torch.no_grad():
            _, state = model(torch.tensor(seqs[:, :p]))
        np.testing.assert_allclose(rec.raw["blocks.0.hook_state"][rec.positions.index(p)], state.ssm[0],
                                   rtol=1e-5, atol=1e-6)
        for layer in range(model.n_layers):
            heads = model.by_head(f"blocks.{layer}.hook_state", state.ssm[layer]).double()
            got = rec.stats.query("name == 'hook_state' and position == @p and layer == @layer")
            np.testing.assert_allclose(got.norm, heads.norm(dim=-1).flatten(), rtol=1e-5)
    assert set(rec.stats.name) == {"hook_state", "hook_dt"}
