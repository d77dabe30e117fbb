"""The RWKV-7 backend: its recurrence against fla's naive DPLR reference, its whole forward against fla's
``RWKV7ForCausalLM`` on CPU (run by tests/fla_oracle.py in a subprocess, fla's Triton pieces swapped
for its torch references), and against itself across chunkings, resets, loading and mitigations."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from statelens.errors import BadInput, CheckpointError
from statelens.interventions.mitigations import apply_mitigation
from statelens.models import backends, hooks, load_checkpoint, save_checkpoint
from statelens.models.checkpoint import parse_config
from statelens.models.rwkv7 import RWKV7Config, RWKV7LM, rwkv7_chunked, rwkv7_config_kwargs, rwkv7_sequential
from statelens.record import rollout
from tests.conftest import assert_rollouts_equal_one_shot
from fla_oracle import fla_runs
from test_delta_rule import fla_naive

VOCAB = 61
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only contend


def scan_inputs(b=2, l=37, h=3, dk=8, dv=5, seed=0, dtype=torch.float64):
    """r, w, k, v, a = -kk, b = kk * iclr as RWKV-7 makes them, and an initial state."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    r, k, v = rand(b, l, h, dk), rand(b, l, h, dk), rand(b, l, h, dv)
    w = -0.6065306597126334 * torch.sigmoid(rand(b, l, h, dk) * 2)
    kk, iclr = F.normalize(rand(b, l, h, dk), dim=-1), torch.sigmoid(rand(b, l, h, dk))
    return r, w, k, v, -kk, kk * iclr, rand(b, h, dk, dv)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_equals_sequential(chunk):
    o_ref, S_ref = rwkv7_sequential(*scan_inputs())
    o, S = rwkv7_chunked(*scan_inputs(), chunk)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)


def test_chunked_survives_a_decay_of_zero():
    """A patched alpha of 0 (log-decay -inf) forgets the diagonal part without nan in the chunked form."""
    r, w, k, v, a, b, S0 = scan_inputs()
    w[:, 5] = -math.inf
    o_ref, S_ref = rwkv7_sequential(r, w, k, v, a, b, S0)
    o, S = rwkv7_chunked(r, w, k, v, a, b, S0, 16)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)


