"""The GLA backend: its recurrence against fla's naive reference, its whole forward against fla's
``GLAForCausalLM`` (fla's Triton kernels swapped for torch equivalents so it runs on CPU), and against
itself across chunkings.

fla's Triton kernels need a GPU; on CPU the tests that use fla replace ``fused_recurrent_gla`` /
``chunk_gla`` by fla's own ``naive_recurrent_gla`` and fla's Triton RMSNorm by ``torch.nn.RMSNorm``.
Everything else (projections, head layout, gates, MLP, residuals, parameter names) is fla's code.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from statelens.models import backends, hooks
from statelens.models.gla import (
    GLALM,
    GLAConfig,
    gla_chunked,
    gla_config_kwargs,
    gla_sequential,
)
from statelens.record import rollout


def internal_name(key: str) -> str:
    """fla's parameter name -> ours: only the prefixes differ."""
    key = re.sub(r"^model\.layers\.", "blocks.", key)
    key = re.sub(r"^model\.embeddings\.", "embedding.", key)
    return re.sub(r"^model\.norm\.", "norm_f.", key)


def random_scan_inputs(b=2, l=37, h=3, dk=8, dv=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, l, h, dk, generator=gen), torch.randn(b, l, h, dk, generator=gen)
    v = torch.randn(b, l, h, dv, generator=gen)
    gk = F.logsigmoid(torch.randn(b, l, h, dk, generator=gen) * 2)  # log-decays, some near 0, some large
    S0 = torch.randn(b, h, dk, dv, generator=gen)
    return q, k, v, gk, S0


def fla_naive_recurrent_gla():
    """fla's ``naive_recurrent_gla``, read from its file: importing it through the package would import
    every fla op, which needs triton (not needed by this file)."""
    pytest.importorskip("fla")
    spec = importlib.util.find_spec("fla")
    path = Path(spec.submodule_search_locations[0]) / "ops" / "gla" / "naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_gla_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.naive_recurrent_gla


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_equals_sequential(chunk):
    q, k, v, gk, S0 = (t.double() for t in random_scan_inputs())
    o_ref, S_ref = gla_sequential(q, k, v, gk, S0)
    o, S = gla_chunked(q, k, v, gk, S0, chunk)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)


def test_recurrence_equals_fla_naive():
    naive_recurrent_gla = fla_naive_recurrent_gla()
    q, k, v, gk, S0 = random_scan_inputs()
    o_fla, S_fla = naive_recurrent_gla(q, k, v, gk, initial_state=S0, output_final_state=True)
    for o, S in (gla_sequential(q, k, v, gk, S0), gla_chunked(q, k, v, gk, S0, 16)):
        torch.testing.assert_close(o, o_fla, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(S, S_fla, rtol=1e-5, atol=1e-5)


FLA_CASES = {
    "default": {},
    "kv-groups-clamp-tied": {"num_heads": 4, "num_kv_heads": 2, "clamp_min": -0.05, "tie_word_embeddings": True},
    "no-output-gate": {"use_output_gate": False, "expand_k": 1.0, "expand_v": 2.0},
}


def tiny_fla(fuse_norm: bool, **overrides):
    """A tiny random fla GLAForCausalLM and its config.json (as a dict), float32."""
    pytest.importorskip("fla.models")  # needs triton importable (not a GPU) for fla's op modules
    from fla.models import GLAConfig as FlaGLAConfig
    from fla.models import GLAForCausalLM

    kwargs = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 61, "hidden_ratio": 2,
                  "fuse_norm": fuse_norm, "fuse_swiglu": False, "fuse_cross_entropy": False} | overrides
    torch.manual_seed(0)
    model = GLAForCausalLM(FlaGLAConfig(**kwargs)).eval()
    with torch.no_grad():  # fla initialises norms to ones and biases to zeros: randomise them too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model, model.config.to_dict()


