"""RWKV-7 ("Goose") language model, pure PyTorch, exact for any chunk length.

Peng et al., 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution" (arXiv:2503.14456); mirrors
flash-linear-attention's ``RWKV7Attention`` layer and ``RWKV7ForCausalLM`` (same parameter names, so only
a prefix differs between checkpoint keys and ours). Axis letters:

    b: batch             l: sequence length (t, s: positions inside a chunk; q: chunk length)
    c: chunk index       h: heads
    k: key dim per head (head_dim)      v: value dim per head       d: hidden_size

The recurrence per head is the generalized delta rule with a diagonal-plus-low-rank (DPLR) transition.
The state is ``S`` [k, v] (keys first, as fla's kernels, its naive reference and its cache hold it; the
paper writes the transpose, [v, k], with ``S_t = S_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t``):

    S_t = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T     (w_t, a_t, b_t, k_t: [k]; v_t: [v])
    o_t = r_t S_t                                              (r_t: the receptance, [k]; o_t: [v])

with ``w_t <= 0`` the log-decay, ``a_t = -kk_t`` and ``b_t = kk_t * iclr_t``: ``kk_t`` the unit-norm
removal key and ``iclr_t`` in (0, 1) the in-context learning rate, so the transition is
``diag(exp(w_t)) - (kk_t * iclr_t) kk_t^T``: decay per key dimension, then erase along ``kk_t``.

One layer (``RWKV7Attention.forward``), for input u [b, l, d] and ``u_prev``, the previous token's u
(carried between calls):

    x_z = u + (shift(u) - u) * x_z               for z in r, w, k, v, a, g  (token shift, lerp mixing)
    r, k, v = r_proj(x_r), k_proj(x_k), v_proj(x_v)
    w = -exp(-1/2) * sigmoid(w_lora(x_w))        # log-decay in (-0.607, 0): decay in (0.545, 1)
    v = lerp(v, v_first, sigmoid(v_lora(x_v)))   # value residual; layer 0 sets v_first = v
    iclr = sigmoid(a_lora(x_a));  g = g_lora(x_g)
    kk = l2normalize(k * k_k) per head;  k = k * (1 + (iclr - 1) * k_a)
    o, S = dplr(r, w, k, v, a=-kk, b=kk * iclr, S)
    o = (groupnorm(o) + sum(r * k * r_k) v) * g  # per head; the r_k bonus term
    out = o_proj(o)

The channel mix: ``value(relu(key(x + (shift(x) - x) * x_k)) ** 2)`` with its own token shift. A block is
``x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x))``, block 0 applying ``pre_norm`` first (with
``norm_first``); all norms are LayerNorms. RWKV-7 carries, besides the matrix states, the last
normed input of each token shift: ``State.conv`` per layer is ``[b, 2, d]``, row 0 the time mix's
``u_prev``, row 1 the channel mix's.

Chunked form (:func:`rwkv7_chunked`, exact for any chunk length): writing ``u_t = S_{t-1}^T a_t`` [v],
the recurrence is ``S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T + b_t u_t^T``, a diagonal-decay recurrence
with two inputs, so the state is a sum of decayed outer products and, within a chunk, the ``u_t`` solve
a unit lower-triangular system (the WY / UT transform); the decays between positions are summed by a
masked cumsum (:func:`statelens.models.ssd.segsum`), never as differences of cumulative sums.

Departures from fla: fla's Triton kernels chunk in 16- or 64-token blocks and may assume the log-decay
lies in a safe range (``safe_gate``, ``lower_bound``); the form here is exact for any chunk length and any
decay in [0, 1], a patched one included. v_first is the layer-0 value after its hook point (a patched layer-0
``hook_x`` reaches every layer's value residual, as fla's single tensor would).

What ``hook_decay`` (and so the decay analysis's ``alpha``) is on RWKV-7: ``exp(w_t)`` per key dimension,
the diagonal part of the transition only. RWKV-7 forgets more than that: each token also erases a
fraction ``iclr_t`` of what the state holds along ``kk_t`` (``hook_iclr``, ``hook_kk``), in-context.

Hook points per block (shapes for a forward over ``l`` tokens):
    hook_C (receptance r), hook_B (keys, after the k_a update) [b, l, h, k]    hook_x (values) [b, l, h, v]
    hook_dt (w, the log-decay) [b, l, h, k]    hook_decay [b, l, h, k] (exp(w); patching it changes the scan)
    hook_iclr (the in-context learning rate) [b, l, h, k]    hook_kk (the unit removal key) [b, l, h, k]
    hook_state [b, h, k, v] (state after the last token)    hook_conv_state [b, 2, d] (the token shifts)
    hook_out [b, l, d] (the time mix's output, before the residual add)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from statelens.errors import ParameterError
from statelens.models.base import FlaTiedEmbeddings, Layout, ScanAdapter, State, backends, check_dims
from statelens.models.hooks import HookPoint
from statelens.models.lm import LMHeadModel
from statelens.models.ssd import segsum

# The decay's floor: w = -exp(-1/2) * sigmoid(.), as RWKV-7 and fla write it.
_W_SCALE = -0.6065306597126334


@dataclass
class RWKV7Config(FlaTiedEmbeddings):
    """fla's ``RWKV7Config`` fields that change the forward (defaults are fla's)."""

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    head_dim: int | None = 64            # wins over num_heads when both are set (fla's layer does the same)
    num_heads: int | None = None         # None: hidden_size // head_dim
    decay_low_rank_dim: int | None = 64  # None: fla's layer default from hidden_size and head_dim
    gate_low_rank_dim: int | None = 128
    a_low_rank_dim: int | None = 64
    v_low_rank_dim: int | None = 16
    hidden_ratio: int | None = 4         # channel-mix width when intermediate_size is None (rounded up to 32)
    intermediate_size: int | None = None
    hidden_act: str = "sqrelu"           # relu(x) ** 2; the only activation fla's RWKV-7 ships
    norm_first: bool = True              # block 0 applies pre_norm to the embeddings first
    norm_bias: bool = True               # the LayerNorms have a bias
    norm_eps: float = 1e-5               # LayerNorms; the output GroupNorm uses head_dim * norm_eps
    value_dim: int | None = None         # all heads' value dims together; only None / hidden_size
    fuse_norm: bool = True               # True: kk = k / sqrt(|k|^2 + 1e-6) (fla's l2_norm); False: F.normalize
    tie_word_embeddings: bool = False
    chunk_size: int = 16                 # statelens's chunk length of the scan (results do not depend on it)

    def __post_init__(self):
        check_dims(self, ("hidden_size", "num_hidden_layers", "vocab_size", "chunk_size"))
        d = self.hidden_size
        if self.head_dim is None and self.num_heads is None:
            raise ParameterError("head_dim", "head_dim or num_heads must be set")
        if self.head_dim is None:
            check_dims(self, ("num_heads",))
            self.head_dim = d // self.num_heads
        check_dims(self, ("head_dim",))
        if d % self.head_dim:
            raise ParameterError("head_dim", f"hidden_size ({d}) must be a multiple of head_dim ({self.head_dim})")
        self.num_heads = d // self.head_dim
        self.value_dim = d if self.value_dim is None else self.value_dim
        if self.value_dim != d:  # fla's layer fails building these (its v_lora init is hidden_size wide)
            raise ParameterError("value_dim", f"value_dim {self.value_dim!r} is not supported (only hidden_size, {d})")
        if self.hidden_act != "sqrelu":
            raise ParameterError("hidden_act", f"hidden_act {self.hidden_act!r} is not supported (only sqrelu)")
        factor = self.head_dim / 64  # fla's layer defaults for a LoRA width left unset
        for name, base in (("decay_low_rank_dim", 2.5 * factor), ("gate_low_rank_dim", 5.0),
                           ("a_low_rank_dim", 2.5 * factor), ("v_low_rank_dim", 1.7 * factor)):
            if getattr(self, name) is None:
                setattr(self, name, max(32, int(round(base * d ** 0.5 / 32) * 32)))
        if self.intermediate_size is None:
            ratio = 4 if self.hidden_ratio is None else self.hidden_ratio
            self.intermediate_size = 32 * math.ceil(int(d * ratio) / 32)
        check_dims(self, ("decay_low_rank_dim", "gate_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim",
                          "intermediate_size"))

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    def num_parameters(self) -> int:
        """Parameter count, computed from the config alone (checked before allocating)."""
        d, V, n = self.hidden_size, self.value_dim, self.num_hidden_layers
        norm = d * (1 + self.norm_bias)
        lora = {name: getattr(self, f"{name}_low_rank_dim") for name in ("decay", "gate", "a", "v")}
        attn = (9 * d + 2 * d * d + 2 * d * V + 2 * V                     # x_*, k_k, k_a, r_k; r, k; v, o; g_norm
                + 2 * d * lora["decay"] + d + 2 * d * lora["a"] + d       # w_lora, a_lora (with biases)
                + (d + V) * lora["gate"])                                  # g_lora (no bias)
        v_lora = (d + V) * lora["v"] + V                                   # every layer but the first
        ffn = d + 2 * d * self.intermediate_size
        blocks = n * (attn + 2 * norm + ffn) + (n - 1) * v_lora + norm * self.norm_first
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + blocks + norm + head


def rwkv7_config_kwargs(raw: dict) -> dict:
    """fla's ``config.json`` (``model_type: rwkv7``) -> :class:`RWKV7Config` keyword arguments.

    Raises ValueError naming a setting statelens does not implement (hybrid attention layers, value
    dims that differ between layers); the others are checked by ``RWKV7Config`` itself.
    """
    if raw.get("attn") is not None:
        raise ParameterError("attn", f"attn {raw['attn']!r} is not supported (RWKV-7 layers only)")
    kwargs = {key: raw.get(key, default) for key, default in _FLA_DEFAULTS.items()}
    value_dim = kwargs["value_dim"]
    if isinstance(value_dim, list):  # fla writes one entry per layer
        if len(set(value_dim)) > 1:
            raise ParameterError("value_dim", f"value_dim {value_dim!r} differs between layers (not supported)")
        kwargs["value_dim"] = value_dim[0] if value_dim else None
    return kwargs


# fla's RWKV7Config defaults for the fields RWKV7Config reads from config.json.
_FLA_DEFAULTS = {
    "hidden_size": 2048, "num_hidden_layers": 24, "vocab_size": 32000, "head_dim": 64, "num_heads": None,
    "decay_low_rank_dim": 64, "gate_low_rank_dim": 128, "a_low_rank_dim": 64, "v_low_rank_dim": 16,
    "hidden_ratio": 4, "intermediate_size": None, "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True,
    "norm_eps": 1e-5, "value_dim": None, "fuse_norm": True, "tie_word_embeddings": False,
}


# -- the recurrence ---------------------------------------------------------------------------------

def rwkv7_steps(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The recurrence one token at a time: ``step(t, S) -> (o_t [b, h, v], S_t [b, h, k, v])`` from
    S = S_{t-1}. r, w, k, a, b [b, l, h, k]; v [b, l, h, v]."""
    def step(t: int, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recalled = torch.einsum("bhk,bhkv->bhv", a[:, t], S)             # u_t = a_t S_{t-1}, before the decay
        S = (w[:, t, :, :, None].exp() * S + b[:, t, :, :, None] * recalled[:, :, None, :]
             + k[:, t, :, :, None] * v[:, t, :, None, :])
        return torch.einsum("bhk,bhkv->bhv", r[:, t], S), S
    return step


def rwkv7_sequential(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    S0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one step per token (:func:`rwkv7_steps`).

    r, w, k, a, b [b, l, h, k] (w the log-decay, <= 0); v [b, l, h, v]; S0 [b, h, k, v]
    -> o [b, l, h, v], final state [b, h, k, v].
    """
    step, S, os = rwkv7_steps(r, w, k, v, a, b), S0, []
    for t in range(r.shape[1]):
        o, S = step(t, S)
        os.append(o)
    return torch.stack(os, dim=1), S


def rwkv7_chunked(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    S0: torch.Tensor, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form; same inputs and outputs as :func:`rwkv7_sequential`.

    ``chunk`` is the chunk length; the result does not depend on it beyond float rounding. Within a chunk,
    with ``G_t = exp(w_1 + ... + w_t)`` (per key dim) and ``u_t = a_t S_{t-1}`` [v]:

        u_t = (a_t G_{t-1}) S_0 + sum_{s<t} (a_t . k_s G_{t-1}/G_s) v_s + (a_t . b_s G_{t-1}/G_s) u_s
        o_t = (r_t G_t) S_0 + sum_{s<=t} (r_t . k_s G_t/G_s) v_s + (r_t . b_s G_t/G_s) u_s
        S_q = G_q S_0 + sum_s (k_s G_q/G_s)^T v_s + (b_s G_q/G_s)^T u_s

    Step 1 holds [b, c, h, q, q, k] tensors of pairwise decays, so memory grows with l * d * chunk.
    """
    bsz, l, h, dk = r.shape
    dv = v.shape[-1]
    Q = min(chunk, l)
    pad = (-l) % Q
    if pad:  # past the end: zero keys and b (no insertion), zero log-decay (alpha = 1): the state is kept
        r, w, k, v, a, b = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (r, w, k, v, a, b))
    c = (l + pad) // Q
    r, k, a, b = (t.view(bsz, c, Q, h, dk).transpose(2, 3) for t in (r, k, a, b))    # [b, c, h, q, k]
    v = v.view(bsz, c, Q, h, dv).transpose(2, 3)                                      # [b, c, h, q, v]
    g = w.view(bsz, c, Q, h, dk).permute(0, 1, 3, 4, 2)                               # [b, c, h, k, q]

    # 1. Pairwise decays: G_t / G_s (s <= t) and G_{t-1} / G_s (s < t), per key dim, key dim last.
    to_t = segsum(g).exp().permute(0, 1, 2, 4, 5, 3)          # [b, c, h, t, s, k], zero for s > t
    to_before_t = F.pad(to_t[..., :-1, :, :], (0, 0, 0, 0, 1, 0))   # row t is row t - 1: zero for s >= t
    A_ak, A_ab = _pairs(a, k, to_before_t), _pairs(a, b, to_before_t)
    A_rk, A_rb = _pairs(r, k, to_t), _pairs(r, b, to_t)

    # 2. The UT transform: (I - A_ab) u = a G_{t-1} S_0 + A_ak v, so u = W S_0 + U with
    #    W = (I - A_ab)^-1 (a G_{t-1}) [q, k] and U = (I - A_ab)^-1 A_ak v [q, v].
    g_cum = g.cumsum(dim=-1).transpose(-1, -2)                 # [b, c, h, q, k]: log G_t
    g_before = F.pad(g_cum[..., :-1, :], (0, 0, 1, 0))        # log G_{t-1}, 0 at the chunk start
    eye = torch.eye(Q, dtype=r.dtype, device=r.device)
    solve = eye - A_ab
    W = torch.linalg.solve_triangular(solve, a * g_before.exp(), upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(solve, A_ak @ v, upper=False, unitriangular=True)

    # 3. Carry the state across chunks: S_q = P S_0 + R, P = diag(G_q) + B~^T W, R = K~^T v + B~^T U.
    to_end = to_t[..., -1, :, :]                               # [b, c, h, s, k]: G_q / G_s
    k_end, b_end = k * to_end, b * to_end
    P = torch.diag_embed(g_cum[..., -1, :].exp()) + b_end.transpose(-1, -2) @ W      # [b, c, h, k, k]
    R = k_end.transpose(-1, -2) @ v + b_end.transpose(-1, -2) @ U                    # [b, c, h, k, v]
    S = S0.to(r.dtype)
    starts = []
    for j in range(c):
        starts.append(S)
        S = P[:, j] @ S + R[:, j]
    starts = torch.stack(starts, dim=1)                        # [b, c, h, k, v]

    # 4. Outputs: the chunk-start state read through G_t, plus the chunk's own values and recalls.
    u = W @ starts + U                                         # [b, c, h, q, v]
    o = (r * g_cum.exp()) @ starts + A_rk @ v + A_rb @ u
    return o.transpose(2, 3).reshape(bsz, c * Q, h, dv)[:, :l], S


def _pairs(x: torch.Tensor, y: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """x, y [b, c, h, q, k], decay [b, c, h, t, s, k] -> [b, c, h, t, s]: sum_k x_t[k] y_s[k] decay[t, s, k]."""
    return (x[..., :, None, :] * y[..., None, :, :] * decay).sum(-1)


# -- the model -------------------------------------------------------------------------------------

def token_shift(u: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u [b, l, d], prev [b, d] (the token before u) -> (shift(u) - u [b, l, d], the new prev u[:, -1])."""
    shifted = torch.cat([prev[:, None].to(u.dtype), u[:, :-1]], dim=1)
    return shifted - u, u[:, -1]


class LoRA(nn.Module):
    """fla's ``LoRA``: ``Linear(d, r, no bias) -> activation -> Linear(r, out, bias)`` as ``lora.0``, ``lora.2``."""

    def __init__(self, d: int, out: int, rank: int, activation: nn.Module, bias: bool = True):
        super().__init__()
        self.lora = nn.Sequential(nn.Linear(d, rank, bias=False), activation, nn.Linear(rank, out, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)


class RWKV7Attention(nn.Module):
    """fla's ``RWKV7Attention`` (the time mix). Its hook points live on the enclosing :class:`RWKV7Block`."""

    def __init__(self, cfg: RWKV7Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d, V, h = cfg.hidden_size, cfg.value_dim, cfg.num_heads
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, d)))
        self.k_k = nn.Parameter(torch.zeros(d))
        self.k_a = nn.Parameter(torch.zeros(d))
        self.r_k = nn.Parameter(torch.zeros(h, cfg.head_dim))
        self.r_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, V, bias=False)
        self.o_proj = nn.Linear(V, d, bias=False)
        self.w_lora = LoRA(d, d, cfg.decay_low_rank_dim, nn.Tanh())
        if layer != 0:
            self.v_lora = LoRA(d, V, cfg.v_low_rank_dim, nn.Identity())
        self.a_lora = LoRA(d, d, cfg.a_low_rank_dim, nn.Identity())
        self.g_lora = LoRA(d, V, cfg.gate_low_rank_dim, nn.Sigmoid(), bias=False)
        self.g_norm = nn.GroupNorm(h, V, eps=cfg.head_dim * cfg.norm_eps)
        # The scan, replaceable by a training-free mitigation (statelens.interventions.mitigations):
        # same inputs and outputs as rwkv7_chunked. None: that exact scan.
        self.scan = None

    def forward(self, u: torch.Tensor, state: torch.Tensor, prev: torch.Tensor, v_first: torch.Tensor | None,
                hooks: RWKV7Block):
        """u [b, l, d]; state [b, h, k, v]; prev [b, d]; v_first [b, l, h, v] (None in layer 0)
        -> (out [b, l, d], state, prev, v_first)."""
        cfg = self.cfg
        bsz, l, _ = u.shape
        h, dk, dv = cfg.num_heads, cfg.head_dim, cfg.head_v_dim
        delta, prev = token_shift(u, prev)
        xr, xw, xk, xv, xa, xg = (u + delta * getattr(self, f"x_{z}") for z in "rwkvag")
        r = self.r_proj(xr).view(bsz, l, h, dk)
        w = _W_SCALE * self.w_lora(xw).sigmoid().view(bsz, l, h, dk)
        k = self.k_proj(xk).view(bsz, l, h, dk)
        v = self.v_proj(xv).view(bsz, l, h, dv)
        if v_first is not None:
            v = torch.lerp(v, v_first, self.v_lora(xv).sigmoid().view(bsz, l, h, dv))
        iclr = hooks.hook_iclr(self.a_lora(xa).sigmoid().view(bsz, l, h, dk))
        kk = k * self.k_k.view(h, dk)
        kk = (kk * torch.rsqrt(kk.pow(2).sum(-1, keepdim=True) + 1e-6) if cfg.fuse_norm
              else F.normalize(kk, dim=-1))
        kk = hooks.hook_kk(kk)
        k = k * (1 + (iclr - 1) * self.k_a.view(h, dk))
        r, k, v = hooks.hook_C(r), hooks.hook_B(k), hooks.hook_x(v)
        v_first = v if v_first is None else v_first

        wide = torch.promote_types(u.dtype, torch.float32)  # the scan runs in float32 or wider
        w = hooks.hook_dt(w.to(wide))
        if hooks.hook_decay.active:  # round-trip through alpha only when somebody looks or patches
            w = hooks.hook_decay(w.exp()).log()
        o, state = (self.scan or rwkv7_chunked)(r.to(wide), w, k.to(wide), v.to(wide), -kk.to(wide),
                                                 (kk * iclr).to(wide), state, cfg.chunk_size)
        state = hooks.hook_state(state)

        o = self.g_norm(o.to(u.dtype).reshape(bsz * l, cfg.value_dim)).view(bsz, l, h, dv)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v  # the r_k term: what the current token adds
        o = (o + bonus).reshape(bsz, l, cfg.value_dim) * self.g_lora(xg)
        return hooks.hook_out(self.o_proj(o)), state, prev, v_first


class RWKV7FeedForward(nn.Module):
    """fla's ``RWKV7FeedForward`` (the channel mix): ``value(relu(key(x + (shift(x) - x) * x_k)) ** 2)``."""

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.key = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.value = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, l, d], prev [b, d] -> (out [b, l, d], the new prev [b, d])."""
        delta, prev = token_shift(x, prev)
        return self.value(F.relu(self.key(x + delta * self.x_k)).square()), prev


class RWKV7Block(nn.Module):
    """``x + attn(attn_norm(x))``, then ``+ ffn(ffn_norm(.))``, after ``pre_norm`` in block 0 (with
    ``norm_first``); holds the layer's hook points."""

    def __init__(self, cfg: RWKV7Config, layer: int):
        super().__init__()
        norm = lambda: nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)  # noqa: E731
        if cfg.norm_first and layer == 0:
            self.pre_norm = norm()
        self.attn_norm = norm()
        self.attn = RWKV7Attention(cfg, layer)
        self.ffn_norm = norm()
        self.ffn = RWKV7FeedForward(cfg)

        self.hook_C = HookPoint(layer)           # [b, l, h, k]: receptance r
        self.hook_B = HookPoint(layer)           # [b, l, h, k]: keys (after the k_a update)
        self.hook_x = HookPoint(layer)           # [b, l, h, v]: values (after the value residual)
        self.hook_dt = HookPoint(layer)          # [b, l, h, k]: w, the log-decay
        self.hook_decay = HookPoint(layer)       # [b, l, h, k]: alpha = exp(w)
        self.hook_iclr = HookPoint(layer)        # [b, l, h, k]: the in-context learning rate
        self.hook_kk = HookPoint(layer)          # [b, l, h, k]: the unit removal key
        self.hook_state = HookPoint(layer)       # [b, h, k, v]
        self.hook_conv_state = HookPoint(layer)  # [b, 2, d]: the time mix's and channel mix's last inputs
        self.hook_out = HookPoint(layer)         # [b, l, d]

    def forward(self, x: torch.Tensor, state: torch.Tensor, shifts: torch.Tensor, v_first: torch.Tensor | None):
        """x [b, l, d]; state [b, h, k, v]; shifts [b, 2, d]; v_first [b, l, h, v] or None (block 0)
        -> (x, state, shifts, v_first)."""
        if hasattr(self, "pre_norm"):
            x = self.pre_norm(x)
        out, state, attn_prev, v_first = self.attn(self.attn_norm(x), state, shifts[:, 0], v_first, self)
        x = x + out
        out, ffn_prev = self.ffn(self.ffn_norm(x), shifts[:, 1])
        shifts = self.hook_conv_state(torch.stack([attn_prev, ffn_prev], dim=1).to(shifts.dtype))
        return x + out, state, shifts, v_first


