"""The Mamba-3 backend against an independent oracle, and against itself across chunkings.

mamba-ssm's Mamba-3 runs only in Triton/TileLang/CuTe kernels (no CPU path; under Triton's interpreter its
SISO kernel returns wrong numbers) and fla's ``Mamba3`` layer calls those same kernels, so the oracle here
is written in this file from the paper's complex-valued form: the state of each rotated pair of
dimensions is a complex number whose transition is ``alpha_t exp(-i dtheta_t)`` (the state is rotated,
B and C are not), from mamba-ssm's reference semantics (``mamba3_siso_step_ref`` in its tests): the
in_proj split ``[z, x, B, C, dd_dt, dd_A, trap, angles]``, RMSNorm then bias on B and C, softplus A
floored at A_floor, ``theta += dt * pi * tanh(angle)``, ``y = (h C + D x) * silu(z)``.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from statelens.interventions.mitigations import apply_mitigation
from statelens.models import Mamba3Config, Mamba3LM, backends, hooks, load_checkpoint, save_checkpoint
from statelens.models.checkpoint import mamba_ssm_checkpoint, parse_config
from statelens.models.mamba3 import mamba3_chunked, mamba3_sequential
from statelens.record import rollout
from tests.conftest import assert_rollouts_equal_one_shot

VOCAB = 53


def tiny(dtype=torch.float64, n_layer=2, **overrides) -> Mamba3LM:
    """A tiny Mamba-3 with every parameter moved off its constant initialisation."""
    kwargs = dict(d_model=16, n_layer=n_layer, vocab_size=VOCAB, d_state=8, headdim=8, ngroups=2, chunk_size=8,
                  tie_embeddings=False) | overrides
    torch.manual_seed(0)
    model = Mamba3LM(Mamba3Config(**kwargs)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("in_proj.weight", "out_proj.weight", "embedding.weight", "lm_head.weight")):
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("dt_bias"):
                p.sub_(1.0)
    return model


def oracle_mixer(mx, cfg, u, h, B_prev, x_prev, theta):
    """One token through a Mamba-3 mixer in the complex form. u [b, d]; h [b, H, p, n] and B_prev
    [b, H, R * n] in the rotated frame of theta [b, H, a] (as the backend stores them), x_prev [b, H, p]
    -> (out [b, d], the new h, B, x, theta, in the same frame). MIMO (rank R): x and z are up-projected per
    rank, the state takes the sum of the R insertions, the R readouts are gated and contracted."""
    H, P, N, G, a, R = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups, cfg.num_rope_angles, cfg.rank
    z, x, B, C, dd_dt, dd_A, trap, angle = F.linear(u, mx.in_proj.weight).split(
        [cfg.d_inner, cfg.d_inner, R * G * N, R * G * N, H, H, H, a], dim=-1)
    x, z = x.view(-1, H, P), z.view(-1, H, P)

    def norm_bias(v, norm, bias):   # -> [b, H, R, N]
        v = v.view(-1, R, G, N)
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
        return (v.repeat_interleave(H // G, dim=2) + bias.transpose(0, 1)).transpose(1, 2)

    def per_rank(v, name):          # [b, H, P] -> [b, H, R, P]
        return v[:, :, None] * getattr(mx, name) if cfg.is_mimo else v[:, :, None]
    B, C = norm_bias(B, mx.B_norm, mx.B_bias), norm_bias(C, mx.C_norm, mx.C_bias)
    xr, xpr = per_rank(x, "mimo_x"), per_rank(x_prev, "mimo_x")
    dt = F.softplus(dd_dt + mx.dt_bias)
    act = F.softplus(dd_A) if cfg.a_activation == "softplus" else torch.where(dd_A >= 0, 1 + dd_A, 1 / (1 - dd_A))
    alpha = torch.exp(-dt * torch.clamp(act, min=cfg.A_floor))
    lam = torch.sigmoid(trap)
    dtheta = dt[..., None] * math.pi * torch.tanh(angle)[:, None, :]              # [b, H, a]

    # the rotated pairs: adjacent dims (SISO), dims i and i + N / 2 (MIMO); first 2a of ``order`` pair up
    pairs = [(2 * i, 2 * i + 1) if not cfg.is_mimo else (i, i + N // 2) for i in range(a)]
    order = [d for pair in pairs for d in pair]
    order += [d for d in range(N) if d not in order]

    def complex_pairs(v):   # [..., N] -> rotated pairs as complex [..., a], the rest real
        v = v[..., order]
        return torch.complex(v[..., 0:2 * a:2], v[..., 1:2 * a:2]), v[..., 2 * a:]

    def real(c, rest):
        ordered = torch.cat([torch.stack([c.real, c.imag], dim=-1).flatten(-2), rest], dim=-1)
        return ordered[..., [order.index(d) for d in range(N)]]
    # into the complex frame of the previous token: undo theta (state) ...
    spin = torch.polar(torch.ones_like(theta), -theta)                             # exp(-i theta)
    hc, hr = complex_pairs(h)
    Bpc, Bpr = complex_pairs(B_prev.view(-1, H, R, N))
    hc, Bpc = hc * spin[:, :, None], Bpc * spin[:, :, None]
    # ... then one step: the transition rotates the state (and the previous input) by -dtheta.
    turn = torch.polar(torch.ones_like(dtheta), -dtheta)
    Bc, Br = complex_pairs(B)
    beta, gamma = ((1 - lam) * dt * alpha)[..., None, None], (lam * dt)[..., None, None]
    outer = lambda xs, Bs: torch.einsum("bhrp,bhrk->bhpk", xs.to(Bs.dtype), Bs)  # noqa: E731
    hc = alpha[..., None, None] * turn[:, :, None] * hc + beta * outer(xpr, turn[:, :, None] * Bpc) + gamma * outer(xr, Bc)
    hr = alpha[..., None, None] * hr + beta * outer(xpr, Bpr) + gamma * outer(xr, Br)
    Cc, Cr = complex_pairs(C)
    y = (torch.einsum("bhpa,bhra->bhrp", hc, Cc.conj()).real + torch.einsum("bhpk,bhrk->bhrp", hr, Cr)
         + mx.D[:, None, None] * xr)
    zr = per_rank(z, "mimo_z")
    if cfg.is_outproj_norm:  # mamba-ssm's RMSNormGated(norm_before_gate=True, group_size=headdim), per rank
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * mx.norm.weight.view(H, 1, P)
    y = y * F.silu(zr)
    y = (y * mx.mimo_o).sum(2) if cfg.is_mimo else y[:, :, 0]
    out = F.linear(y.flatten(1), mx.out_proj.weight)
    # back to the rotated frame of the new theta
    theta = (theta + dtheta).remainder(2 * math.pi)
    back = torch.polar(torch.ones_like(theta), theta)
    return out, real(hc * back[:, :, None], hr), real(Bc * back[:, :, None], Br).flatten(-2), x, theta


def oracle(model, tokens, state=None):
    """The whole model a token at a time through :func:`oracle_mixer`: logits [b, l, vocab] and the final
    state as the backend lays it out (ssm, and conv = previous B, x, theta)."""
    cfg = model.config
    n, p = cfg.d_state, cfg.headdim
    state = state or model.zero_state(tokens.shape[0])
    ssm = list(state.ssm)
    carry = [c.split([cfg.rank * n, p, cfg.num_rope_angles], dim=-1) for c in state.conv]
    logits = []
    for t in range(tokens.shape[1]):
        res = model.embedding(tokens[:, t])
        for i, block in enumerate(model.blocks):
            u = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * block.norm.weight
            out, ssm[i], *carry[i] = oracle_mixer(block.mixer, cfg, u, ssm[i], *carry[i])
            res = res + out
        res = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * model.norm_f.weight
        logits.append(model.lm_head(res))
    return torch.stack(logits, dim=1), ssm, [torch.cat(c, dim=-1) for c in carry]


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))


def random_scan_inputs(b=2, l=37, h=3, p=4, n=6, r=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    log_a = -torch.rand(b, l, h, generator=gen, dtype=torch.float64) * 2
    gamma, eta = torch.rand(b, l, h, generator=gen, dtype=torch.float64), torch.rand(b, l, h, generator=gen, dtype=torch.float64)
    return (rand(b, l, h, r, p), log_a, rand(b, l, h, r, n), rand(b, l, h, r, n), gamma, eta, rand(b, h, p, n),
            rand(b, h, r, n), rand(b, h, r, p))


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_scan_equals_sequential(chunk, rank):
    inputs = random_scan_inputs(r=rank)
    y_ref, h_ref = mamba3_sequential(*inputs)
    y, h = mamba3_chunked(*inputs, chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_logits_and_states_equal_the_oracle_float64(model, tokens):
    """From a random carried state (ssm, previous B and x, angle): every logit and the final state."""
    gen = torch.Generator().manual_seed(5)
    start = model.zero_state(2).map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype))
    expected, ssm, carry = oracle(model, tokens[:, :40], start)
    with torch.no_grad():
        got, state = model(tokens[:, :40], start)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-10 * scale
    for i in range(model.n_layers):
        torch.testing.assert_close(state.ssm[i], ssm[i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state.conv[i], carry[i], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", [{"rope_fraction": 1.0}, {"is_outproj_norm": True}, {"a_activation": "heavy_tail"},
                                     {"ngroups": 1, "d_state": 6}, {"is_mimo": True, "mimo_rank": 3},
                                     {"is_mimo": True, "mimo_rank": 2, "is_outproj_norm": True, "rope_fraction": 1.0}])
def test_variants_equal_the_oracle(variant, tokens):
    """Every rotated dimension, the per-head output norm, mamba-ssm main's A activation, one B/C group
    with an odd number of angles (d_state 6 at rope_fraction 0.5: one pair rotated, four dims not)."""
    model = tiny(n_layer=1, **variant)
    assert model.num_parameters() == model.config.num_parameters()   # what the loader checks before allocating
    expected, ssm, _ = oracle(model, tokens[:, :24])
    with torch.no_grad():
        got, state = model(tokens[:, :24])
    assert (got - expected).abs().max().item() <= 1e-10 * expected.abs().max().item()
    torch.testing.assert_close(state.ssm[0], ssm[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("p", [1, 33])
def test_states_after_p_tokens_equal_the_oracle(model, tokens, p):
    _, ssm, carry = oracle(model, tokens[:, :p])
    state = model.zero_state(2)
    with torch.no_grad():
        for c in rollout(model, tokens[:, :p], chunk=7):
            state = c.state
    for i in range(model.n_layers):
        torch.testing.assert_close(state.ssm[i], ssm[i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state.conv[i], carry[i], rtol=1e-10, atol=1e-10)


def test_logits_equal_the_oracle_float32(tokens):
    model = tiny()
    expected, _, _ = oracle(model, tokens[:, :50])
    model = model.float()
    with torch.no_grad():
        got, _ = model(tokens[:, :50])
    assert (got.double() - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_one_shot_equals_chunked_equals_token_by_token(model, tokens, one_thread):
    assert_rollouts_equal_one_shot(model, tokens, logits_tol=1e-9, state_rtol=1e-9, state_atol=1e-9)


def test_mimo_one_shot_equals_chunked_equals_token_by_token(tokens):
    model = tiny(is_mimo=True, mimo_rank=3)
    assert_rollouts_equal_one_shot(model, tokens[:, :40], logits_tol=1e-9, state_rtol=1e-9, state_atol=1e-9,
                                   chunks=(1, 7))
    assert model.state_shapes()[0]["conv"] == (4, 3 * 8 + 8 + 2)


def test_reset_rows_equal_separate_runs(model, tokens):
    x = tokens[:1].expand(4, -1)
    resets = [0, 1, 37, 90]
    with torch.no_grad():
        got = torch.cat([c.logits() for c in rollout(model, x, chunk=16, resets=resets)], dim=1)
        for row, r in enumerate(resets):
            alone, _ = model(x[row:row + 1, r:])
            torch.testing.assert_close(got[row, r:], alone[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[3, :90], got[0, :90], rtol=1e-9, atol=1e-9)


def test_hooks_shapes_and_meaning(model):
    cfg = model.config
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    seen = {}
    with hooks(model, {"blocks.*": lambda t, hook: seen.__setitem__(hook.name, t.clone())}), torch.no_grad():
        _, state = model(tokens)
    b, l, h, p, n, a = 2, 9, cfg.nheads, cfg.headdim, cfg.d_state, cfg.num_rope_angles
    for i in range(cfg.n_layer):
        name = f"blocks.{i}."
        torch.testing.assert_close(seen[name + "hook_state"], state.ssm[i], rtol=0, atol=0)
        torch.testing.assert_close(seen[name + "hook_conv_state"], state.conv[i], rtol=0, atol=0)
        assert seen[name + "hook_x"].shape == (b, l, h, p)
        assert seen[name + "hook_B"].shape == seen[name + "hook_C"].shape == (b, l, h, n)
        assert seen[name + "hook_angle"].shape == (b, l, h, a)
        for key in ("hook_dt", "hook_decay", "hook_lambda"):
            assert seen[name + key].shape == (b, l, h)
        assert 0 < seen[name + "hook_decay"].min() and seen[name + "hook_decay"].max() < 1
        # the carry holds the last token's rotated B and x and its angle
        torch.testing.assert_close(state.conv[i], torch.cat([seen[name + "hook_B"][:, -1], seen[name + "hook_x"][:, -1],
                                                             seen[name + "hook_angle"][:, -1]], dim=-1))
        assert model.by_head(name + "hook_decay", seen[name + "hook_decay"]).shape == (b, l, h, 1)
    assert model.state_shapes()[0] == {"ssm": (h, p, n), "conv": (h, n + p + a)}
    assert backends.get("mamba3") is Mamba3LM


def test_patching_decay_to_zero_forgets_all_but_the_last_two_tokens(model):
    """alpha = 0 also zeroes beta (= (1 - lambda) dt alpha): the state is the last token's gamma x B^T."""
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    seen = {}
    with torch.no_grad(), hooks(model, [("blocks.0.hook_decay", lambda t, hook: torch.zeros_like(t)),
                                        ("blocks.0.hook_*", lambda t, hook: seen.__setitem__(hook.name, t))]):
        _, forgotten = model(tokens)
    x, B = seen["blocks.0.hook_x"][:, -1], seen["blocks.0.hook_B"][:, -1]
    gamma = (seen["blocks.0.hook_lambda"] * seen["blocks.0.hook_dt"])[:, -1]
    torch.testing.assert_close(forgotten.ssm[0], gamma[..., None, None] * x[..., None] * B[..., None, :])