def ours_from(model, raw: dict) -> GLALM:
    ours = GLALM(GLAConfig(**gla_config_kwargs(raw))).eval()
    state = {internal_name(k): v for k, v in model.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours


def run_fla_on_cpu(model, tokens, monkeypatch) -> torch.Tensor:
    """fla's forward with its Triton-only pieces swapped for torch equivalents (fla's naive
    recurrence; torch RMSNorm and SiLU for the per-head output norm and gate, which are unfused with
    fuse_norm=False; torch SwiGLU in the MLP)."""
    import fla.layers.gla as fla_gla
    import fla.modules.mlp as fla_mlp

    naive_recurrent_gla = fla_naive_recurrent_gla()

    def naive(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, **_):
        assert initial_state is None
        return naive_recurrent_gla(q, k, v, gk if gk is not None else g)[0], None

    monkeypatch.setattr(fla_gla, "fused_recurrent_gla", naive)
    monkeypatch.setattr(fla_gla, "chunk_gla", naive)
    monkeypatch.setattr(fla_mlp, "swiglu", lambda gate, y: F.silu(gate) * y)
    for layer in model.model.layers:
        fla_norm = layer.attn.g_norm
        norm = nn.RMSNorm(fla_norm.hidden_size, eps=fla_norm.eps)
        with torch.no_grad():
            norm.weight.copy_(fla_norm.weight)
        monkeypatch.setattr(layer.attn, "g_norm", norm)
        monkeypatch.setattr(layer.attn, "gate_fn", F.silu, raising=False)
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@pytest.mark.parametrize("case", FLA_CASES)
def test_logits_equal_fla(case, monkeypatch):
    model, raw = tiny_fla(fuse_norm=False, **FLA_CASES[case])
    ours = ours_from(model, raw)
    tokens = torch.randint(0, 61, (2, 80), generator=torch.Generator().manual_seed(1))
    expected = run_fla_on_cpu(model, tokens, monkeypatch)
    got, _ = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", FLA_CASES)
@pytest.mark.parametrize("fuse_norm", [True, False])
def test_parameter_names_and_count_match_fla(case, fuse_norm):
    model, raw = tiny_fla(fuse_norm=fuse_norm, **FLA_CASES[case])
    ours = ours_from(model, raw)  # strict load: same names and shapes
    assert ours.num_parameters() == ours.config.num_parameters() == model.num_parameters()
    assert ours.config.intermediate_size == model.model.layers[0].mlp.intermediate_size


@pytest.fixture(scope="module")
def model():
    cfg = GLAConfig(hidden_size=32, num_hidden_layers=2, vocab_size=61, num_heads=2, hidden_ratio=2, chunk_size=16)
    torch.manual_seed(0)
    m = GLALM(cfg).eval()
    with torch.no_grad():  # decays away from 1 so the carried state matters
        for block in m.blocks:
            block.attn.gk_proj[1].bias.fill_(-2.0)
    return m


def test_one_shot_equals_chunked_equals_token_by_token(model):
    tokens = torch.randint(0, 61, (2, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, final = model(tokens)
    for chunk in (1, 7, 64):
        chunks = list(rollout(model, tokens, chunk=chunk))
        got = torch.cat([c.logits() for c in chunks], dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for s, s_ref in zip(chunks[-1].state.ssm, final.ssm):
            torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)
    state = model.zero_state(2)
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t:t + 1], state)
            torch.testing.assert_close(logits[:, 0], expected[:, t], rtol=1e-4, atol=1e-4)


def test_hooks_shapes_and_state(model):
    cfg = model.config
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    seen = {}
    with hooks(model, {"blocks.*": lambda t, hook: seen.__setitem__(hook.name, t.clone())}), torch.no_grad():
        _, state = model(tokens)
    b, l, h, dk, dv = 2, 9, cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
    for i in range(cfg.num_hidden_layers):
        torch.testing.assert_close(seen[f"blocks.{i}.hook_state"], state.ssm[i], rtol=0, atol=0)
        assert seen[f"blocks.{i}.hook_state"].shape == (b, h, dk, dv)
        for name in ("hook_C", "hook_B", "hook_dt", "hook_decay"):
            assert seen[f"blocks.{i}.{name}"].shape == (b, l, h, dk)
        assert seen[f"blocks.{i}.hook_x"].shape == (b, l, h, dv)
        assert seen[f"blocks.{i}.hook_out"].shape == (b, l, cfg.hidden_size)
        assert seen[f"blocks.{i}.hook_conv_state"].shape == (b, 0, 0)
        torch.testing.assert_close(seen[f"blocks.{i}.hook_decay"], seen[f"blocks.{i}.hook_dt"].exp())
        assert model.by_head(f"blocks.{i}.hook_state", state.ssm[i]).shape == (b, h, dk * dv)
        assert model.by_head(f"blocks.{i}.hook_x", seen[f"blocks.{i}.hook_x"]).shape == (b, l, h, dv)
    assert model.state_shapes()[0] == {"ssm": (h, dk, dv), "conv": (0, 0)}
    assert model.n_heads == h and backends.get("gla") is GLALM


def test_patching_decay_changes_the_scan(model):
    tokens = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, plain = model(tokens)
        with hooks(model, {"blocks.0.hook_decay": lambda t, hook: torch.zeros_like(t)}):
            _, forgetful = model(tokens)
    # alpha = 0 forgets everything: layer 0's state is the last token's k^T v alone
    assert not torch.allclose(plain.ssm[0], forgetful.ssm[0])
    with torch.no_grad():
        _, last = model(tokens[:, -1:])
    torch.testing.assert_close(forgetful.ssm[0], last.ssm[0])


@pytest.mark.parametrize("bad, match", [
    ({"feature_map": "elu"}, "feature_map"),
    ({"use_short_conv": True}, "use_short_conv"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"expand_k": 0.3}, "expand_k"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
])
def test_config_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        GLAConfig(hidden_size=32, num_hidden_layers=1, vocab_size=10, num_heads=2, **bad)


def test_config_kwargs_reject_hybrid_attention():
    with pytest.raises(ValueError, match="attn"):
        gla_config_kwargs({"hidden_size": 32, "attn": {"layers": [1]}})


def test_a_refused_fla_config_is_one_checkpoint_error(tmp_path):
    """GLA's layout (declared in gla.py) refuses through parse_config as one line naming the file (it
    used to fail there with an UnboundLocalError)."""
    from statelens.errors import CheckpointError
    from statelens.models.checkpoint import parse_config

    with pytest.raises(CheckpointError) as info:
        parse_config({"model_type": "gla", "hidden_size": 32, "attn": {"layers": [1]}}, tmp_path / "config.json")
    assert str(info.value) == f"{tmp_path / 'config.json'}: attn {{'layers': [1]}} is not supported (GLA layers only)"
