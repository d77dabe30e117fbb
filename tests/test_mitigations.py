"""Training-free mitigations against a direct computation: each backend's whole forward written out token
by token from the model's weights, with the mitigation applied literally (alpha and B times constants;
every head's state scaled back to its threshold after each token; the output reading
h_p - alpha_{p-r+1:p} h_{p-r}), in float64."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from statelens.analysis.positionwise import positionwise
from statelens.analysis.remembrance import remembrance
from statelens.errors import BadInput
from statelens.interventions.mitigations import Cap, Scale, Window, apply_mitigation, parse_mitigation, spec
from statelens.models import GLALM, GLAConfig, Mamba1Config, Mamba1LM, Mamba2Config, Mamba2LM, load_checkpoint
from statelens.record import rollout
from statelens.record.recorder import record

VOCAB, LENGTH, TRAIN_LEN = 32, 40, 16
TOL = {"rtol": 0, "atol": 1e-10}


def tiny(arch: str) -> torch.nn.Module:
    """A 2-layer float64 model with its constant-initialised parameters moved off their constants."""
    torch.manual_seed(0)
    model = {
        "mamba2": lambda: Mamba2LM(Mamba2Config(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4, headdim=4,
                                                ngroups=2, chunk_size=8)),
        "mamba1": lambda: Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4)),
        "gla": lambda: GLALM(GLAConfig(hidden_size=16, num_hidden_layers=2, vocab_size=VOCAB, num_heads=2,
                                       chunk_size=8, gate_logit_normalizer=4)),
    }[arch]().double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", ".D", "norm.weight", "conv1d.bias", "dt_proj.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))


# -- the direct computation ----------------------------------------------------------------------------

def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def conv_step(window, x, conv):
    """Shifts x [b, c] into the conv window [b, c, k]; the causal conv's output, after SiLU."""
    window = torch.cat([window[..., 1:], x[..., None]], dim=-1)
    return window, F.silu((window * conv.weight[:, 0]).sum(-1) + conv.bias)


def mamba2_layer(mx, cfg, u, conv, alpha_scale, B_scale):
    """One token through a Mamba-2 mixer up to the scan: alpha [b, h], insertion u_t [b, h, p, n], and the
    readout (state [b, h, p, n] -> output [b, d_model]). ``conv`` [b, conv_dim, k] is updated in place."""
    H, P, N, G = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
    z, xBC, dt = F.linear(u, mx.in_proj.weight).split([cfg.d_ssm, cfg.conv_dim, H], dim=-1)
    conv[:], xBC = conv_step(conv, xBC, mx.conv1d)
    x, B, C = xBC.split([cfg.d_ssm, G * N, G * N], dim=-1)
    x = x.view(-1, H, P)
    B, C = (t.view(-1, G, N).repeat_interleave(H // G, dim=1) for t in (B, C))
    dt = F.softplus(dt + mx.dt_bias)
    alpha = alpha_scale * torch.exp(-dt * torch.exp(mx.A_log))
    insertion = (dt[..., None] * x)[..., None] * (B_scale * B)[:, :, None, :]

    def readout(h):
        y = torch.einsum("bhpn,bhn->bhp", h, C) + mx.D[:, None] * x
        y = (y.reshape(-1, cfg.d_ssm) * F.silu(z)).unflatten(-1, (G, -1))
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.gated_norm_eps)).flatten(-2) * mx.norm.weight
        return F.linear(y, mx.out_proj.weight)
    return alpha[..., None, None], insertion, readout


def mamba1_layer(mx, cfg, u, conv, alpha_scale, B_scale):
    """As mamba2_layer for Mamba-1: alpha [b, d, n], insertion [b, d, n]."""
    x, z = F.linear(u, mx.in_proj.weight).chunk(2, dim=-1)
    conv[:], x = conv_step(conv, x, mx.conv1d)
    dt_low, B, C = F.linear(x, mx.x_proj.weight).split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
    dt = F.softplus(F.linear(dt_low, mx.dt_proj.weight, mx.dt_proj.bias))
    alpha = alpha_scale * torch.exp(-dt[..., None] * torch.exp(mx.A_log))
    insertion = (dt * x)[..., None] * (B_scale * B)[:, None, :]

    def readout(h):
        y = (torch.einsum("bdn,bn->bd", h, C) + mx.D * x) * F.silu(z)
        return F.linear(y, mx.out_proj.weight)
    return alpha, insertion, readout


