"""statelens.monitor.StateMonitor: every number against the same quantity computed another way (the
standalone analyses on the same weights, and brute-force transformers forwards), its out-of-support
reference refitted on schedule, the model's modes restored, the CSV resumable, bad input refused."""
from __future__ import annotations

import gc
import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import statelens
from conftest import hf_mamba2, run_cli, transformers
from statelens.analysis.collapse import collapse
from statelens.analysis.coverage import out_of_support
from statelens.analysis.positionwise import positionwise
from statelens.analysis.remembrance import remembrance
from statelens.analysis.states import state_stats
from statelens.errors import BadInput, ParameterError
from statelens.monitor import COLUMNS, StateMonitor, StateMonitorCallback, log_values

T, L, N = 16, 48, 3


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return hf_mamba2(tmp_path_factory.mktemp("monitor") / "ckpt")


@pytest.fixture(scope="module")
def probe():
    return np.random.default_rng(0).integers(0, 64, size=(N, L), dtype=np.int64)


def pick(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    return df[df.metric == metric].reset_index(drop=True)


def head_states(model, probe: np.ndarray, position: int) -> torch.Tensor:
    """[layers, N, heads, headdim * d_state]: each head's Mamba-2 state after probe[:, :position], from
    one forward of the model (no recorder, no rollout engine)."""
    with torch.no_grad():
        _, state = model(torch.as_tensor(probe[:, :position]))
    return torch.stack([s.flatten(2) for s in state.ssm])


def test_the_monitor_equals_the_standalone_analyses_and_brute_force(hf, probe):
    model = statelens.wrap(hf)
    df = StateMonitor(model, probe, train_len=T, every=1, effrem_ts=[2, 8])(7)
    assert list(df.columns) == COLUMNS and (df.step == 7).all()

    # loss: positionwise() one bucket per position, and one-shot transformers logits
    pw = positionwise(model, probe, buckets=L - 1, scale="linear")
    assert (pw.pos_end - pw.pos_start == 1).all()
    with torch.no_grad():
        logits = hf(torch.as_tensor(probe)).logits                                    # [N, L, vocab]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), torch.as_tensor(probe[:, 1:]),
                                            reduction="none").double().mean(0).numpy()   # [L - 1], p = 1 ..
    for metric, inside, brute in (("loss_in_context", pw.pos_start <= T, nll[:T]),
                                  ("loss_beyond", pw.pos_start > T, nll[T:])):
        value = pick(df, metric).value.item()
        assert value == pytest.approx(pw.loss[inside].mean(), rel=1e-6)
        assert value == pytest.approx(brute.mean(), rel=1e-5)

    # state norm and std ratios: state_stats() at [T, L], and the states of plain forwards
    stats = state_stats(model, probe, positions=[T, L])
    at = {p: stats[stats.position == p].reset_index(drop=True) for p in (T, L)}
    at_t, at_end = head_states(model, probe, T).double(), head_states(model, probe, L).double()
    for metric, column, statistic in (("state_norm_ratio", "norm", lambda s: s.norm(dim=-1)),
                                      ("state_std_ratio", "std", lambda s: s.std(dim=-1, unbiased=False))):
        rows = pick(df, metric)
        # the same statistics, read from a rollout cut at other positions: equal to float32 rounding
        np.testing.assert_allclose(rows.value, at[L][column] / at[T][column], rtol=1e-6)
        brute = (statistic(at_end).mean(1) / statistic(at_t).mean(1)).flatten().numpy()   # [layers * heads]
        np.testing.assert_allclose(rows.value, brute, rtol=1e-4)
        assert rows[["layer", "head"]].to_numpy().tolist() == at[T][["layer", "head"]].to_numpy().tolist()

    # collapsed heads: collapse() on those statistics, and "a norm or std ratio above k = 2" by hand
    heads = collapse(stats, T, k=2.0).sort_values(["layer", "head"], ignore_index=True)
    rows = pick(df, "state_collapsed")
    np.testing.assert_array_equal(rows.value, heads.collapsed.astype(float))
    by_hand = (pick(df, "state_norm_ratio").value > 2) | (pick(df, "state_std_ratio").value > 2)
    np.testing.assert_array_equal(rows.value, by_hand.astype(float))
    assert 0 < rows.value.sum() < len(rows)   # some heads collapse here, some do not

    # EffRem with horizon L: remembrance(), and TV of transformers' next-token distributions
    effrem = remembrance(model, probe, T=L, ts=[2, 8])
    rows = pick(df, "effrem")
    assert rows.t.tolist() == [2, 8]
    np.testing.assert_allclose(rows.value, effrem.effrem[effrem.t > 0], rtol=1e-12)
    with torch.no_grad():
        q = {t: torch.softmax(hf(torch.as_tensor(probe[:, t:])).logits[:, -1].double(), -1) for t in (0, 2, 8)}
    brute = [0.5 * (q[0] - q[t]).abs().sum(-1).mean().item() for t in (2, 8)]
    np.testing.assert_allclose(rows.value, brute, rtol=1e-3, atol=1e-6)
    assert rows.value.min() > 1e-6  # EffRem is not trivially 0 here

    # out of support: out_of_support() on states from plain forwards (stride T // 16 = 1: positions 1..T)
    reference = torch.stack([head_states(model, probe, p) for p in range(1, T + 1)], dim=2)  # [layers, N, T, H, d]
    rows = pick(df, "oos_fraction")
    expected = [out_of_support(reference[i, :, :, h].reshape(-1, reference.shape[-1]).numpy(),
                               at_end[i, :, h].numpy())["oos_fraction"]
                for i in range(reference.shape[0]) for h in range(reference.shape[3])]
    np.testing.assert_allclose(rows.value, expected)
    assert 0 < rows.value.mean() < 1  # some heads in, some out: the comparison is not between constants


