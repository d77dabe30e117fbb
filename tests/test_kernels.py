"""The CUDA fast paths (:mod:`statelens.models.kernels`) against the pure-PyTorch reference.

The kernel tests run on a CUDA machine with ``pip install "statelens[cuda]"``. The SSD kernels are
Triton: with mamba-ssm and triton importable and ``TRITON_INTERPRET=1``, they run on the CPU in
Triton's interpreter, so their wiring is checked without a GPU too (slowly). Elsewhere they skip,
saying why. The Mamba-1 h0 decomposition is checked everywhere, with the kernel's zero-start scan
stood in for by the reference.
"""
from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch

from statelens.models import GLALM, GLAConfig, Mamba1Config, Mamba1LM, Mamba2Config, Mamba2LM, kernels
from statelens.models.selective_scan import selective_scan_sequential
from statelens.record import rollout
from statelens.record.recorder import record

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_device(op: str) -> torch.device:
    """Where the kernel path ``op`` can run here, or skip."""
    if kernels._ops(op) is None:
        pytest.skip(f"the {op} kernels do not import: pip install 'statelens[cuda]' on a CUDA machine")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if op in kernels.TRITON and INTERPRETED:
        return torch.device("cpu")
    pytest.skip(f"the {op} kernels need a CUDA GPU" + (" (or TRITON_INTERPRET=1)" if op in kernels.TRITON else ""))


@pytest.fixture
def interpreter(monkeypatch):
    """Lets the Triton launchers run under the interpreter on CPU tensors: mamba-ssm's
    ``torch.cuda.device(index)`` guard gets a no-op, the device's multiprocessor count (which only
    sizes a grid) is 1, the autotuner, which would time configs on a GPU, takes its first config, and
    fla's kernels, which call ``.to`` on a ``range`` loop index (a tensor when compiled, an int when
    interpreted), get a ``range`` of ints that have it."""
    if INTERPRETED and not torch.cuda.is_available():
        import sys

        monkeypatch.setenv("STATELENS_KERNELS", "interpret")   # the Triton kernels on CPU tensors

        import triton.language as tl
        from triton.runtime import autotuner

        class Index(int):
            def to(self, dtype, **kwargs):
                return tl.full((), int(self), dtype)

        def interpreted_range(*args):
            return (Index(i) for i in range(*(int(a) for a in args)))

        kernels._ops("gla")   # imports fla's kernel modules, when present, so that they can be patched
        for name, module in list(sys.modules.items()):
            if name.startswith("fla.ops."):
                monkeypatch.setattr(module, "range", interpreted_range, raising=False)
        monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=1))
        monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *args, config, **meta: [1.0, 1.0, 1.0])


def run_both(model, tokens, monkeypatch, fn):
    """fn(model, tokens) with the kernels, then with STATELENS_KERNELS=off (the reference)."""
    fast = fn(model, tokens)
    setting = os.environ.get("STATELENS_KERNELS")
    monkeypatch.setenv("STATELENS_KERNELS", "off")
    reference = fn(model, tokens)
    if setting is None:
        monkeypatch.delenv("STATELENS_KERNELS")
    else:
        monkeypatch.setenv("STATELENS_KERNELS", setting)
    return fast, reference


def chunked_logits(model, tokens):
    """Logits [b, l, vocab] and final states of a rollout in uneven chunks carrying the state."""
    pieces = list(rollout(model, tokens, chunk=45))
    return torch.cat([p.logits() for p in pieces], dim=1), pieces[-1].state


def mamba2(device, **options) -> Mamba2LM:
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=64, d_state=16, headdim=16, ngroups=2, chunk_size=32,
                       **options)
    model = Mamba2LM(cfg)
    with torch.no_grad():  # decays from slow to fast, so that the carried state matters
        for block in model.blocks:
            block.mixer.dt_bias.copy_(torch.linspace(-6, 0, cfg.nheads))
            block.mixer.A_log.copy_(torch.linspace(0, 2, cfg.nheads))
    return model.to(device)


def test_ssd_kernels_equal_the_reference(monkeypatch, interpreter):
    device = kernel_device("ssd")
    model = mamba2(device)
    assert model.state_block == 32                          # the kernels' block: the config's chunk_size
    tokens = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(1)).to(device)
    (logits, state), (ref_logits, ref_state) = run_both(model, tokens, monkeypatch, chunked_logits)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(state.ssm + state.conv, ref_state.ssm + ref_state.conv):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    # Block states, as the recorder reads them inside a call (positions on 32-token boundaries).
    def recorded(m, t):
        return record(m, t, positions=32, chunk=96).stats.drop(columns="finite")
    fast, reference = run_both(model, tokens, monkeypatch, recorded)
    assert len(fast) == len(reference) > 0
    torch.testing.assert_close(torch.tensor(fast.norm.to_numpy()), torch.tensor(reference.norm.to_numpy()),
                               rtol=1e-4, atol=1e-5)


def test_ssd_kernels_give_the_reference_gradients(monkeypatch, interpreter):
    device = kernel_device("ssd")
    model = mamba2(device)
    tokens = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(2)).to(device)

    def grads(m, t):
        m.zero_grad()
        state = m.zero_state(2)
        state = state.map(lambda s: s + 0.1)                # a carried state, as state passing gives
        logits, _ = m(t, state)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), t[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    fast, reference = run_both(model, tokens, monkeypatch, grads)
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-3, atol=1e-5, msg=name)