def test_recurrence_equals_fla_naive_dplr():
    """fla's dplr_recurrence (S [k, v], q scaled by dk ** -0.5 inside, float32), with an initial state."""
    dplr_recurrence = fla_naive("generalized_delta_rule/dplr", "dplr_recurrence")
    r, w, k, v, a, b, S0 = scan_inputs(dtype=torch.float32)
    t = [x.transpose(1, 2) for x in (r * r.shape[-1] ** 0.5, k, v, a, b, w)]
    o_fla, S_fla = dplr_recurrence(*t, initial_state=S0, output_final_state=True)
    for o, S in (rwkv7_sequential(r, w, k, v, a, b, S0), rwkv7_chunked(r, w, k, v, a, b, S0, 16)):
        torch.testing.assert_close(o, o_fla.transpose(1, 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(S, S_fla, rtol=1e-5, atol=1e-5)


# -- the whole model against fla's -------------------------------------------------------------------

TINY = {"hidden_size": 32, "num_hidden_layers": 3, "head_dim": 8, "vocab_size": VOCAB, "hidden_ratio": 2,
        "decay_low_rank_dim": 8, "gate_low_rank_dim": 8, "a_low_rank_dim": 8, "v_low_rank_dim": 8}
FLA_CASES = {
    "default": {},
    "tied-no-prenorm-no-bias": {"tie_word_embeddings": True, "norm_first": False, "norm_bias": False},
    "fused-norms": {"fuse_norm": True},
    "lora-widths-from-fla-formula": {"decay_low_rank_dim": None, "gate_low_rank_dim": None, "a_low_rank_dim": None,
                                     "v_low_rank_dim": None, "num_heads": 2, "head_dim": None},
}
PREFIX = 37  # the oracle runs on the first PREFIX tokens: its final states are ours at position PREFIX


def tokens(b=2, length=100, seed=1):
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fla_models(tmp_path_factory):
    """fla's logits and states per (case, dtype): float32 with fla's naive scan, float64 with ours (then
    everything but the scan is fla's). One subprocess for all (see tests/fla_oracle.py)."""
    runs = [{"family": "rwkv7", "config": TINY | overrides, "tokens": tokens()[:, :PREFIX].tolist(), "dtype": dtype,
             "seed": 0, "kernel": "fla" if dtype == "float32" else "statelens"}
            for overrides in FLA_CASES.values() for dtype in ("float32", "float64")]
    out = fla_runs(runs, tmp_path_factory.mktemp("fla_rwkv7"))
    return {(case, dtype): out[2 * i + j] for i, case in enumerate(FLA_CASES) for j, dtype in enumerate(("float32", "float64"))}


def internal_name(key: str) -> str:
    """fla's parameter name -> ours: only the prefixes differ."""
    key = re.sub(r"^model\.layers\.", "blocks.", key)
    key = re.sub(r"^model\.embeddings\.", "embedding.", key)
    return re.sub(r"^model\.norm\.", "norm_f.", key)


def ours_from(run: dict) -> RWKV7LM:
    model = RWKV7LM(RWKV7Config(**rwkv7_config_kwargs(run["config"]))).eval()
    model.load_state_dict({internal_name(k): v for k, v in run["state_dict"].items()}, strict=True)
    return model.to(run["logits"].dtype)


@pytest.mark.parametrize("case", FLA_CASES)
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("float64", 1e-11)])
def test_logits_and_states_equal_fla(fla_models, case, dtype, tolerance):
    """Logits within ``tolerance`` relative to the logit scale; the matrix states and token-shift states
    after PREFIX tokens of a longer rollout in 7-token calls equal fla's after those PREFIX tokens."""
    run = fla_models[case, dtype]
    model = ours_from(run)
    with torch.no_grad():
        got, _ = model(tokens()[:, :PREFIX])
    scale = run["logits"].abs().max().item()
    assert (got - run["logits"]).abs().max().item() <= tolerance * scale
    chunks = list(rollout(model, tokens(), chunk=7, stops=[PREFIX]))
    state = next(c.state for c in chunks if c.end == PREFIX)
    for layer in range(model.n_layers):
        assert (state.ssm[layer] - run["states"][layer]).abs().max().item() <= tolerance * 10
        assert (state.conv[layer] - run["shifts"][layer]).abs().max().item() <= tolerance * 10


@pytest.mark.parametrize("case", FLA_CASES)
def test_parameter_names_and_count_match_fla(fla_models, case):
    run = fla_models[case, "float32"]
    model = ours_from(run)  # strict load: same names and shapes
    assert model.num_parameters() == model.config.num_parameters() == run["num_parameters"]


def test_fla_directory_loads_and_round_trips(fla_models, tmp_path):
    """An fla-layout directory (config.json with model_type rwkv7, keys model.layers.*) loads with fla's
    logits, and saves back under the same names."""
    from safetensors.torch import save_file

    run = fla_models["tied-no-prenorm-no-bias", "float32"]
    state = {k: v.contiguous() for k, v in run["state_dict"].items() if k != "lm_head.weight"}  # tied: omitted
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(run["config"]))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.arch == "rwkv7" and ckpt.backend == "native"
    with torch.no_grad():
        got, _ = ckpt.model(tokens()[:, :PREFIX])
    assert (got - run["logits"]).abs().max().item() <= 1e-4 * run["logits"].abs().max().item()
    save_checkpoint(ckpt, tmp_path / "again")
    again = load_checkpoint(tmp_path / "again")
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(state)
    with torch.no_grad():
        torch.testing.assert_close(again.model(tokens()[:, :PREFIX])[0], got, rtol=0, atol=0)


# -- the model against itself -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    cfg = RWKV7Config(**(TINY | {"num_hidden_layers": 2}), chunk_size=16)
    torch.manual_seed(0)
    m = RWKV7LM(cfg)
    with torch.no_grad():  # every parameter random (zeros and ones at construction)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def test_one_shot_equals_chunked_equals_token_by_token(model):
    """Calls of 1 token (token by token), 7, 64 and 100 tokens against one call."""
    assert_rollouts_equal_one_shot(model, tokens(), logits_tol=1e-4, state_rtol=1e-4, state_atol=1e-5)