def gla_layer(attn, cfg, u, conv, alpha_scale, B_scale):
    """As mamba2_layer for GLA: alpha [b, h, k, 1] (per key dim), insertion k_t^T v_t [b, h, k, v]."""
    h, dk, dv = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
    q, k = attn.q_proj(u).view(-1, h, dk), attn.k_proj(u).view(-1, h, dk)
    v = attn.v_proj(u).view(-1, h, dv)
    alpha = alpha_scale * torch.exp(F.logsigmoid(attn.gk_proj(u)) / cfg.gate_logit_normalizer).view(-1, h, dk)
    insertion = (B_scale * k)[..., None] * v[:, :, None, :]

    def readout(S):
        o = torch.einsum("bhk,bhkv->bhv", q * dk ** -0.5, S)
        o = rms(o, getattr(attn, attn.norm_name).weight, cfg.norm_eps) * F.silu(attn.g_proj(u).view(-1, h, dv))
        return attn.o_proj(o.flatten(1))
    return alpha[..., None], insertion, readout


def direct(model, tokens, *, alpha=1.0, B=1.0, tau=None, cap_every=None, r=None):
    """Logits [b, l, vocab] and the states carried, per layer [b, l + 1, *state] (entry p after p
    tokens), token by token. ``tau`` [layers, heads]: cap each head's norm after every token (the
    output reads the capped state), or with ``cap_every`` only the state carried from positions that
    are multiples of it (the output there reads the uncapped state); ``r``: read (and carry)
    h_p - alpha_{p-r+1:p} h_{p-r}."""
    arch, cfg = model.arch, model.config
    b, length = tokens.shape
    zero = model.zero_state(b)
    states = [[s] for s in zero.ssm]                                 # the plain (or capped) recurrence
    alphas = [[] for _ in model.blocks]
    convs = [torch.zeros(b, c.shape[1], c.shape[2] + 1, dtype=torch.float64) for c in zero.conv]
    read_states, logits = [[s] for s in zero.ssm], []
    layer = {"mamba2": mamba2_layer, "mamba1": mamba1_layer, "gla": gla_layer}[arch]
    for t in range(length):
        res = model.embedding.weight[tokens[:, t]]
        for i, block in enumerate(model.blocks):
            mixer = block.attn if arch == "gla" else block.mixer
            u = rms(res, (block.attn_norm if arch == "gla" else block.norm).weight, cfg.norm_eps)
            a, insertion, readout = layer(mixer, cfg, u, convs[i], alpha, B)
            h = a * states[i][-1] + insertion
            read = h
            if tau is not None:
                norms = h.reshape(b, len(tau[i]), -1).norm(dim=-1)                   # [b, heads]
                factor = torch.where(norms > tau[i], tau[i] / norms, torch.ones_like(norms))
                capped = (h.reshape(b, len(tau[i]), -1) * factor[..., None]).reshape(h.shape)
                if cap_every is None:
                    h = read = capped
                elif (t + 1) % cap_every == 0:
                    h = capped
            states[i].append(h)
            alphas[i].append(a)
            p = t + 1
            if r is not None and p - r >= 0:
                read = h - math.prod(alphas[i][p - r:p]) * states[i][p - r]
            read_states[i].append(h if r is None else read)
            res = res + readout(read)
            if arch == "gla":
                res = res + block.mlp(block.mlp_norm(res))
        logits.append(model.lm_head(rms(res, model.norm_f.weight, cfg.norm_eps)))
    return torch.stack(logits, dim=1), [torch.stack(s, dim=1) for s in read_states]


def max_norms(states, n_heads, upto):
    """[layers, heads]: the largest per-head norm over positions 1..upto and the batch."""
    return torch.stack([s[:, 1:upto + 1].flatten(2).unflatten(2, (n_heads, -1)).norm(dim=-1).amax((0, 1))
                        for s in states])


def mitigated_run(model, tokens, chunk):
    """Logits [b, l, vocab] and final SSM states of a chunked rollout."""
    pieces = list(rollout(model, tokens, chunk=chunk))
    return torch.cat([p.logits() for p in pieces], dim=1), pieces[-1].state.ssm


def assert_matches(model, tokens, expected_logits, expected_states, chunks=(LENGTH, 7, 1)):
    with torch.no_grad():
        for chunk in chunks:
            logits, final = mitigated_run(model, tokens, chunk)
            torch.testing.assert_close(logits, expected_logits, **TOL, msg=f"chunk {chunk}")
            for got, want in zip(final, expected_states):
                torch.testing.assert_close(got, want[:, -1], **TOL, msg=f"chunk {chunk}")


