"""The compiled fast path (statelens.models.fused, ``--compile``) of the Mamba-1 and GLA mixers against their eager
reference: the same logits and final states to float rounding, from a nonzero state, over calls with full pieces
and an eager tail, on configurations that exercise every branch of each mixer; hooks on the scan's inputs and
gradients keep the eager path. (The Mamba-2 mixer's: tests/test_fused.py.)"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from statelens.models import Mamba1Config, Mamba1LM, fused, gla, mamba1
from statelens.models.checkpoint import Checkpoint, save_checkpoint
from statelens.models.gla import GLAConfig, GLALM
from statelens.models.hooks import hooks
from tests.conftest import hf_mamba1
from tests.test_fused import assert_cli_compile_on_gives_the_eager_csvs

pytestmark = pytest.mark.skipif(not fused.compiler_available(), reason="torch.compile's CPU backend needs a C++ "
                                "compiler")


def mamba1_model(**options) -> Mamba1LM:
    """A random 2-layer Mamba-1 with decays spread as mamba-ssm initialises them and training keeps them:
    A = -(1 .. n) per channel, dt log-uniform in [1e-3, 1e-1] (dt_proj's bias its inverse softplus)."""
    torch.manual_seed(0)
    m = Mamba1LM(Mamba1Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, dt_rank=4, **options)).eval()
    with torch.no_grad():
        for block in m.blocks:
            mixer = block.mixer
            mixer.A_log.copy_(torch.arange(1, 9.0).log().expand_as(mixer.A_log))
            dt = torch.empty(mixer.dt_proj.bias.shape).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            mixer.D.normal_()
    return m


def gla_model(**options) -> GLALM:
    """A random 2-layer GLA whose gates spread the decays alpha = sigmoid(z) ** (1 / 16) from about 0.6 to 1
    (gk_proj's bias uniform in [-8, 4]), as in trained models, and a nonconstant output norm."""
    torch.manual_seed(0)
    m = GLALM(GLAConfig(hidden_size=64, num_hidden_layers=2, vocab_size=50, num_heads=4, **options)).eval()
    with torch.no_grad():
        for block in m.blocks:
            block.attn.gk_proj[1].bias.uniform_(-8.0, 4.0)
            norm = getattr(block.attn, block.attn.norm_name).weight
            if norm is not None:
                norm.normal_(1.0, 0.3)
    return m


CASES = {  # family -> (model, piece length of the family's mixer at batch b, configurations covering its branches)
    "mamba1": (mamba1_model, lambda m, b: fused.piece_length(b, 1, mamba1.PIECE),
               {"biases-no-conv-bias": dict(bias=True, conv_bias=False)}),  # the defaults: the other tests
    "gla": (gla_model, lambda m, b: fused.piece_length(b, m.config.chunk_size, gla.PIECE),
            {"gated": {}, "kv-groups-clamp-no-gate-no-affine": dict(num_kv_heads=2, clamp_min=-0.3,
                                                                    use_output_gate=False, elementwise_affine=False)}),
}
PARAMS = [(family, name) for family, (_, _, configs) in CASES.items() for name in sorted(configs)]


def run(m, x: torch.Tensor, state, mode: str):
    """Logits [b, l, V] and the final state, without gradient."""
    with torch.inference_mode(), fused.mode(mode):
        return m(x, state)


def close(mine: torch.Tensor, theirs: torch.Tensor, rel: float) -> bool:
    """Same shape, and every entry within ``rel`` of the largest magnitude (an empty tensor: shape only)."""
    assert mine.shape == theirs.shape
    return theirs.numel() == 0 or bool((mine - theirs).abs().max() <= rel * theirs.abs().max())