def test_a_transformers_model_a_checkpoint_and_its_wrapper_give_the_same_rows(hf, probe, tmp_path):
    hf.save_pretrained(tmp_path / "again")
    frames = [StateMonitor(model, probe, train_len=T, every=1)(0) for model in (hf, statelens.wrap(hf),
                                                                               str(tmp_path / "again"))]
    for other in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], other, rtol=1e-6)
    assert pick(frames[0], "effrem").t.tolist() == [T // 8, T // 2]


def test_the_reference_is_refitted_every_n_calls_and_the_monitor_follows_the_training_weights(tmp_path, probe):
    hf = hf_mamba2(tmp_path / "ckpt", seed=3)
    monitor = StateMonitor(hf, probe, train_len=T, every=1, refit_every=2)
    model = statelens.wrap(hf)
    old = {p: head_states(model, probe, p) for p in (*range(1, T + 1), L)}
    first = pick(monitor(0), "oos_fraction")
    with torch.no_grad():  # a training step that moves the states: larger inputs to every SSM
        for layer in hf.backbone.layers:
            layer.mixer.in_proj.weight.mul_(1.5)
    new = {p: head_states(model, probe, p) for p in (*range(1, T + 1), L)}
    second, third = pick(monitor(1), "oos_fraction"), pick(monitor(2), "oos_fraction")

    def expected(ref: dict, query: torch.Tensor) -> list[float]:
        reference = torch.stack([ref[p] for p in range(1, T + 1)], dim=2)          # [layers, N, T, H, d]
        return [out_of_support(reference[i, :, :, h].reshape(-1, reference.shape[-1]).numpy(),
                               query[i, :, h].numpy())["oos_fraction"]
                for i in range(reference.shape[0]) for h in range(reference.shape[3])]

    np.testing.assert_allclose(first.value, expected(old, old[L]))
    np.testing.assert_allclose(second.value, expected(old, new[L]))   # call 1: the support of call 0
    np.testing.assert_allclose(third.value, expected(new, new[L]))    # call 2: refitted
    assert not np.allclose(second.value, third.value)                 # the two references differ here


def test_eval_mode_and_no_gradients_during_a_call_and_each_module_mode_restored_after(hf, probe):
    model = statelens.wrap(hf)   # a statelens model is run as it is: its own modules are seen
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    try:
        for source in (hf, model):
            source.train()
            list(source.children())[0].eval()   # a mixed state, as a trainer may leave it
            modes = {name: m.training for name, m in source.named_modules()}
            assert any(modes.values()) and not all(modes.values())
            StateMonitor(source, probe, train_len=T, every=1)(0)
            assert {name: m.training for name, m in source.named_modules()} == modes
    finally:
        hook.remove()
        hf.eval()
        model.eval()
    assert seen and set(seen) == {(False, False)}
    assert all(p.grad is None for p in hf.parameters())


def test_step_runs_at_the_cadence_and_appends_a_csv_that_a_rerun_resumes(hf, probe, tmp_path):
    out = tmp_path / "monitor.csv"
    monitor = StateMonitor(hf, probe, train_len=T, every=2, out=out)
    assert monitor.step(1).empty and not out.exists()
    written = {s: monitor.step(s) for s in (0, 1, 2, 3, 4)}
    assert [s for s, df in written.items() if len(df)] == [0, 2, 4]
    csv = pd.read_csv(out)
    assert list(csv.columns) == COLUMNS and sorted(set(csv.step)) == [0, 2, 4]
    expected = pd.concat([written[s] for s in (0, 2, 4)], ignore_index=True)
    pd.testing.assert_frame_equal(csv, expected, check_dtype=False)
    rerun = monitor.step(2)   # resumed from step 2: the rows of steps 2 and 4 go, the new step 2 stays
    csv = pd.read_csv(out)
    assert sorted(set(csv.step)) == [0, 2]
    pd.testing.assert_frame_equal(csv, pd.concat([written[0], rerun], ignore_index=True), check_dtype=False)


def live_objects() -> tuple[int, int, int]:
    """How many torch tensors, numpy arrays and DataFrames are alive now."""
    gc.collect()
    with warnings.catch_warnings():   # isinstance on torch's deprecated aliases warns
        warnings.simplefilter("ignore")
        return tuple(sum(isinstance(o, kind) for o in gc.get_objects())
                     for kind in (torch.Tensor, np.ndarray, pd.DataFrame))


def test_the_monitor_keeps_nothing_per_call(hf, probe):
    """After two calls (caches warm), four more leave as many tensors, arrays and tables alive, and
    Python's traced memory within 256 KiB (one call's rows and states would be more each)."""
    monitor = StateMonitor(hf, probe, train_len=T, every=1, refit_every=1)
    tracemalloc.start()
    try:
        for step in range(2):
            monitor(step)
        before, traced = live_objects(), tracemalloc.get_traced_memory()[0]
        for step in range(2, 6):
            monitor(step)
        after, grown = live_objects(), tracemalloc.get_traced_memory()[0] - traced
    finally:
        tracemalloc.stop()
    assert after == before and grown < 256 * 1024 and monitor.calls == 6


@pytest.mark.parametrize("kwargs, parameter, words", [
    ({"train_len": 25}, "probe", "fewer than 2 x train_len = 50"),
    ({"every": 0}, "every", "every must be a positive integer, got 0"),
    ({"effrem_ts": [0, 8]}, "effrem_ts", "must lie in [1, 47]"),
    ({"probe": np.zeros((2, 48))}, "probe", "probe must be an int array"),
], ids=["short-probe", "cadence-0", "effrem-t-0", "float-probe"])
def test_bad_input_is_refused_at_construction(hf, probe, kwargs, parameter, words):
    args = {"train_len": T, "every": 10, "probe": probe} | kwargs
    with pytest.raises(ParameterError) as info:
        StateMonitor(hf, args.pop("probe"), **args)
    assert info.value.parameter == parameter and words in str(info.value) and "\n" not in str(info.value)


def test_a_model_it_cannot_carry_state_for_is_refused_at_construction(probe):
    with pytest.raises(BadInput, match="not a model statelens can wrap"):
        StateMonitor(torch.nn.Linear(2, 2), probe, train_len=T)


def train_tiny(hf, tmp_path, callbacks, steps: int = 4):
    """``steps`` AdamW steps of transformers' Trainer on CPU over random T-token rows, batch 2."""
    rows = np.random.default_rng(5).integers(0, 64, size=(2 * steps, T))
    data = [{"input_ids": torch.as_tensor(r), "labels": torch.as_tensor(r)} for r in rows]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps,
                                          per_device_train_batch_size=2, learning_rate=2e-2, logging_steps=1000,
                                          report_to="none", use_cpu=True, save_strategy="no", seed=0,
                                          disable_tqdm=True)
    return transformers.Trainer(model=hf, args=args, train_dataset=data, callbacks=callbacks)


