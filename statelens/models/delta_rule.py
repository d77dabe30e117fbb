"""The (gated) delta rule: the recurrence of DeltaNet and Gated DeltaNet, one token at a time and chunked.

Per head, with key ``k_t`` [dk], value ``v_t`` [dv], write strength ``beta_t`` in (0, 1) and log decay
``g_t <= 0`` (0 for DeltaNet), the state ``S`` [dk, dv] evolves as

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T (scale q_t)

(the value written is ``u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)``: the delta between the new value
and what the decayed state already recalls for ``k_t``). :func:`delta_rule_steps` is that recurrence,
the reference; :func:`delta_rule_chunked` computes the same outputs and final state a chunk of ``C``
tokens at a time with matrix products (the WY / UT-transform form of Yang et al., 2024): with ``gamma``
the within-chunk cumulative log decay,

    (I + A) U = diag(beta) (V - diag(exp(gamma)) K S_0),   A_ij = beta_i exp(gamma_i - gamma_j) k_i^T k_j  (j < i)
    O   = diag(exp(gamma)) Q S_0 + (Q K^T * exp(gamma_t - gamma_i) [i <= t]) U
    S_C = exp(gamma_C) S_0 + (K * exp(gamma_C - gamma))^T U

(``U`` by a unit-triangular solve). Exact for any chunk length, initial state in, final state out.

Axis letters: ``b`` batch, ``l`` tokens, ``h`` heads, ``k`` key dims, ``v`` value dims.
"""
from __future__ import annotations

import torch

from statelens.errors import ParameterError
from statelens.models.ssd import segsum


def _checked(q, k, v, beta, log_g, state, scale):
    """The inputs as ``[b, h, l, .]`` in the values' dtype (log_g zeros when None), the initial state
    ``[b, h, k, v]`` (zeros when None) and the query scale (``dk ** -0.5`` when None)."""
    b, length, h, dk = k.shape
    if q.shape != k.shape or v.shape[:3] != (b, length, h) or beta.shape != (b, length, h):
        raise ParameterError("q", f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and beta "
                                  f"{tuple(beta.shape)} must be [b, l, h, dk], [b, l, h, dk], [b, l, h, dv], [b, l, h]")
    dtype = v.dtype
    log_g = torch.zeros_like(beta) if log_g is None else log_g
    if state is None:
        state = torch.zeros(b, h, dk, v.shape[-1], dtype=dtype, device=v.device)
    scale = dk ** -0.5 if scale is None else scale
    q, k, v, beta, log_g = (t.transpose(1, 2).to(dtype) for t in (q, k, v, beta, log_g))
    return q * scale, k, v, beta, log_g, state.to(dtype)


def delta_rule_stepper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       log_g: torch.Tensor | None = None, state: torch.Tensor | None = None,
                       scale: float | None = None):
    """The recurrence one token at a time, for callers that act between tokens (the state cap): same
    inputs as :func:`delta_rule_steps` -> ``(step, S0, length)`` with ``step(t, S) -> (o_t [b, h, dv],
    S_t [b, h, dk, dv])`` from ``S = S_{t-1}``, the initial state and the number of tokens."""
    q, k, v, beta, log_g, S0 = _checked(q, k, v, beta, log_g, state, scale)

    def step(t: int, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = S * log_g[:, :, t, None, None].exp()
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, :, t]))
        S = S + k[:, :, t, :, None] * u[:, :, None, :]
        return torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]), S
    return step, S0, k.shape[2]


def delta_rule_steps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                     log_g: torch.Tensor | None = None, state: torch.Tensor | None = None,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, token by token: q, k [b, l, h, dk], v [b, l, h, dv], beta, log_g [b, l, h] (log_g
    None: DeltaNet), state [b, h, dk, dv] (None: zeros) -> (o [b, l, h, dv], final state [b, h, dk, dv])."""
    step, S, length = delta_rule_stepper(q, k, v, beta, log_g, state, scale)
    outputs = []
    for t in range(length):
        o, S = step(t, S)
        outputs.append(o)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape).to(S.dtype)
    return o, S


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       log_g: torch.Tensor | None = None, state: torch.Tensor | None = None,
                       scale: float | None = None, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`delta_rule_steps`, ``chunk`` tokens at a time (the module docstring's form); same shapes."""
    if chunk < 1:
        raise ParameterError("chunk", f"chunk must be >= 1, got {chunk}")
    q, k, v, beta, log_g, S = _checked(q, k, v, beta, log_g, state, scale)
    outputs = []
    for start in range(0, k.shape[2], chunk):
        part = slice(start, start + chunk)
        o, S = _chunk(q[:, :, part], k[:, :, part], v[:, :, part], beta[:, :, part], log_g[:, :, part], S)
        outputs.append(o)
    o = torch.cat(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return o.transpose(1, 2), S


def _chunk(q, k, v, beta, log_g, S):
    """One chunk: q, k [b, h, C, dk], v [b, h, C, dv], beta, log_g [b, h, C], S [b, h, dk, dv] ->
    (o [b, h, C, dv], S after the chunk)."""
    C = k.shape[2]
    gamma = log_g.cumsum(-1)                                                   # [b, h, C]
    # exp(gamma_i - gamma_j) for j <= i, 0 above: summed by segsum, not as a difference, which cancels
    # once the cumulative log decay is large and is nan where a patched decay is 0 (log -inf).
    decay = segsum(log_g).exp()                                                # [b, h, C, C]
    strict = decay.masked_fill(torch.eye(C, dtype=torch.bool, device=k.device), 0.0)   # j < i only
    A = beta[..., None] * strict * (k @ k.transpose(-1, -2))                   # [b, h, C, C], strictly lower
    rhs = beta[..., None] * (v - gamma.exp()[..., None] * (k @ S))             # [b, h, C, dv]
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    U = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    o = gamma.exp()[..., None] * (q @ S) + (decay * (q @ k.transpose(-1, -2))) @ U
    to_end = decay[..., -1, :]                                                 # exp(gamma_C - gamma_j) [b, h, C]
    S = gamma[..., -1:].exp()[..., None] * S + (k * to_end[..., None]).transpose(-1, -2) @ U
    return o, S
