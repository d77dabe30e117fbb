"""Mamba-3 language model (SISO and MIMO), pure PyTorch, exact for any chunk length.

Lahoti, Li, Chen, Wang, Bick, Kolter, Dao & Gu, 2026, "Mamba-3: Improved Sequence Modeling using State
Space Principles" (ICLR 2026); mirrors mamba-ssm's ``Mamba3`` module (``mamba_ssm/modules/mamba3.py``,
with the pure-torch references ``mamba3_siso_step_ref`` / ``mamba3_siso_fwd_ref`` of its tests) and
flash-linear-attention's port (``fla/layers/mamba3.py``, ``model_type: mamba3``), which share parameter
names. Axis letters as in :mod:`statelens.models.ssd`, plus:

    a: rotary angles per head (num_rope_angles)       d: d_model

The recurrence per head (exponential-trapezoidal discretization; ``lambda_t`` the trapezoid's mix):

    alpha_t = exp(dt_t * A_t)           beta_t = (1 - lambda_t) dt_t alpha_t       gamma_t = lambda_t dt_t
    h_t = alpha_t h_{t-1} + beta_t x_{t-1} B_{t-1}^T + gamma_t x_t B_t^T          (h_t: [p, n])
    y_t = h_t C_t + D x_t

``B_t`` and ``C_t`` are rotated by the cumulative data-dependent angle ``theta_t = theta_{t-1} + dt_t *
pi * tanh(angle_t)`` (mod 2 pi), pairs of state dimensions (2i, 2i + 1) for i < a, the rest unrotated:
the real form of a complex-valued state whose transition is alpha_t times a rotation by
``dt_t pi tanh(angle_t)`` (rotating B and C instead of the state keeps every transition a scalar).
For the decay analysis, alpha_t (``hook_decay``, one per head and token) is the whole forgetting: the
initial state survives with weight ``prod alpha`` (the rotation preserves norms; the trapezoid only
splits each token's insertion between two steps).

One layer (``Mamba3Mixer.forward``), for input u [b, l, d]; no convolution:

    z, x, B, C, dd_dt, dd_A, trap, angle = in_proj(u)
    B, C = rmsnorm(B), rmsnorm(C) over n, then + B_bias, C_bias (per head), then rotated by theta
    dt = softplus(dd_dt + dt_bias);  A = -max(act(dd_A), A_floor);  lambda = sigmoid(trap)
    y = scan(...) + D * x;  y = y * silu(z)   (is_outproj_norm: rmsnorm(y) * silu(z) per head)
    out = out_proj(y)

``act`` is softplus in mamba-ssm's releases (2.3.x) and fla; mamba-ssm's main branch (June 2026) switched
to a heavy-tailed ``f(x) = 1 + x (x >= 0), 1 / (1 - x) (x < 0)``; config.json does not record which, so
``a_activation`` says (``ssm_cfg.a_activation``, default softplus).

The state carried between calls per layer: ``ssm`` [b, h, p, n] the state h; ``conv`` [b, h, n + p + a],
the previous token's rotated B and its x (the trapezoid's second point) and the cumulative angle theta,
all in float32 or wider (mamba-ssm's cache: angle_state, ssm_state, k_state, v_state).

The chunked scan (:func:`mamba3_chunked`) is Mamba-2's SSD with one weight per token: the term
``beta_{s+1} x_s B_s^T`` enters at s + 1 decayed by alpha_{s+1}, exactly as the gamma term of token s
does, so token s's input is ``(gamma_s + eta_{s+1}) x_s B_s^T`` with ``eta = (1 - lambda) dt`` (no
division by alpha), the carried previous token folds into the initial state, and only the diagonal
(s = t, whose beta term has not entered yet) is corrected. mamba-ssm's ``mamba3_siso_fwd_ref`` does the same.

Hook points per block (shapes for a forward over ``l`` tokens):
    hook_x [b, l, h, p]      hook_B, hook_C [b, l, h, n] (after norm, bias and rotation: what the state sees;
                             MIMO [b, l, h, r, n])
    hook_dt [b, l, h]        hook_decay [b, l, h] (alpha = exp(dt * A); patching it changes the scan, beta too)
    hook_lambda [b, l, h] (the trapezoid's mix; patchable)    hook_angle [b, l, h, a] (theta, cumulative)
    hook_state [b, h, p, n]  hook_conv_state [b, h, n + p + a] (previous B, x and theta; see above)
    hook_out [b, l, d]

MIMO (``is_mimo``, rank ``r = mimo_rank``): x and z are up-projected per rank (``mimo_x``, ``mimo_z``
[h, r, p]), B and C have r per head, each token inserts ``sum_r x_r B_r^T`` (both trapezoid points) and
is read out r times, and the r gated outputs are contracted by ``mimo_o``; the rotation pairs dims
(i, i + n / 2), as mamba-ssm's TileLang MIMO kernels do (its SISO kernels pair (2i, 2i + 1)). Then hook_B
and hook_C are [b, l, h, r, n]; the conv state's B is [h, r * n].
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from statelens.errors import ParameterError
from statelens.models.base import Layout, ScanAdapter, State, backends, check_dims
from statelens.models.hooks import HookPoint
from statelens.models.layers import gated_rms_norm
from statelens.models.lm import LMHeadModel
from statelens.models.mamba_layouts import HF_NAMES, MAMBA_SSM_NAMES, mamba_ssm_config, mamba_ssm_kwargs
from statelens.models.ssd import ssd_chunked

A_ACTIVATIONS = ("softplus", "heavy_tail")


@dataclass
class Mamba3Config:
    d_model: int
    n_layer: int
    vocab_size: int                  # embedding rows, already padded as the reference pads them
    d_state: int = 128
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1                 # B and C heads (each shared by nheads / ngroups heads)
    rope_fraction: float = 0.5       # share of d_state rotated: 0.5 or 1.0
    A_floor: float = 1e-4            # A <= -A_floor
    a_activation: str = "softplus"   # A = -act(dd_A): softplus (mamba-ssm 2.3.x, fla) or heavy_tail
    is_outproj_norm: bool = False    # rmsnorm(y) * silu(z) per head instead of y * silu(z)
    is_mimo: bool = False            # MIMO: each token inserts mimo_rank terms and is read out mimo_rank times
    mimo_rank: int = 4               # read for MIMO configs only
    chunk_size: int = 64             # the scan's block length (results do not depend on it)
    bias: bool = False               # in_proj / out_proj bias (fla's use_bias; mamba-ssm has none)
    bc_norm_eps: float = 1e-5        # B, C and output norms (mamba-ssm hard-codes 1e-5; fla: norm_eps)
    rms_norm: bool = True            # block norms: RMSNorm (True) or LayerNorm
    norm_eps: float = 1e-5           # block norms
    residual_in_fp32: bool = True
    tie_embeddings: bool = True

    def __post_init__(self):
        check_dims(self, ("d_model", "n_layer", "vocab_size", "d_state", "expand", "headdim", "ngroups",
                          "chunk_size"))
        check_dims(self, ("mimo_rank",))
        if self.is_mimo and self.d_state % 2:
            raise ParameterError("d_state", f"d_state ({self.d_state}) must be even for MIMO (halves are rotated)")
        if self.rope_fraction not in (0.5, 1.0):
            raise ParameterError("rope_fraction", f"rope_fraction must be 0.5 or 1.0, got {self.rope_fraction!r}")
        if self.a_activation not in A_ACTIVATIONS:
            raise ParameterError("a_activation", f"a_activation must be one of {', '.join(A_ACTIVATIONS)}, "
                                                 f"got {self.a_activation!r}")
        if self.d_inner % self.headdim:
            raise ParameterError("headdim", f"expand * d_model ({self.d_inner}) must be a multiple of headdim "
                                            f"({self.headdim})")
        if self.nheads % self.ngroups:
            raise ParameterError("ngroups", f"nheads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})")
        if self.num_rope_angles < 1:
            raise ParameterError("d_state", f"d_state * rope_fraction ({self.d_state} * {self.rope_fraction}) "
                                            "gives no rotary angle")
        if not 0 < self.A_floor < math.inf:
            raise ParameterError("A_floor", f"A_floor must be positive and finite, got {self.A_floor!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def rank(self) -> int:
        """Terms per token: mimo_rank for MIMO, 1 for SISO."""
        return self.mimo_rank if self.is_mimo else 1

    @property
    def num_rope_angles(self) -> int:
        """Rotated pairs of state dimensions: mamba-ssm's ``split_tensor_size // 2``."""
        return int(self.d_state * self.rope_fraction) // 2

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.rank * self.ngroups * self.d_state + 3 * self.nheads + self.num_rope_angles

    @property
    def carry_width(self) -> int:
        """The conv state's last axis: previous B [r, n], previous x [p], theta [a]."""
        return self.rank * self.d_state + self.headdim + self.num_rope_angles

    def num_parameters(self) -> int:
        """Parameter count, computed from the config alone (checked before allocating)."""
        h, n, r = self.nheads, self.d_state, self.rank
        mixer = (self.d_model * self.d_in_proj + self.d_inner * self.d_model
                 + (self.d_in_proj + self.d_model) * self.bias
                 + 2 * h + 2 * h * r * n + 2 * n + self.d_inner * self.is_outproj_norm + 3 * h * r * self.headdim * self.is_mimo)
        norms = (self.n_layer + 1) * self.d_model * (1 if self.rms_norm else 2)
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + self.n_layer * mixer + norms + head


