"""Decay analysis against alpha computed from transformers' own internals, and against itself."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import hf_mamba2, perturb
from statelens.analysis.buckets import bucket_edges
from statelens.analysis.decay import COLUMNS, decay
from statelens.models import load_checkpoint


def slow_decay(hf, path):
    """Moves A = -exp(A_log) 20x towards 0 (alpha ~ 0.95 .. 0.999), so that the retention of the
    initial state stays measurable over a few hundred tokens, and saves the model again."""
    with torch.no_grad():
        for layer in hf.backbone.layers:
            layer.mixer.A_log.sub_(3.0)
    hf.save_pretrained(path)
    return hf


def hf_mamba1_heads(path, seed=0):
    """A Mamba-1 with d_inner 96: statelens groups it into 3 "heads" of 32 channels."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, state_size=8, expand=2,
                                   conv_kernel=4)
    return slow_decay(perturb(transformers.MambaForCausalLM(cfg), seed), path)


@torch.no_grad()
def captured(modules, tokens, hf):
    """Runs ``hf`` on ``tokens`` and returns the output of each of ``modules`` (one forward call each)."""
    seen = {}
    handles = [m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out.detach()))
               for i, m in enumerate(modules)]
    try:
        hf(tokens)
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(modules))]


@torch.no_grad()
def mamba2_alpha(hf, tokens):
    """Per layer alpha [N, L, heads, 1] as transformers' Mamba2Mixer computes it: dt is the last
    num_heads columns of in_proj's output, dt = softplus(dt + dt_bias), alpha = exp(dt * -exp(A_log))."""
    mixers = [layer.mixer for layer in hf.backbone.layers]
    alphas = []
    for mixer, projected in zip(mixers, captured([m.in_proj for m in mixers], tokens, hf)):
        dt = F.softplus(projected[..., -mixer.num_heads:] + mixer.dt_bias)
        dt = dt.clamp(*mixer.time_step_limit)
        alphas.append(torch.exp(dt * -torch.exp(mixer.A_log.float()))[..., None])
    return alphas


