"""State statistics and state collapse, each held to a number computed another way: transformers'
recurrent cache, a second chunking, synthetic tables with a known answer, and tiny checkpoints edited
so that one head integrates without forgetting (or overflows)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import hf_mamba1, hf_mamba2
from statelens.analysis.collapse import collapse
from statelens.analysis.states import COLUMNS, state_stats
from statelens.errors import BadInput
from statelens.models import load_checkpoint

# The integrating head: A = -exp(-30) ~ 0 so alpha = exp(dt * A) ~ 1, and dt ~ softplus(5) ~ 5.
SLOW = (1, 3)         # (layer, head); the last layer, so nothing downstream changes
OVERFLOW = (1, 5)


def edited_mamba2(path, *, slow: bool = False, overflow: bool = False):
    """A tiny Mamba-2 (transformers writes it) whose heads all decay at one constant rate (dt rows of
    in_proj zeroed, dt = softplus(-3.5) ~ 0.03, A = -1, alpha ~ 0.97), except: ``slow``: head SLOW
    integrates its inputs without forgetting; ``overflow``: head OVERFLOW integrates too, its x rows scaled by
    1e38, so that its state overflows to inf/NaN."""
    hf = hf_mamba2(path)
    cfg = hf.config
    with torch.no_grad():
        for layer in hf.backbone.layers:
            layer.mixer.A_log.fill_(0.0)
            layer.mixer.dt_bias.fill_(-3.5)
            layer.mixer.in_proj.weight[-cfg.num_heads:] = 0.0       # the dt rows: dt no longer depends on u
        if slow:
            mixer = hf.backbone.layers[SLOW[0]].mixer
            mixer.A_log[SLOW[1]] = -30.0
            mixer.dt_bias[SLOW[1]] = 5.0
        if overflow:
            mixer = hf.backbone.layers[OVERFLOW[0]].mixer
            d_inner = cfg.expand * cfg.hidden_size
            first = d_inner + OVERFLOW[1] * cfg.head_dim           # in_proj rows: z [d_inner], then x, B, C, dt
            mixer.in_proj.weight[first:first + cfg.head_dim] *= 1e38
            mixer.A_log[OVERFLOW[1]] = -30.0
            mixer.dt_bias[OVERFLOW[1]] = 5.0
    hf.save_pretrained(path)
    return load_checkpoint(path).model


# -- state statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mamba2", "mamba1"])
def test_stats_equal_transformers_recurrent_state(arch, tmp_path, tokens):
    """Per head: Mamba-2 heads are dim 1 of [b, h, p, n]; Mamba-1's are groups of head_channels channels
    of [b, d, n]. Aggregates: norm, mean, std averaged over the batch, absmax its max."""
    hf = (hf_mamba2 if arch == "mamba2" else hf_mamba1)(tmp_path)
    model = load_checkpoint(tmp_path).model
    positions = [5, 13, 24]
    got = state_stats(model, tokens[:, :24], positions=positions, chunk=7)
    assert list(got.columns) == COLUMNS
    assert len(got) == len(positions) * model.n_layers * model.n_heads

    expected, cache = [], None
    with torch.no_grad():
        for t in range(24):
            cache = hf(tokens[:, t:t + 1], cache_params=cache, use_cache=True).cache_params
            if t + 1 not in positions:
                continue
            for layer in range(model.n_layers):
                s = cache.get_recurrent_state(layer).double()
                if arch == "mamba2":
                    heads = s.flatten(2)                                # [b, h, p * n]
                else:
                    heads = s.reshape(s.shape[0], -1, model.head_channels * s.shape[-1])  # [b, H, c * n]
                for head in range(heads.shape[1]):
                    x = heads[:, head]                                  # [b, k]
                    expected.append({"position": t + 1, "layer": layer, "head": head,
                                     "norm": x.norm(dim=-1).mean().item(), "mean": x.mean(-1).mean().item(),
                                     "std": x.std(-1, correction=0).mean().item(),
                                     "absmax": x.abs().amax().item(), "finite": True})
    expected = pd.DataFrame(expected, columns=COLUMNS)
    assert len(expected) == len(got)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-4, atol=1e-7)


def test_chunk_length_does_not_change_the_stats(tmp_path, tokens):
    hf_mamba2(tmp_path)
    model = load_checkpoint(tmp_path).model
    short = state_stats(model, tokens, positions=25, chunk=7)
    long = state_stats(model, tokens, positions=25, chunk=64)
    assert sorted(short.position.unique()) == list(range(25, 301, 25))
    pd.testing.assert_frame_equal(short, long, rtol=1e-5, atol=1e-7)


def test_progress_counts_every_token(tmp_path, tokens):
    hf_mamba2(tmp_path)
    model = load_checkpoint(tmp_path).model
    seen = []
    state_stats(model, tokens, positions=[10, 300], chunk=64, progress=seen.append)
    assert sum(seen) == tokens.numel()


# -- collapse on tables with a known answer --------------------------------------------------------


def table(heads: dict, positions) -> pd.DataFrame:
    """heads: (layer, head) -> {statistic: fn(position) -> value}; norm, std, absmax default to 1,
    mean to 0.1; finite follows the values."""
    rows = []
    for (layer, head), fns in heads.items():
        for p in positions:
            values = {"norm": 1.0, "mean": 0.1, "std": 1.0, "absmax": 1.0} | {s: f(p) for s, f in fns.items()}
            rows.append({"position": p, "layer": layer, "head": head, **values,
                         "finite": all(np.isfinite(v) for v in values.values())})
    return pd.DataFrame(rows, columns=COLUMNS)


T, P = 100, 160                       # training length, and where things happen past it
POSITIONS = range(10, 301, 10)


def step(before: float, after: float, at: int = P):
    return lambda p: before if p < at else after


def test_collapse_known_answers():
    stats = table({
        (0, 0): {"norm": step(1.0, 3.0)},                      # 3x at P: collapsed, ratio 3
        (0, 1): {"norm": step(1.0, 1.5)},                      # 1.5x: not with k = 2
        (0, 2): {"norm": step(1.0, np.inf, 180), "absmax": step(1.0, np.inf, 180)},   # overflows at 180
        (1, 0): {"std": step(2.0, 5.0, 130)},                  # std 2.5x from 130
        (1, 1): {},                                            # steady
        (1, 2): {"norm": lambda p: 1.0 + p / 1000},            # slow drift: 1.3 / 1.1
    }, POSITIONS)
    got = collapse(stats, T).set_index(["layer", "head"])
    # Ranked: non-finite first, then collapsed by ratio, then the rest by ratio.
    assert list(got.index) == [(0, 2), (0, 0), (1, 0), (0, 1), (1, 2), (1, 1)]
    assert got.collapsed.tolist() == [True, True, True, False, False, False]
    assert got.nonfinite.tolist() == [True] + [False] * 5
    assert got.loc[(0, 0)].tolist()[1:] == ["norm", 3.0, P, False, 1.0, 3.0]
    assert got.loc[(0, 2)].tolist()[1:] == ["norm", np.inf, 180, True, 1.0, np.inf]
    assert got.loc[(1, 0)].tolist()[1:] == ["std", 2.5, 130, False, 2.0, 5.0]
    assert got.loc[(0, 1), "ratio"] == 1.5 and got.loc[(0, 1), "start_position"] == -1
    assert got.loc[(1, 2), "ratio"] == pytest.approx(1.3 / 1.1)
    assert got.loc[(1, 1)].tolist()[1:] == ["norm", 1.0, -1, False, 1.0, 1.0]

    # k moves the threshold: at k = 1.4 the 1.5x head collapses where its step starts.
    assert collapse(stats, T, k=1.4).set_index(["layer", "head"]).loc[(0, 1), "start_position"] == P


def test_nan_and_finite_flag_and_mean_on_request():
    stats = table({
        (0, 0): {"std": step(1.0, np.nan, 250)},               # NaN only past the training length
        (0, 1): {"mean": step(0.1, -0.5)},                      # |mean| 5x: only when asked for
    }, POSITIONS)
    got = collapse(stats, T).set_index(["layer", "head"])
    assert got.loc[(0, 0)].tolist()[:5] == [True, "std", np.inf, 250, True]
    assert not got.loc[(0, 1), "collapsed"]
    with_mean = collapse(stats, T, statistics=("norm", "std", "absmax", "mean")).set_index(["layer", "head"])
    assert with_mean.loc[(0, 1)].tolist()[:4] == [True, "mean", pytest.approx(5.0), P]

    # ``finite`` False alone (statistics finite) still counts as non-finite.
    flagged = table({(0, 0): {}}, POSITIONS)
    flagged.loc[flagged.position == 200, "finite"] = False
    assert collapse(flagged, T).iloc[0][["collapsed", "start_position", "nonfinite"]].tolist() == [True, 200, True]


def test_collapse_refuses_what_it_cannot_compare():
    stats = table({(0, 0): {}}, POSITIONS)
    with pytest.raises(ValueError, match="no state recorded at a position <= the training length 5"):
        collapse(stats, 5)
    with pytest.raises(ValueError, match="no state recorded at a position > the training length 300"):
        collapse(stats, 300)
    with pytest.raises(ValueError, match="one row per position, layer and head"):
        collapse(pd.concat([stats, stats]), T)


# -- tiny checkpoints with a known culprit ---------------------------------------------------------


def test_an_integrating_head_collapses_and_only_it(tmp_path):
    model = edited_mamba2(tmp_path, slow=True)
    train_len, stride = 256, 16
    sequences = np.random.default_rng(0).integers(0, 64, size=(4, 1024))
    stats = state_stats(model, sequences, positions=stride, chunk=200)
    heads = collapse(stats, train_len)

    assert heads.collapsed.sum() == 1
    top = heads.iloc[0]
    assert (top.layer, top["head"]) == SLOW and not top.nonfinite

    # Directly from the table: the first recorded position past train_len where the head's norm
    # exceeds 2x its maximum within train_len.
    slow = stats[(stats.layer == SLOW[0]) & (stats["head"] == SLOW[1])]
    limit = 2 * slow.loc[slow.position <= train_len, "norm"].max()
    first = slow.loc[(slow.position > train_len) & (slow.norm > limit), "position"].min()
    assert top.start_position == first
    assert top.ratio == pytest.approx(slow[top.statistic].abs().max() / slow.loc[slow.position <= train_len,
                                                                                    top.statistic].abs().max())


def test_an_overflowing_head_is_a_finding_not_an_error(tmp_path):
    model = edited_mamba2(tmp_path, overflow=True)
    sequences = np.random.default_rng(0).integers(0, 64, size=(2, 256))
    stats = state_stats(model, sequences, positions=16)
    bad = (stats.layer == OVERFLOW[0]) & (stats["head"] == OVERFLOW[1])
    assert not stats.loc[bad, "finite"].any()
    assert not np.isfinite(stats.loc[bad, ["norm", "std", "absmax"]].to_numpy()).any()
    assert stats.loc[~bad, "finite"].all() and np.isfinite(stats.loc[~bad, ["norm", "std", "absmax"]]).all().all()

    heads = collapse(stats, 64)
    top = heads.iloc[0]
    assert (top.layer, top["head"]) == OVERFLOW
    assert top.collapsed and top.nonfinite and top.ratio == np.inf and top.start_position == 80
    assert heads.nonfinite.sum() == 1


# -- the command -----------------------------------------------------------------------------------


def test_cli_writes_what_the_library_computes(tmp_path):
    pytest.importorskip("statelens.reports.figures")
    import typer
    from typer.testing import CliRunner

    from statelens.analysis import analyses
    from statelens.cli.analysis import command

    states = command(analyses.get("states"))

    app = typer.Typer()
    app.command()(states)
    model = edited_mamba2(tmp_path / "ckpt", slow=True)
    sequences = np.random.default_rng(1).integers(0, 64, size=(3, 1024))
    np.save(tmp_path / "tokens.npy", sequences)
    out = tmp_path / "out"
    args = ["--ckpt", str(tmp_path / "ckpt"), "--data", str(tmp_path / "tokens.npy"), "--train-len", "256",
            "--num-seqs", "3", "--group", "3", "--stride", "16", "--chunk", "100", "--out", str(out)]
    run = CliRunner().invoke(app, args)  # --length: 4 x 256 by default; one group = the library's batch
    assert run.exit_code == 0, run.output
    assert "1 of 16 heads collapse" in run.output and f"layer {SLOW[0]} head {SLOW[1]}" in run.output

    stats = state_stats(model, sequences, positions=16, chunk=100)
    heads = collapse(stats, 256)
    pd.testing.assert_frame_equal(pd.read_csv(out / "state_stats.csv"), stats, check_dtype=False, rtol=1e-9)
    pd.testing.assert_frame_equal(pd.read_csv(out / "collapse.csv"), heads, check_dtype=False, rtol=1e-9)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["config"]["length"] == 1024 and manifest["config"]["stride"] == 16
    assert manifest["results"]["collapsed_heads"] == 1
    top = [(h["layer"], h["head"]) for h in manifest["results"]["top"]]
    assert top == list(zip(heads.layer[:5], heads["head"][:5]))

    bad = CliRunner().invoke(app, [*args[:-2], "--length", "100", "--stride", "128", "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, BadInput) and str(bad.exception).startswith("--stride 128")
    assert not (tmp_path / "x").exists()


def test_no_recording_position_is_refused_before_running(tmp_path, tokens):
    hf_mamba2(tmp_path)
    model = load_checkpoint(tmp_path).model
    with pytest.raises(ValueError, match="no recording position in 1..300"):
        state_stats(model, tokens, positions=301)