# -- the direct computation is the model ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mamba2", "mamba1", "gla"])
def test_direct_computation_equals_the_unmitigated_model(arch, tokens):
    model = tiny(arch)
    with torch.no_grad():
        assert_matches(model, tokens, *direct(model, tokens), chunks=(LENGTH,))


# -- scale ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mamba2", "mamba1", "gla"])
def test_scale_matches_direct_recurrence(arch, tokens):
    model = tiny(arch)
    with torch.no_grad():
        expected = direct(model, tokens, alpha=0.9, B=0.5)
        plain = model(tokens)[0]
    with apply_mitigation(model, "scale:alpha=0.9,B=0.5"):
        assert_matches(model, tokens, *expected)
    assert (expected[0] - plain).abs().max() > 1e-2  # the mitigation changed something
    torch.testing.assert_close(model(tokens)[0], plain, rtol=0, atol=0)  # removed


@pytest.mark.parametrize("arch", ["mamba2", "mamba1", "gla"])
def test_scale_one_equals_unmitigated(arch, tokens):
    model = tiny(arch)
    with torch.no_grad():
        plain, plain_state = model(tokens)
        with apply_mitigation(model, "scale:alpha=1,B=1"):
            got, state = model(tokens)
    torch.testing.assert_close(got, plain, **TOL)
    for a, b in zip(state.ssm, plain_state.ssm):
        torch.testing.assert_close(a, b, **TOL)


# -- cap --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mamba2", "mamba1", "gla"])
def test_cap_thresholds_are_the_multiplier_times_the_in_context_max_norm(arch, tokens):
    model = tiny(arch)
    with torch.no_grad():
        _, states = direct(model, tokens[:, :TRAIN_LEN])
    with apply_mitigation(model, "cap:multiplier=1.5", calibration=tokens, train_len=TRAIN_LEN, chunk=5) as applied:
        thresholds = applied.thresholds
        summary = applied.summary()
    assert thresholds.shape == (model.n_layers, model.n_heads)
    torch.testing.assert_close(thresholds, 1.5 * max_norms(states, model.n_heads, TRAIN_LEN), **TOL)
    assert summary["calibration"]["positions"] == TRAIN_LEN and summary["spec"] == "cap:multiplier=1.5,at=token"


@pytest.mark.parametrize("arch", ["mamba2", "mamba1", "gla"])
def test_cap_matches_direct_recurrence(arch, tokens):
    model = tiny(arch)
    with apply_mitigation(model, "cap:multiplier=0.8", calibration=tokens, train_len=TRAIN_LEN) as applied:
        with torch.no_grad():
            expected = direct(model, tokens, tau=applied.thresholds)
        assert_matches(model, tokens, *expected)
    _, plain_states = direct(model, tokens)
    heads_capped = max_norms(plain_states, model.n_heads, LENGTH) > applied.thresholds
    assert heads_capped.any()  # the cap binds somewhere
    capped = max_norms(expected[1], model.n_heads, LENGTH)
    assert (capped <= applied.thresholds * (1 + 1e-12)).all()


def test_cap_at_call_caps_only_the_state_carried_out_of_each_call(tokens):
    model = tiny("mamba2")
    with apply_mitigation(model, "cap:multiplier=0.8,at=call", calibration=tokens, train_len=TRAIN_LEN) as applied:
        with torch.no_grad():
            expected_logits, expected_states = direct(model, tokens, tau=applied.thresholds,
                                                      cap_every=8)
        assert_matches(model, tokens, expected_logits, expected_states, chunks=(8,))
    torch.testing.assert_close(
        applied.thresholds, 0.8 * max_norms(direct(model, tokens[:, :TRAIN_LEN])[1], model.n_heads, TRAIN_LEN), **TOL)


def test_cap_needs_calibration(tokens):
    model = tiny("mamba2")
    with pytest.raises(BadInput, match="--mitigation cap:multiplier=1.5,at=token: the cap needs calibration"):
        apply_mitigation(model, "cap:multiplier=1.5")
    with torch.no_grad(), apply_mitigation(model, "scale:alpha=1,B=1"):  # nothing was left applied
        torch.testing.assert_close(model(tokens)[0], direct(model, tokens)[0], **TOL)


# -- window -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mamba2", "mamba1", "gla"])
@pytest.mark.parametrize("r", [1, 5, 16])
def test_window_matches_direct_state_difference(arch, r, tokens):
    model = tiny(arch)
    with torch.no_grad():
        expected = direct(model, tokens, r=r)
        plain = model(tokens)[0]
    with apply_mitigation(model, Window(r)):
        assert_matches(model, tokens, *expected)
    assert (expected[0] - plain).abs().max() > 1e-6  # tiny models forget fast: r = 16 changes little