# -- checkpoints ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mimo", [False, True])
def test_mamba_ssm_directory_round_trip(model, tokens, tmp_path, mimo):
    model = tiny(is_mimo=True, mimo_rank=2) if mimo else model
    path = save_checkpoint(mamba_ssm_checkpoint(model, tmp_path / "src"), tmp_path / "ssm")
    raw = json.loads((path / "config.json").read_text())
    assert raw["ssm_cfg"]["layer"] == "Mamba3" and "d_conv" not in raw["ssm_cfg"]
    loaded = load_checkpoint(path, dtype=torch.float64)
    assert loaded.arch == "mamba3" and loaded.format == "mamba_ssm"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens)[0], model(tokens)[0], rtol=0, atol=0)
    again = save_checkpoint(loaded, tmp_path / "again")
    assert json.loads((again / "config.json").read_text()) == raw


def test_fla_directory_loads(model, tokens, tmp_path):
    """fla's Mamba3ForCausalLM layout: model_type mamba3, its key names, backbone.embeddings."""
    cfg = model.config
    raw = {"model_type": "mamba3", "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "vocab_size": VOCAB,
           "state_size": cfg.d_state, "head_dim": cfg.headdim, "n_groups": cfg.ngroups, "expand": cfg.expand,
           "chunk_size": 16, "norm_eps": 1e-5, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    names = {"blocks.": "backbone.layers.", "embedding.": "backbone.embeddings.", "norm_f.": "backbone.norm_f."}

    def external(k):
        return next((v + k[len(o):] for o, v in names.items() if k.startswith(o)), k)
    torch.save({external(k): v for k, v in model.state_dict().items()}, tmp_path / "pytorch_model.bin")
    loaded = load_checkpoint(tmp_path, dtype=torch.float64)
    assert loaded.arch == "mamba3" and loaded.format == "hf"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens)[0], model(tokens)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ssm_cfg, needle", [
    ({"is_mimo": True, "d_state": 7}, "d_state (7) must be even for MIMO"),
    ({"rope_fraction": 0.25}, "rope_fraction must be 0.5 or 1.0"),
    ({"a_activation": "relu"}, "a_activation must be one of softplus, heavy_tail"),
    ({"d_conv": 4}, "ssm_cfg key(s) d_conv not understood for Mamba3"),
    ({"is_mimo": True, "mimo_rank": 0}, "mimo_rank must be a positive integer"),
    ({"headdim": 7}, "must be a multiple of headdim"),
], ids=["mimo-odd-d_state", "rope_fraction", "a_activation", "d_conv", "mimo_rank", "headdim"])
def test_bad_mamba_ssm_configs_are_one_line(ssm_cfg, needle, tmp_path):
    from statelens.errors import CheckpointError

    raw = {"d_model": 16, "n_layer": 1, "vocab_size": 8, "ssm_cfg": {"layer": "Mamba3", "d_state": 8} | ssm_cfg}
    with pytest.raises(CheckpointError) as info:
        parse_config(raw, tmp_path / "config.json")
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: ") and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_heavy_tail_activation():
    """mamba-ssm main's f(x) = 1 + x for x >= 0, 1 / (1 - x) below."""
    from statelens.models.mamba3 import a_activation

    x = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    torch.testing.assert_close(a_activation(x, "heavy_tail"), torch.tensor([0.25, 1 / 1.5, 1.0, 3.0]))