@pytest.mark.parametrize("family, name", PARAMS)
def test_compiled_path_equals_eager(family, name, compiled_calls):
    """Two rows of 300 tokens from a nonzero state (full pieces, then an eager tail shorter than one): logits
    within 2e-6 of the logit scale (float32 rounding; the backends' tolerance is 1e-4), every final state within
    1e-5 relative."""
    make, piece_of, configs = CASES[family]
    m = make(**configs[name])
    x = torch.randint(0, 50, (2, 300), generator=torch.Generator().manual_seed(1))
    _, state = run(m, x[:, :37], m.zero_state(2), "off")              # an arbitrary, nonzero starting state
    eager, eager_state = run(m, x, state, "off")
    assert not compiled_calls
    fast, fast_state = run(m, x, state, "on")
    piece = piece_of(m, 2)
    assert 300 % piece                                                # an eager tail
    assert compiled_calls == [torch.Size([2, piece, m.embedding.embedding_dim])] * (300 // piece) * 2  # 2 layers
    assert set(compiled_calls.classes) == {"Block" if family == "mamba1" else "GatedLinearAttention"}
    assert close(fast, eager, 2e-6)
    for mine, theirs in zip(fast_state.ssm + fast_state.conv, eager_state.ssm + eager_state.conv):
        assert close(mine, theirs, 1e-5)


@pytest.mark.parametrize("family", sorted(CASES))
def test_compiled_path_in_float64_is_the_reference_to_rounding(family, compiled_calls):
    m = CASES[family][0]().double()
    x = torch.randint(0, 50, (1, 300), generator=torch.Generator().manual_seed(2))
    _, state = run(m, x[:, :37], m.zero_state(1), "off")
    eager, eager_state = run(m, x, state, "off")
    fast, fast_state = run(m, x, state, "on")
    assert compiled_calls and close(fast, eager, 1e-13)
    for mine, theirs in zip(fast_state.ssm + fast_state.conv, eager_state.ssm + eager_state.conv):
        assert close(mine, theirs, 1e-13)


@pytest.mark.parametrize("family", sorted(CASES))
def test_hooks_on_the_scan_inputs_and_gradients_keep_the_eager_path(family, compiled_calls):
    """A hook on layer 0's values (hook_x) sees the whole call and keeps that layer eager, layer 1 compiled; a
    hook on layer 1's output (hook_out) sees its whole output, as eager (Mamba-1: that layer's mixer compiles
    alone, its norm and residual add out of the graph); a gradient keeps the whole call eager."""
    make, piece_of, _ = CASES[family]
    m = make()
    x = torch.randint(0, 50, (1, 300))
    seen, out = [], {}
    with fused.mode("on"):
        for mode in ("off", "on"):
            with torch.inference_mode(), fused.mode(mode), hooks(m, {
                    "blocks.0.hook_x": lambda t, hook: seen.append(t.shape),
                    "blocks.1.hook_out": lambda t, hook, mode=mode: out.setdefault(mode, t.clone())}):
                out[mode, "logits"] = m(x, m.zero_state(1))[0]
        piece = piece_of(m, 1)
        assert seen[1][:2] == (1, 300)
        assert compiled_calls == [torch.Size([1, piece, m.embedding.embedding_dim])] * (300 // piece)  # layer 1
        assert "Block" not in compiled_calls.classes
        assert close(out["on"], out["off"], 1e-5) and close(out["on", "logits"], out["off", "logits"], 2e-6)
        m(x, m.zero_state(1))[0].sum().backward()
    assert len(compiled_calls) == 300 // piece


def write_checkpoint(family: str, path):
    """A tiny random checkpoint directory of ``family``: transformers' Mamba-1 (its initialisation spreads the
    decays as mamba-ssm's does), or :func:`gla_model` in fla's layout."""
    if family == "mamba1":
        hf_mamba1(path, vocab=50)
        return path
    config = {"model_type": "gla", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 50, "num_heads": 4}
    return save_checkpoint(Checkpoint(gla_model(), Path(path), "hf", "bin", config), path)


@pytest.mark.parametrize("family", sorted(CASES))
def test_cli_compile_on_gives_the_eager_csvs(family, tmp_path, monkeypatch, capsys, compiled_calls):
    """perplexity and states, --compile on against off, as for Mamba-2 (tests/test_fused.py): every value within
    the README's determinism tolerance, and the compiled graph really ran."""
    ckpt = write_checkpoint(family, tmp_path / "ckpt")
    assert_cli_compile_on_gives_the_eager_csvs(ckpt, tmp_path, monkeypatch, capsys, "--train-len", 256)
    assert compiled_calls