@pytest.mark.parametrize("arch", ["mamba2", "mamba1", "gla"])
def test_window_at_least_the_length_equals_unmitigated(arch, tokens):
    model = tiny(arch)
    with torch.no_grad():
        plain, plain_state = model(tokens)
        for r in (LENGTH, 10 * LENGTH):
            with apply_mitigation(model, Window(r)):
                logits, state = mitigated_run(model, tokens, 7)
            torch.testing.assert_close(logits, plain, **TOL)
            for a, b in zip(state, plain_state.ssm):
                torch.testing.assert_close(a, b, **TOL)


def test_window_rows_reset_as_separate_runs(tokens):
    """A rollout reset restarts a row from the zero state, window history included."""
    model = tiny("mamba2")
    with torch.no_grad():
        expected = direct(model, tokens[:1, 13:], r=5)[0]
        with apply_mitigation(model, Window(5)):
            pieces = list(rollout(model, tokens[:1].repeat(2, 1), chunk=6, resets=[0, 13]))
    logits = torch.cat([p.logits() for p in pieces], dim=1)
    torch.testing.assert_close(logits[1, 13:], expected[0], **TOL)


@pytest.mark.parametrize("mitigation", ["window:r=5", "cap:multiplier=0.8"])
def test_recorded_block_states_are_the_mitigated_states(mitigation, tokens):
    """The recorder reads Mamba-2's states inside a call (hook_state_blocks): they are the states the
    outputs read."""
    model = tiny("mamba2")
    with apply_mitigation(model, mitigation, calibration=tokens, train_len=TRAIN_LEN) as applied:
        kwargs = {"r": 5} if applied.thresholds is None else {"tau": applied.thresholds}
        with torch.no_grad():
            _, states = direct(model, tokens, **kwargs)
            rec = record(model, tokens, positions=8, chunk=LENGTH)
    stats = rec.stats.sort_values(["position", "seq", "layer", "head"])
    want = torch.stack([s[:, 8::8].reshape(2, LENGTH // 8, model.n_heads, -1).norm(dim=-1) for s in states])
    # [layers, b, positions, heads] -> rows ordered by position, seq, layer, head
    want = want.permute(2, 1, 0, 3).flatten()
    torch.testing.assert_close(torch.tensor(stats["norm"].to_numpy()), want, **TOL)


# -- applying and removing --------------------------------------------------------------------------------

def test_remove_restores_the_model_and_a_second_mitigation_is_refused(tokens):
    model = tiny("mamba2")
    with torch.no_grad():
        plain = model(tokens)[0]
        applied = apply_mitigation(model, "window:r=3")
        with pytest.raises(BadInput, match=r"already has a mitigation applied \(window:r=3\)"):
            apply_mitigation(model, "scale:alpha=0.5")
        assert len(model.zero_state(2).extra) == model.n_layers
        applied.remove()
        assert model.zero_state(2).extra == ()
        torch.testing.assert_close(model(tokens)[0], plain, rtol=0, atol=0)


def test_a_backend_that_declares_no_scan_adapter_is_refused():
    """The mitigations know no architecture: a backend without a ScanAdapter (the hf adapter's case) is
    refused in one line naming those that have one."""
    from statelens.models.base import RecurrentLM

    class Opaque(RecurrentLM):
        arch = "opaque"

    model = Opaque()
    with pytest.raises(BadInput) as info:
        apply_mitigation(model, "scale:alpha=0.5")
    message = str(info.value)
    assert message == "--mitigation scale:alpha=0.5,B=1: needs a native backend (delta_net, gated_deltanet, gla, mamba1, mamba2, mamba3, rwkv7), got opaque"
    assert getattr(model, "mitigation", None) is None


# -- the spec ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "parsed", "canonical"), [
    ("scale:alpha=0.99,B=0.5", Scale(0.99, 0.5), "scale:alpha=0.99,B=0.5"),
    ("scale:b=0.5", Scale(1.0, 0.5), "scale:alpha=1,B=0.5"),
    (" Scale : alpha = 0.9 ", Scale(0.9, 1.0), "scale:alpha=0.9,B=1"),
    ("cap:multiplier=1.5", Cap(1.5), "cap:multiplier=1.5,at=token"),
    ("cap:multiplier=2,at=call", Cap(2.0, "call"), "cap:multiplier=2,at=call"),
    ("window:r=256", Window(256), "window:r=256"),
])
def test_parse(text, parsed, canonical):
    assert parse_mitigation(text) == parsed
    assert spec(parsed) == canonical
    assert parse_mitigation(canonical) == parsed


@pytest.mark.parametrize(("text", "why"), [
    ("stretch:x=1", "unknown mitigation 'stretch'"),
    ("scale:gamma=1", "'gamma=1' is not one of alpha=..., B=..."),
    ("scale:alpha", "'alpha' is not one of"),
    ("scale:alpha=fast", "alpha='fast' is not a number"),
    ("scale:alpha=0", "alpha=0 must be positive and finite"),
    ("scale:B=inf", "B=inf must be positive and finite"),
    ("scale:alpha=1,alpha=2", "alpha given twice"),
    ("cap", "cap needs multiplier=..."),
    ("cap:multiplier=-1", "multiplier=-1 must be positive"),
    ("cap:multiplier=1,at=chunk", "at='chunk' must be token or call"),
    ("window:r=2.5", "r='2.5' is not an integer"),
    ("window:r=0", "r=0 must be >= 1"),
    ("", "unknown mitigation ''"),
])
def test_bad_spec_is_one_line_naming_the_option(text, why):
    with pytest.raises(BadInput) as info:
        parse_mitigation(text)
    message = str(info.value)
    assert message.startswith(f"--mitigation {text!r}: ") and why in message and "\n" not in message


# -- the CLI ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import hf_mamba2

    path = tmp_path_factory.mktemp("ckpt")
    hf_mamba2(path, vocab=VOCAB)
    return path


def test_perplexity_with_cap_equals_the_library(ckpt, tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", ckpt, "--mitigation", "cap:multiplier=0.9",
                           "--train-len", 16, "--length", 48, "--num-seqs", 2, "--buckets", 6, "--chunk", 7,
                           "--dtype", "float64", "--seed", 4, "--out", out)
    assert code == 0, err
    sequences = np.random.default_rng(4).integers(0, VOCAB, size=(2, 48), dtype=np.int64)  # the seeded default
    model = load_checkpoint(ckpt, dtype=torch.float64).model
    plain = positionwise(model, sequences, buckets=6)
    with apply_mitigation(model, Cap(0.9), calibration=sequences[:, :16], train_len=16) as applied:
        expected = positionwise(model, sequences, buckets=6, chunk=20)
    written = pd.read_csv(out / "positionwise.csv")
    np.testing.assert_allclose(written.loss, expected.loss, rtol=0, atol=1e-9)
    assert np.abs(expected.loss - plain.loss).max() > 1e-4
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["config"]["mitigation"] == "cap:multiplier=0.9,at=token"
    np.testing.assert_allclose(manifest["mitigation"]["thresholds"], applied.thresholds.numpy(), rtol=1e-12)


def test_remembrance_with_window_equals_the_library(ckpt, tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "remembrance", "--ckpt", ckpt, "--mitigation", "window:r=6",
                           "--T", 40, "--num-seqs", 2, "--t", "3,10,30", "--chunk", 16, "--dtype", "float64",
                           "--out", out)
    assert code == 0, err
    sequences = np.random.default_rng(0).integers(0, VOCAB, size=(2, 40), dtype=np.int64)
    model = load_checkpoint(ckpt, dtype=torch.float64).model
    with apply_mitigation(model, Window(6)):
        expected = remembrance(model, sequences, T=40, ts=[3, 10, 30], chunk=40)
    written = pd.read_csv(out / "remembrance.csv")
    np.testing.assert_allclose(written.effrem, expected.effrem, rtol=0, atol=1e-9)
    # The window forgets: the prediction at T reads 6 tokens per layer (plus 3 through each conv), 2 layers,
    # so truncating the first t <= 10 tokens changes nothing; t = 30 leaves too few.
    assert list(written.t) == [0, 3, 10, 30]
    np.testing.assert_allclose(written.effrem[:3], 0, atol=1e-9)
    assert written.effrem[3] > 1e-5


@pytest.mark.parametrize(("args", "message"), [
    (["perplexity", "--mitigation", "cap:multiplier=zero"], "--mitigation 'cap:multiplier=zero': multiplier="),
    (["copying", "--mitigation", "cap:multiplier=1"], ("--mitigation cap:multiplier=1,at=token: the cap is "
                                                       "calibrated on a command's sequences and copying has none")),
])
def test_bad_mitigation_exits_2_with_one_line(ckpt, tmp_path, monkeypatch, capsys, args, message):
    from conftest import run_cli

    code, _, err = run_cli(monkeypatch, capsys, *args, "--ckpt", ckpt, "--out", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
