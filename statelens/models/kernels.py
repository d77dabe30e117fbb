"""Fast paths through the optional CUDA packages (``pip install "statelens[cuda]"``), behind the mixers'
own interface; the pure-PyTorch code stays the reference, and the tests compare the two.

- ``ssd``: mamba-ssm's SSD Triton kernels (``mamba_chunk_scan_combined``) for the Mamba-2 scan, the
  carried state going in as ``initial_states`` and out as the final state; a recorder's block states
  come from the same kernels' state-passing step.
- ``conv``: causal-conv1d's CUDA kernel for the depthwise convolution (Mamba-1 and Mamba-2), the conv
  state going in as ``initial_states`` and out as ``final_states``.
- ``gla``: flash-linear-attention's ``chunk_gla`` Triton kernels for the GLA scan, the carried state
  going in as ``initial_state`` and out as the final state (training goes through its backward).
- ``selective_scan``: mamba-ssm's CUDA selective scan for Mamba-1 (forward only: its last state has no
  gradient). The kernel starts from the zero state; the carried state's part is added exactly, by
  linearity: ``h_t = h_t|zero start + exp(A * (dt_1 + ... + dt_t)) h_0``.

Resets need no ``seq_idx``: the rollout cuts its calls at reset positions and restarts those rows from
their initial state, which may be any state, where ``seq_idx`` restarts from zero.

A path runs when its package imports, its tensors are on a CUDA device, the dtype is not float64 (the
kernels have none) and ``STATELENS_KERNELS`` is not ``off``. The Triton ones (SSD, GLA) also run on the
CPU with ``STATELENS_KERNELS=interpret`` and ``TRITON_INTERPRET=1``, in Triton's interpreter: that is
how the tests check them without a GPU. Anything that changes the scan (a patched ``hook_decay``, a
mitigation) takes the reference path.
"""
from __future__ import annotations

import functools
import os

import torch

from statelens.models import layers

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
TRITON = ("ssd", "gla")  # the paths that are Triton kernels (the others are CUDA C++)


@functools.cache
def _ops(op: str):
    """The package function(s) behind ``op``, or None when the package does not import."""
    try:
        if op == "ssd":
            from mamba_ssm.ops.triton.ssd_combined import (
                _mamba_chunk_scan_combined_fwd,
                mamba_chunk_scan_combined,
            )
            return mamba_chunk_scan_combined, _mamba_chunk_scan_combined_fwd
        if op == "conv":
            from causal_conv1d import causal_conv1d_fn
            return causal_conv1d_fn
        if op == "gla":
            from fla.ops.gla import chunk_gla
            return chunk_gla
        if op == "selective_scan":
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            return selective_scan_fn
    except ImportError:
        return None
    raise ValueError(f"unknown kernel {op!r}")


def ready(op: str, t: torch.Tensor) -> bool:
    """Whether the kernel path ``op`` ("ssd", "gla", "conv", "selective_scan") runs for tensors like ``t``."""
    if os.environ.get("STATELENS_KERNELS", "on").lower() in ("off", "0", "false", "no") or t.dtype not in SUPPORTED:
        return False
    interpreted = (op in TRITON and t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
                   and os.environ.get("STATELENS_KERNELS") == "interpret")
    on_device = t.is_cuda or interpreted
    return on_device and _ops(op) is not None


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor,
        block: int, *, block_states: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The SSD scan ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t`` on the kernels.

    x [b, l, h, p] (not multiplied by dt), dt [b, l, h], A [h], B and C [b, l, g, n], h0 [b, h, p, n],
    ``block`` the kernels' chunk length -> y [b, l, h, p], final state [b, h, p, n], and with
    ``block_states`` the state at the start of each block [b, c, h, p, n] (entry 0 is h0; forward only).
    """
    combined, forward = _ops("ssd")
    h0 = h0.to(x.dtype)
    if block_states or not torch.is_grad_enabled():
        y, _, _, _, starts, final = forward(x, dt, A, B, C, block, initial_states=h0)
        return y, final, starts if block_states else None
    y, final = combined(x, dt, A, B, C, block, initial_states=h0, return_final_states=True)
    return y, final, None


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor,
        S0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`statelens.models.gla.gla_chunked` on fla's ``chunk_gla``: q, k and gk [b, l, h, k]
    (gk the log-decay), v [b, l, h, v], S0 [b, h, k, v] -> o [b, l, h, v] (times d_k ** -0.5), final
    state [b, h, k, v]. The kernels choose their own chunk length."""
    o, final = _ops("gla")(q, k, v, gk, scale=q.shape[-1] ** -0.5, initial_state=S0.to(q.dtype),
                           output_final_state=True)
    return o, final


def conv_ready(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether causal-conv1d takes this convolution: x [b, c, l], weight [c, 1, k] (c % 8 == 0, 2 <= k <= 4)."""
    return ready("conv", x) and x.shape[1] % 8 == 0 and 2 <= weight.shape[-1] <= 4 and weight.dtype == x.dtype


def causal_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`statelens.models.layers.causal_conv` (conv, then SiLU) on causal-conv1d's kernel when
    :func:`conv_ready`, else on the reference. x [b, c, l]; conv_state [b, c, k - 1]; weight [c, 1, k]."""
    if not conv_ready(x, weight):
        return layers.causal_conv(x, conv_state, weight, bias)
    channel_last = x.transpose(1, 2).contiguous().transpose(1, 2)       # the kernel's layout for states
    state = conv_state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    return _ops("conv")(channel_last, weight[:, 0], bias, initial_states=state, return_final_states=True,
                        activation="silu")


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   h0: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's scan on the CUDA kernel; same inputs and outputs as
    :func:`statelens.models.selective_scan.selective_scan_chunked`: u and dt [b, l, d], A [d, n],
    B and C [b, l, n], h0 [b, d, n] -> y [b, l, d], final state [b, d, n]. Forward only.

    The kernel runs from the zero state; h0's part, ``C_t . exp(A * cumsum(dt)_t) h0``, is added in
    blocks of ``block`` tokens ([b, block, d, n] at a time)."""
    y, last = _ops("selective_scan")(u.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2),
                                     C.transpose(1, 2), return_last_state=True)
    y = y.transpose(1, 2)
    h0 = h0.to(y.dtype)
    cum = dt.cumsum(dim=1)                                                  # [b, l, d]
    parts = []
    for start in range(0, u.shape[1], block):
        decay = (cum[:, start:start + block, :, None] * A).exp()          # [b, q, d, n]
        parts.append(torch.einsum("bqdn,bdn,bqn->bqd", decay, h0, C[:, start:start + block]))
    final = last + (cum[:, -1, :, None] * A).exp() * h0
    return y + torch.cat(parts, dim=1), final
