"""Mamba-2 language model, pure PyTorch, exact for any chunk length.

Dao & Gu, 2024, "Transformers are SSMs" (arXiv:2405.21060); mirrors mamba-ssm's ``Mamba2`` and
``MambaLMHeadModel`` and transformers' ``Mamba2ForCausalLM``. Axis letters as in :mod:`statelens.models.ssd`
(``h`` heads, ``p`` headdim, ``n`` d_state, ``g`` groups), plus ``d`` d_model and ``k`` d_conv.

One layer (``Mamba2Mixer.forward``), for input u [b, l, d]:

    z0, x0, z, xBC, dt = in_proj(u)                   # z0, x0: the optional gated MLP (d_ssm < d_inner)
    xBC = silu(causal_conv1d(xBC))                    # carries the last k - 1 inputs as conv state
    x, B, C = xBC;  dt = softplus(dt + dt_bias), clamped to dt_limit;  A = -exp(A_log)
    y, state = ssd(x * dt, dt * A, B, C, state)  +  D * x
    y = gated_rms_norm(y, z)                          # per group of d_ssm / ngroups channels
    out = out_proj(cat(silu(z0) * x0, y))

Departure from mamba-ssm: the conv state holds ``k - 1`` inputs (all the convolution needs) where
mamba-ssm's inference cache holds ``k``; the oldest of those never reaches an output.

Hook points per block (shapes for a forward over ``l`` tokens):
    hook_x [b, l, h, p]    hook_B, hook_C [b, l, g, n]    hook_dt [b, l, h]
    hook_decay [b, l, h] (alpha = exp(dt * A); patching it changes the scan)
    hook_state [b, h, p, n] (state after the last token)    hook_conv_state [b, conv_dim, k - 1]
    hook_state_blocks [b, c, h, p, n]: the state at the start of each SSD block of the call (entry j
        after j * q tokens, entry 0 the incoming state; q = min(ssd_block, l)); observe only
    hook_out [b, l, d] (the mixer's output, before the residual add)
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
from statelens.models.layers import gated_rms_norm
from statelens.models.lm import LMHeadModel
from statelens.models.mamba_layouts import (HF_KEYS, HF_NAMES, MAMBA_SSM_NAMES, hf_kwargs, json_number,
                                            mamba_ssm_config, mamba_ssm_kwargs)
from statelens.models.ssd import ssd_chunked, ssd_chunked_with_block_states, ssd_steps


@dataclass
class Mamba2Config:
    d_model: int
    n_layer: int
    vocab_size: int                  # embedding rows, already padded as the reference pads them
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    d_ssm: int | None = None         # channels through the SSM; None: all of d_inner
    chunk_size: int = 256            # the reference kernels' SSD block length (results do not depend on it)
    dt_limit: tuple[float, float] = (0.0, math.inf)
    bias: bool = False               # in_proj / out_proj bias
    conv_bias: bool = True
    D_has_hdim: bool = False         # D per channel [d_ssm] instead of per head [nheads]
    rmsnorm: bool = True             # gated RMSNorm before out_proj; False: y * silu(z)
    norm_before_gate: bool = False
    rms_norm: bool = True            # block norms: RMSNorm (True) or LayerNorm
    norm_eps: float = 1e-5           # block norms
    gated_norm_eps: float = 1e-5     # the mixer's gated norm (mamba-ssm hard-codes 1e-5)
    residual_in_fp32: bool = True
    tie_embeddings: bool = True

    def __post_init__(self):
        check_dims(self, ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim", "ngroups",
                          "chunk_size"))
        self.d_ssm = self.d_inner if self.d_ssm is None else self.d_ssm
        check_dims(self, ("d_ssm",))
        if self.d_ssm % self.headdim:
            raise ParameterError("d_ssm", f"d_ssm ({self.d_ssm}) must be a multiple of headdim ({self.headdim})")
        if self.nheads % self.ngroups:
            raise ParameterError("nheads", f"nheads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})")
        if self.d_ssm > self.d_inner:
            raise ParameterError("d_ssm", f"d_ssm ({self.d_ssm}) exceeds d_inner ({self.d_inner})")
        self.dt_limit = (float(self.dt_limit[0]), float(self.dt_limit[1]))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_ssm // self.headdim

    @property
    def d_mlp(self) -> int:
        return self.d_inner - self.d_ssm

    @property
    def conv_dim(self) -> int:
        return self.d_ssm + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    def num_parameters(self) -> int:
        """Parameter count, computed from the config alone (checked before allocating)."""
        mixer = (
            self.d_model * self.d_in_proj * (1 + self.bias)
            + self.conv_dim * (self.d_conv + self.conv_bias)
            + 3 * self.nheads
            + (self.d_ssm if self.D_has_hdim else 0) - (self.nheads if self.D_has_hdim else 0)
            + self.d_ssm * self.rmsnorm
            + self.d_inner * self.d_model + self.d_model * self.bias
        )
        norms = (self.n_layer + 1) * self.d_model * (1 if self.rms_norm else 2)
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + self.n_layer * mixer + norms + head


class Mamba2Mixer(fused.Piecewise, nn.Module):
    """One Mamba-2 layer's mixer: ``forward(u [b, l, d], ssm_state [b, h, p, n], conv_state [b, conv_dim, k - 1])
    -> (out [b, l, d], ssm state, conv state)`` (:class:`~statelens.models.fused.Piecewise`), its hooks on the way."""

    def __init__(self, cfg: Mamba2Config, layer: int):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=cfg.bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                bias=cfg.conv_bias, padding=cfg.d_conv - 1)
        self.dt_bias = nn.Parameter(torch.zeros(cfg.nheads))
        self.A_log = nn.Parameter(torch.zeros(cfg.nheads))
        self.D = nn.Parameter(torch.ones(cfg.d_ssm if cfg.D_has_hdim else cfg.nheads))
        if cfg.rmsnorm:
            self.norm = nn.Module()
            self.norm.weight = nn.Parameter(torch.ones(cfg.d_ssm))
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        # SSD block length. Results do not depend on it; 64 measured fastest on CPU at both the small
        # and the 130M shape (2x faster than the config's usual 256 at 130M).
        self.ssd_block = min(cfg.chunk_size, 64)
        # The scan, replaceable by a training-free mitigation (statelens.interventions.mitigations):
        # same inputs and outputs as ssd_chunked_with_block_states. None: that exact scan.
        self.scan = None

        self.hook_x = HookPoint(layer)           # [b, l, h, p]
        self.hook_B = HookPoint(layer)           # [b, l, g, n]
        self.hook_C = HookPoint(layer)           # [b, l, g, n]
        self.hook_dt = HookPoint(layer)          # [b, l, h]
        self.hook_decay = HookPoint(layer)       # [b, l, h]
        self.hook_state = HookPoint(layer)       # [b, h, p, n]
        self.hook_state_blocks = HookPoint(layer)  # [b, c, h, p, n]: at each SSD block start (observe only)
        self.hook_conv_state = HookPoint(layer)  # [b, conv_dim, k - 1]
        self.hook_out = HookPoint(layer)         # [b, l, d]

    def block_length(self) -> int:
        """The SSD block length of a call: the config's ``chunk_size`` where mamba-ssm's kernels run
        (:mod:`statelens.models.kernels`), else ``ssd_block``. The same on both paths, so that the
        states ``hook_state_blocks`` sees fall where the recorder expects them."""
        return self.cfg.chunk_size if kernels.ready("ssd", self.A_log) else self.ssd_block

    def fast_piece(self, u: torch.Tensor) -> int:
        """Tokens per row of a piece when a call on u [b, l, d] takes the compiled path (:mod:`fused`), else 0."""
        piece = fused.piece_length(u.shape[0], self.ssd_block)
        inputs = (self.hook_x, self.hook_B, self.hook_C, self.hook_dt, self.hook_decay)
        return piece if fused.applies(self, u, inputs, piece) and not kernels.ready("ssd", u) else 0

    def options(self) -> tuple[bool]:
        """:meth:`unhooked`'s arguments after the states: whether the block states are wanted."""
        return (self.hook_state_blocks.active,)

    def observe(self, ssm_state: torch.Tensor, conv_state: torch.Tensor, blocks: torch.Tensor | None):
        """The hooks on the states :meth:`unhooked` returned -> (ssm state, conv state)."""
        conv_state = self.hook_conv_state(conv_state)
        if blocks is not None:  # observe only
            self.hook_state_blocks(blocks)
        return self.hook_state(ssm_state), conv_state

    def unhooked(self, u: torch.Tensor, ssm_state: torch.Tensor, conv_state: torch.Tensor, blocks_wanted: bool):
        """:meth:`forward` without the hooks on its outputs (``hook_conv_state``, ``hook_state_blocks``,
        ``hook_state``, ``hook_out``) -> (out [b, l, d], ssm state, conv state, the state at each block start
        [b, c, h, p, n] or None when not ``blocks_wanted``)."""
        cfg = self.cfg
        z0, x0, z, xBC, dt = self.in_proj(u).split(
            [cfg.d_mlp, cfg.d_mlp, cfg.d_ssm, cfg.conv_dim, cfg.nheads], dim=-1)
        y, ssm_state, conv_state, blocks = self._scan(z, xBC, dt, ssm_state, conv_state, blocks_wanted)
        if cfg.d_mlp:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y), ssm_state, conv_state, blocks

    def _scan(self, z: torch.Tensor, xBC: torch.Tensor, dt: torch.Tensor, ssm_state: torch.Tensor,
              conv_state: torch.Tensor, blocks_wanted: bool):
        """Between the two projections: z [b, l, d_ssm], xBC [b, l, conv_dim], dt [b, l, h] -> (y [b, l, d_ssm]
        gated and normed, ssm state, conv state, block states or None), the hooks on the scan's inputs on the
        way."""
        cfg = self.cfg
        b, l, _ = xBC.shape
        g, n, h, p = cfg.ngroups, cfg.d_state, cfg.nheads, cfg.headdim
        xBC, conv_state = kernels.causal_conv(xBC.transpose(1, 2), conv_state, self.conv1d.weight, self.conv1d.bias)
        x, B, C = xBC.transpose(1, 2).split([cfg.d_ssm, g * n, g * n], dim=-1)
        x = self.hook_x(x.reshape(b, l, h, p))
        B = self.hook_B(B.reshape(b, l, g, n))
        C = self.hook_C(C.reshape(b, l, g, n))

        dt = F.softplus(dt + self.dt_bias)
        if cfg.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*cfg.dt_limit)
        dt = self.hook_dt(dt)
        wide = torch.promote_types(x.dtype, torch.float32)  # the scan runs in float32 or wider
        A = -torch.exp(self.A_log.to(wide))
        log_a = dt.to(wide) * A.to(wide)
        if self.hook_decay.active:  # round-trip through alpha only when somebody looks or patches
            log_a = self.hook_decay(log_a.exp()).log()

        block = self.block_length()
        if (self.scan is None and not self.hook_decay.active and kernels.ready("ssd", log_a)
                and not (blocks_wanted and torch.is_grad_enabled())):  # the kernels' block states: forward only
            y, ssm_state, blocks = kernels.ssd(x.to(wide), dt.to(wide), A, B.to(wide), C.to(wide), ssm_state, block,
                                               block_states=blocks_wanted)
        else:
            scan_inputs = (x.to(wide) * dt.to(wide)[..., None], log_a, B.to(wide), C.to(wide), ssm_state, block)
            if self.scan is not None:
                y, ssm_state, blocks = self.scan(*scan_inputs)
            elif blocks_wanted:  # the states after each SSD block come for free
                y, ssm_state, blocks = ssd_chunked_with_block_states(*scan_inputs)
            else:
                (y, ssm_state), blocks = ssd_chunked(*scan_inputs), None
        D = self.D.view(h, p) if cfg.D_has_hdim else self.D[:, None]
        y = (y + x.to(wide) * D).reshape(b, l, cfg.d_ssm)

        if cfg.rmsnorm:
            y = gated_rms_norm(y, z, self.norm.weight, cfg.gated_norm_eps, cfg.d_ssm // g, cfg.norm_before_gate)
        else:
            y = y * F.silu(z.to(wide))
        return y.to(z.dtype), ssm_state, conv_state, blocks


# -- what the mitigations need (statelens.models.base.ScanAdapter) -------------------------------------
# The scan's inputs, as Mamba2Mixer hands them to ``scan``: x [b, l, h, p] (times dt), log_a [b, l, h],
# B, C [b, l, g, n], h0 [b, h, p, n], chunk the SSD block length.

def _steps(x, log_a, B, C, h0, chunk):
    """The SSD recurrence a token at a time, with the block states ssd_chunked_with_block_states returns."""
    return ssd_steps(x, log_a, B, C), h0.to(x.dtype), x.shape[1], min(chunk, x.shape[1])


def _window(extend, x, log_a, B, C, h0, chunk):
    """The SSD scan with the sliding window: the removal step of token t inserts
    -alpha_{t-r+1:t} x_{t-r} B_{t-r}^T (the decay is one number per head)."""
    (x_old, B_old, _), window = extend([x, B, log_a])
    x_out = -x_old * window.exp()[..., None]              # the token leaving: -alpha_{t-r+1:t} x_{t-r}
    y, state, starts = ssd_chunked_with_block_states(
        interleave(x_out, x), interleave(log_a, torch.zeros_like(log_a)), interleave(B_old, B),
        interleave(C, C), h0, 2 * chunk)
    return y[:, 1::2], state, starts


def _window_width(cfg: Mamba2Config) -> int:
    """x [h, p], B [g, n] and log_a [h] of one token."""
    return cfg.nheads * cfg.headdim + cfg.ngroups * cfg.d_state + cfg.nheads


# -- its checkpoints (statelens.models.base.Layout) -----------------------------------------------------

_SSM_KEYS = frozenset({"d_state", "d_conv", "expand", "headdim", "d_ssm", "ngroups", "chunk_size", "dt_limit", "bias",
                       "conv_bias", "D_has_hdim", "rmsnorm", "norm_before_gate"})   # what ssm_cfg may set


def _from_hf(raw: dict) -> dict:
    """transformers' Mamba2Config (its config.json) -> Mamba2Config keyword arguments."""
    common = hf_kwargs(raw)
    heads, headdim = raw.get("num_heads", 128), raw.get("head_dim", 64)
    return common | dict(
        d_state=raw.get("state_size", 128), headdim=headdim, d_ssm=heads * headdim,
        ngroups=raw.get("n_groups", 8), chunk_size=raw.get("chunk_size", 256),
        dt_limit=tuple(json_number(v) for v in raw.get("time_step_limit", (0.0, math.inf))),
        gated_norm_eps=common["norm_eps"], tie_embeddings=raw.get("tie_word_embeddings", False),
    )


def _from_mamba_ssm(raw: dict) -> dict:
    """mamba-ssm's config.json with ``ssm_cfg.layer`` Mamba2 -> Mamba2Config keyword arguments."""
    kwargs = mamba_ssm_kwargs(raw, "Mamba2", _SSM_KEYS)
    if "dt_limit" in kwargs:
        kwargs["dt_limit"] = tuple(json_number(v) for v in kwargs["dt_limit"])
    return kwargs


def _to_mamba_ssm(cfg: Mamba2Config) -> dict:
    """mamba-ssm's config.json for ``cfg``."""
    ssm_cfg = {k: getattr(cfg, k) for k in ("headdim", "ngroups", "d_ssm", "chunk_size", "D_has_hdim", "rmsnorm",
                                            "norm_before_gate")}
    if cfg.dt_limit != (0.0, math.inf):
        ssm_cfg["dt_limit"] = list(cfg.dt_limit)
    return mamba_ssm_config(cfg, "Mamba2", ssm_cfg)


@backends.register("mamba2")
class Mamba2LM(LMHeadModel):
    """Mamba-2 language model. State per layer: ssm [b, nheads, headdim, d_state],
    conv [b, d_ssm + 2 * ngroups * d_state, d_conv - 1]."""

    arch = "mamba2"
    config_class = Mamba2Config
    layouts = (
        Layout("hf", "mamba2", _from_hf, HF_NAMES,
               config_keys=HF_KEYS | {"headdim": "head_dim", "ngroups": "n_groups", "d_ssm": "num_heads * head_dim"}),
        Layout("mamba_ssm", "Mamba2", _from_mamba_ssm, MAMBA_SSM_NAMES, write_config=_to_mamba_ssm),
    )
    scan_adapter = ScanAdapter(mixer="mixer", decay_hook="hook_decay", input_hook="hook_B",
                               chunked=ssd_chunked_with_block_states, steps=_steps, window=_window,
                               window_width=_window_width)

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self._build(cfg, [Mamba2Mixer(cfg, i) for i in range(cfg.n_layer)])

    def layer_state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cfg = self.config
        return (cfg.nheads, cfg.headdim, cfg.d_state), (cfg.conv_dim, cfg.d_conv - 1)

    @property
    def n_heads(self) -> int:
        return self.config.nheads

    @property
    def state_block(self) -> int:
        """The SSD block length: ``hook_state_blocks`` sees the state every this many tokens of a call
        (of a call longer than one block)."""
        return self.blocks[0].mixer.block_length()

    def by_head(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A hook's tensor with its heads made explicit: the state hooks give [b, heads, k], the
        per-token hooks [b, l, heads, k]. hook_B and hook_C are split by group; the conv state and
        hook_out have no heads (one "head" 0)."""
        kind = name.rsplit(".", 1)[-1]
        if kind == "hook_state":
            return t.flatten(2)                       # [b, h, p * n]
        if kind == "hook_conv_state":
            return t.flatten(1)[:, None]              # [b, 1, conv_dim * (k - 1)]
        if kind in ("hook_dt", "hook_decay"):
            return t[..., None]                       # [b, l, h, 1]
        if kind == "hook_out":
            return t[:, :, None]                      # [b, l, 1, d]
        return t                                      # hook_x [b, l, h, p]; hook_B, hook_C [b, l, g, n]
