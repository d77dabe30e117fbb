"""The (gated) delta rule's recurrence (statelens.models.delta_rule) against flash-linear-attention's
naive references and, independently, transformers' torch gated-delta-rule functions (the ones its
Qwen3-Next layers fall back to); the chunked form against the token-by-token one."""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from statelens.errors import ParameterError
from statelens.models.delta_rule import delta_rule_chunked, delta_rule_steps


def inputs(b=2, length=37, h=3, dk=8, dv=5, *, gated=True, dtype=torch.float64, seed=0):
    """Random q, k (L2-normalized, as the layers feed them), v, beta in (0, 1), log decay <= 0, S0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, length, h, dk, generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(b, length, h, dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(b, length, h, dv, generator=g, dtype=dtype)
    beta = torch.rand(b, length, h, generator=g, dtype=dtype)
    log_g = -torch.rand(b, length, h, generator=g, dtype=dtype) * 0.5 if gated else None
    state = torch.randn(b, h, dk, dv, generator=g, dtype=dtype)
    return q, k, v, beta, log_g, state


def fla_naive(family: str, name: str):
    """A function of fla's ``ops/<family>/naive.py``, read from its file (the fla package needs triton)."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("flash-linear-attention is not installed")
    path = Path(spec.submodule_search_locations[0]) / "ops" / family / "naive.py"
    module_spec = importlib.util.spec_from_file_location(f"fla_{family}_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def test_steps_equal_fla_naive_gated_delta_rule():
    q, k, v, beta, log_g, state = inputs(dtype=torch.float32)
    ours, final = delta_rule_steps(q, k, v, beta, log_g, state)
    theirs, their_final = fla_naive("gated_delta_rule", "naive_recurrent_gated_delta_rule")(
        q, k, v, beta, log_g, initial_state=state, output_final_state=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, their_final, rtol=1e-5, atol=1e-5)


def test_steps_equal_transformers_torch_gated_delta_rule():
    mod = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, beta, log_g, state = inputs(dtype=torch.float32, seed=1)
    ours, final = delta_rule_steps(q, k, v, beta, log_g, state)
    for name in ("torch_recurrent_gated_delta_rule", "torch_chunk_gated_delta_rule"):
        # unwrapped: transformers dispatches to fla's Triton kernel wherever fla imports (triton installed)
        theirs, their_final = inspect.unwrap(getattr(mod, name))(q, k, v, g=log_g, beta=beta, initial_state=state.clone(),
                                                 output_final_state=True)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(final, their_final, rtol=1e-4, atol=1e-4, msg=name)


def test_deltanet_equals_fla_naive_delta_rule():
    """DeltaNet: no decay. fla's reference takes q unscaled and scales by dk ** -0.5 itself."""
    q, k, v, beta, _, state = inputs(gated=False, dtype=torch.float32, seed=2)
    ours, final = delta_rule_steps(q, k, v, beta, None, state)
    theirs, their_final = fla_naive("delta_rule", "delta_rule_recurrence")(
        *(t.transpose(1, 2) for t in (q, k, v)), beta.transpose(1, 2), initial_state=state)
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, their_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 64, 100])
def test_chunked_equals_steps_for_any_chunk_length(gated, chunk):
    q, k, v, beta, log_g, state = inputs(length=100, gated=gated)
    ours, final = delta_rule_chunked(q, k, v, beta, log_g, state, chunk=chunk)
    steps, step_final = delta_rule_steps(q, k, v, beta, log_g, state)
    torch.testing.assert_close(ours, steps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, step_final, rtol=1e-12, atol=1e-12)


def test_split_runs_carry_the_state_exactly():
    q, k, v, beta, log_g, state = inputs(length=50)
    whole, final = delta_rule_chunked(q, k, v, beta, log_g, state, chunk=16)
    first, middle = delta_rule_chunked(*(t[:, :23] for t in (q, k, v, beta, log_g)), state, chunk=16)
    second, end = delta_rule_chunked(*(t[:, 23:] for t in (q, k, v, beta, log_g)), middle, chunk=9)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(end, final, rtol=1e-12, atol=1e-12)


def test_bad_shapes_and_chunk_name_the_parameter():
    q, k, v, beta, log_g, state = inputs()
    with pytest.raises(ParameterError, match="must be") as info:
        delta_rule_steps(q[:, :-1], k, v, beta, log_g, state)
    assert info.value.parameter == "q"
    with pytest.raises(ParameterError, match="chunk must be >= 1"):
        delta_rule_chunked(q, k, v, beta, log_g, state, chunk=0)


def test_a_zero_decay_forgets_everything_and_strong_decays_stay_exact():
    """alpha = 0 (log decay -inf, as a patched hook_decay gives) mid-chunk: the chunked form equals the
    steps (no nan), and the state is what the tokens after it wrote from zero; a cumulative log decay
    of -1000 over a chunk keeps float32 agreement."""
    q, k, v, beta, log_g, state = inputs(length=20)
    log_g[:, 9] = -torch.inf
    ours, final = delta_rule_chunked(q, k, v, beta, log_g, state, chunk=16)
    steps, step_final = delta_rule_steps(q, k, v, beta, log_g, state)
    torch.testing.assert_close(ours, steps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, step_final, rtol=1e-12, atol=1e-12)
    after_zero = torch.cat([torch.zeros_like(log_g[:, 9:10]), log_g[:, 10:]], dim=1)
    _, after = delta_rule_steps(*(t[:, 9:] for t in (q, k, v, beta)), after_zero)
    torch.testing.assert_close(final, after, rtol=1e-12, atol=1e-12)
    q, k, v, beta, log_g, state = inputs(length=64, dtype=torch.float32, seed=3)
    log_g = log_g * 0 - 16.0                                                  # -1024 over the chunk
    ours, final = delta_rule_chunked(q, k, v, beta, log_g, state, chunk=64)
    steps, step_final = delta_rule_steps(q, k, v, beta, log_g, state)
    torch.testing.assert_close(ours, steps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, step_final, rtol=1e-5, atol=1e-5)
