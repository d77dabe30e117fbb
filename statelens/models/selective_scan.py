"""Mamba-1's selective scan: the sequential recurrence and a chunked parallel form.

Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv:2312.00752),
Algorithm 2. Axis letters:

    b: batch    l: sequence length (q: block length)    d: d_inner (channels)    n: d_state (N)

Per channel ``d`` and state index ``n``, with ``alpha_t = exp(dt_t * A)``:

    h_t = alpha_t * h_{t-1} + dt_t * B_t * u_t          (h_t: [d, n])
    y_t = h_t C_t                                        (y_t: [d])

Mamba-1 has no heads: the state of channel ``d`` is the row ``h[d, :]``. The D skip and the gate are
not part of the scan.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def selective_scan_steps(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    log_decay: torch.Tensor | None = None,
) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The recurrence one token at a time: ``step(t, h) -> (y_t [b, d], h_t [b, d, n])`` from h = h_{t-1}.
    u, dt [b, l, d]; A [d, n]; B, C [b, l, n]; ``log_decay`` [b, l, d, n], when given, replaces ``dt * A``."""
    def step(t: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_a = log_decay[:, t] if log_decay is not None else dt[:, t, :, None] * A
        h = log_a.exp() * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        return torch.einsum("bdn,bn->bd", h, C[:, t]), h
    return step


def selective_scan_sequential(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one step per token (:func:`selective_scan_steps`).

    u, dt [b, l, d]; A [d, n]; B, C [b, l, n]; h0 [b, d, n] -> y [b, l, d], final state [b, d, n].
    """
    step, h, ys = selective_scan_steps(u, dt, A, B, C), h0, []
    for t in range(u.shape[1]):
        y, h = step(t, h)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def block_length(batch: int, d: int, n: int, budget: int = 1 << 23) -> int:
    """Largest power-of-two block (<= 128) whose [batch, q, d, n] tensors stay under ``budget`` numbers."""
    q = 128
    while q > 1 and batch * q * d * n > budget:
        q //= 2
    return q


def selective_scan_chunked(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    block: int | None = None,
    inputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``q`` tokens, each scanned in ``log2(q)`` parallel steps (Hillis-Steele); the state is
    carried from block to block. Same inputs and outputs as :func:`selective_scan_sequential`.

    ``log_decay`` [b, l, d, n], when given, replaces ``dt * A`` (a patched decay, see ``hook_decay``);
    ``inputs`` [b, l, d, n], when given, replaces the insertion ``dt * u * B`` (the sliding-window
    mitigation's, see :mod:`statelens.interventions.mitigations`).
    Every product formed is of decays <= 1, so the form is as stable as the recurrence.
    """
    b, l, d = u.shape
    n = A.shape[-1]
    q = block or block_length(b, d, n)
    h = h0.to(u.dtype)
    du = dt * u
    ys = []
    for start in range(0, l, q):
        end = min(start + q, l)
        log_a = log_decay[:, start:end] if log_decay is not None else dt[:, start:end, :, None] * A
        a = log_a.exp()                                                # [b, q, d, n]
        v = (inputs[:, start:end] if inputs is not None
             else du[:, start:end, :, None] * B[:, start:end, None, :])  # [b, q, d, n]
        # Inclusive scan of (a, v) under (a1, v1) o (a2, v2) = (a1 a2, a2 v1 + v2).
        step = 1
        while step < end - start:
            v = torch.cat([v[:, :step], v[:, step:] + a[:, step:] * v[:, :-step]], dim=1)
            a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
            step *= 2
        states = v + a * h[:, None]                                    # h_t for t in the block
        ys.append(torch.einsum("bqdn,bqn->bqd", states, C[:, start:end]))
        h = states[:, -1]
    return torch.cat(ys, dim=1), h
