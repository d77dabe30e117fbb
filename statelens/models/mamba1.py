"""Mamba-1 language model, pure PyTorch, exact for any chunk length.

Gu & Dao, 2023, "Mamba" (arXiv:2312.00752); mirrors mamba-ssm's ``Mamba`` (simple) module and
transformers' ``MambaForCausalLM``. Axis letters as in :mod:`statelens.models.selective_scan`
(``d`` d_inner, ``n`` d_state) plus ``r`` dt_rank and ``k`` d_conv.

One layer, for input u [b, l, d_model]:

    x, z = in_proj(u)                                 # [b, l, d] each
    x = silu(causal_conv1d(x))                        # carries the last k - 1 inputs as conv state
    dt_low, B, C = x_proj(x)                          # [b, l, r], [b, l, n], [b, l, n]
    dt = softplus(dt_proj(dt_low));  A = -exp(A_log)  # dt [b, l, d], A [d, n]
    y, state = selective_scan(x, dt, A, B, C, state)  +  D * x
    out = out_proj(y * silu(z))

Mamba-1 has no heads: its state is [d_inner, d_state], one row per channel.

Hook points per block: hook_x [b, l, d], hook_B and hook_C [b, l, n], hook_dt [b, l, d],
hook_decay [b, l, d, n] (alpha = exp(dt * A); materialised only when hooked; patching it changes the
scan), hook_state [b, d, n], hook_conv_state [b, d, k - 1], hook_out [b, l, d_model].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from statelens.errors import ParameterError
from statelens.models import fused, kernels
from statelens.models.base import Layout, ScanAdapter, backends, check_dims, interleave
from statelens.models.hooks import HookPoint
from statelens.models.lm import LMHeadModel
from statelens.models.mamba_layouts import (HF_KEYS, HF_NAMES, MAMBA_SSM_NAMES, hf_kwargs, mamba_ssm_config,
                                            mamba_ssm_kwargs)
from statelens.models.selective_scan import selective_scan_chunked, selective_scan_sequential, selective_scan_steps


@dataclass
class Mamba1Config:
    d_model: int
    n_layer: int
    vocab_size: int                  # embedding rows, already padded as the reference pads them
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None       # None ("auto"): ceil(d_model / 16)
    bias: bool = False               # in_proj / out_proj bias
    conv_bias: bool = True
    rms_norm: bool = True            # block norms: RMSNorm (True) or LayerNorm
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True

    def __post_init__(self):
        check_dims(self, ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"))
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        check_dims(self, ("dt_rank",))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def num_parameters(self) -> int:
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        mixer = (
            self.d_model * 2 * d * (1 + self.bias) + d * (self.d_conv + self.conv_bias)
            + d * (r + 2 * n) + (r + 1) * d + d * n + d + d * self.d_model + self.d_model * self.bias
        )
        norms = (self.n_layer + 1) * self.d_model * (1 if self.rms_norm else 2)
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + self.n_layer * mixer + norms + head


class Mamba1Mixer(fused.Piecewise, nn.Module):
    """One Mamba-1 layer's mixer: ``forward(u [b, l, d_model], ssm_state [b, d, n], conv_state [b, d, k - 1]) ->
    (out [b, l, d_model], ssm state, conv state)`` (:class:`~statelens.models.fused.Piecewise`), its hooks on the
    way."""

    def __init__(self, cfg: Mamba1Config, layer: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_inner
        self.in_proj = nn.Linear(cfg.d_model, 2 * d, bias=cfg.bias)
        self.conv1d = nn.Conv1d(d, d, cfg.d_conv, groups=d, bias=cfg.conv_bias, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(d, cfg.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(cfg.dt_rank, d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d, cfg.d_state))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, cfg.d_model, bias=cfg.bias)
        # The scan, replaceable by a training-free mitigation (statelens.interventions.mitigations):
        # same inputs and outputs as selective_scan_chunked. None: that exact scan.
        self.scan = None

        self.hook_x = HookPoint(layer)           # [b, l, d]
        self.hook_B = HookPoint(layer)           # [b, l, n]
        self.hook_C = HookPoint(layer)           # [b, l, n]
        self.hook_dt = HookPoint(layer)          # [b, l, d]
        self.hook_decay = HookPoint(layer)       # [b, l, d, n]
        self.hook_state = HookPoint(layer)       # [b, d, n]
        self.hook_conv_state = HookPoint(layer)  # [b, d, k - 1]
        self.hook_out = HookPoint(layer)         # [b, l, d_model]

    def fast_piece(self, u: torch.Tensor) -> int:
        """Tokens per row of a piece when a call on u [b, l, d_model] takes the compiled path (:mod:`fused`),
        else 0."""
        piece = fused.piece_length(u.shape[0], 1, PIECE)
        return piece if fused.applies(self, u, (self.hook_x, self.hook_B, self.hook_C, self.hook_dt,
                                                self.hook_decay), piece) else 0

    def options(self) -> tuple:
        """:meth:`unhooked`'s arguments after the states: none."""
        return ()

    def observe(self, ssm_state: torch.Tensor, conv_state: torch.Tensor):
        """The hooks on the states :meth:`unhooked` returned -> (ssm state, conv state). The conv state is
        hooked last: the scan does not read it, so hooking it after changes nothing."""
        conv_state = self.hook_conv_state(conv_state)
        return self.hook_state(ssm_state), conv_state

    def unhooked(self, u: torch.Tensor, ssm_state: torch.Tensor, conv_state: torch.Tensor):
        """:meth:`forward` without the hooks on its outputs (``hook_conv_state``, ``hook_state``, ``hook_out``)
        -> (out [b, l, d_model], ssm state [b, d, n], conv state [b, d, k - 1])."""
        cfg = self.cfg
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, conv_state = kernels.causal_conv(x.transpose(1, 2), conv_state, self.conv1d.weight, self.conv1d.bias)
        x = self.hook_x(x.transpose(1, 2))
        dt_low, B, C = self.x_proj(x).split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        B, C = self.hook_B(B), self.hook_C(C)
        dt = self.hook_dt(F.softplus(self.dt_proj(dt_low)))

        wide = torch.promote_types(x.dtype, torch.float32)  # the scan runs in float32 or wider
        A = -torch.exp(self.A_log.to(wide))
        log_decay = None
        if self.hook_decay.active:  # [b, l, d, n] is large: build it only when somebody looks or patches
            log_decay = self.hook_decay((dt.to(wide)[..., None] * A).exp()).log()
        scan_inputs = (x.to(wide), dt.to(wide), A, B.to(wide), C.to(wide), ssm_state)
        if (self.scan is None and log_decay is None and not torch.is_grad_enabled()
                and kernels.ready("selective_scan", scan_inputs[0])):  # the kernel's last state has no gradient
            y, ssm_state = kernels.selective_scan(*scan_inputs)
        elif torch.compiler.is_compiling() and self.scan is None and log_decay is None:
            # The compiled path (statelens.models.fused): the recurrence itself, a token at a time, each step
            # fused into one loop over the [b, d, n] state (in cache); the same sums as the chunked form's.
            y, ssm_state = selective_scan_sequential(*scan_inputs)
        else:
            y, ssm_state = (self.scan or selective_scan_chunked)(*scan_inputs, log_decay=log_decay)
        y = (y + x.to(wide) * self.D) * F.silu(z.to(wide))
        return self.out_proj(y.to(u.dtype)), ssm_state, conv_state