def test_one_shot_equals_token_by_token_in_float64(model):
    m = RWKV7LM(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    x = tokens(length=40)
    state = m.zero_state(2)
    with torch.no_grad():
        expected, final = m(x)
        for t in range(x.shape[1]):
            logits, state = m(x[:, t:t + 1], state)
            assert (logits[:, 0] - expected[:, t]).abs().max().item() <= 1e-12
    for s, s_ref in zip(state.ssm + state.conv, final.ssm + final.conv):
        assert (s - s_ref).abs().max().item() <= 1e-12


def test_a_random_initial_state_carries_the_same_in_any_chunking(model):
    """From random matrix and token-shift states (float64): one call == calls of 1 and 7 tokens."""
    m = RWKV7LM(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(5)
    initial = m.zero_state(2).map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype))
    x = tokens(length=30)
    with torch.no_grad():
        expected, final = m(x, initial)
    assert (expected - m(x)[0]).abs().max().item() > 1e-3  # the initial state matters
    for chunk in (1, 7):
        chunks = list(rollout(m, x, chunk=chunk, state=initial))
        assert (torch.cat([c.logits() for c in chunks], dim=1) - expected).abs().max().item() <= 1e-12
        for s, s_ref in zip(chunks[-1].state.ssm + chunks[-1].state.conv, final.ssm + final.conv):
            assert (s - s_ref).abs().max().item() <= 1e-12


def test_reset_rows_equal_separate_runs(model):
    x = tokens(b=1, length=120).expand(4, -1)
    resets = [0, 1, 50, 97]
    with torch.no_grad():
        got = torch.cat([c.logits() for c in rollout(model, x, chunk=32, resets=resets)], dim=1)
        for row, r in enumerate(resets):
            alone, _ = model(x[row:row + 1, r:])
            assert (got[row, r:] - alone[0]).abs().max().item() <= 1e-4, r
    assert (got[3, :97] - got[0, :97]).abs().max().item() <= 1e-5  # before its reset, row 3 is row 0


def test_hooks_shapes_and_state(model):
    cfg = model.config
    seen = {}
    with hooks(model, {"blocks.*": lambda t, hook: seen.__setitem__(hook.name, t.clone())}), torch.no_grad():
        _, state = model(tokens(length=9))
    b, l, h, dk, dv, d = 2, 9, cfg.num_heads, cfg.head_dim, cfg.head_v_dim, cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        torch.testing.assert_close(seen[f"blocks.{i}.hook_state"], state.ssm[i], rtol=0, atol=0)
        torch.testing.assert_close(seen[f"blocks.{i}.hook_conv_state"], state.conv[i], rtol=0, atol=0)
        assert seen[f"blocks.{i}.hook_state"].shape == (b, h, dk, dv)
        assert seen[f"blocks.{i}.hook_conv_state"].shape == (b, 2, d)
        for name in ("hook_C", "hook_B", "hook_dt", "hook_decay", "hook_iclr", "hook_kk"):
            assert seen[f"blocks.{i}.{name}"].shape == (b, l, h, dk)
        assert seen[f"blocks.{i}.hook_x"].shape == (b, l, h, dv)
        assert seen[f"blocks.{i}.hook_out"].shape == (b, l, d)
        torch.testing.assert_close(seen[f"blocks.{i}.hook_decay"], seen[f"blocks.{i}.hook_dt"].exp())
        assert seen[f"blocks.{i}.hook_decay"].min() > math.exp(-0.6065306597126334)   # RWKV-7's floor
        torch.testing.assert_close(seen[f"blocks.{i}.hook_kk"].norm(dim=-1), torch.ones(b, l, h))
        assert model.by_head(f"blocks.{i}.hook_state", state.ssm[i]).shape == (b, h, dk * dv)
    assert model.state_shapes()[0] == {"ssm": (h, dk, dv), "conv": (2, d)}
    assert model.n_heads == h and backends.get("rwkv7") is RWKV7LM


