"""The GLA backend: its recurrence against fla's naive reference, its whole forward against fla's
``GLAForCausalLM`` on CPU (run by tests/fla_oracle.py in a subprocess: ``fused_recurrent_gla`` /
``chunk_gla`` swapped for fla's own ``naive_recurrent_gla``, fla's Triton RMSNorm for ``torch.nn.RMSNorm``,
everything else fla's code), and against itself across chunkings.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from statelens.models import backends, hooks
from statelens.models.gla import (
    GLALM,
    GLAConfig,
    gla_chunked,
    gla_config_kwargs,
    gla_sequential,
)
from statelens.record import rollout
from fla_oracle import fla_runs
from test_delta_rule import fla_naive


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


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_equals_sequential(chunk):
    q, k, v, gk, S0 = (t.double() for t in random_scan_inputs())
    o_ref, S_ref = gla_sequential(q, k, v, gk, S0)
    o, S = gla_chunked(q, k, v, gk, S0, chunk)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)


def test_recurrence_equals_fla_naive():
    naive_recurrent_gla = fla_naive("gla", "naive_recurrent_gla")
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
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 61, "hidden_ratio": 2,
        "fuse_swiglu": False}


def tokens():
    return torch.randint(0, 61, (2, 80), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fla_models(tmp_path_factory):
    """fla's tiny random GLAForCausalLM per (case, fuse_norm): its weights, config.json, and with
    fuse_norm=False its logits and final states. One subprocess for all (tests/fla_oracle.py)."""
    runs = [{"family": "gla", "config": TINY | {"fuse_norm": fuse_norm} | FLA_CASES[case], "seed": 0,
             "dtype": "float32", "kernel": "fla", "tokens": None if fuse_norm else tokens().tolist()}
            for case in FLA_CASES for fuse_norm in (False, True)]
    out = fla_runs(runs, tmp_path_factory.mktemp("fla_gla"))
    return {(case, fuse_norm): out[2 * i + j] for i, case in enumerate(FLA_CASES) for j, fuse_norm in enumerate((False, True))}


def ours_from(run: dict) -> GLALM:
    ours = GLALM(GLAConfig(**gla_config_kwargs(run["config"]))).eval()
    ours.load_state_dict({internal_name(k): v for k, v in run["state_dict"].items()}, strict=True)
    return ours


@pytest.mark.parametrize("case", FLA_CASES)
def test_logits_and_states_equal_fla(fla_models, case):
    run = fla_models[case, False]
    ours = ours_from(run)
    with torch.no_grad():
        got, state = ours(tokens())
    expected = run["logits"]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    for mine, theirs in zip(state.ssm, run["states"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", FLA_CASES)
@pytest.mark.parametrize("fuse_norm", [True, False])
def test_parameter_names_and_count_match_fla(fla_models, case, fuse_norm):
    run = fla_models[case, fuse_norm]
    ours = ours_from(run)  # strict load: same names and shapes
    assert ours.num_parameters() == ours.config.num_parameters() == run["num_parameters"]
    assert ours.config.intermediate_size == run["mlp_width"]


@pytest.fixture(scope="module")
def model():
    cfg = GLAConfig(hidden_size=32, num_hidden_layers=2, vocab_size=61, num_heads=2, hidden_ratio=2, chunk_size=16)
    torch.manual_seed(0)
    m = GLALM(cfg).eval()
    with torch.no_grad():  # decays away from 1 so the carried state matters
        for block in m.blocks:
            block.attn.gk_proj[1].bias.fill_(-2.0)
    return m


def test_one_shot_equals_chunked_equals_token_by_token(model, one_thread):
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