MAMBA2_OPTIONS = {  # mamba-ssm's Mamba2 options that transformers does not implement, and the default
    "default": {},
    "gated MLP (d_ssm < d_inner)": {"d_ssm": 64},
    "D per channel": {"D_has_hdim": True},
    "no gated norm": {"rmsnorm": False},
    "norm before gate": {"norm_before_gate": True},
}


@pytest.mark.parametrize("options", MAMBA2_OPTIONS.values(), ids=MAMBA2_OPTIONS.keys())
def test_mamba2_equals_mamba_ssm_own_model(monkeypatch, interpreter, options):
    """statelens's Mamba-2, on the kernels and on the reference, against mamba-ssm's MambaLMHeadModel
    holding the same weights (an independent implementation: its own modules, fused norms and kernels)."""
    device = kernel_device("ssd")
    model = mamba2(device, **options)
    with torch.no_grad():  # D away from its all-ones start, so that its layout matters
        for block in model.blocks:
            block.mixer.D.copy_(torch.linspace(0.5, 1.5, block.mixer.D.numel()))
    try:
        from statelens.models.checkpoint import mamba_ssm_module
        twin = mamba_ssm_module(model)
    except ImportError as e:
        pytest.skip(f"mamba-ssm's model does not import: {e}")
    if not torch.cuda.is_available():   # interpreted: its fused conv path is CUDA C++, the unfused one is not
        for layer in twin.backbone.layers:
            layer.mixer.use_mem_eff_path = False
    tokens = torch.randint(0, 64, (2, 100), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        theirs = twin(tokens).logits
    (ours, _), (reference, _) = run_both(model, tokens, monkeypatch, chunked_logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reference, theirs, rtol=1e-4, atol=1e-4)


def gla_model(device) -> GLALM:
    torch.manual_seed(0)
    return GLALM(GLAConfig(hidden_size=64, num_hidden_layers=2, vocab_size=64, num_heads=2, hidden_ratio=2,
                           chunk_size=16)).to(device)


def test_gla_kernels_equal_the_reference(monkeypatch, interpreter):
    device = kernel_device("gla")
    model = gla_model(device)
    tokens = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(1)).to(device)
    (logits, state), (ref_logits, ref_state) = run_both(model, tokens, monkeypatch, chunked_logits)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(state.ssm, ref_state.ssm):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    def grads(m, t):
        m.zero_grad()
        logits, _ = m(t[:, :70], m.zero_state(2).map(lambda s: s + 0.1))   # from a carried state
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), t[:, 1:70].flatten()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    fast, reference = run_both(model, tokens, monkeypatch, grads)
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-3, atol=1e-5, msg=name)


def test_conv_and_selective_scan_kernels_equal_the_reference(monkeypatch):
    device = kernel_device("selective_scan")
    kernel_device("conv")
    torch.manual_seed(0)
    model = Mamba1LM(Mamba1Config(d_model=64, n_layer=2, vocab_size=64, d_state=8)).to(device)
    tokens = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(1)).to(device)
    (logits, state), (ref_logits, ref_state) = run_both(model, tokens, monkeypatch, chunked_logits)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(state.ssm + state.conv, ref_state.ssm + ref_state.conv):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_selective_scan_adds_the_carried_state_exactly(monkeypatch):
    """kernels.selective_scan runs the kernel from the zero state and adds h0's part by linearity.
    With the kernel's zero-start scan (its layouts: [b, d, l], B and C [b, n, l]) stood in for by the
    sequential reference, the sum must equal the recurrence started from h0, in float64."""
    def zero_start(u, delta, A, B, C, return_last_state):
        y, last = selective_scan_sequential(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                            C.transpose(1, 2), torch.zeros(u.shape[0], *A.shape, dtype=u.dtype))
        return y.transpose(1, 2), last

    monkeypatch.setattr(kernels, "_ops", lambda op: zero_start)
    gen = torch.Generator().manual_seed(0)
    b, l, d, n = 2, 37, 5, 3
    u = torch.randn(b, l, d, generator=gen, dtype=torch.float64)
    dt = torch.rand(b, l, d, generator=gen, dtype=torch.float64)
    A = -2 * torch.rand(d, n, generator=gen, dtype=torch.float64)
    B, C = (torch.randn(b, l, n, generator=gen, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(b, d, n, generator=gen, dtype=torch.float64)
    y, final = kernels.selective_scan(u, dt, A, B, C, h0, block=8)
    y_ref, final_ref = selective_scan_sequential(u, dt, A, B, C, h0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-12)


def test_kernels_stay_off_where_they_cannot_run(monkeypatch):
    """CPU tensors (unless asked to interpret), float64, or STATELENS_KERNELS=off: the reference path."""
    monkeypatch.setattr(kernels, "_ops", lambda op: object())     # as if every package imported
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("STATELENS_KERNELS", raising=False)
    assert not kernels.ready("ssd", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels.ready("ssd", torch.zeros(1))            # Triton debugging alone changes nothing
    monkeypatch.setenv("STATELENS_KERNELS", "interpret")
    assert kernels.ready("ssd", torch.zeros(1)) and kernels.ready("gla", torch.zeros(1))
    assert not kernels.ready("conv", torch.zeros(1))           # CUDA C++: no interpreter
    assert not kernels.ready("ssd", torch.zeros(1, dtype=torch.float64))
    monkeypatch.setenv("STATELENS_KERNELS", "off")
    assert not kernels.ready("ssd", torch.zeros(1))