def test_patching_decay_and_iclr_changes_the_scan(model):
    """alpha = 0 and iclr = 0 in layer 0: its state is the last token's k^T v alone (nothing kept, nothing erased)."""
    x = tokens(b=1, length=12)
    zero = lambda t, hook: torch.zeros_like(t)  # noqa: E731
    seen = {}
    with torch.no_grad(), hooks(model, {"blocks.0.hook_decay": zero, "blocks.0.hook_iclr": zero,
                                        "blocks.0.hook_B": lambda t, hook: seen.__setitem__("k", t),
                                        "blocks.0.hook_x": lambda t, hook: seen.__setitem__("v", t)}):
        _, forgetful = model(x)
    last = seen["k"][0, -1, :, :, None] * seen["v"][0, -1, :, None, :]
    torch.testing.assert_close(forgetful.ssm[0][0], last)


# -- configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 5}, "head_dim"),
    ({"value_dim": 64}, "value_dim"),
    ({"head_dim": None, "num_heads": None}, "head_dim"),
])
def test_config_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        RWKV7Config(**(TINY | bad))


@pytest.mark.parametrize("raw, message", [
    ({"attn": {"layers": [1]}}, "attn {'layers': [1]} is not supported (RWKV-7 layers only)"),
    ({"value_dim": [32, 64]}, "value_dim [32, 64] differs between layers (not supported)"),
    ({"value_dim": 64}, "value_dim 64 is not supported (only hidden_size, 32)"),
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported (only sqrelu)"),
])
def test_a_refused_fla_config_is_one_checkpoint_error(tmp_path, raw, message):
    with pytest.raises(CheckpointError) as info:
        parse_config({"model_type": "rwkv7", "hidden_size": 32, "head_dim": 8, "num_hidden_layers": 2} | raw,
                     tmp_path / "config.json")
    assert str(info.value) == f"{tmp_path / 'config.json'}: {message}"


def test_fla_defaults_give_fla_widths():
    """fla's RWKV7Config defaults: LoRA widths 64/128/64/16 and intermediate_size 4 d rounded up to 32."""
    cfg = RWKV7Config(**rwkv7_config_kwargs({"hidden_size": 80, "num_hidden_layers": 1, "vocab_size": 10,
                                               "head_dim": 16}))
    assert (cfg.decay_low_rank_dim, cfg.gate_low_rank_dim, cfg.a_low_rank_dim, cfg.v_low_rank_dim) == (64, 128, 64, 16)
    assert cfg.intermediate_size == 320 and cfg.num_heads == 5 and cfg.value_dim == 80


# -- mitigations --------------------------------------------------------------------------------------

def test_window_is_refused_in_one_line(model):
    with pytest.raises(BadInput) as info:
        apply_mitigation(model, "window:r=8")
    assert str(info.value).startswith("--mitigation window:r=8: not exact on rwkv7: its transition")
    assert getattr(model, "mitigation", None) is None


def test_scale_equals_the_recurrence_with_scaled_decay_and_keys(model):
    """scale:alpha=A,B=S on layer 0: its state equals fla's naive DPLR recurrence run on layer 0's own
    inputs with log-decay w + log A and keys S k (layer 0's inputs do not depend on the mitigation)."""
    dplr_recurrence = fla_naive("generalized_delta_rule/dplr", "dplr_recurrence")
    x = tokens(b=1, length=30)
    seen = {}
    keep = lambda name: lambda t, hook: seen.__setitem__(name, t.clone())  # noqa: E731
    with torch.no_grad(), hooks(model, {f"blocks.0.hook_{n}": keep(n) for n in ("C", "B", "x", "dt", "iclr", "kk")}):
        model(x)
    with torch.no_grad(), apply_mitigation(model, "scale:alpha=0.9,B=0.5"):
        _, scaled = model(x)
        chunked_then_steps = [model(x[:, :13])[1]]
        chunked_then_steps.append(model(x[:, 13:], chunked_then_steps[0])[1])
    kk = seen["kk"]
    t = [z.transpose(1, 2) for z in (seen["C"] * kk.shape[-1] ** 0.5, seen["B"] * 0.5, seen["x"], -kk,
                                      kk * seen["iclr"], seen["dt"] + math.log(0.9))]
    _, S = dplr_recurrence(*t, output_final_state=True)
    assert (scaled.ssm[0] - S).abs().max().item() <= 1e-5 * S.abs().max().item()
    for s, s_ref in zip(chunked_then_steps[1].ssm, scaled.ssm):
        torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)


