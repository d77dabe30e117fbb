"""Post-training: the samplers' statistics and wiring, TBTT's loader, the loop, its outputs and resume."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import hf_mamba2
from statelens.errors import BadInput
from statelens.interventions import FittedNoise, RandomNoise, StatePassing, ZeroState, tbtt_batches
from statelens.models import load_checkpoint
from statelens.train import posttrain

SEQ_LEN, BATCH = 32, 2


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_mamba2(path, vocab=64)
    return path


def data(n=8, length=4 * SEQ_LEN, seed=0):
    return np.random.default_rng(seed).integers(0, 64, size=(n, length), dtype=np.int64)


def test_loss_decreases_on_a_repeated_batch(ckpt_dir, tmp_path):
    ckpt = load_checkpoint(ckpt_dir)
    fixed = data(n=BATCH, length=SEQ_LEN)  # one batch: every step sees the same tokens
    log = posttrain(ckpt, fixed, intervention="none", steps=8, seq_len=SEQ_LEN, batch=BATCH, lr=3e-3, warmup=1,
                    seed=0, save_every=8, out=tmp_path / "run")
    assert len(log) == 8
    assert log.loss.iloc[-1] < log.loss.iloc[0] - 0.05


def test_state_passing_returns_previous_final_state_detached(ckpt_dir):
    model = load_checkpoint(ckpt_dir).model
    sampler = StatePassing(model)
    first = sampler.sample(BATCH)
    for a, b in zip(first.ssm + first.conv, ZeroState(model).sample(BATCH).ssm + ZeroState(model).sample(BATCH).conv):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    tokens = torch.as_tensor(data(n=BATCH, length=SEQ_LEN))
    _, final = model(tokens, first)
    assert final.ssm[0].requires_grad  # the model's output carries a graph; the sampler's must not
    sampler.update(final)
    nxt = sampler.sample(BATCH)
    for got, want in zip(nxt.ssm + nxt.conv, final.ssm + final.conv):
        assert not got.requires_grad and got.grad_fn is None
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    no_conv = StatePassing(model, pass_conv=False)
    no_conv.update(final)
    assert all(bool((c == 0).all()) for c in no_conv.sample(BATCH).conv)


def test_no_gradient_crosses_batches(ckpt_dir):
    model = load_checkpoint(ckpt_dir).model
    sampler = StatePassing(model)
    tokens = torch.as_tensor(data(n=BATCH, length=SEQ_LEN))
    _, final = model(tokens, sampler.sample(BATCH))
    sampler.update(final)
    state0 = sampler.sample(BATCH)
    logits, _ = model(tokens, state0)
    logits.sum().backward()  # would fail ("backward through the graph a second time") if the graph were kept
    assert all(t.grad is None for t in state0.ssm)


def test_tbtt_batches_continue_documents():
    docs = data(n=BATCH, length=3 * SEQ_LEN + 5)
    gen = tbtt_batches(docs, BATCH, SEQ_LEN)
    for k in range(3):
        rows, new = next(gen)
        assert new == (k == 0)
        np.testing.assert_array_equal(rows, docs[:, k * SEQ_LEN:(k + 1) * SEQ_LEN])
    rows, new = next(gen)  # documents exhausted: start again, state reset
    assert new
    np.testing.assert_array_equal(rows, docs[:, :SEQ_LEN])


def test_fitted_noise_matches_numpy(ckpt_dir, tmp_path):
    model = load_checkpoint(ckpt_dir).model
    seqs = data(n=5, length=SEQ_LEN)
    fitted = FittedNoise.fit(model, seqs, SEQ_LEN, seed=0, batch=2)
    with torch.no_grad():
        _, final = model(torch.as_tensor(seqs))
    for layer, s in enumerate(final.ssm):
        heads = s.double().numpy().reshape(5, model.n_heads, -1)           # [n, H, k]
        np.testing.assert_allclose(fitted.mean[layer].numpy(), heads.mean(axis=(0, 2)), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fitted.std[layer].numpy(), heads.std(axis=(0, 2)), rtol=1e-10, atol=1e-12)
    for path in (tmp_path / "f.safetensors", tmp_path / "f.json"):
        fitted.save(path)
        back = FittedNoise.load(path, model)
        torch.testing.assert_close(back.mean, fitted.mean)
        torch.testing.assert_close(back.std, fitted.std)
    # A large sample follows the fitted per-head statistics.
    sample = fitted.sample(400)
    got = sample.ssm[1].double().reshape(400, model.n_heads, -1)
    torch.testing.assert_close(got.mean(dim=(0, 2)), fitted.mean[1], atol=0.05 * fitted.std[1].max().item(), rtol=0)
    torch.testing.assert_close(got.std(dim=(0, 2)), fitted.std[1], rtol=0.05, atol=1e-6)
    assert all(bool((c == 0).all()) for c in sample.conv)


def test_random_noise_has_requested_statistics(ckpt_dir):
    model = load_checkpoint(ckpt_dir).model
    state = RandomNoise(model, mean=0.5, std=2.0, seed=3).sample(64)
    values = torch.cat([s.flatten() for s in state.ssm]).double()
    assert abs(values.mean().item() - 0.5) < 0.02
    assert abs(values.std().item() - 2.0) < 0.02
    assert all(bool((c == 0).all()) for c in state.conv)
    with_conv = RandomNoise(model, mean=0.0, std=1.0, seed=3, pass_conv=True).sample(4)
    assert all(c.std() > 0.5 for c in with_conv.conv)


@pytest.mark.parametrize("intervention", ["state-passing", "tbtt", "fitted-noise"])
def test_resume_equals_uninterrupted(ckpt_dir, tmp_path, intervention):
    kwargs = dict(intervention=intervention, steps=6, seq_len=SEQ_LEN, batch=BATCH, lr=1e-3, warmup=2, seed=1,
                  save_every=3)
    whole = load_checkpoint(ckpt_dir)
    posttrain(whole, data(), out=tmp_path / "whole", **kwargs)

    class Interrupted(Exception):
        pass

    done = []

    def stop_after_three(n):
        done.append(n)
        if len(done) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        posttrain(load_checkpoint(ckpt_dir), data(), out=tmp_path / "split", progress=stop_after_three, **kwargs)
    assert json.loads((tmp_path / "split" / "statelens.json").read_text())["steps"] == 3
    resumed = load_checkpoint(ckpt_dir)
    log = posttrain(resumed, data(), out=tmp_path / "split", resume=True, **kwargs)
    assert list(log.step) == [1, 2, 3, 4, 5, 6]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "train_log.csv"),
                                  pd.read_csv(tmp_path / "split" / "train_log.csv"))


def test_outputs_reload(ckpt_dir, tmp_path):
    ckpt = load_checkpoint(ckpt_dir)
    out = tmp_path / "run"
    posttrain(ckpt, data(), intervention="noise", steps=4, seq_len=SEQ_LEN, batch=BATCH, lr=1e-3, warmup=1,
              noise_std=0.1, save_every=3, out=out)
    back = load_checkpoint(out)
    assert back.format == ckpt.format
    for (name, a), b in zip(ckpt.model.state_dict().items(), back.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    meta = json.loads((out / "statelens.json").read_text())
    assert meta["train_len"] == SEQ_LEN and meta["intervention"] == "noise" and meta["steps"] == 4
    log = pd.read_csv(out / "train_log.csv")
    assert list(log.columns) == ["step", "loss", "lr", "grad_norm", "mean_state_norm"]
    assert list(log.step) == [1, 2, 3, 4]
    assert np.isfinite(log.drop(columns="step").to_numpy()).all()
    assert (log.mean_state_norm > 0).all()
    assert json.loads((out / "run.json").read_text())["config"]["intervention"] == "noise"


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"),
    (dict(intervention="bogus"), "unknown intervention"),
    (dict(seq_len=10 * SEQ_LEN), "longer than the documents"),
    (dict(batch=100), "too small"),
])
def test_bad_input(ckpt_dir, tmp_path, kwargs, match):
    args = dict(intervention="none", steps=2, seq_len=SEQ_LEN, batch=BATCH, out=tmp_path / "run") | kwargs
    with pytest.raises(BadInput, match=match):
        posttrain(load_checkpoint(ckpt_dir), data(), **args)


def cli(*args):
    """``statelens posttrain ARGS`` through typer (cli/main.py wires the command; its error policy maps
    BadInput to exit 2)."""
    import typer
    from typer.testing import CliRunner

    from statelens.cli.posttrain import posttrain as command

    app = typer.Typer()
    app.command()(command)
    app.command("unused")(lambda: None)  # two commands, so the command's name is the first argument
    return CliRunner().invoke(app, ["posttrain", *map(str, args)])


def test_cli_writes_a_checkpoint(ckpt_dir, tmp_path):
    out = tmp_path / "run"
    result = cli("--ckpt", ckpt_dir, "--intervention", "tbtt", "--steps", 3, "--seq-len", SEQ_LEN, "--batch", BATCH,
                 "--warmup", 1, "--save-every", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "statelens.json").read_text())["train_len"] == SEQ_LEN
    assert len(pd.read_csv(out / "train_log.csv")) == 3
    assert json.loads((out / "run.json").read_text())["results"]["final_loss"] > 0
    load_checkpoint(out)


@pytest.mark.parametrize("args", [("--steps", 0), ("--intervention", "bogus")])
def test_cli_bad_input(ckpt_dir, tmp_path, args):
    result = cli("--ckpt", ckpt_dir, "--out", tmp_path / "run", *args)
    assert result.exit_code != 0
    if args[0] == "--steps":
        assert isinstance(result.exception, BadInput) and "--steps" in str(result.exception)
    else:
        assert result.exit_code == 2 and "bogus" in result.output


def test_corrupt_resume_file_is_bad_input(ckpt_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "resume.pt").write_bytes(b"not a torch file")
    with pytest.raises(BadInput, match="cannot resume"):
        posttrain(load_checkpoint(ckpt_dir), data(), intervention="none", steps=2, seq_len=SEQ_LEN, batch=BATCH,
                  out=out, resume=True)


def test_the_monitor_measures_the_training_weights_without_changing_the_training(ckpt_dir, tmp_path):
    """monitor.csv at steps 0, 2, 4 equals a fresh StateMonitor on the weights before and after training
    (the checkpoint it saves), and the run's weights and log equal those of the same run unmonitored."""
    from statelens.monitor import StateMonitor

    probe = data(n=3, length=2 * SEQ_LEN, seed=9)
    kwargs = dict(intervention="state-passing", steps=4, seq_len=SEQ_LEN, batch=BATCH, lr=3e-3, warmup=1, seed=0,
                  save_every=4)
    before = StateMonitor(load_checkpoint(ckpt_dir).model, probe, train_len=SEQ_LEN, every=1)(0)
    plain, watched = load_checkpoint(ckpt_dir), load_checkpoint(ckpt_dir)
    log = posttrain(plain, data(), out=tmp_path / "plain", **kwargs)
    watched_log = posttrain(watched, data(), out=tmp_path / "run", monitor_every=2, monitor_probe=probe, **kwargs)
    pd.testing.assert_frame_equal(log, watched_log)
    for (name, a), b in zip(plain.model.state_dict().items(), watched.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    csv = pd.read_csv(tmp_path / "run" / "monitor.csv")
    assert sorted(set(csv.step)) == [0, 2, 4] and (tmp_path / "run" / "train_log.csv").is_file()
    after = StateMonitor(load_checkpoint(tmp_path / "run").model, probe, train_len=SEQ_LEN, every=1)(4)
    at = {s: csv[csv.step == s].reset_index(drop=True) for s in (0, 4)}
    np.testing.assert_allclose(at[0].value, before.value, rtol=1e-6)
    same_reference = after.metric != "oos_fraction"   # at step 4 the monitor's reference is still step 0's
    np.testing.assert_allclose(at[4].value[same_reference], after.value[same_reference], rtol=1e-6)
    assert not np.allclose(at[4].value, at[0].value)  # it trained, and the monitor saw it


def test_cli_monitor_every_writes_monitor_csv_beside_train_log(ckpt_dir, tmp_path):
    out = tmp_path / "run"
    result = cli("--ckpt", ckpt_dir, "--intervention", "none", "--steps", 2, "--seq-len", SEQ_LEN, "--batch", BATCH,
                 "--warmup", 1, "--monitor-every", 2, "--monitor-seqs", 2, "--out", out)
    assert result.exit_code == 0, result.output
    csv = pd.read_csv(out / "monitor.csv")
    assert list(csv.columns) == ["step", "metric", "layer", "head", "t", "value"]
    assert sorted(set(csv.step)) == [0, 2] and len(pd.read_csv(out / "train_log.csv")) == 2
    assert set(csv.metric) == {"loss_in_context", "loss_beyond", "state_norm_ratio", "state_std_ratio",
                               "state_collapsed", "effrem", "oos_fraction"}
    assert sorted(csv[csv.metric == "effrem"].t.unique()) == [SEQ_LEN // 8, SEQ_LEN // 2]
    assert json.loads((out / "run.json").read_text())["config"]["monitor_length"] == 4 * SEQ_LEN


@pytest.mark.parametrize("args, words", [
    (("--monitor-every", 2, "--monitor-length", SEQ_LEN), f"--monitor-length {SEQ_LEN} must be at least 2 x"),
    (("--monitor-every", -1), "--monitor-every must be an integer >= 0, got -1"),
], ids=["short-probe", "negative-cadence"])
def test_cli_monitor_bad_input(ckpt_dir, tmp_path, args, words):
    result = cli("--ckpt", ckpt_dir, "--steps", 2, "--seq-len", SEQ_LEN, "--batch", BATCH, "--out", tmp_path / "run",
                 *args)
    assert isinstance(result.exception, BadInput) and words in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_cli_monitor_data_is_the_probe_measured_at_step_0(ckpt_dir, tmp_path):
    """--monitor-data PROBE.npy ([n, L] exactly as asked): the step-0 rows equal a fresh StateMonitor on the
    checkpoint before training with that probe."""
    from statelens.monitor import StateMonitor

    probe = data(n=2, length=3 * SEQ_LEN, seed=11)
    np.save(tmp_path / "probe.npy", probe)
    out = tmp_path / "run"
    result = cli("--ckpt", ckpt_dir, "--intervention", "none", "--steps", 2, "--seq-len", SEQ_LEN, "--batch", BATCH,
                 "--warmup", 1, "--monitor-every", 2, "--monitor-data", tmp_path / "probe.npy", "--monitor-seqs", 2,
                 "--monitor-length", 3 * SEQ_LEN, "--out", out)
    assert result.exit_code == 0, result.output
    csv = pd.read_csv(out / "monitor.csv")
    expected = StateMonitor(load_checkpoint(ckpt_dir).model, probe, train_len=SEQ_LEN, every=1)(0)
    np.testing.assert_allclose(csv[csv.step == 0].value, expected.value, rtol=1e-6)