@torch.no_grad()
def mamba1_alpha(hf, tokens, head_channels):
    """Per layer alpha [N, L, heads, channels-per-head * d_state] as transformers' MambaMixer computes
    it: dt_low = first time_step_rank columns of x_proj's output, dt = softplus(dt_proj(dt_low)),
    alpha [N, L, d, n] = exp(dt[..., None] * A), A = -exp(A_log); a head is head_channels channels."""
    mixers = [layer.mixer for layer in hf.backbone.layers]
    alphas = []
    for mixer, x_dbl in zip(mixers, captured([m.x_proj for m in mixers], tokens, hf)):
        dt = F.softplus(x_dbl[..., :mixer.time_step_rank] @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)
        alpha = torch.exp(dt[..., None] * -torch.exp(mixer.A_log.float()))       # [N, L, d, n]
        n, length, d, s = alpha.shape
        alphas.append(alpha.reshape(n, length, d // head_channels, head_channels * s))
    return alphas


def expected(alphas, edges):
    """mean_alpha and retention [bucket, layer, head] straight from full alpha tensors: plain means, and
    a cumulative product (not a sum of logs) over positions, in float64."""
    mean, retention = [], []
    for lo, hi in itertools.pairwise(edges):
        mean.append([a[:, lo - 1:hi - 1].double().mean(dim=(0, 1, 3)) for a in alphas])
        retention.append([a.double().cumprod(dim=1)[:, hi - 2].mean(dim=(0, 2)) for a in alphas])
    return torch.tensor(np.array(mean)), torch.tensor(np.array(retention))


def as_grid(df, column, n_layers, n_heads):
    return torch.tensor(df[column].to_numpy().reshape(-1, n_layers, n_heads))


def check_against(df, alphas, length, buckets, scale, model):
    edges = bucket_edges(1, length + 1, buckets, scale)
    assert list(df.columns) == COLUMNS
    assert len(df) == (len(edges) - 1) * model.n_layers * model.n_heads
    assert df.pos_start.iloc[0] == 1 and df.pos_end.iloc[-1] == length + 1
    mean, retention = expected(alphas, edges)
    assert retention.min() > 1e-6 and retention.median() > 0.1  # not just zeros
    torch.testing.assert_close(as_grid(df, "mean_alpha", model.n_layers, model.n_heads), mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(as_grid(df, "retention", model.n_layers, model.n_heads), retention,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", ["log", "linear"])
def test_mamba2_equals_alpha_from_transformers(scale, tmp_path, tokens):
    hf = slow_decay(hf_mamba2(tmp_path), tmp_path)
    model = load_checkpoint(tmp_path).model
    df = decay(model, tokens.numpy(), buckets=8, scale=scale, chunk=64)
    check_against(df, mamba2_alpha(hf, tokens), tokens.shape[1], 8, scale, model)


def test_mamba1_equals_alpha_from_transformers(tmp_path, tokens):
    hf = hf_mamba1_heads(tmp_path)
    model = load_checkpoint(tmp_path).model
    assert (model.n_heads, model.head_channels) == (3, 32)
    df = decay(model, tokens, buckets=8, chunk=64)
    check_against(df, mamba1_alpha(hf, tokens, model.head_channels), tokens.shape[1], 8, "log", model)


@pytest.mark.parametrize("arch", ["mamba2", "mamba1"])
def test_chunk_length_does_not_change_the_result(arch, tmp_path, tokens):
    slow_decay(hf_mamba2(tmp_path), tmp_path) if arch == "mamba2" else hf_mamba1_heads(tmp_path)
    model = load_checkpoint(tmp_path).model
    seen = []
    a = decay(model, tokens, buckets=12, chunk=7, progress=seen.append)
    b = decay(model, tokens, buckets=12, chunk=100)
    assert sum(seen) == tokens.numel()
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-7)


def test_horizon_and_monotone_retention(tmp_path, tokens):
    hf_mamba2(tmp_path)
    model = load_checkpoint(tmp_path).model
    with torch.no_grad():
        model.blocks[1].mixer.A_log[2] = -torch.inf  # A = 0: alpha == 1, this head never forgets
    df = decay(model, tokens, buckets=10, chunk=50)
    never = (df.layer == 1) & (df["head"] == 2)
    assert never.sum() == df.pos_start.nunique()
    assert (df[never].mean_alpha == 1).all() and (df[never].horizon == np.inf).all()
    assert (df[never].retention == 1).all()
    rest = df[~never]
    assert ((rest.mean_alpha > 0) & (rest.mean_alpha < 1)).all()
    np.testing.assert_allclose(rest.horizon, -1 / np.log(rest.mean_alpha.to_numpy()), rtol=1e-12)
    for _, group in df.groupby(["layer", "head"]):
        retention = group.sort_values("pos_start").retention.to_numpy()
        assert (retention <= 1).all() and (np.diff(retention) <= 0).all()
    # The first bucket is position 1 alone, whose retention is alpha at position 1 itself.
    first = df[df.pos_start == 1]
    assert (first.pos_end == 2).all()
    np.testing.assert_allclose(first.retention, first.mean_alpha, rtol=1e-6)


def test_cli_writes_what_the_function_computes(tmp_path):
    pytest.importorskip("statelens.reports.figures")
    import typer
    from typer.testing import CliRunner

    from statelens.analysis import analyses
    from statelens.cli.analysis import command as generated

    command = generated(analyses.get("decay"))

    slow_decay(hf_mamba2(tmp_path / "ckpt"), tmp_path / "ckpt")
    tokens = np.random.default_rng(5).integers(0, 64, size=(3, 80))
    np.save(tmp_path / "tokens.npy", tokens)
    app = typer.Typer()
    app.command()(command)
    out = tmp_path / "out"
    # No --length: 4 x the training length (16) = 64 tokens of each of the first 2 rows.
    result = CliRunner().invoke(app, ["--ckpt", str(tmp_path / "ckpt"), "--data", str(tmp_path / "tokens.npy"),
                                      "--train-len", "16", "--num-seqs", "2", "--buckets", "6", "--scale",
                                      "linear", "--chunk", "10", "--group", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out / "decay.csv")
    direct = decay(load_checkpoint(tmp_path / "ckpt").model, tokens[:2, :64], buckets=6, scale="linear")
    pd.testing.assert_frame_equal(written, direct, check_exact=False, rtol=1e-6, atol=1e-9)
    assert (out / "decay.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["length"] == 64 and run["config"]["scale"] == "linear"
    last = direct[direct.pos_start == direct.pos_start.max()]
    assert run["results"]["last_bucket"] == [int(last.pos_start.iloc[0]), 65]
    medians = {str(k): v for k, v in last.groupby("layer").horizon.median().items()}
    assert run["results"]["median_horizon_by_layer"] == pytest.approx(medians, rel=1e-9)
