"""The backends against transformers (the oracle), and against themselves across chunkings."""
from __future__ import annotations

import pytest
import torch

from conftest import hf_mamba1, hf_mamba2, mamba_ssm_dir
from statelens.models import hooks, load_checkpoint
from statelens.record import rollout

CASES = {
    "mamba2-g2-untied": lambda p, **kw: hf_mamba2(p, ngroups=2, tie=False, **kw),
    "mamba2-g1-tied": lambda p, **kw: hf_mamba2(p, ngroups=1, tie=True, **kw),
    "mamba1-tied": lambda p, **kw: hf_mamba1(p, tie=True, **kw),
    "mamba1-untied": lambda p, **kw: hf_mamba1(p, tie=False, **kw),
}


def logits_of(model, tokens, chunk):
    return torch.cat([c.logits() for c in rollout(model, tokens, chunk=chunk)], dim=1)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_float32(case, tmp_path, tokens):
    hf = CASES[case](tmp_path)
    ours = load_checkpoint(tmp_path).model
    with torch.no_grad():
        expected = hf(tokens).logits
    got, _ = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["mamba2-g2-untied", "mamba1-tied"])
def test_logits_equal_transformers_float64(case, tmp_path, tokens):
    hf = CASES[case](tmp_path, dtype=torch.float64)
    ours = load_checkpoint(tmp_path, dtype=torch.float64).model
    with torch.no_grad():
        expected = hf(tokens).logits.double()
    got, _ = ours(tokens)
    assert got.dtype == torch.float64
    # transformers computes its norms (and Mamba-2's A) in float32 even in a float64 model, which
    # bounds the agreement; the scans themselves agree to 1e-12 in float64 (test_scans.py).
    assert (got - expected).abs().max().item() <= 2e-6


def test_dt_limit_matches_transformers(tmp_path, tokens):
    import transformers

    cfg = transformers.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8,
                                    num_heads=8, n_groups=2, chunk_size=16, time_step_limit=(0.02, 0.05))
    torch.manual_seed(3)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path).model
    assert ours.config.dt_limit == (0.02, 0.05)
    with torch.no_grad():
        assert (ours(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_one_shot_equals_chunked_equals_token_by_token(case, tmp_path, tokens):
    CASES[case](tmp_path)
    model = load_checkpoint(tmp_path).model
    for chunk, length in ((1, 40), (7, 300), (64, 300), (100, 300)):  # token by token: 40 calls carry the state
        one_shot, state = model(tokens[:, :length])
        chunks = list(rollout(model, tokens[:, :length], chunk=chunk))
        assert [c.end - c.start for c in chunks][:2] == [chunk] * 2
        got = torch.cat([c.logits() for c in chunks], dim=1)
        assert (got - one_shot).abs().max().item() <= 1e-4, chunk
        for a, b in zip(chunks[-1].state.ssm, state.ssm):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["mamba2-g2-untied", "mamba1-tied"])
def test_state_equals_transformers_recurrent_state(case, tmp_path, tokens):
    """transformers' only exact continuation for Mamba-1 is one token at a time: feed p tokens so."""
    hf = CASES[case](tmp_path)
    model = load_checkpoint(tmp_path).model
    p = 23
    cache = None
    with torch.no_grad():
        for t in range(p):
            out = hf(tokens[:, t:t + 1], cache_params=cache, use_cache=True)
            cache = out.cache_params
    _, state = model(tokens[:, :p])
    for layer in range(model.n_layers):
        torch.testing.assert_close(state.ssm[layer], cache.get_recurrent_state(layer).float(), rtol=1e-4, atol=1e-5)
        # transformers keeps d_conv inputs; statelens keeps the d_conv - 1 the convolution needs.
        torch.testing.assert_close(state.conv[layer], cache.get_conv_state(layer)[..., 1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer,make", [("Mamba2", hf_mamba2), ("Mamba1", hf_mamba1)])
@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_mamba_ssm_layout_with_vocab_padding(layer, make, weights, tmp_path, tokens):
    """vocab_size 61 padded to a multiple of 8 gives the 64 rows mamba-ssm would have allocated."""
    hf = make(tmp_path / "hf", tie=True)
    ckpt = load_checkpoint(mamba_ssm_dir(tmp_path / "ssm", hf, layer=layer, vocab_size=61, weights=weights))
    assert ckpt.format == "mamba_ssm" and ckpt.model.config.vocab_size == 64
    with torch.no_grad():
        assert (ckpt.model(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["mamba2", "mamba1"])
def test_reset_rows_equal_separate_runs(arch, tmp_path, tokens):
    (hf_mamba2 if arch == "mamba2" else hf_mamba1)(tmp_path)
    model = load_checkpoint(tmp_path).model
    x = tokens[:1].expand(4, -1)
    resets = [0, 1, 77, 250]
    got = torch.cat([c.logits() for c in rollout(model, x, chunk=64, resets=resets)], dim=1)
    for row, r in enumerate(resets):
        alone, _ = model(x[row:row + 1, r:])
        assert (got[row, r:] - alone[0]).abs().max().item() <= 1e-4, r
    # Before its reset a row runs on the full context, like row 0.
    assert (got[3, :250] - got[0, :250]).abs().max().item() <= 1e-5


def test_hook_points_are_named_and_see_the_state(tmp_path, tokens):
    hf_mamba2(tmp_path)
    model = load_checkpoint(tmp_path).model
    names = set(model.hook_points())
    for i in range(model.n_layers):
        for h in ("state", "conv_state", "dt", "decay", "B", "C", "x", "out"):
            assert f"blocks.{i}.hook_{h}" in names
    seen = {}
    with hooks(model, {"blocks.*.hook_state": lambda t, hook: seen.__setitem__(hook.layer, t.clone())}):
        _, state = model(tokens)
    assert not any(p.active for p in model.hook_points().values())  # removed on exit
    for layer, t in seen.items():
        torch.testing.assert_close(t, state.ssm[layer])


def test_patching_hooks_changes_the_computation_as_specified(tmp_path, tokens):
    hf_mamba2(tmp_path)
    model = load_checkpoint(tmp_path).model
    plain, _ = model(tokens)
    with hooks(model, {"blocks.*.hook_decay": lambda a, hook: a}):  # identity through alpha = exp(dt A)
        same, _ = model(tokens)
    assert (same - plain).abs().max().item() <= 1e-5
    # Zeroing the state handed on after the first 100 tokens == starting the rest from a zero state.
    _, state = model(tokens[:, :100])
    with hooks(model, {"blocks.*.hook_state": lambda s, hook: torch.zeros_like(s)}):
        _, zeroed = model(tokens[:, :100])
    restarted = model(tokens[:, 100:], zeroed)[0]
    expected = model(tokens[:, 100:], state.map(lambda t: t).__class__(
        tuple(torch.zeros_like(s) for s in state.ssm), state.conv))[0]
    torch.testing.assert_close(restarted, expected)
