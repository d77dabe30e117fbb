"""The Gated DeltaNet and DeltaNet backends against flash-linear-attention's ``GatedDeltaNetForCausalLM``
/ ``DeltaNetForCausalLM`` and against themselves across chunkings.

fla's Triton kernels need a GPU; on CPU the oracle model (run by tests/fla_oracle.py in a subprocess)
keeps fla's own code for everything but the kernels, which are swapped for independent torch code: the delta-rule kernels for fla's naive
recurrences (``naive_recurrent_gated_delta_rule``, ``delta_rule_recurrence``) or, independently,
transformers' ``torch_chunk_gated_delta_rule`` (the Qwen3-Next fallback), with the l2 norm of queries
and keys from transformers and the gate from fla's ``naive_gdn_gate``; the short convolutions for
``nn.Conv1d``'s own forward; fla's Triton norms for torch ones; the fused SwiGLU for torch.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from statelens.errors import BadInput, CheckpointError
from statelens.models import backends, hooks, load_checkpoint, save_checkpoint
from statelens.models.checkpoint import parse_config
from statelens.models.gated_deltanet import DeltaNetConfig, DeltaNetLM, GatedDeltaNetConfig, GatedDeltaNetLM
from statelens.record import rollout
from tests.conftest import assert_rollouts_equal_one_shot
from fla_oracle import fla_runs

VOCAB = 61
GDN_CASES = {
    "default": {},
    "gva-neg-eigval-tied": {"num_v_heads": 4, "allow_neg_eigval": True, "tie_word_embeddings": True},
    "no-gate-no-conv": {"use_gate": False, "use_short_conv": False, "expand_v": 1.5},
    "sigmoid-gate": {"output_gate_activation": "sigmoid", "conv_size": 2},
}
DELTANET_CASES = {
    "default": {},
    "gate-no-beta-neg-eigval": {"use_gate": True, "use_beta": False, "allow_neg_eigval": True, "expand_v": 2.0},
    "elu-sum-no-conv": {"qk_activation": "elu", "qk_norm": "sum", "use_short_conv": False, "tie_word_embeddings": True},
    "relu": {"qk_activation": "relu", "expand_k": 0.5},
    "identity": {"qk_activation": "identity", "conv_size": 3},
}
CASES = [("gated_deltanet", c) for c in GDN_CASES] + [("delta_net", c) for c in DELTANET_CASES]
FLOAT64_CASES = [("gated_deltanet", "gva-neg-eigval-tied"), ("delta_net", "default")]
PREFIX = 37


def tokens(b=2, length=80, seed=1):
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def fla_config(family: str, case: str) -> dict:
    """fla config kwargs of a tiny model of ``family``."""
    common = {"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": VOCAB, "hidden_ratio": 2, "fuse_norm": False,
              "fuse_swiglu": False, "num_heads": 2}
    if family == "gated_deltanet":
        return common | {"head_dim": 8, "expand_v": 2.0} | GDN_CASES[case]
    return common | DELTANET_CASES[case]


@pytest.fixture(scope="module")
def fla_models(tmp_path_factory):
    """fla's tiny random models (fla's kernels swapped for torch, tests/fla_oracle.py; one subprocess for
    all): per (family, case) in float32 with fla's naive recurrences, the default ones also saved by fla
    (``saved``) and wrapped in memory; per FLOAT64_CASES in float64 with transformers' chunked delta rule,
    on all tokens and on the first PREFIX. Each its weights, config.json, logits and final states."""
    folder = tmp_path_factory.mktemp("fla_delta")
    runs = [{"family": family, "config": fla_config(family, case), "seed": 0, "dtype": "float32", "kernel": "fla",
             "tokens": tokens().tolist()} | ({"save_to": str(folder / family), "wrap": True} if case == "default" else {})
            for family, case in CASES]
    runs += [{"family": family, "config": fla_config(family, case), "seed": 0, "dtype": "float64",
              "kernel": "transformers", "tokens": tokens()[:, :length].tolist()}
             for family, case in FLOAT64_CASES for length in (None, PREFIX)]
    keys = [(family, case, "float32") for family, case in CASES]
    keys += [(family, case, f"float64:{length}") for family, case in FLOAT64_CASES for length in ("all", PREFIX)]
    return dict(zip(keys, fla_runs(runs, folder), strict=True)) | {"saved": folder}


def ours_from(family: str, run: dict):
    """Our backend read from fla's config.json and holding fla's weights (strict: same names and shapes)."""
    backend = backends.get(family)
    (layout,) = backend.layouts
    ours = backend(backend.config_class(**layout.read_config(run["config"]))).eval()
    renames = [(theirs, mine) for mine, theirs in layout.weight_names]
    state = {}
    for key, value in run["state_dict"].items():
        new = next((mine + key.removeprefix(theirs) for theirs, mine in renames if key.startswith(theirs)), key)
        state[new] = value
    ours.load_state_dict(state, strict=True)
    return ours.to(run["logits"].dtype)


@pytest.mark.parametrize("family, case", CASES)
def test_logits_and_states_equal_fla(fla_models, family, case):
    run = fla_models[family, case, "float32"]
    ours = ours_from(family, run)
    with torch.no_grad():
        got, state = ours(tokens())
    expected = run["logits"]
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-4 * scale
    for mine, theirs in zip(state.ssm, run["states"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert ours.num_parameters() == ours.config.num_parameters() == run["num_parameters"]


@pytest.mark.parametrize("family, case", FLOAT64_CASES)
def test_float64_logits_equal_transformers_torch_delta_rule(fla_models, family, case):
    """Far tighter in float64, with transformers' chunked torch delta rule inside fla's model; the states
    after PREFIX tokens too."""
    run, prefix_run = fla_models[family, case, "float64:all"], fla_models[family, case, f"float64:{PREFIX}"]
    ours = ours_from(family, run)
    x = tokens()
    with torch.no_grad():
        got, _ = ours(x)
        _, state = ours(x[:, :PREFIX])
    expected = run["logits"]
    assert (got - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()
    for mine, theirs in zip(state.ssm, prefix_run["states"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def native(family: str, **overrides):
    """A tiny model of ours with decays away from 1 (the carried state matters)."""
    common = {"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": VOCAB, "hidden_ratio": 2, "num_heads": 2,
              "chunk_size": 16}
    torch.manual_seed(0)
    if family == "gated_deltanet":
        model = GatedDeltaNetLM(GatedDeltaNetConfig(**(common | {"num_v_heads": 4, "head_dim": 8} | overrides)))
        with torch.no_grad():
            for block in model.blocks:
                block.attn.A_log.copy_(torch.linspace(-2, 1, 4))
    else:
        model = DeltaNetLM(DeltaNetConfig(**(common | overrides)))
    return model.eval()


@pytest.mark.parametrize("family", ["gated_deltanet", "delta_net"])
def test_one_shot_equals_chunked_equals_token_by_token(family, one_thread):
    model = native(family)
    x = tokens(length=100, seed=2)
    expected = assert_rollouts_equal_one_shot(model, x, logits_tol=1e-4, state_rtol=1e-4, state_atol=1e-5)
    state = model.zero_state(2)
    with torch.no_grad():
        for t in range(x.shape[1]):
            logits, state = model(x[:, t:t + 1], state)
            torch.testing.assert_close(logits[:, 0], expected[:, t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gated_deltanet", "delta_net"])
def test_reset_rows_equal_the_suffix_run_alone(family):
    model = native(family)
    x = tokens(1, 120, seed=3).expand(4, -1)
    resets = [0, 1, 37, 100]
    got = torch.cat([c.logits() for c in rollout(model, x, chunk=16, resets=resets)], dim=1)
    with torch.no_grad():
        for row, r in enumerate(resets):
            alone, _ = model(x[row:row + 1, r:])
            assert (got[row, r:] - alone[0]).abs().max().item() <= 1e-4, r
    assert (got[3, :100] - got[0, :100]).abs().max().item() <= 1e-5


def test_hooks_shapes_and_their_meaning():
    model = native("gated_deltanet")
    cfg = model.config
    x = tokens(2, 9, seed=4)
    seen = {}
    with hooks(model, {"blocks.*": lambda t, hook: seen.__setitem__(hook.name, t.clone())}), torch.no_grad():
        _, state = model(x)
    b, l, h, dk, dv = 2, 9, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim
    attn = model.blocks[0].attn
    with torch.no_grad():  # alpha = exp(-exp(A_log) softplus(a_proj(u) + dt_bias)), computed here from the weights
        u = model.blocks[0].attn_norm(model.embedding(x))
        alpha = torch.exp(-attn.A_log.exp() * F.softplus(attn.a_proj(u) + attn.dt_bias))
    torch.testing.assert_close(seen["blocks.0.hook_decay"], alpha)
    torch.testing.assert_close(seen["blocks.0.hook_beta"], attn.b_proj(u).sigmoid())
    for i in range(cfg.num_hidden_layers):
        torch.testing.assert_close(seen[f"blocks.{i}.hook_state"], state.ssm[i], rtol=0, atol=0)
        assert seen[f"blocks.{i}.hook_state"].shape == (b, h, dk, dv)
        for name in ("hook_C", "hook_B"):
            assert seen[f"blocks.{i}.{name}"].shape == (b, l, h, dk)
            torch.testing.assert_close(seen[f"blocks.{i}.{name}"].norm(dim=-1), torch.ones(b, l, h), atol=1e-4, rtol=0)
        assert seen[f"blocks.{i}.hook_x"].shape == (b, l, h, dv)
        for name in ("hook_beta", "hook_dt", "hook_decay"):
            assert seen[f"blocks.{i}.{name}"].shape == (b, l, h)
            assert model.by_head(f"blocks.{i}.{name}", seen[f"blocks.{i}.{name}"]).shape == (b, l, h, 1)
        assert seen[f"blocks.{i}.hook_conv_state"].shape == (b, 2 * cfg.key_dim + cfg.value_dim, cfg.conv_size - 1)
        assert seen[f"blocks.{i}.hook_out"].shape == (b, l, cfg.hidden_size)
        assert model.by_head(f"blocks.{i}.hook_state", state.ssm[i]).shape == (b, h, dk * dv)
    assert model.n_heads == h and backends.get("gated_deltanet") is GatedDeltaNetLM


def test_deltanet_decay_is_one_and_patching_it_gates_the_scan():
    """DeltaNet's alpha is 1; patched to a constant c it is the gated delta rule with log-decay log c."""
    model = native("delta_net")
    x = tokens(1, 12, seed=5)
    seen = []
    with hooks(model, {"blocks.*.hook_decay": lambda t, hook: seen.append(t)}), torch.no_grad():
        _, plain = model(x)
    assert all(torch.equal(t, torch.ones_like(t)) for t in seen) and len(seen) == 2
    with torch.no_grad(), hooks(model, {"blocks.0.hook_decay": lambda t, hook: torch.full_like(t, 0.5)}):
        _, gated = model(x)
    captured = {}
    with torch.no_grad(), hooks(model, {"blocks.0.hook_*": lambda t, hook: captured.__setitem__(hook.name, t)}):
        model(x)
    from statelens.models.delta_rule import delta_rule_steps
    q, k, v, beta = (captured[f"blocks.0.hook_{n}"] for n in ("C", "B", "x", "beta"))
    _, S = delta_rule_steps(q, k, v, beta, torch.full_like(beta, 0.5).log())
    torch.testing.assert_close(gated.ssm[0], S, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gated.ssm[0], plain.ssm[0])


