"""State coverage (statelens.analysis.coverage) against numbers computed another way: Gaussian samples
whose distribution is known, a hand-computed leave-one-out threshold, position-wise loss and direct
forward runs on a tiny checkpoint, chunk-length invariance, and the CLI's files against the library."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chi, spearmanr

from conftest import hf_mamba1, hf_mamba2, run_cli
from statelens.analysis.buckets import bucket_edges
from statelens.analysis.coverage import (BUCKET_COLUMNS, HEAD_COLUMNS, Support, collect_states, coverage,
                                         out_of_support, random_projection, scatter_points)
from statelens.analysis.positionwise import bucket_losses, position_losses
from statelens.errors import BadInput
from statelens.models import load_checkpoint

N, L, TRAIN_LEN, STRIDE = 3, 96, 32, 4

# -- out_of_support on synthetic data ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian():
    """2000 samples of a 32-dim Gaussian with distinct per-axis scales (so the top 16 PCA axes are well
    defined), and 2000 more from the same distribution."""
    rng = np.random.default_rng(0)
    scale = np.linspace(3.0, 0.5, 32)
    return scale, rng.standard_normal((2000, 32)) * scale, rng.standard_normal((2000, 32)) * scale


def test_in_distribution_query_is_inside(gaussian):
    _, reference, query = gaussian
    result = out_of_support(reference, query, k=5, components=16)
    assert set(result) == {"oos_fraction", "maha_median", "maha_p95", "norm_ratio"}
    assert result["oos_fraction"] < 0.05                      # ~ 1 - quantile = 0.01
    # Mahalanobis over 16 standardised Gaussian components: chi distribution with 16 degrees of freedom.
    assert result["maha_median"] == pytest.approx(chi(16).median(), rel=0.2)
    assert result["maha_p95"] == pytest.approx(chi(16).ppf(0.95), rel=0.2)
    direct = np.median(np.linalg.norm(query, axis=1)) / np.median(np.linalg.norm(reference, axis=1))
    assert result["norm_ratio"] == pytest.approx(direct, rel=1e-12)


def test_shifted_query_is_outside(gaussian):
    scale, reference, query = gaussian
    result = out_of_support(reference, query + 5 * scale, k=5, components=16)
    assert result["oos_fraction"] > 0.95
    assert result["maha_median"] > 2 * chi(16).median()


def test_leave_one_out_threshold_by_hand():
    # Six points on a line in 2-D at t = 0, 1, 3, 6, 10, 15 along u from an offset. k = 2:
    # leave-one-out 2nd-neighbour distances are 3, 2, 3, 4, 5, 9 -> sorted 2, 3, 3, 4, 5, 9;
    # their 0.5 quantile (linear interpolation) is (3 + 4) / 2 = 3.5.
    u, offset = np.array([0.6, 0.8]), np.array([1.0, -2.0])
    t = np.array([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])
    reference = offset + t[:, None] * u
    support = Support.fit(reference, k=2, components=16, quantile=0.5)
    assert support.basis.shape == (2, 2)                      # c = min(16, m - 1, D) = 2
    assert support.threshold == pytest.approx(3.5, abs=1e-12)
    # Queries at t = 8 (neighbours 6, 10: 2nd distance 2, inside), t = -3 (0, 1: 4, outside),
    # t = 20 (15, 10: 10, outside), and 2.5 off the line at t = 6 (6, 3: sqrt(9 + 6.25), outside).
    normal = np.array([-0.8, 0.6])
    query = np.stack([offset + 8 * u, offset - 3 * u, offset + 20 * u, offset + 6 * u + 2.5 * normal])
    np.testing.assert_allclose(support.knn_distance(query), [2, 4, 10, np.sqrt(15.25)], atol=1e-12)
    np.testing.assert_array_equal(support.outside(query), [False, True, True, True])
    assert out_of_support(reference, query, k=2, quantile=0.5)["oos_fraction"] == pytest.approx(0.75)
    # The second axis has zero variance: the epsilon keeps it finite, and on the line the Mahalanobis
    # distance is |t - mean(t)| / std(t).
    maha = support.mahalanobis(query)
    assert np.isfinite(maha).all()
    np.testing.assert_allclose(maha[:3], np.abs([8, -3, 20] - t.mean()) / t.std(ddof=1), rtol=1e-9)


def test_duplicates_count_as_neighbours():
    # Leave-one-out removes the point itself, not its duplicates: each of a pair is at distance 0.
    reference = np.array([[0.0], [0.0], [5.0], [5.0], [9.0], [9.0]])
    support = Support.fit(reference, k=1, quantile=0.5)
    assert support.threshold == 0.0


def test_degenerate_references():
    with pytest.raises(ValueError, match="k \\+ 2 = 7"):
        out_of_support(np.zeros((6, 4)), np.zeros((3, 4)), k=5)
    # All reference points equal: no variance at all, yet no crash and finite distances.
    result = out_of_support(np.ones((10, 4)), np.full((3, 4), 2.0), k=2)
    assert result["oos_fraction"] == 1.0 and np.isfinite(result["maha_median"])
    assert out_of_support(np.ones((10, 4)), np.ones((3, 4)), k=2)["oos_fraction"] == 0.0
    # A query that exploded (non-finite) is outside.
    assert out_of_support(np.random.default_rng(0).normal(size=(50, 4)), np.full((2, 4), np.inf),
                          k=2)["oos_fraction"] == 1.0


# -- the analysis on a tiny checkpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("coverage") / "mamba2"
    hf_mamba2(path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(ckpt, dtype=torch.float64).model


@pytest.fixture(scope="module")
def sequences():
    return np.random.default_rng(3).integers(0, 64, size=(N, L), dtype=np.int64)


@pytest.fixture(scope="module")
def result(model, sequences):
    return coverage(model, sequences, train_len=TRAIN_LEN, stride=STRIDE, chunk=64)


def test_tables_and_loss_match_positionwise(model, sequences, result):
    per_head, per_bucket, summary = result
    assert list(per_head.columns) == HEAD_COLUMNS and list(per_bucket.columns) == BUCKET_COLUMNS
    edges = bucket_edges(TRAIN_LEN + 1, L + 1, 8, "log")
    np.testing.assert_array_equal(per_bucket.pos_start, edges[:-1])
    np.testing.assert_array_equal(per_bucket.pos_end, edges[1:])
    assert len(per_head) == (len(edges) - 1) * model.n_layers * model.n_heads

    # Loss per bucket: position-wise loss of a separate rollout, same edges (the loss at p exists for p < L).
    summed = position_losses(model, sequences, chunk=64)
    expected = bucket_losses(summed, N, np.minimum(edges, L))
    np.testing.assert_allclose(per_bucket.loss, expected.loss, atol=1e-6, rtol=0)
    in_context = bucket_losses(summed, N, np.array([TRAIN_LEN // 2 + 1, TRAIN_LEN + 1])).loss.iloc[0]
    assert summary["in_context_loss"] == pytest.approx(in_context, abs=1e-6)
    np.testing.assert_allclose(per_bucket.loss_increase, expected.loss - in_context, atol=1e-6, rtol=0)

    # Counts: the reference is every sequence's states at the recorded positions <= train_len.
    recorded = np.arange(STRIDE, L + 1, STRIDE)
    assert (per_head.n_reference == N * (recorded <= TRAIN_LEN).sum()).all()
    in_bucket = [N * ((recorded >= lo) & (recorded < hi)).sum() for lo, hi in itertools.pairwise(edges)]
    np.testing.assert_array_equal(per_head.groupby("pos_start").n_query.first(), in_bucket)

    # Per-bucket out-of-support = mean over layers and heads; Spearman as scipy computes it.
    np.testing.assert_allclose(per_bucket.oos_fraction, per_head.groupby("pos_start").oos_fraction.mean())
    rho, p = spearmanr(per_bucket.oos_fraction, per_bucket.loss_increase)
    assert summary["n_buckets"] == len(edges) - 1
    assert summary["spearman_rho"] == pytest.approx(rho, nan_ok=True)
    assert summary["spearman_p"] == pytest.approx(p, nan_ok=True)
    assert per_head[["oos_fraction", "maha_median", "norm_ratio"]].notna().all().all()
    assert per_head.oos_fraction.between(0, 1).all()


def test_chunk_length_invariance(model, sequences, result):
    per_head, per_bucket, _ = coverage(model, sequences, train_len=TRAIN_LEN, stride=STRIDE, chunk=7)
    pd.testing.assert_frame_equal(per_head, result[0], check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(per_bucket, result[1], check_exact=False, atol=1e-6, rtol=0)


def test_recorded_states_equal_direct_runs(model, sequences):
    positions = [5, 32, 96]
    kept = collect_states(model, sequences, positions=positions, chunk=7)
    projected = collect_states(model, sequences, positions=positions, chunk=7, projection_dim=16, seed=4)
    assert not kept.projected and projected.projected
    matrix = random_projection(64, 16, seed=4)
    for j, p in enumerate(positions):
        with torch.no_grad():
            _, state = model(torch.as_tensor(sequences[:, :p]))
        for i in range(model.n_layers):
            direct = model.by_head(f"blocks.{i}.hook_state", state.ssm[i])                # [N, H, 64]
            torch.testing.assert_close(kept.states[i][:, j], direct, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(projected.states[i][:, j], direct @ matrix, atol=1e-10, rtol=1e-10)
            np.testing.assert_allclose(kept.norms[:, j, i], direct.norm(dim=-1).numpy(), rtol=1e-12)
            np.testing.assert_array_equal(projected.norms[:, j, i], kept.norms[:, j, i])


def test_projection_keeps_norms_unprojected(model, sequences, result):
    per_head, _, _ = coverage(model, sequences, train_len=TRAIN_LEN, stride=STRIDE, chunk=64, projection_dim=16)
    pd.testing.assert_series_equal(per_head.norm_ratio, result[0].norm_ratio)
    pd.testing.assert_series_equal(per_head.n_reference, result[0].n_reference)


def test_scatter_points(model, sequences):
    sample = collect_states(model, sequences, positions=list(range(STRIDE, L + 1, STRIDE)), chunk=64)
    df = scatter_points(sample, train_len=TRAIN_LEN, layer=1, head=3)
    assert list(df.columns) == ["pc1", "pc2", "position", "set"]
    assert len(df) == N * (L // STRIDE)
    reference = df[df.set == "reference"]
    assert (reference.position <= TRAIN_LEN).all() and (df[df.set == "query"].position > TRAIN_LEN).all()
    assert len(reference) == N * (TRAIN_LEN // STRIDE)
    assert reference.pc1.mean() == pytest.approx(0, abs=1e-9)     # centred on the reference
    assert reference.pc1.var() >= reference.pc2.var()


def test_mamba1(tmp_path, sequences):
    hf_mamba1(tmp_path / "m1")
    model = load_checkpoint(tmp_path / "m1").model                # heads of 64 channels x 8: kdim 512
    per_head, per_bucket, _ = coverage(model, sequences, train_len=TRAIN_LEN, stride=8, chunk=64, buckets=3)
    assert len(per_head) == len(per_bucket) * model.n_layers * model.n_heads
    assert per_head.oos_fraction.between(0, 1).all()


def test_bad_parameters(model, sequences):
    with pytest.raises(ValueError, match="no positions past the training length"):
        coverage(model, sequences, train_len=L)
    with pytest.raises(ValueError, match="no recorded position"):
        coverage(model, sequences, train_len=TRAIN_LEN, stride=TRAIN_LEN + 1)
    with pytest.raises(ValueError, match="reference set holds 3 states"):
        coverage(model, sequences, train_len=TRAIN_LEN, stride=TRAIN_LEN)


def test_refusals_are_bad_input(model, sequences):
    """What a caller can get wrong is a BadInput naming the parameter (still a ValueError for callers
    that catch that)."""
    for kwargs, parameter in ((dict(train_len=L), "sequences"), (dict(train_len=TRAIN_LEN, stride=TRAIN_LEN + 1),
                                                                   "stride"), (dict(train_len=TRAIN_LEN, k=0), "k")):
        with pytest.raises(BadInput) as refused:
            coverage(model, sequences, **kwargs)
        assert refused.value.parameter == parameter and isinstance(refused.value, ValueError)


# -- the CLI -----------------------------------------------------------------------------------------


def test_cli_writes_the_analysis(ckpt, tmp_path):
    pytest.importorskip("statelens.reports.figures")
    import typer
    from typer.testing import CliRunner

    from statelens.analysis import analyses
    from statelens.cli.analysis import command as generated

    command = generated(analyses.get("coverage"))

    app = typer.Typer()
    app.command()(command)
    out = tmp_path / "out"
    args = ["--ckpt", str(ckpt), "--train-len", str(TRAIN_LEN), "--length", str(L), "--num-seqs", str(N),
            "--stride", str(STRIDE), "--chunk", "16", "--buckets", "4", "--out", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "Spearman rho" in run.output and "out of support" in run.output

    model = load_checkpoint(ckpt).model                            # the CLI's defaults: float32, seed 0
    tokens = np.random.default_rng(0).integers(0, 64, size=(N, L), dtype=np.int64)
    per_head, per_bucket, summary = coverage(model, tokens, train_len=TRAIN_LEN, stride=STRIDE, chunk=16,
                                             buckets=4)
    pd.testing.assert_frame_equal(pd.read_csv(out / "coverage.csv"), per_head, check_dtype=False, atol=1e-9)
    pd.testing.assert_frame_equal(pd.read_csv(out / "coverage_buckets.csv"), per_bucket, check_dtype=False,
                                  atol=1e-9)
    results = json.loads((out / "run.json").read_text())["results"]
    assert results["n_buckets"] == summary["n_buckets"]
    assert results["in_context_loss"] == pytest.approx(summary["in_context_loss"])

    bad = CliRunner().invoke(app, [*args[:-2], "--stride", str(TRAIN_LEN + 1), "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, BadInput) and str(bad.exception).startswith("--stride")


def test_cli_a_failure_inside_the_analysis_is_internal(ckpt, tmp_path, monkeypatch, capsys):
    """A ValueError the user did not cause (here: planted in the analysis) is an internal error, exit 1,
    not "bad input" (exit 2)."""
    import statelens.analysis.coverage as analysis

    def broken(*args, **kwargs):
        raise ValueError("planted")

    monkeypatch.setattr(analysis, "coverage_from_states", broken)
    code, _, err = run_cli(monkeypatch, capsys, "coverage", "--ckpt", ckpt, "--train-len", TRAIN_LEN, "--length", L,
                           "--num-seqs", N, "--stride", STRIDE, "--out", tmp_path / "out")
    assert code == 1 and "internal error: ValueError: planted" in err, err
    assert not (tmp_path / "out" / "coverage.csv").exists()


# -- reference regimes: the states a state-passing or TBTT-trained model met -------------------------


CHAIN = 3


@pytest.fixture(scope="module")
def reference_tokens():
    return np.random.default_rng(11).integers(0, 64, size=(N, CHAIN * TRAIN_LEN + 5), dtype=np.int64)


def _chain_by_hand(model, tokens, rows_of_segment):
    """Runs the chain segment by segment with model(tokens, state); returns norms [M, P, layers, H] at
    positions STRIDE, 2 STRIDE, ... within each segment."""
    norms, state = [], None
    for j in range(CHAIN):
        segment = torch.as_tensor(tokens[rows_of_segment(j), j * TRAIN_LEN:(j + 1) * TRAIN_LEN])
        for q in range(STRIDE, TRAIN_LEN + 1, STRIDE):
            with torch.no_grad():
                _, s = model(segment[:, :q], state)
            norms.append(np.stack([model.by_head(f"blocks.{i}.hook_state", s.ssm[i]).norm(dim=-1).numpy()
                                   for i in range(model.n_layers)], axis=1))      # [M, layers, H]
        with torch.no_grad():
            _, state = model(segment, state)
    return np.stack(norms, axis=1)


@pytest.mark.parametrize("regime", ["tbtt", "state-passing"])
def test_reference_states_equal_chains_run_by_hand(model, reference_tokens, regime):
    from statelens.analysis.coverage import collect_reference

    sample = collect_reference(model, reference_tokens, regime=regime, train_len=TRAIN_LEN, chain=CHAIN,
                               stride=STRIDE, chunk=5)
    per_segment = TRAIN_LEN // STRIDE
    np.testing.assert_array_equal(sample.positions, [j * TRAIN_LEN + q for j in range(CHAIN)
                                                     for q in range(STRIDE, TRAIN_LEN + 1, STRIDE)])
    rows = np.arange(N)
    order = (lambda j: rows) if regime == "tbtt" else (lambda j: (rows + j) % N)
    np.testing.assert_allclose(sample.norms, _chain_by_hand(model, reference_tokens, order), rtol=1e-9)
    assert sample.states[0].shape[:2] == (N, CHAIN * per_segment)
    if regime == "tbtt":
        # TBTT = the rollout of the whole document from zero.
        direct = collect_states(model, reference_tokens[:, :CHAIN * TRAIN_LEN], positions=sample.positions.tolist())
        for i in range(model.n_layers):
            torch.testing.assert_close(sample.states[i], direct.states[i], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("regime", ["tbtt", "state-passing"])
def test_regime_reference_counts(model, sequences, reference_tokens, result, regime):
    per_head, per_bucket, summary = coverage(model, sequences, train_len=TRAIN_LEN, stride=STRIDE, chunk=64,
                                             regime=regime, chain=CHAIN, reference_sequences=reference_tokens)
    assert summary["regime"] == regime and result[2]["regime"] == "zero"
    assert (per_head.n_reference == N * CHAIN * (TRAIN_LEN // STRIDE)).all()
    # The query sets and the loss are those of the zero-state rollout, whatever the reference.
    pd.testing.assert_series_equal(per_head.n_query, result[0].n_query)
    pd.testing.assert_series_equal(per_bucket.loss, result[1].loss)
    assert per_head.oos_fraction.between(0, 1).all()
    with pytest.raises(ValueError, match="needs reference_sequences"):
        coverage(model, sequences, train_len=TRAIN_LEN, stride=STRIDE, regime=regime)
    with pytest.raises(ValueError, match="regime must be"):
        coverage(model, sequences, train_len=TRAIN_LEN, regime="noise")


def test_cli_regime_defaults_to_the_checkpoints_intervention(ckpt, tmp_path):
    pytest.importorskip("statelens.reports.figures")
    import shutil

    import typer
    from typer.testing import CliRunner

    from statelens.analysis.coverage import default_regime
    from statelens.analysis import analyses
    from statelens.cli.analysis import command as generated

    command = generated(analyses.get("coverage"))

    assert default_regime(ckpt) == "zero"                                # no statelens.json
    post = tmp_path / "post"
    shutil.copytree(ckpt, post)
    (post / "statelens.json").write_text("not json")
    assert default_regime(post) == "zero"
    (post / "statelens.json").write_text(json.dumps({"train_len": TRAIN_LEN, "intervention": "state-passing"}))
    assert default_regime(post) == "state-passing"
    (post / "statelens.json").write_text(json.dumps({"train_len": TRAIN_LEN, "intervention": "tbtt"}))
    assert default_regime(post) == "tbtt"

    app = typer.Typer()
    app.command()(command)
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["--ckpt", str(post), "--length", str(L), "--num-seqs", str(N), "--stride",
                                   str(STRIDE), "--chunk", "16", "--buckets", "4", "--chain", "2", "--out", str(out)])
    assert run.exit_code == 0, run.output
    saved = json.loads((out / "run.json").read_text())
    assert saved["results"]["regime"] == "tbtt"

    model = load_checkpoint(post).model
    drawn = np.random.default_rng(0).integers(0, 64, size=(2 * N, L), dtype=np.int64)
    per_head, _, _ = coverage(model, drawn[:N], train_len=TRAIN_LEN, stride=STRIDE, chunk=16, buckets=4,
                              regime="tbtt", chain=2, reference_sequences=drawn[N:, :2 * TRAIN_LEN])
    pd.testing.assert_frame_equal(pd.read_csv(out / "coverage.csv"), per_head, check_dtype=False, atol=1e-9)
    assert (per_head.n_reference == N * 2 * (TRAIN_LEN // STRIDE)).all()