# -- what the mitigations need (statelens.models.base.ScanAdapter) -------------------------------------
# The scan's inputs, as RWKV7Attention hands them to ``scan``: r, w, k, a, b [b, l, h, k], v [b, l, h, v],
# S0 [b, h, k, v], chunk the chunk length. The sliding window by state difference is refused: with a
# non-diagonal transition S_t - alpha_{t-r+1:t} S_{t-r} is not the last r tokens' contribution.

def _steps(r, w, k, v, a, b, S0, chunk):
    """The RWKV-7 recurrence a token at a time (no block states)."""
    return rwkv7_steps(r, w, k, v, a, b), S0.to(r.dtype), r.shape[1], None


# flash-linear-attention's weight names: (ours, fla's) prefixes; lm_head.weight is the same in both.
_FLA_NAMES = (("blocks.", "model.layers."), ("embedding.", "model.embeddings."), ("norm_f.", "model.norm."))


@backends.register("rwkv7")
class RWKV7LM(LMHeadModel):
    """RWKV-7 language model. State per layer: ssm [b, num_heads, head_dim, head_v_dim], conv [b, 2, d]
    (the last normed input of the time mix, row 0, and of the channel mix, row 1).

    Parameter names are fla's with ``model.layers.`` -> ``blocks.``, ``model.embeddings.`` ->
    ``embedding.`` and ``model.norm.`` -> ``norm_f.``.
    """

    arch = "rwkv7"
    config_class = RWKV7Config
    layouts = (Layout("hf", "rwkv7", rwkv7_config_kwargs, _FLA_NAMES),)   # fla's config.json (model_type rwkv7)
    # Scaling multiplies the decay exp(w) (hook_decay) and the keys written (hook_B); the window is refused.
    scan_adapter = ScanAdapter(mixer="attn", decay_hook="hook_decay", input_hook="hook_B", chunked=rwkv7_chunked,
                               steps=_steps, no_window="its transition diag(alpha) - b kk^T is not "
                               "diagonal, so the state difference is not the last r tokens' contribution")

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(RWKV7Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.hook_points()  # names every HookPoint from its module path

    def hidden(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        x, v_first = self.embedding(tokens), None
        ssm, conv = [], []
        for block, s, c in zip(self.blocks, state.ssm, state.conv):
            x, s, c, v_first = block(x, s, c, v_first)
            ssm.append(s)
            conv.append(c)
        return self.norm_f(x), State(tuple(ssm), tuple(conv))

    def layer_state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cfg = self.config
        return (cfg.num_heads, cfg.head_dim, cfg.head_v_dim), (2, cfg.hidden_size)

    @property
    def n_heads(self) -> int:
        return self.config.num_heads

    def by_head(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A hook's tensor with its heads made explicit: the state hooks give [b, heads, k], the
        per-token hooks [b, l, heads, k]. The token-shift state and hook_out have no heads (one "head" 0)."""
        kind = name.rsplit(".", 1)[-1]
        if kind == "hook_state":
            return t.flatten(2)                       # [b, h, k * v]
        if kind == "hook_conv_state":
            return t.flatten(1)[:, None]              # [b, 1, 2 d]
        if kind == "hook_out":
            return t[:, :, None]                      # [b, l, 1, d]
        return t  # hook_C, hook_B, hook_dt, hook_decay, hook_iclr, hook_kk [b, l, h, k]; hook_x [b, l, h, v]