# -- the recurrence ---------------------------------------------------------------------------------

def mamba3_steps(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, gamma: torch.Tensor,
    eta: torch.Tensor, B_prev: torch.Tensor, x_prev: torch.Tensor,
) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The recurrence one token at a time: ``step(t, h) -> (y_t [b, h, r, p], h_t [b, h, p, n])`` from
    h = h_{t-1}. x [b, l, h, r, p]; log_a, gamma, eta [b, l, h] (beta = eta * alpha); B, C [b, l, h, r, n];
    B_prev [b, h, r, n], x_prev [b, h, r, p]: the token before x[:, 0]. ``r`` the MIMO rank (1: SISO):
    each token inserts ``sum_r x_r B_r^T`` and is read out once per rank, ``y_r = h C_r``."""
    def step(t: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Bp, xp = (B_prev, x_prev) if t == 0 else (B[:, t - 1], x[:, t - 1])
        alpha = log_a[:, t, :, None, None].exp()
        h = (alpha * h + (alpha * eta[:, t, :, None, None]) * torch.einsum("bhrp,bhrn->bhpn", xp, Bp)
             + gamma[:, t, :, None, None] * torch.einsum("bhrp,bhrn->bhpn", x[:, t], B[:, t]))
        return torch.einsum("bhpn,bhrn->bhrp", h, C[:, t]), h
    return step


def mamba3_sequential(x, log_a, B, C, gamma, eta, h0, B_prev, x_prev) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one step per token (:func:`mamba3_steps`); h0 [b, h, p, n]
    -> y [b, l, h, r, p] (without the D skip), final state [b, h, p, n]."""
    step, h, ys = mamba3_steps(x, log_a, B, C, gamma, eta, B_prev, x_prev), h0, []
    for t in range(x.shape[1]):
        y, h = step(t, h)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def mamba3_chunked(x, log_a, B, C, gamma, eta, h0, B_prev, x_prev, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form (trapezoidal SSD); same inputs and outputs as :func:`mamba3_sequential`, and
    ``chunk`` the block length (the result does not depend on it beyond float rounding)."""
    # 1. Token s's weight: its own gamma_s, and the eta_{s+1} with which token s + 1 re-inserts it (the
    #    alpha_{s+1} of beta_{s+1} is the decay the SSD applies anyway). None after the call's last token.
    eta_next = F.pad(eta[:, 1:], (0, 0, 0, 1))
    weight = (gamma + eta_next)[..., None, None]
    # 2. The carried previous token enters at token 0 with beta_0 = eta_0 alpha_0: fold it into h0.
    h0 = h0 + eta[:, 0, :, None, None] * torch.einsum("bhrp,bhrn->bhpn", x_prev, B_prev)
    if x.shape[3] == 1:  # SISO: one SSD step per token
        y, state = ssd_chunked((x * weight)[:, :, :, 0], log_a, B[:, :, :, 0], C[:, :, :, 0], h0, chunk)
        y = y[:, :, :, None]
    else:
        y, state = ranked_ssd([(x * weight, B)], log_a, C, h0, chunk)
    # 3. On the diagonal the eta_{t+1} part has not entered yet: take it out of y_t.
    diagonal = torch.einsum("blhRn,blhrn,blhrp->blhRp", C, B, x)
    return y - eta_next[..., None, None] * diagonal, state


def ranked_ssd(terms, log_a, C, h0, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD over tokens that each insert several rank-r terms and are then read out r times: token t becomes
    ``r * (len(terms) + 1)`` SSD steps, the first decaying by alpha_t, then one per term and rank inserting
    ``x B^T`` (terms: pairs x [b, l, h, r, p], B [b, l, h, r, n]), then one per rank reading C_r [b, l, h, r, n]
    out. -> y [b, l, h, r, p], final state [b, h, p, n]."""
    b, l, h, r, p = terms[0][0].shape
    xs = [x for x, _ in terms] + [torch.zeros_like(terms[0][0])]
    Bs = [B for _, B in terms] + [torch.zeros_like(C)]
    Cs = [torch.zeros_like(C)] * len(terms) + [C]
    steps = r * len(xs)

    def as_steps(parts):   # [b, l, h, r, k] each -> [b, l * steps, h, k]
        return torch.cat(parts, dim=3).permute(0, 1, 3, 2, 4).reshape(b, l * steps, h, -1)
    decay = F.pad(log_a[:, :, None], (0, 0, 0, steps - 1)).reshape(b, l * steps, h)
    y, state = ssd_chunked(as_steps(xs), decay, as_steps(Bs), as_steps(Cs), h0, steps * chunk)
    return y.view(b, l, steps, h, p)[:, :, -r:].transpose(2, 3), state


def rotate(v: torch.Tensor, theta: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """v [..., n] rotated by theta [..., a]: the pairs of dims (2i, 2i + 1) (``pairwise``: SISO), or
    (i, i + n / 2) (MIMO: mamba-ssm's TileLang kernels pair halves), for i < a; the other dims unchanged."""
    a, n = theta.shape[-1], v.shape[-1]
    first, second = (torch.arange(0, 2 * a, 2), torch.arange(1, 2 * a, 2)) if pairwise else \
        (torch.arange(a), torch.arange(a) + n // 2)
    cos, sin = theta.cos(), theta.sin()
    out = v.clone()
    out[..., first] = v[..., first] * cos - v[..., second] * sin
    out[..., second] = v[..., first] * sin + v[..., second] * cos
    return out


def cumulative_angle(theta0: torch.Tensor, increments: torch.Tensor) -> torch.Tensor:
    """theta0 [b, h, a] + cumsum of increments [b, l, h, a] over l, mod 2 pi -> [b, l, h, a].

    Summed in float64: the reference's float32 cumsum loses ~1e-4 rad over 4k tokens, which would make
    the result depend on the chunking."""
    theta = (theta0.double()[:, None] + increments.double().cumsum(dim=1)).remainder(2 * math.pi)
    return theta.to(increments.dtype)


def a_activation(dd_A: torch.Tensor, kind: str) -> torch.Tensor:
    """The positive activation of the data-dependent A (see the module docstring)."""
    if kind == "softplus":
        return F.softplus(dd_A)
    return dd_A.clamp_min(0) + torch.reciprocal(1 - dd_A.clamp_max(0))


# -- the model -------------------------------------------------------------------------------------

class Mamba3Mixer(nn.Module):
    def __init__(self, cfg: Mamba3Config, layer: int):
        super().__init__()
        self.cfg = cfg
        h, n = cfg.nheads, cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=cfg.bias)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.B_bias = nn.Parameter(torch.ones(h, cfg.rank, n))   # [h, r, n], as mamba-ssm
        self.C_bias = nn.Parameter(torch.ones(h, cfg.rank, n))
        if cfg.is_mimo:  # per head and rank, over headdim: x's up-projection, z's, the output's contraction
            self.mimo_x, self.mimo_z, self.mimo_o = (nn.Parameter(torch.ones(h, cfg.rank, cfg.headdim)) for _ in range(3))
        self.B_norm, self.C_norm = nn.Module(), nn.Module()
        self.B_norm.weight = nn.Parameter(torch.ones(n))
        self.C_norm.weight = nn.Parameter(torch.ones(n))
        self.D = nn.Parameter(torch.ones(h))
        if cfg.is_outproj_norm:
            self.norm = nn.Module()
            self.norm.weight = nn.Parameter(torch.ones(cfg.d_inner))
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        # The scan, replaceable by a training-free mitigation (statelens.interventions.mitigations):
        # same inputs and outputs as mamba3_chunked. None: that exact scan.
        self.scan = None

        self.hook_x = HookPoint(layer)           # [b, l, h, p]
        self.hook_B = HookPoint(layer)           # [b, l, h, n]: normed, biased, rotated
        self.hook_C = HookPoint(layer)           # [b, l, h, n]: normed, biased, rotated
        self.hook_dt = HookPoint(layer)          # [b, l, h]
        self.hook_decay = HookPoint(layer)       # [b, l, h]: alpha = exp(dt * A)
        self.hook_lambda = HookPoint(layer)      # [b, l, h]: the trapezoid's mix, sigmoid(trap)
        self.hook_angle = HookPoint(layer)       # [b, l, h, a]: cumulative rotary angle theta
        self.hook_state = HookPoint(layer)       # [b, h, p, n]
        self.hook_conv_state = HookPoint(layer)  # [b, h, n + p + a]: previous B, x; theta
        self.hook_out = HookPoint(layer)         # [b, l, d]

    def _bc(self, v: torch.Tensor, norm: nn.Module, bias: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """v [b, l, r, g, n] -> rmsnorm over n, per head [b, l, h, r, n], + bias [h, r, n], rotated by theta."""
        cfg = self.cfg
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.bc_norm_eps) * norm.weight.to(v.dtype)
        v = v.repeat_interleave(cfg.nheads // cfg.ngroups, dim=3).transpose(2, 3) + bias.to(v.dtype)
        return rotate(v, theta[:, :, :, None], pairwise=not cfg.is_mimo)

    def _per_rank(self, v: torch.Tensor, name: str) -> torch.Tensor:
        """v [..., h, p] -> [..., h, r, p]: times mimo_x or mimo_z (MIMO), or as it is (SISO, r = 1)."""
        return v[..., None, :] * getattr(self, name).to(v.dtype) if self.cfg.is_mimo else v[..., None, :]

    def forward(self, u: torch.Tensor, ssm_state: torch.Tensor, carry: torch.Tensor):
        """u [b, l, d]; ssm_state [b, h, p, n]; carry [b, h, r * n + p + a] -> (out, ssm_state, carry)."""
        cfg = self.cfg
        b, l, _ = u.shape
        g, n, h, p, a, r = cfg.ngroups, cfg.d_state, cfg.nheads, cfg.headdim, cfg.num_rope_angles, cfg.rank
        wide = torch.promote_types(u.dtype, torch.float32)  # everything after in_proj in float32 or wider
        z, x, B, C, dd_dt, dd_A, trap, angle = self.in_proj(u).to(wide).split(
            [cfg.d_inner, cfg.d_inner, r * g * n, r * g * n, h, h, h, a], dim=-1)
        B_prev, x_prev, theta0 = carry.to(wide).split([r * n, p, a], dim=-1)

        dt = self.hook_dt(F.softplus(dd_dt + self.dt_bias.to(wide)))
        A = -a_activation(dd_A, cfg.a_activation).clamp_min(cfg.A_floor)
        log_a = dt * A
        if self.hook_decay.active:  # round-trip through alpha only when somebody looks or patches
            log_a = self.hook_decay(log_a.exp()).log()
        lam = self.hook_lambda(torch.sigmoid(trap))
        theta = self.hook_angle(cumulative_angle(theta0, dt[..., None] * math.pi * torch.tanh(angle)[:, :, None]))
        x = self.hook_x(x.reshape(b, l, h, p))
        B, C = (self._bc(v.reshape(b, l, r, g, n), norm, bias.to(wide), theta)
                for v, norm, bias in ((B, self.B_norm, self.B_bias), (C, self.C_norm, self.C_bias)))
        squeeze = (lambda t: t[:, :, :, 0]) if r == 1 else (lambda t: t)   # SISO hooks: [b, l, h, n]
        B = self.hook_B(squeeze(B)).view(b, l, h, r, n)
        C = self.hook_C(squeeze(C)).view(b, l, h, r, n)

        scan_inputs = (self._per_rank(x, "mimo_x"), log_a, B, C, lam * dt, (1 - lam) * dt, ssm_state.to(wide),
                       B_prev.view(b, h, r, n), self._per_rank(x_prev, "mimo_x"), cfg.chunk_size)
        y, ssm_state = (self.scan or mamba3_chunked)(*scan_inputs)
        ssm_state = self.hook_state(ssm_state)
        carry = self.hook_conv_state(torch.cat([B[:, -1].flatten(-2), x[:, -1], theta[:, -1]], dim=-1))
        return self.hook_out(self.out_proj(self._output(y + scan_inputs[0] * self.D.to(wide)[:, None, None], z)
                                           .to(u.dtype))), ssm_state, carry

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y [b, l, h, r, p] (with the D skip), z [b, l, d_inner] -> gated, contracted over r, [b, l, d_inner]."""
        cfg = self.cfg
        z = self._per_rank(z.unflatten(-1, (cfg.nheads, cfg.headdim)), "mimo_z")
        if cfg.is_outproj_norm:  # mamba-ssm's RMSNormGated(norm_before_gate=True, group_size=headdim), per rank
            y = gated_rms_norm(y, z, self.norm.weight.view(cfg.nheads, 1, cfg.headdim), cfg.bc_norm_eps,
                               cfg.headdim, norm_before_gate=True)
        else:
            y = y * F.silu(z)
        y = (y * self.mimo_o.to(y.dtype)).sum(3) if cfg.is_mimo else y[:, :, :, 0]
        return y.flatten(2)


# -- what the mitigations need (statelens.models.base.ScanAdapter) -------------------------------------
# The scan's inputs, as Mamba3Mixer hands them to ``scan``: x [b, l, h, p], log_a, gamma, eta [b, l, h],
# B, C [b, l, h, n], h0 [b, h, p, n], B_prev [b, h, n], x_prev [b, h, p], chunk the block length.

def _steps(x, log_a, B, C, gamma, eta, h0, B_prev, x_prev, chunk):
    """The Mamba-3 recurrence a token at a time (no block states)."""
    return mamba3_steps(x, log_a, B, C, gamma, eta, B_prev, x_prev), h0.to(x.dtype), x.shape[1], None


def _window(extend, x, log_a, B, C, gamma, eta, h0, B_prev, x_prev, chunk):
    """The scan with the sliding window by state difference. Token t inserts two terms,
    ``u_t = beta_t x_{t-1} B_{t-1}^T + gamma_t x_t B_t^T`` (each a sum over ranks), so the window of r tokens
    reaches back to token t - r's x and B (through beta_{t-r+1}). Each token becomes SSD steps
    (:func:`ranked_ssd`): the removal of both terms of token t - r times alpha_{t-r+1:t} (the first step
    decaying by alpha_t), the insertion of both terms of token t, then its readout."""
    xa = (log_a.exp() * eta)[..., None, None] * torch.cat([x_prev[:, None], x[:, :-1]], dim=1)  # beta_t x_{t-1}
    Ba = torch.cat([B_prev[:, None], B[:, :-1]], dim=1)                                         # B_{t-1}
    xb = gamma[..., None, None] * x                                                             # gamma_t x_t
    (xa_old, Ba_old, xb_old, B_old, _), window = extend([xa, Ba, xb, B, log_a])
    leaving = -window.exp()[..., None, None]                                                    # -alpha_{t-r+1:t}
    return ranked_ssd([(leaving * xa_old, Ba_old), (leaving * xb_old, B_old), (xa, Ba), (xb, B)], log_a, C, h0,
                      chunk)


def _window_width(cfg: Mamba3Config) -> int:
    """Per token: beta x_{t-1} [h, r, p], B_{t-1} [h, r, n], gamma x_t [h, r, p], B_t [h, r, n], log_a [h]."""
    return cfg.nheads * (2 * cfg.rank * (cfg.headdim + cfg.d_state) + 1)


# -- its checkpoints (statelens.models.base.Layout) -----------------------------------------------------

_SSM_KEYS = frozenset({"d_state", "expand", "headdim", "ngroups", "rope_fraction", "A_floor", "a_activation",
                       "is_outproj_norm", "is_mimo", "mimo_rank", "chunk_size"})
_IGNORED = ("dropout", "n_layer", "bias", "fuse_pregate_headwise_norm")  # what mamba-ssm's Mamba3 absorbs unused


def _from_mamba_ssm(raw: dict) -> dict:
    """mamba-ssm's config.json with ``ssm_cfg.layer`` Mamba3 -> Mamba3Config keyword arguments."""
    raw = dict(raw, ssm_cfg={k: v for k, v in (raw.get("ssm_cfg") or {}).items() if k not in _IGNORED})
    return mamba_ssm_kwargs(raw, "Mamba3", _SSM_KEYS)


def _to_mamba_ssm(cfg: Mamba3Config) -> dict:
    """mamba-ssm's config.json for ``cfg`` (``a_activation`` is statelens' own key; mamba-ssm ignores it)."""
    if cfg.bias or cfg.bc_norm_eps != 1e-5:
        raise ParameterError("bias", "mamba-ssm's Mamba3 has no in_proj/out_proj bias and a fixed norm eps 1e-5")
    keys = ("expand", "headdim", "ngroups", "rope_fraction", "A_floor", "a_activation", "is_outproj_norm", "is_mimo",
            "mimo_rank", "chunk_size")
    return mamba_ssm_config(cfg, "Mamba3", {k: getattr(cfg, k) for k in keys})


_FLA_DEFAULTS = {"hidden_size": 2048, "num_hidden_layers": 48, "vocab_size": 32000, "state_size": 128, "expand": 2,
                 "head_dim": 64, "n_groups": 1, "use_bias": False, "rope_fraction": 0.5, "A_floor": 1e-4,
                 "is_outproj_norm": False, "is_mimo": False, "mimo_rank": 4, "chunk_size": 64, "norm_eps": 1e-5,
                 "residual_in_fp32": True, "tie_word_embeddings": False}
_FLA_KEYS = {"d_model": "hidden_size", "n_layer": "num_hidden_layers", "d_state": "state_size",
             "headdim": "head_dim", "ngroups": "n_groups", "bias": "use_bias", "tie_embeddings": "tie_word_embeddings"}


def _from_fla(raw: dict) -> dict:
    """flash-linear-attention's config.json (``model_type: mamba3``) -> Mamba3Config keyword arguments."""
    if raw.get("hidden_act", "silu") != "silu":
        raise ParameterError("hidden_act", f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    ours_by_fla = {fla: ours for ours, fla in _FLA_KEYS.items()}
    kwargs = {ours_by_fla.get(key, key): raw.get(key, default) for key, default in _FLA_DEFAULTS.items()}
    kwargs["bc_norm_eps"] = kwargs["norm_eps"]  # fla uses one eps for every norm
    return kwargs


@backends.register("mamba3")
class Mamba3LM(LMHeadModel):
    """Mamba-3 (SISO or MIMO) language model. State per layer: ssm [b, nheads, headdim, d_state],
    conv [b, nheads, d_state + headdim + num_rope_angles] (the trapezoid's previous B and x, the angle)."""

    arch = "mamba3"
    config_class = Mamba3Config
    layouts = (
        Layout("mamba_ssm", "Mamba3", _from_mamba_ssm, MAMBA_SSM_NAMES, write_config=_to_mamba_ssm),
        Layout("hf", "mamba3", _from_fla, HF_NAMES, config_keys=_FLA_KEYS),
    )
    # alpha and B as everywhere: the scaled alpha also scales beta_t (it is the decay of token t - 1's input).
    scan_adapter = ScanAdapter(mixer="mixer", decay_hook="hook_decay", input_hook="hook_B", chunked=mamba3_chunked,
                               steps=_steps, window=_window, window_width=_window_width)

    def __init__(self, cfg: Mamba3Config):
        super().__init__()
        self._build(cfg, [Mamba3Mixer(cfg, i) for i in range(cfg.n_layer)])

    def layer_state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cfg = self.config
        return (cfg.nheads, cfg.headdim, cfg.d_state), (cfg.nheads, cfg.carry_width)

    def zero_state(self, batch: int, *, device=None, dtype=None) -> State:
        """As every backend's, but the carry (angle, previous B and x) in float32 or wider too."""
        state = super().zero_state(batch, device=device, dtype=dtype)
        return State(state.ssm, tuple(c.to(s.dtype) for s, c in zip(state.ssm, state.conv)))

    @property
    def n_heads(self) -> int:
        return self.config.nheads

    def by_head(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A hook's tensor with its heads made explicit: the state hooks give [b, heads, k], the
        per-token hooks [b, l, heads, k]; hook_out has no heads (one "head" 0)."""
        kind = name.rsplit(".", 1)[-1]
        if kind in ("hook_state", "hook_conv_state"):
            return t.flatten(2)                       # [b, h, p * n], [b, h, n + p + a]
        if kind in ("hook_dt", "hook_decay", "hook_lambda"):
            return t[..., None]                       # [b, l, h, 1]
        if kind == "hook_out":
            return t[:, :, None]                      # [b, l, 1, d]
        return t.flatten(3)                           # hook_x, hook_angle; hook_B, hook_C [b, l, h, (r) n]