def test_the_trainer_callback_logs_the_monitor_through_the_trainers_log(tmp_path, probe):
    hf = hf_mamba2(tmp_path / "ckpt", seed=2)
    start = log_values(StateMonitor(hf, probe, train_len=T, every=1)(0))       # the weights before training
    seen = []

    class Logger(transformers.TrainerCallback):   # what TensorBoard / W&B callbacks are handed
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    # refit_every=1: each call's out-of-support reference is its own, as a fresh monitor's is
    monitor = StateMonitor(hf, probe, train_len=T, every=2, out=tmp_path / "monitor.csv", refit_every=1)
    trainer = train_tiny(hf, tmp_path, [Logger()])
    StateMonitorCallback(monitor, trainer)
    trainer.train()
    end = log_values(StateMonitor(hf, probe, train_len=T, every=1)(4))         # the weights after it

    logged = [entry for entry in trainer.state.log_history if "statelens/loss_in_context" in entry]
    assert [entry["step"] for entry in logged] == [0, 2, 4]
    assert [e for e in seen if "statelens/loss_in_context" in e] == [{k: v for k, v in e.items() if k != "step"}
                                                                     for e in logged]
    for entry, expected in ((logged[0], start), (logged[-1], end)):
        assert set(expected) <= set(entry) and len(expected) == 2 + 3 * 16 + 2 + 16
        np.testing.assert_allclose([entry[k] for k in expected], list(expected.values()), rtol=1e-6)
    assert end["statelens/loss_in_context"] < start["statelens/loss_in_context"] - 0.05   # it trained
    csv = pd.read_csv(tmp_path / "monitor.csv")
    for entry in logged:
        rows = csv[csv.step == entry["step"]].reset_index(drop=True)
        np.testing.assert_allclose(list(log_values(rows).values()), [entry[k] for k in log_values(rows)])