@pytest.mark.parametrize("family", ["gated_deltanet", "delta_net"])
def test_fla_directory_loads_and_round_trips(fla_models, family, tmp_path):
    """A directory written by fla's own ``save_pretrained`` loads as the native backend with fla's logits."""
    ckpt = load_checkpoint(fla_models["saved"] / family)
    assert ckpt.arch == family and ckpt.format == "hf"
    x = tokens()
    expected = fla_models[family, "default", "float32"]["logits"]
    with torch.no_grad():
        got, _ = ckpt.model(x)
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    save_checkpoint(ckpt, tmp_path / "again")
    with torch.no_grad():
        again, _ = load_checkpoint(tmp_path / "again").model(x)
    assert torch.equal(again, got)


@pytest.mark.parametrize("family", ["gated_deltanet", "delta_net"])
def test_wrapping_fla_s_model_in_memory_gives_the_native_backend(fla_models, family):
    """``wrap`` run on fla's model object (in the oracle's process) gives the native backend, with fla's logits."""
    run = fla_models[family, "default", "float32"]
    assert run["wrapped"]["type"] == backends.get(family).__name__
    got, expected = run["wrapped"]["logits"], run["logits"]
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("family, bad, message", [
    ("gated_deltanet", {"num_heads": 2, "num_v_heads": 3}, "num_v_heads (3) must be a multiple of num_heads (2)"),
    ("gated_deltanet", {"head_dim": 8, "expand_v": 0.3}, "expand_v gives a dimension of 2.4, not a positive integer"),
    ("gated_deltanet", {"output_gate_activation": "gelu"}, "output_gate_activation 'gelu' is not supported"),
    ("gated_deltanet", {"attn": {"layers": [1]}}, "attn {'layers': [1]} is not supported (Gated DeltaNet layers only)"),
    ("gated_deltanet", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported (only swish)"),
    ("delta_net", {"qk_norm": "rms"}, "qk_norm 'rms' is not supported (l2, sum)"),
    ("delta_net", {"qk_activation": "tanh"}, "qk_activation 'tanh' is not supported"),
    ("delta_net", {"num_heads": 3}, "hidden_size * expand_k (32) must be a multiple of num_heads (3)"),
    ("delta_net", {"attnres_block_size": 4}, "attnres_block_size 4 is not supported (DeltaNet layers only)"),
])
def test_refused_configs_are_one_line_naming_the_key(family, bad, message, tmp_path):
    raw = {"model_type": family, "hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 10, "num_heads": 2} | bad
    where = tmp_path / "config.json"
    with pytest.raises(CheckpointError) as info:
        parse_config(raw, where)
    assert str(info.value).startswith(f"{where}: {message}") and "\n" not in str(info.value)


def test_mitigations_scale_and_cap_apply_and_the_window_is_refused():
    from statelens.interventions.mitigations import apply_mitigation

    model = native("gated_deltanet")
    x = tokens(1, 40, seed=6)
    captured = {}
    with torch.no_grad(), hooks(model, {"blocks.0.hook_*": lambda t, hook: captured.__setitem__(hook.name, t)}):
        model(x)
    with apply_mitigation(model, "scale:alpha=0.5,B=0.8"), torch.no_grad():
        _, scaled = model(x)
    # layer 0's state is the delta rule with the gate halved and beta times 0.8, computed here
    from statelens.models.delta_rule import delta_rule_steps
    q, k, v, beta, alpha = (captured[f"blocks.0.hook_{n}"] for n in ("C", "B", "x", "beta", "decay"))
    _, S = delta_rule_steps(q, k, v, beta * 0.8, (alpha * 0.5).log())
    torch.testing.assert_close(scaled.ssm[0], S, rtol=1e-5, atol=1e-6)

    with apply_mitigation(model, "cap:multiplier=0.5", calibration=x, train_len=40) as applied, torch.no_grad():
        _, capped = model(x)
        tau = applied.thresholds
    norms = torch.stack([s[0].flatten(1).norm(dim=-1) for s in capped.ssm])     # [layers, heads]
    assert (norms <= tau * (1 + 1e-5)).all() and torch.isclose(norms, tau.float(), rtol=1e-4).any()
    with pytest.raises(BadInput) as info:
        apply_mitigation(model, "window:r=8")
    assert str(info.value) == ("--mitigation window:r=8: not exact on gated_deltanet: the sliding window by state "
                               "difference does not hold for the delta rule's non-commuting transitions "
                               "alpha (I - beta k k^T)")
    assert getattr(model, "mitigation", None) is None


def test_decay_reports_the_gate_and_deltanet_never_forgets():
    from statelens.analysis.decay import decay

    x = tokens(2, 64, seed=7)
    df = decay(native("delta_net"), x, buckets=4)
    assert (df.mean_alpha == 1).all() and (df.horizon == float("inf")).all() and (df.retention == 1).all()
    model = native("gated_deltanet")
    df = decay(model, x, buckets=1)
    alphas = []
    with torch.no_grad(), hooks(model, {"blocks.*.hook_decay": lambda t, hook: alphas.append(t)}):
        model(x)
    expected = torch.stack([a.double().mean(dim=(0, 1)) for a in alphas]).numpy().ravel()   # [layers * heads]
    assert abs(df.sort_values(["layer", "head"]).mean_alpha.to_numpy() - expected).max() < 1e-6


@pytest.mark.parametrize("family", ["gated_deltanet", "delta_net"])
def test_the_report_runs_every_analysis_and_its_figures_read_right(family, tmp_path):
    """`statelens report` on a tiny fla-format checkpoint of the family: perplexity, remembrance, states,
    decay, coverage and logits drift run unchanged, and every figure passes the visual checks."""
    from test_report import FIGURES, SMALL, cli, figure_problems

    from statelens.models.checkpoint import Checkpoint
    from statelens.reports.html import load_results
    from statelens.reports.page_figures import report_figures

    model = native(family, vocab_size=256)  # vocab >= 256: text is tokenized as bytes
    raw = {"model_type": family, "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 256, "hidden_ratio": 2,
           "num_heads": 2} | ({"num_v_heads": 4, "head_dim": 8} if family == "gated_deltanet" else {})
    save_checkpoint(Checkpoint(model, tmp_path, "hf", "safetensors", raw), tmp_path / "ckpt")
    text = tmp_path / "docs.txt"
    text.write_text(" ".join(f"word{i % 97} and some more text number {i}." for i in range(200)))
    cli("report", "--ckpt", tmp_path / "ckpt", "--data", text, *SMALL, "--out", tmp_path / "out")
    (folder,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert json.loads((folder / "decay" / "run.json").read_text())["checkpoint"]["arch"] == family
    shown = report_figures([load_results(folder)], [family], [32])
    assert [f["id"] for f in shown] == FIGURES
    for f in shown:
        assert figure_problems(f["figure"]) == [], f["id"]
