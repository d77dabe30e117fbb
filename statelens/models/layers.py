"""Pieces shared by the Mamba backends: norms and the causal depthwise convolution with state."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 (or wider), as mamba-ssm's Triton kernel does."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def block_norm(d: int, eps: float, rms: bool) -> nn.Module:
    """The pre-norm of a residual block: RMSNorm (``rms_norm: true``) or LayerNorm."""
    return RMSNorm(d, eps) if rms else nn.LayerNorm(d, eps=eps)


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int, norm_before_gate: bool
) -> torch.Tensor:
    """mamba-ssm's ``RMSNormGated``: y [..., d], z [..., d] -> [..., d].

    ``norm_before_gate=False`` (the Mamba-2 default): ``rmsnorm(y * silu(z))``; else ``rmsnorm(y) * silu(z)``.
    The RMS is taken over groups of ``group_size`` channels (``d / ngroups``), as the reference does.
    """
    dtype = y.dtype
    wide = torch.promote_types(dtype, torch.float32)
    y, z = y.to(wide), z.to(wide)
    if not norm_before_gate:
        y = y * F.silu(z)
    grouped = y.unflatten(-1, (-1, group_size))
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    if norm_before_gate:
        y = y * F.silu(z)
    return (weight * y).to(dtype)


def causal_conv(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d continuing from a state, then SiLU (``silu=False``: none).

    x [batch, channels, length]; conv_state [batch, channels, k - 1] (the k - 1 inputs before x);
    weight [channels, 1, k] (nn.Conv1d layout); returns (y [batch, channels, length],
    new conv_state [batch, channels, k - 1]).
    """
    k = weight.shape[-1]
    window = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # [b, c, k - 1 + length]
    if torch.compiler.is_compiling():  # the compiled path: k shifted products, fused into one loop with the SiLU
        y = _shifted_products(window, weight, bias, x.shape[-1], silu)
    else:
        y = F.conv1d(window, weight, bias, groups=x.shape[1])
        y = F.silu(y) if silu else y
    return y, window[:, :, window.shape[-1] - (k - 1):]


def _shifted_products(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, length: int,
                      silu: bool) -> torch.Tensor:
    """The depthwise conv (and SiLU) as k shifted products, window [b, c, k - 1 + length] -> [b, c, length]
    laid out token-major (a transposed view of [b, length, c]), as the projections hand it over and the scan
    reads it: in channel-major order the compiled scan's loops would gather across channels token by token."""
    window = window.transpose(1, 2)                                          # [b, k - 1 + length, c]
    y = sum(window[:, j:j + length] * weight[:, 0, j] for j in range(weight.shape[-1]))
    y = y if bias is None else y + bias
    return (F.silu(y) if silu else y).transpose(1, 2)