# -- mitigations ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mimo", [{}, {"is_mimo": True, "mimo_rank": 2}])
def test_window_state_is_the_state_difference(tokens, mimo):
    """window:r keeps h_t - alpha_{t-r+1:t} h_{t-r} (computed from the plain run's states, token by token);
    one layer, so the layer's input does not depend on the mitigation."""
    model, r = tiny(n_layer=1, **mimo), 5
    plain, alphas, state = [], [], model.zero_state(2)
    with torch.no_grad(), hooks(model, {"blocks.0.hook_decay": lambda t, hook: alphas.append(t[:, 0])}):
        for t in range(30):
            _, state = model(tokens[:, t:t + 1], state)
            plain.append(state.ssm[0])
    with apply_mitigation(model, f"window:r={r}"), torch.no_grad():
        for chunk in (1, 7, 30):
            states = [c.state.ssm[0] for c in rollout(model, tokens[:, :30], chunk=chunk)]
            t = 29
            retained = torch.stack(alphas[t - r + 1:t + 1]).prod(0)[..., None, None]
            torch.testing.assert_close(states[-1], plain[t] - retained * plain[t - r], rtol=1e-10, atol=1e-10)


def test_scale_multiplies_alpha_in_beta_too(tokens):
    """scale:alpha=s equals the oracle run with every alpha (and so beta) times s."""
    model = tiny(n_layer=1)
    with torch.no_grad():
        with hooks(model, {"blocks.0.hook_decay": lambda t, hook: t * 0.9}):
            expected, _ = model(tokens[:, :20])
        with apply_mitigation(model, "scale:alpha=0.9"):
            got, _ = model(tokens[:, :20])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cap_steps_equal_the_chunked_scan_when_nothing_is_capped(tokens):
    model = tiny(n_layer=1)
    with torch.no_grad():
        expected, _ = model(tokens[:, :30])
        with apply_mitigation(model, "cap:multiplier=1000", calibration=tokens[:, :30], train_len=30):
            got, _ = model(tokens[:, :30])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# -- the report ----------------------------------------------------------------------------------------