#: Tokens per piece on the compiled path (:mod:`statelens.models.fused`), over the batch. There the scan is the
#: recurrence a token at a time, which inductor unrolls into loops over the [b, d, n] state (in L2 at the 130M
#: shape); the eager chunked form's [b, q, d, n] decays and partial products go through memory log2(q) times.
#: Measured on one 130M-shaped layer over 4096 tokens at batch 1: 32 and 64 tokens 449 and 446 ms against
#: 1330 ms eager; the chunked form compiled, 16-token blocks in 128-token pieces, 670 ms. 32 compiles faster.
PIECE = 32


# -- what the mitigations need (statelens.models.base.ScanAdapter) -------------------------------------
# The scan's inputs, as Mamba1Mixer hands them to ``scan``: u, dt [b, l, d]; A [d, n]; B, C [b, l, n];
# h0 [b, d, n]; log_decay [b, l, d, n] or None (a patched hook_decay).

def _steps(u, dt, A, B, C, h0, log_decay=None):
    """The selective scan a token at a time (no block states)."""
    return selective_scan_steps(u, dt, A, B, C, log_decay), h0.to(u.dtype), u.shape[1], None


def _window(extend, u, dt, A, B, C, h0, log_decay=None):
    """The selective scan with the sliding window. The decay differs per (channel, state index), so the
    removal is a full [b, l, d, n] input; dt is carried rather than the log-decay, A * sum(dt) being
    the window's."""
    if log_decay is not None:
        raise ParameterError("mitigation", "the window on Mamba-1 needs the backend's own decay (hook_decay is patched)")
    du = dt * u
    (du_old, B_old, _), window = extend([du, B, dt])
    removal = -(window[..., None] * A).exp() * du_old[..., None] * B_old[:, :, None, :]     # [b, l, d, n]
    insertion = du[..., None] * B[:, :, None, :]
    log_a = dt[..., None] * A
    y, state = selective_scan_chunked(
        interleave(u, u), interleave(dt, dt), A, interleave(B, B), interleave(C, C), h0,
        log_decay=interleave(log_a, torch.zeros_like(log_a)), inputs=interleave(removal, insertion))
    return y[:, 1::2], state


