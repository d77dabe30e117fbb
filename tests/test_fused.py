"""The compiled fast path of the Mamba-2 mixer (statelens.models.fused, ``--compile``) against the eager
reference: the same logits, states and block states to float rounding, on configurations that exercise every
branch of the mixer, and the same CSVs from the CLI within the README's determinism tolerance."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from statelens.models import Mamba2Config, Mamba2LM, fused
from statelens.models.hooks import hooks
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(not fused.compiler_available(), reason="torch.compile's CPU backend needs a C++ "
                                "compiler")

CONFIGS = {  # every branch of the mixer, each switch away from its default in one of the two (the other tests: defaults)
    "grouped-norm-before-gate": dict(ngroups=2, norm_before_gate=True),
    "mlp-D-per-channel-dt-limits-no-norm": dict(d_ssm=64, D_has_hdim=True, dt_limit=(0.01, 0.5), rmsnorm=False),
}


def model(**options) -> Mamba2LM:
    """A random 2-layer Mamba-2 with decays spread as in trained models (dt_bias, A_log not at zero), but for one
    head of layer 0 that forgets at every token: its A_log of 1000 is past even float64's exp range, so A = -inf
    and its decay is 0, which the compiled path's segment sums (differences of cumsums) must keep at 0, as the
    eager masked cumsum does, not turn into inf - inf."""
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=50, d_state=16, headdim=16, chunk_size=16, **options)
    m = Mamba2LM(cfg).eval()
    with torch.no_grad():
        for block in m.blocks:
            block.mixer.dt_bias.normal_(-2.0, 1.0)
            block.mixer.A_log.uniform_(0.0, 2.5)
            block.mixer.D.normal_()
        m.blocks[0].mixer.A_log[0] = 1000.0
    return m


def run(m: Mamba2LM, x: torch.Tensor, state, mode: str):
    """Logits [b, l, V], final states and the block states layer 1's hook saw."""
    seen = []
    with torch.inference_mode(), fused.mode(mode), hooks(m, {"blocks.1.hook_state_blocks":
                                                             lambda t, hook: seen.append(t.clone())}):
        logits, final = m(x, state)
    return logits, final, seen[0]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_path_equals_eager(name, compiled_calls):
    """Two rows of 1100 tokens (four full pieces of 256 and an eager tail of 76) from a nonzero state: logits
    within 2e-6 of the logit scale (float32 rounding; the backends' tolerance is 1e-4), states and block states
    within 1e-5 relative."""
    m = model(**CONFIGS[name])
    x = torch.randint(0, 50, (2, 1100), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, state = m(x[:, :37], m.zero_state(2))                      # an arbitrary, nonzero starting state
    eager, eager_state, eager_blocks = run(m, x, state, "off")
    assert not compiled_calls
    fast, fast_state, fast_blocks = run(m, x, state, "on")
    piece = fused.piece_length(2, m.blocks[0].mixer.ssd_block)                  # 512 tokens over 2 rows
    assert compiled_calls == [torch.Size([2, piece, 64])] * (1100 // piece) * 2  # 2 layers; the tail runs eager
    assert set(compiled_calls.classes) == {"Block"}                               # norm, mixer, residual add
    assert torch.isfinite(eager).all() and (fast - eager).abs().max() <= 2e-6 * eager.abs().max()
    for mine, theirs in [*zip(fast_state.ssm + fast_state.conv, eager_state.ssm + eager_state.conv),
                         (fast_blocks, eager_blocks)]:
        assert mine.shape == theirs.shape
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_compiled_path_in_float64_is_the_reference_to_rounding(compiled_calls):
    m = model(ngroups=2).double()
    x = torch.randint(0, 50, (1, 600), generator=torch.Generator().manual_seed(2))
    eager, eager_state, _ = run(m, x, m.zero_state(1), "off")
    fast, fast_state, _ = run(m, x, m.zero_state(1), "on")
    assert compiled_calls and (fast - eager).abs().max() <= 1e-13 * eager.abs().max()
    assert (fast_state.ssm[1] - eager_state.ssm[1]).abs().max() <= 1e-13 * eager_state.ssm[1].abs().max()


def test_hooks_on_the_scan_inputs_and_gradients_keep_the_eager_path(compiled_calls):
    """A hook on a layer's x, or a gradient, needs the eager path's intermediates: that layer, or that call,
    does not compile. A hook on a layer's output (hook_out) keeps that layer's norm and residual add out of the
    graph: the mixer alone compiles, and the hook sees its whole output, as eager."""
    m = model()
    x = torch.randint(0, 50, (1, 600))
    seen = {}
    with fused.mode("on"):
        for mode in ("off", "on"):
            with torch.inference_mode(), fused.mode(mode), hooks(m, {
                    "blocks.0.hook_x": lambda t, hook: t,
                    "blocks.1.hook_out": lambda t, hook, mode=mode: seen.setdefault(mode, t.clone())}):
                seen[mode, "logits"] = m(x, m.zero_state(1))[0]
        assert compiled_calls == [torch.Size([1, 512, 64])]              # layer 1 only: layer 0's x is hooked
        assert compiled_calls.classes == ["Mamba2Mixer"]                 # layer 1's output is hooked
        assert seen["on"].shape == (1, 600, 64)
        assert (seen["on"] - seen["off"]).abs().max() <= 1e-5 * seen["off"].abs().max()
        assert (seen["on", "logits"] - seen["off", "logits"]).abs().max() <= 2e-6 * seen["off", "logits"].abs().max()
        m(x, m.zero_state(1))[0].sum().backward()
    assert len(compiled_calls) == 1


def test_a_torch_hook_on_the_mixer_sees_its_whole_call(compiled_calls):
    """A forward hook registered with torch on a layer's mixer module fires once, on the mixer's whole output, under
    --compile as eager: that layer's mixer compiles alone, outside its block's graph."""
    m = model()
    x = torch.randint(0, 50, (1, 600))
    seen = {}
    for mode in ("off", "on"):
        handle = m.blocks[1].mixer.register_forward_hook(
            lambda module, args, out, mode=mode: seen.setdefault(mode, []).append(out[0].clone()))
        with torch.inference_mode(), fused.mode(mode):
            m(x, m.zero_state(1))
        handle.remove()
    assert [t.shape for t in seen["on"]] == [(1, 600, 64)] and len(seen["off"]) == 1
    assert (seen["on"][0] - seen["off"][0]).abs().max() <= 1e-5 * seen["off"][0].abs().max()
    assert compiled_calls.classes == ["Block", "Mamba2Mixer"]               # layer 0 whole, layer 1's mixer alone


def test_auto_resolves_on_the_work_not_the_clock():
    """auto: on from 2 x parameters x tokens >= 1.2e13 FLOPs (a 130M model over 8 sequences of 8192 tokens: 1.7e13),
    off for the demo's 2-layer model at any length a command would use."""
    assert fused.resolve("auto", 130_000_000, 8 * 8192) == "on"
    assert fused.resolve("auto", 130_000_000, 8 * 2048) == "off"          # 4.3e12
    assert fused.resolve("auto", 500_000, 1_000_000) == "off"
    assert fused.resolve("on", 1, 1) == "on" and fused.resolve("off", 10**12, 10**9) == "off"


def test_without_a_compiler_auto_is_off_and_on_is_refused(monkeypatch, tmp_path, capsys):
    from statelens.demo import BASELINE

    monkeypatch.setenv("PATH", str(tmp_path))                             # no g++, c++ nor clang++ there
    monkeypatch.delenv("CXX", raising=False)
    assert fused.resolve("auto", 130_000_000, 8 * 8192) == "off"
    code, out, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", BASELINE, "--compile", "on", "--out",
                             tmp_path / "out")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1 and "C++ compiler" in err
    assert not (tmp_path / "out").exists()


def test_cli_compile_on_gives_the_eager_csvs(tmp_path, monkeypatch, capsys, compiled_calls):
    """perplexity and states on the demo baseline, --compile on against off (see the helper below)."""
    from statelens.demo import BASELINE

    assert_cli_compile_on_gives_the_eager_csvs(BASELINE, tmp_path, monkeypatch, capsys, "--train-len", 256)
    assert compiled_calls


def assert_cli_compile_on_gives_the_eager_csvs(ckpt, tmp_path, monkeypatch, capsys, *options):
    """perplexity and states of ``ckpt`` (2 sequences of 1024 tokens in 1024-token calls, states recorded every
    256 tokens so that the calls are whole pieces, and ``options``) with --compile off and on: the same tables,
    every value within the README's determinism tolerance |a - b| <= 1e-6 |a| + 1e-8, but for two columns held
    to their conditioning. ``ppl`` is exp(loss): on it that tolerance would ask the loss for an absolute 1e-6, one
    float32 rounding at a loss of 14 (the demo baseline's first positions; measured 1.9x over), so ``ppl`` is held
    to exp of its row's loss and the loss to the tolerance. A head's ``mean`` sums entries that cancel (GLA's:
    -7.471e-4 against -7.473e-4 at std 13.6, 21x over), so it is held to the tolerance relative to its row's
    ``std``. run.json says on."""
    for mode in ("off", "on"):
        for command, more in (("perplexity", ()), ("states", ("--stride", 256))):
            code, _, err = run_cli(monkeypatch, capsys, command, "--ckpt", ckpt, "--length", 1024,
                                   "--num-seqs", 2, "--chunk", 1024, "--compile", mode, "--out",
                                   tmp_path / mode / command, *more, *options)
            assert code == 0, err
    assert json.loads((tmp_path / "on" / "states" / "run.json").read_text())["config"]["compile"] == "on"
    assert "compile" not in json.loads((tmp_path / "off" / "states" / "run.json").read_text())["config"]
    for table in ("perplexity/positionwise.csv", "states/state_stats.csv", "states/collapse.csv"):
        off, on = pd.read_csv(tmp_path / "off" / table), pd.read_csv(tmp_path / "on" / table)
        assert list(off.columns) == list(on.columns) and len(off) == len(on) > 0
        if "ppl" in on:
            assert ((on.ppl - on.loss.map(math.exp)).abs() <= 1e-9 * on.ppl).all()
            off, on = off.drop(columns="ppl"), on.drop(columns="ppl")
        numbers = off.select_dtypes("number").columns
        a, b = off[numbers].to_numpy(), on[numbers].to_numpy()
        scale = abs(off[numbers]).to_numpy()
        if "mean" in off and "std" in off:
            scale[:, list(numbers).index("mean")] += off["std"].to_numpy()
        excess = np.abs(a - b) - 1e-6 * scale - 1e-8
        excess = excess[~(pd.isna(a) & pd.isna(b))]
        assert not np.isnan(excess).any() and excess.max() <= 0, \
            f"{table}: beyond the determinism tolerance by {excess.max():.3g}"


def test_the_compiled_loss_is_cross_entropy():
    """The fast path's per-token loss against torch's cross_entropy, in float64, on logits with a spread of
    scales and a row whose target is its smallest logit; rows of two counts (dynamic in the rows: one compile)."""
    gen = torch.Generator().manual_seed(4)
    for rows in (7, 300):
        logits = torch.randn(rows, 1000, generator=gen) * torch.linspace(0.1, 30, rows)[:, None]
        target = torch.randint(0, 1000, (rows,), generator=gen)
        target[0] = logits[0].argmin()
        with torch.inference_mode():
            mine = fused.token_nll(logits, target)
        theirs = torch.nn.functional.cross_entropy(logits.double(), target, reduction="none")
        assert mine.shape == (rows,)
        assert ((mine.double() - theirs).abs() <= 1e-6 * theirs.abs() + 1e-6).all()


def test_the_recorder_s_compiled_statistics_are_the_eager_ones():
    """Per-head norm, mean, std, absmax and finiteness under --compile (one compiled reduction) against the eager
    ones, on states with an offset (so the mean is not ~0), one huge finite head (its norm overflows float32:
    recomputed in float64 on both paths) and one head holding a NaN."""
    from statelens.record.recorder import head_stats

    x = torch.randn(3, 2, 4, 500, generator=torch.Generator().manual_seed(5)) * 0.3 + 0.05
    x[0, 0, 1] *= 3e37
    x[1, 1, 2, 7] = math.nan
    eager = head_stats(x)
    with fused.mode("on"):
        fast = head_stats(x)
    assert eager[0, 0, 1, 0] > 1e38 and math.isfinite(eager[0, 0, 1, 0]) and eager[1, 1, 2, 4] == 0
    assert torch.equal(fast.isnan(), eager.isnan())
    both = ~eager.isnan()
    assert ((fast - eager).abs()[both] <= 1e-6 * eager.abs()[both] + 1e-8).all()


def test_check_verifies_the_compiled_path_and_fails_when_it_is_wrong(monkeypatch, capsys, compiled_calls):
    """statelens check --compile on: the one-shot run's pieces go through the compiled graph (2 layers x 2 full
    pieces of 512 in 1100 tokens) and agree with the eager chunked and token-by-token runs; a compiled graph that
    drops the carried state between pieces makes check exit 1."""
    from statelens.demo import BASELINE

    code, out, err = run_cli(monkeypatch, capsys, "check", "--ckpt", BASELINE, "--compile", "on", "--length", 1100)
    assert code == 0, err
    assert "the compiled path: 4 pieces" in out and "ok:" in out and len(compiled_calls) == 4
    code, out, _ = run_cli(monkeypatch, capsys, "check", "--ckpt", BASELINE, "--compile", "on")
    assert code == 0 and "the compiled path did not run" in out             # 300 tokens: shorter than a piece

    graph = fused._compiled

    def forgetting(cls):
        def run(mixer, u, ssm_state, *rest):
            return graph(cls)(mixer, u, torch.zeros_like(ssm_state), *rest)
        return run
    monkeypatch.setattr(fused, "_compiled", forgetting)
    code, out, _ = run_cli(monkeypatch, capsys, "check", "--ckpt", BASELINE, "--compile", "on", "--length", 1100)
    assert code == 1 and "FAILED" in out


def test_a_process_meeting_many_models_keeps_the_compiled_path(monkeypatch):
    """Nine configurations in one process (more than dynamo's default limit of 8 graphs per function) all take the
    compiled path: hitting the limit is made an error here rather than a quiet fallback to eager. The subject is
    dynamo's bookkeeping, so the graphs are traced with its "eager" backend, without inductor's C++ compile of
    each (70 s of a cold CI run for ten)."""
    torch._dynamo.reset()
    fused._compiled.cache_clear()
    monkeypatch.setattr(fused, "BACKEND", "eager")
    before = fused.pieces_compiled()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for width in range(9):
                torch.manual_seed(width)
                m = Mamba2LM(Mamba2Config(d_model=32 + 8 * width, n_layer=1, vocab_size=20, d_state=8, headdim=8,
                                          chunk_size=16)).eval()
                with torch.inference_mode(), fused.mode("on"):
                    m(torch.zeros(1, 512, dtype=torch.long), m.zero_state(1))
    finally:  # the next test's graphs are inductor's again
        fused._compiled.cache_clear()
        torch._dynamo.reset()
    assert fused.pieces_compiled() - before == 9