def test_report_renders_every_figure_on_a_tiny_mamba3(tmp_path):
    """`statelens report` on a tiny Mamba-3 in mamba-ssm's layout: every figure drawn, and the decay table
    holds one row per (bucket, layer, head) with alpha = exp(dt * A) in (0, 1)."""
    import pandas as pd
    import typer

    from statelens.cli import report as report_cli

    model = tiny(torch.float32, vocab_size=256)
    ckpt = save_checkpoint(mamba_ssm_checkpoint(model, tmp_path / "src"), tmp_path / "ckpt")
    text = tmp_path / "docs.txt"
    text.write_text(" ".join(f"word{i % 97} and some more text number {i}." for i in range(100)))
    app = typer.Typer()
    app.command("report")(report_cli.report)
    app.command("compare")(report_cli.compare)
    app(["report", "--ckpt", str(ckpt), "--data", str(text), "--train-len", "16", "--length", "48", "--num-seqs", "1",
         "--buckets", "4", "--out", str(tmp_path / "out")], standalone_mode=False)
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    figures = ["perplexity", "remembrance", "state-norm", "state-std", "decay", "coverage", "logits-drift"]
    assert all(f'id="fig-{f}"' in html for f in figures) and html.count("<svg") == len(figures)
    decay = pd.read_csv(next((tmp_path / "out").rglob("decay/decay.csv")))
    assert set(decay["head"]) == set(range(model.n_heads)) and set(decay["layer"]) == {0, 1}
    assert decay["mean_alpha"].between(0, 1, inclusive="neither").all()