def test_cap_runs_the_recurrence_token_by_token(model):
    """cap with a multiplier far above any norm reached caps nothing: the same logits as the plain model."""
    x = tokens(b=1, length=24)
    with torch.no_grad():
        plain, _ = model(x)
        with apply_mitigation(model, "cap:multiplier=1e6", calibration=x, train_len=24) as applied:
            capped, _ = model(x)
    assert applied.thresholds.shape == (model.n_layers, model.n_heads)
    torch.testing.assert_close(capped, plain, rtol=1e-4, atol=1e-4)


# -- analyses and the report --------------------------------------------------------------------------

def test_decay_reports_exp_w_per_head(model):
    """decay's mean_alpha and retention equal those computed from exp(w) seen at hook_decay in one call,
    and layer 0's exp(w) equals the formula from its parameters: exp(-exp(-1/2) sigmoid(w_lora(x_w)))."""
    from test_decay import check_against

    from statelens.analysis.decay import decay

    slow = RWKV7LM(model.config).eval()
    slow.load_state_dict(model.state_dict())
    with torch.no_grad():  # decays near 1, so retention stays measurable
        for block in slow.blocks:
            block.attn.w_lora.lora[2].bias.fill_(-4.0)
            block.attn.w_lora.lora[2].weight.mul_(0.1)
    x = tokens(length=24)
    seen = {}
    with torch.no_grad(), hooks(slow, {"blocks.*.hook_decay": lambda t, hook: seen.__setitem__(hook.layer, t)}):
        slow(x)
    block = slow.blocks[0]
    with torch.no_grad():
        u = block.attn_norm(block.pre_norm(slow.embedding(x)))
        x_w = u + (F.pad(u, (0, 0, 1, -1)) - u) * block.attn.x_w
        alpha0 = torch.exp(-math.exp(-0.5) * torch.sigmoid(block.attn.w_lora(x_w)))
    torch.testing.assert_close(seen[0], alpha0.view_as(seen[0]), rtol=1e-6, atol=1e-6)
    df = decay(slow, x.numpy(), buckets=6, scale="linear", chunk=5)
    check_against(df, [seen[i] for i in range(slow.n_layers)], x.shape[1], 6, "linear", slow)


def fla_directory(path: Path, model: RWKV7LM) -> Path:
    """``model`` written as flash-linear-attention writes an rwkv7 checkpoint: config.json and fla's names."""
    from safetensors.torch import save_file

    cfg = model.config
    names = (("blocks.", "model.layers."), ("embedding.", "model.embeddings."), ("norm_f.", "model.norm."))
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in names:
            key = theirs + key.removeprefix(ours) if key.startswith(ours) else key
        state[key] = value.contiguous()
    path.mkdir(parents=True)
    save_file(state, path / "model.safetensors")
    keys = ("hidden_size", "num_hidden_layers", "vocab_size", "head_dim", "decay_low_rank_dim", "gate_low_rank_dim",
            "a_low_rank_dim", "v_low_rank_dim", "intermediate_size")
    (path / "config.json").write_text(json.dumps({"model_type": "rwkv7"} | {k: getattr(cfg, k) for k in keys}))
    return path


def test_report_renders_every_figure_on_a_tiny_rwkv7(tmp_path):
    """`statelens report` on an fla rwkv7 directory: every figure and its tables, as on Mamba-2."""
    from test_report import FIGURES, SMALL, Page, cli

    torch.manual_seed(0)
    tiny = RWKV7LM(RWKV7Config(**(TINY | {"num_hidden_layers": 1, "vocab_size": 256})))
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ckpt = fla_directory(tmp_path / "ckpt", tiny)
    text = tmp_path / "docs.txt"
    text.write_text(" ".join(f"word{i % 97} and some more text number {i}." for i in range(200)))
    cli("report", "--ckpt", ckpt, "--data", text, *SMALL, "--out", tmp_path / "out")
    page = Page((tmp_path / "out" / "index.html").read_text(encoding="utf-8"))
    assert {f"fig-{f}" for f in FIGURES} <= page.ids()
    assert sum(t == "svg" for t, _ in page.tags) == len(FIGURES)
    alpha = pd.read_csv(next((tmp_path / "out").glob("**/decay.csv"))).mean_alpha
    assert alpha.between(math.exp(-0.6065306597126334), 1).all()