def _window_width(cfg: Mamba1Config) -> int:
    """dt * u [d], B [n] and dt [d] of one token."""
    return 2 * cfg.d_inner + cfg.d_state


# -- its checkpoints (statelens.models.base.Layout) -----------------------------------------------------

_SSM_KEYS = frozenset({"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias"})   # what ssm_cfg may set


def _from_hf(raw: dict) -> dict:
    """transformers' MambaConfig (its config.json) -> Mamba1Config keyword arguments."""
    rank = raw.get("time_step_rank", "auto")
    return hf_kwargs(raw) | dict(
        d_state=raw.get("state_size", 16), dt_rank=None if rank == "auto" else rank,
        tie_embeddings=raw.get("tie_word_embeddings", True),
    )


def _from_mamba_ssm(raw: dict) -> dict:
    """mamba-ssm's config.json with ``ssm_cfg.layer`` Mamba1 -> Mamba1Config keyword arguments."""
    kwargs = mamba_ssm_kwargs(raw, "Mamba1", _SSM_KEYS)
    if kwargs.get("dt_rank") == "auto":
        kwargs["dt_rank"] = None
    return kwargs


@backends.register("mamba1")
class Mamba1LM(LMHeadModel):
    """Mamba-1 language model. State per layer: ssm [b, d_inner, d_state], conv [b, d_inner, d_conv - 1]."""

    arch = "mamba1"
    config_class = Mamba1Config
    layouts = (
        Layout("hf", "mamba", _from_hf, HF_NAMES, config_keys=HF_KEYS | {"dt_rank": "time_step_rank"}),
        Layout("mamba_ssm", "Mamba1", _from_mamba_ssm, MAMBA_SSM_NAMES,
               write_config=lambda cfg: mamba_ssm_config(cfg, "Mamba1", {"dt_rank": cfg.dt_rank})),
    )
    scan_adapter = ScanAdapter(mixer="mixer", decay_hook="hook_decay", input_hook="hook_B",
                               chunked=selective_scan_chunked, steps=_steps, window=_window,
                               window_width=_window_width)

    def __init__(self, cfg: Mamba1Config):
        super().__init__()
        self._build(cfg, [Mamba1Mixer(cfg, i) for i in range(cfg.n_layer)])

    def layer_state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cfg = self.config
        return (cfg.d_inner, cfg.d_state), (cfg.d_inner, cfg.d_conv - 1)

    @property
    def head_channels(self) -> int:
        """Mamba-1 has no heads. statelens groups its d_inner channels into "heads" of 64 consecutive
        channels (like Mamba-2's usual headdim; fewer when 64 does not divide d_inner), so that
        per-head statistics have the same meaning and size as for Mamba-2."""
        return math.gcd(self.config.d_inner, 64)

    @property
    def n_heads(self) -> int:
        return self.config.d_inner // self.head_channels

    def by_head(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A hook's tensor with its heads (channel groups) made explicit: the state hooks give
        [b, heads, k], the per-token hooks [b, l, heads, k]. hook_B, hook_C (shared by all channels),
        the conv state and hook_out have no heads (one "head" 0)."""
        kind = name.rsplit(".", 1)[-1]
        if kind == "hook_state":
            return t.reshape(t.shape[0], self.n_heads, -1)             # [b, H, c * n]
        if kind == "hook_conv_state":
            return t.flatten(1)[:, None]                                # [b, 1, d * (k - 1)]
        if kind in ("hook_x", "hook_dt"):
            return t.unflatten(2, (self.n_heads, -1))                   # [b, l, H, c]
        if kind == "hook_decay":
            return t.flatten(2).unflatten(2, (self.n_heads, -1))        # [b, l, H, c * n]
        return t[:, :, None]                                            # hook_B, hook_C, hook_out