def test_the_trainer_callback_without_its_trainer_is_refused_before_the_first_step(hf, probe, tmp_path):
    monitor = StateMonitor(hf, probe, train_len=T, every=1)
    trainer = train_tiny(hf, tmp_path, [StateMonitorCallback(monitor)], steps=1)
    with pytest.raises(ParameterError, match="no Trainer to log through"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_the_monitor_during_posttrain_equals_the_commands_on_the_saved_checkpoint(tmp_path, probe, monkeypatch, capsys):
    """The issue's check: post-train with the monitor, then run `statelens perplexity`, `states` and
    `remembrance` on the checkpoint saved at the last monitored step, on the probe (a 2-D .npy)."""
    from statelens.models import load_checkpoint
    from statelens.train import posttrain

    hf_mamba2(tmp_path / "base", seed=4)
    tokens = np.random.default_rng(6).integers(0, 64, size=(8, T), dtype=np.int64)
    posttrain(load_checkpoint(tmp_path / "base"), tokens, intervention="state-passing", steps=4, seq_len=T, batch=2,
              lr=3e-3, warmup=1, save_every=4, monitor_every=2, monitor_probe=probe, out=tmp_path / "run")
    rows = pd.read_csv(tmp_path / "run" / "monitor.csv").query("step == 4").reset_index(drop=True)
    np.save(tmp_path / "probe.npy", probe)
    common = ["--ckpt", tmp_path / "run", "--data", tmp_path / "probe.npy", "--num-seqs", N, "--group", N]
    for command, extra in (("perplexity", ["--length", L, "--buckets", L - 1, "--scale", "linear"]),
                           ("states", ["--length", L, "--stride", T]),
                           ("remembrance", ["--T", L, "--t", f"{T // 8},{T // 2}"])):
        code, _, err = run_cli(monkeypatch, capsys, command, *common, *extra, "--out", tmp_path / command)
        assert code == 0, err

    pw = pd.read_csv(tmp_path / "perplexity" / "positionwise.csv")
    assert pick(rows, "loss_in_context").value.item() == pytest.approx(pw.loss[pw.pos_start <= T].mean(), rel=1e-6)
    assert pick(rows, "loss_beyond").value.item() == pytest.approx(pw.loss[pw.pos_start > T].mean(), rel=1e-6)
    stats = pd.read_csv(tmp_path / "states" / "state_stats.csv")
    at = {p: stats[stats.position == p].reset_index(drop=True) for p in (T, L)}
    for metric, column in (("state_norm_ratio", "norm"), ("state_std_ratio", "std")):
        np.testing.assert_allclose(pick(rows, metric).value, at[L][column] / at[T][column], rtol=1e-6)
    heads = pd.read_csv(tmp_path / "states" / "collapse.csv").sort_values(["layer", "head"], ignore_index=True)
    np.testing.assert_array_equal(pick(rows, "state_collapsed").value, heads.collapsed.astype(float))
    effrem = pd.read_csv(tmp_path / "remembrance" / "remembrance.csv")
    np.testing.assert_allclose(pick(rows, "effrem").value, effrem.effrem[effrem.t > 0], rtol=1e-6)
    assert pick(rows, "effrem").t.tolist() == [T // 8, T // 2]


def test_the_lightning_callback_logs_the_monitor_to_the_trainers_loggers(tmp_path, probe):
    """Four optimizer steps of a Lightning Trainer on CPU, two batches each (gradient accumulation): the
    CSV logger gets the monitor's values once at steps 0, 2 and 4, equal to fresh monitors on the weights
    before and after training."""
    pl = pytest.importorskip("lightning.pytorch", reason="Lightning is optional (pip install lightning)")
    from statelens.monitor import StateMonitorLightningCallback

    model = statelens.wrap(hf_mamba2(tmp_path / "ckpt", seed=7))

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model.train()

        def training_step(self, batch, batch_idx):
            tokens = batch[0]                                                       # [2, T]
            logits, _ = self.model(tokens)
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=2e-2)

    start = log_values(StateMonitor(model, probe, train_len=T, every=1)(0))
    rows = torch.as_tensor(np.random.default_rng(5).integers(0, 64, size=(16, T)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows), batch_size=2)
    monitor = StateMonitor(model, probe, train_len=T, every=2, refit_every=1)
    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                         logger=pl.loggers.CSVLogger(tmp_path / "logs"), callbacks=[StateMonitorLightningCallback(monitor)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    trainer.fit(Module(), loader)
    end = log_values(StateMonitor(model, probe, train_len=T, every=1)(4))

    logged = pd.read_csv(trainer.logger.log_dir + "/metrics.csv")
    logged = logged[logged["statelens/loss_in_context"].notna()]
    assert logged.step.tolist() == [0, 2, 4]
    for step, expected in ((0, start), (4, end)):
        row = logged[logged.step == step].iloc[0]
        np.testing.assert_allclose([row[k] for k in expected], list(expected.values()), rtol=1e-6)
    assert abs(end["statelens/loss_in_context"] - start["statelens/loss_in_context"]) > 0.01   # the weights moved
    assert model.training   # the monitor left the module in training mode


def test_the_report_draws_a_during_training_section_from_a_monitor_csv(tmp_path, probe):
    """A folder holding monitor.csv gives the report a "During training" figure whose curves are the CSV's
    numbers reduced by hand: the loss gap, the worst head's norm ratio, EffRem per t, the mean oos."""
    from statelens.reports.html import load_results, render
    from statelens.reports.page_figures import monitor_figures

    hf = hf_mamba2(tmp_path / "ckpt", seed=8)
    (tmp_path / "run").mkdir()
    monitor = StateMonitor(hf, probe, train_len=T, every=1, out=tmp_path / "run" / "monitor.csv")
    monitor.step(0)
    with torch.no_grad():
        for layer in hf.backbone.layers:
            layer.mixer.in_proj.weight.mul_(1.3)
    monitor.step(3)
    csv = pd.read_csv(tmp_path / "run" / "monitor.csv")

    def value(step: int, metric: str, **where) -> pd.Series:
        rows = csv[(csv.step == step) & (csv.metric == metric)]
        for column, wanted in where.items():
            rows = rows[rows[column] == wanted]
        return rows.value

    expected = {"loss_gap": [value(s, "loss_beyond").item() - value(s, "loss_in_context").item() for s in (0, 3)],
                "norm_ratio": [value(s, "state_norm_ratio").max() for s in (0, 3)],
                "oos": [value(s, "oos_fraction").mean() for s in (0, 3)]}
    expected |= {f"effrem t={t}": [value(s, "effrem", t=t).item() for s in (0, 3)] for t in (T // 8, T // 2)}
    results = load_results(tmp_path / "run")
    (shown,) = monitor_figures([results], ["post"])
    drawn = {line.get_gid().removeprefix("monitor "): line for ax in shown["figure"].axes for line in ax.lines
             if (line.get_gid() or "").startswith("monitor ")}
    assert sorted(drawn) == sorted(expected)
    for name, values in expected.items():
        assert list(drawn[name].get_xdata()) == [0, 3]
        np.testing.assert_allclose(drawn[name].get_ydata(), values, rtol=1e-12)
    assert not np.allclose(*expected["norm_ratio"])   # the two steps differ: the curve is not flat
    html = render([results], ["post"])
    assert "During training" in html and 'id="fig-monitor"' in html
