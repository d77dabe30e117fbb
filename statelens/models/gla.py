"""Gated linear attention (GLA) language model, pure PyTorch, exact for any chunk length.

Yang, Wang, Shen, Panda & Kim, 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training" (arXiv:2312.06635); mirrors flash-linear-attention's ``GatedLinearAttention`` layer and
``GLAForCausalLM`` (same parameter names, so only a prefix differs between checkpoint keys and ours).
Axis letters:

    b: batch             l: sequence length (t, s: positions inside a chunk; q: chunk length)
    c: chunk index       h: heads
    k: key dim per head (d_k)           v: value dim per head (d_v)         d: hidden_size

The recurrence, per head, with the gate ``alpha_t = exp(gk_t)`` (one decay per key dimension):

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t       (S_t: [k, v]; k_t: [k]; v_t: [v])
    o_t = scale * q_t S_t                         (o_t: [v]; scale = d_k ** -0.5)

One layer (``GatedLinearAttention.forward``), for input u [b, l, d]:

    q, k, v = q_proj(u), k_proj(u), v_proj(u)      # k, v repeated over heads when num_kv_heads < num_heads
    gk = logsigmoid(gk_proj(u)) / gate_logit_normalizer, clamped below at clamp_min if set
    o, S = gla(q, k, v, gk, S)
    o = rmsnorm(o) * swish(g_proj(u))             # per head over d_v; without the output gate, rmsnorm(o)
    out = o_proj(o)

A block is ``x = x + attn(attn_norm(x)); x = x + mlp(mlp_norm(x))`` with a SwiGLU MLP
(``down_proj(silu(gate_proj(x)) * up_proj(x))``). GLA has no convolution state: the State's conv
tensors are empty, ``[b, 0, 0]``.

Departure from fla: fla's kernels use a two-level chunked form with a secondary chunk for stability;
here the within-chunk decay between positions s <= t is summed per key dimension by a masked cumsum
(:func:`statelens.models.ssd.segsum`), which is exact without the secondary level. fla keeps the state
as [v, k] in its cache (``state_v_first``); ours is [k, v] as in the paper and fla's naive reference.

Hook points per block (shapes for a forward over ``l`` tokens):
    hook_C (queries), hook_B (keys) [b, l, h, k]    hook_x (values) [b, l, h, v]
    hook_dt (gk, the log-decay) [b, l, h, k]      hook_decay [b, l, h, k] (alpha = exp(gk); patching it
        changes the scan)
    hook_state [b, h, k, v] (state after the last token)    hook_conv_state [b, 0, 0] (no convolution)
    hook_out [b, l, d] (the attention's output, before the residual add)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from statelens.errors import ParameterError
from statelens.models import fused, kernels
from statelens.models.base import FlaTiedEmbeddings, Layout, ScanAdapter, backends, check_dims, interleave
from statelens.models.hooks import HookPoint
from statelens.models.layers import RMSNorm
from statelens.models.lm import LMHeadModel
from statelens.models.ssd import segsum


@dataclass
class GLAConfig(FlaTiedEmbeddings):
    """fla's ``GLAConfig`` fields that change the forward (defaults are fla's)."""

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_heads: int = 4
    num_kv_heads: int | None = None     # None: num_heads (keys and values shared by groups of heads otherwise)
    expand_k: float = 0.5               # key_dim = hidden_size * expand_k, split over heads
    expand_v: float = 1.0               # value_dim = hidden_size * expand_v
    hidden_ratio: int | None = 4        # MLP width when intermediate_size is None (fla's rounding to 256)
    intermediate_size: int | None = None
    feature_map: str | None = None      # only None (identity) is supported
    use_short_conv: bool = False        # only False is supported
    use_output_gate: bool = True        # rmsnorm(o) * swish(g_proj(u)); False: rmsnorm(o)
    hidden_act: str = "swish"           # the MLP's and the output gate's activation; only swish
    gate_logit_normalizer: float = 16   # fla's layer default (GLAForCausalLM does not pass it)
    gate_low_rank_dim: int = 16         # gk_proj = Linear(d, r) then Linear(r, key_dim, bias)
    clamp_min: float | None = None      # lower clamp of the log-decay gk
    fuse_norm: bool = True              # math unchanged; names the output norm (g_norm_swish_gate / g_norm)
    elementwise_affine: bool = True     # the output norm has a weight
    norm_eps: float = 1e-6              # every RMSNorm (block, final and the output norm)
    tie_word_embeddings: bool = False
    chunk_size: int = 16                # statelens's chunk length of the scan (results do not depend on it)

    def __post_init__(self):
        self.num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        check_dims(self, ("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "num_kv_heads",
                          "gate_low_rank_dim", "chunk_size"))
        if self.feature_map is not None:
            raise ParameterError("feature_map", f"feature_map {self.feature_map!r} is not supported (only None)")
        if self.use_short_conv:
            raise ParameterError("use_short_conv", "use_short_conv=True is not supported (GLA without short convolutions only)")
        if self.hidden_act not in ("swish", "silu"):
            raise ParameterError("hidden_act", f"hidden_act {self.hidden_act!r} is not supported (only swish)")
        for name, dim in (("expand_k", self.hidden_size * self.expand_k),
                          ("expand_v", self.hidden_size * self.expand_v)):
            if dim < 1 or not math.isclose(dim, round(dim)):
                raise ParameterError(name, f"hidden_size * {name} must be a positive integer, got {dim}")
            if round(dim) % self.num_heads:
                raise ParameterError(name, f"hidden_size * {name} ({round(dim)}) must be a multiple of num_heads "
                                 f"({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ParameterError("num_heads", f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.intermediate_size is None:
            ratio = 4 if self.hidden_ratio is None else self.hidden_ratio
            self.intermediate_size = 256 * math.ceil(int(self.hidden_size * ratio * 2 / 3) / 256)
        check_dims(self, ("intermediate_size",))

    @property
    def key_dim(self) -> int:
        return round(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return round(self.hidden_size * self.expand_v)

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def kv_groups(self) -> int:
        """Heads sharing one key/value head."""
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        """Parameter count, computed from the config alone (checked before allocating)."""
        d, K, V, g, r = self.hidden_size, self.key_dim, self.value_dim, self.kv_groups, self.gate_low_rank_dim
        attn = (d * K + d * K // g + d * V // g + d * V * self.use_output_gate
                + d * r + r * K // g + K // g + V * d + self.head_v_dim * self.elementwise_affine)
        block = attn + 2 * d + 3 * d * self.intermediate_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * block + d + head


def gla_config_kwargs(raw: dict) -> dict:
    """fla's ``config.json`` (``model_type: gla``) -> :class:`GLAConfig` keyword arguments.

    Raises ValueError naming a setting statelens does not implement (hybrid attention layers,
    attention residuals); the others are checked by ``GLAConfig`` itself.
    """
    for key in ("attn", "attnres_block_size"):
        if raw.get(key) is not None:
            raise ParameterError(key, f"{key} {raw[key]!r} is not supported (GLA layers only)")
    kwargs = {key: raw.get(key, default) for key, default in _FLA_DEFAULTS.items()}
    kwargs["elementwise_affine"] = bool(kwargs["elementwise_affine"])  # fla treats None as False
    return kwargs


# fla's GLAConfig defaults for the fields GLAConfig reads from config.json.
_FLA_DEFAULTS = {
    "hidden_size": 2048, "num_hidden_layers": 24, "vocab_size": 32000, "num_heads": 4, "num_kv_heads": None,
    "expand_k": 0.5, "expand_v": 1.0, "hidden_ratio": 4, "intermediate_size": None, "feature_map": None,
    "use_short_conv": False, "use_output_gate": True, "hidden_act": "swish", "clamp_min": None,
    "fuse_norm": True, "elementwise_affine": True, "norm_eps": 1e-6, "tie_word_embeddings": False,
}


# -- the recurrence ---------------------------------------------------------------------------------

def gla_steps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor
) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The recurrence one token at a time: ``step(t, S) -> (o_t [b, h, v], S_t [b, h, k, v])`` from
    S = S_{t-1}. q, k, gk [b, l, h, k]; v [b, l, h, v]."""
    scale = q.shape[-1] ** -0.5

    def step(t: int, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = gk[:, t, :, :, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        return torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S), S
    return step


def gla_sequential(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, S0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one step per token (:func:`gla_steps`).

    q, k [b, l, h, k]; v [b, l, h, v]; gk [b, l, h, k] (log-decay, <= 0); S0 [b, h, k, v]
    -> o [b, l, h, v] (already times scale = d_k ** -0.5), final state [b, h, k, v].
    """
    step, S, os = gla_steps(q, k, v, gk), S0, []
    for t in range(q.shape[1]):
        o, S = step(t, S)
        os.append(o)
    return torch.stack(os, dim=1), S


def gla_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, S0: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form; same inputs and outputs as :func:`gla_sequential`.

    ``chunk`` is the chunk length; the result does not depend on it beyond float rounding. Step 1
    holds a [b, c, h, k, q, q] tensor of pairwise decays, so memory grows with l * h * d_k * chunk.
    """
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5
    Q = min(chunk, l)
    pad = (-l) % Q
    if pad:  # zero keys and zero log-decay (alpha = 1) past the end leave the final state exact
        q, k, v, gk = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v, gk))
    c = (l + pad) // Q
    q, k, gk = (t.view(b, c, Q, h, dk) for t in (q * scale, k, gk))
    v = v.view(b, c, Q, h, dv)
    g = gk.permute(0, 1, 3, 4, 2)                 # [b, c, h, k, q]
    g_cum = g.cumsum(dim=-1)                      # log-decay from the chunk start to t, inclusive

    # 1. Within each chunk: o_t = sum_{s <= t} sum_k q_t[k] k_s[k] exp(g_{s+1} + ... + g_t)[k] v_s
    decay = segsum(g).exp()                       # [b, c, h, k, t, s], zero above the diagonal
    A = torch.einsum("bcthk,bcshk,bchkts->bchts", q, k, decay)
    o = torch.einsum("bchts,bcshv->bcthv", A, v)

    # 2. Each chunk's own contribution to the state at its end: sum_s (k_s * exp(g_{s+1..q}))^T v_s
    # The decays to the end are the last row of step 1's: no cum[q] - cum[s], which is nan when a
    # patched alpha is 0 (log-decay -inf).
    k_to_end = k * decay[..., -1, :].permute(0, 1, 4, 2, 3)                 # [b, c, q, h, k]
    chunk_states = torch.einsum("bcshk,bcshv->bchkv", k_to_end, v)

    # 3. Carry the state across chunk boundaries (a short loop: c = l / chunk).
    chunk_decay = g_cum[..., -1].exp()            # [b, c, h, k]
    S = S0.to(q.dtype)
    starts = []
    for j in range(c):
        starts.append(S)
        S = chunk_decay[:, j, :, :, None] * S + chunk_states[:, j]
    starts = torch.stack(starts, dim=1)           # [b, c, h, k, v]

    # 4. The state at each chunk's start, decayed to position t and read out by q_t.
    q_from_start = q * g_cum.exp().permute(0, 1, 4, 2, 3)                   # [b, c, q, h, k]
    o = o + torch.einsum("bcthk,bchkv->bcthv", q_from_start, starts)
    return o.reshape(b, c * Q, h, dv)[:, :l], S


# -- the model -------------------------------------------------------------------------------------

class GatedLinearAttention(nn.Module):
    """fla's ``GatedLinearAttention`` without short convolutions or feature maps. Its hook points
    live on the enclosing :class:`GLABlock` (so they are named ``blocks.{i}.hook_*``)."""

    def __init__(self, cfg: GLAConfig):
        super().__init__()
        self.cfg = cfg
        d, g = cfg.hidden_size, cfg.kv_groups
        self.q_proj = nn.Linear(d, cfg.key_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.key_dim // g, bias=False)
        self.v_proj = nn.Linear(d, cfg.value_dim // g, bias=False)
        if cfg.use_output_gate:
            self.g_proj = nn.Linear(d, cfg.value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(d, cfg.gate_low_rank_dim, bias=False),
                                     nn.Linear(cfg.gate_low_rank_dim, cfg.key_dim // g, bias=True))
        self.o_proj = nn.Linear(cfg.value_dim, d, bias=False)
        # fla names the per-head output norm after whether it is fused with the gate; the math is the same.
        self.norm_name = "g_norm_swish_gate" if cfg.fuse_norm and cfg.use_output_gate else "g_norm"
        norm = nn.Module()
        norm.register_parameter("weight", nn.Parameter(torch.ones(cfg.head_v_dim)) if cfg.elementwise_affine else None)
        setattr(self, self.norm_name, norm)
        # The scan, replaceable by a training-free mitigation (statelens.interventions.mitigations):
        # same inputs and outputs as gla_chunked. None: that exact scan.
        self.scan = None

    def forward(self, u: torch.Tensor, state: torch.Tensor, hooks: GLABlock) -> tuple[torch.Tensor, torch.Tensor]:
        """u [b, l, d]; state [b, h, k, v] -> (out [b, l, d], state [b, h, k, v]). ``hooks`` holds the
        hook points."""
        piece = fused.piece_length(u.shape[0], self.cfg.chunk_size, PIECE)
        inputs = (hooks.hook_C, hooks.hook_B, hooks.hook_x, hooks.hook_dt, hooks.hook_decay)
        if fused.applies(self, u, inputs, piece) and not kernels.ready("gla", u):
            out, state = fused.in_pieces(self, u, (state,), piece, hooks)  # --compile: the same numbers to rounding
        else:
            out, state = self.unhooked(u, state, hooks)
        state = hooks.hook_state(state)
        return hooks.hook_out(out), state

    def unhooked(self, u: torch.Tensor, state: torch.Tensor, hooks: GLABlock) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` without the hooks on its outputs (``hook_state``, ``hook_out``): u [b, l, d];
        state [b, h, k, v] -> (out [b, l, d], state [b, h, k, v])."""
        cfg = self.cfg
        b, l, _ = u.shape
        h, dk, dv, g = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.kv_groups
        q = self.q_proj(u).view(b, l, h, dk)
        # Key/value head j serves heads j * g .. j * g + g - 1, as fla's repeat '(h d) -> (h g) d'.
        k = self.k_proj(u).view(b, l, h // g, dk).repeat_interleave(g, dim=2)
        v = self.v_proj(u).view(b, l, h // g, dv).repeat_interleave(g, dim=2)
        gk = self.gk_proj(u).view(b, l, h // g, dk).repeat_interleave(g, dim=2)
        q, k, v = hooks.hook_C(q), hooks.hook_B(k), hooks.hook_x(v)

        wide = torch.promote_types(u.dtype, torch.float32)  # the scan runs in float32 or wider
        gk = F.logsigmoid(gk.to(wide)) / cfg.gate_logit_normalizer
        if cfg.clamp_min is not None:
            gk = gk.clamp_min(cfg.clamp_min)
        gk = hooks.hook_dt(gk)
        if hooks.hook_decay.active:  # round-trip through alpha only when somebody looks or patches
            gk = hooks.hook_decay(gk.exp()).log()

        if self.scan is None and not hooks.hook_decay.active and kernels.ready("gla", gk):
            o, state = kernels.gla(q.to(wide), k.to(wide), v.to(wide), gk, state)
        else:
            o, state = (self.scan or gla_chunked)(q.to(wide), k.to(wide), v.to(wide), gk, state, cfg.chunk_size)

        # Per-head RMSNorm over d_v, then the swish output gate (fla: FusedRMSNormGated or RMSNorm * swish).
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        weight = getattr(self, self.norm_name).weight
        if weight is not None:
            o = o * weight.to(wide)
        if cfg.use_output_gate:
            o = o * F.silu(self.g_proj(u).view(b, l, h, dv).to(wide))
        return self.o_proj(o.reshape(b, l, cfg.value_dim).to(u.dtype)), state


#: Tokens per piece on the compiled path (:mod:`statelens.models.fused`), over the batch, in whole chunks; the
#: chunked scan is the eager one, its pairwise decays and einsum operand layouts fused into inductor's loops.
#: Measured on one 130M-shaped layer (hidden 768, 4 heads) over 4096 tokens at batch 1: 128 and 256 tokens 244
#: and 241 ms (512: 266, 64: 255; 32-token chunks in 128-token pieces: 282) against 700 ms eager; 128 compiles
#: faster.
PIECE = 128


class GatedMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, d: int, d_hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_hidden, bias=False)
        self.up_proj = nn.Linear(d, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FlaBlock(nn.Module):
    """flash-linear-attention's residual block, ``x + attn(attn_norm(x))``, then ``+ mlp(mlp_norm(.))``
    (fla's parameter names); a family's block adds its hook points and calls its attention in ``forward``."""

    def __init__(self, cfg, attn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = attn
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def with_mlp(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x [b, l, d] plus the attention's output, then plus the MLP of that."""
        x = x + out
        return x + self.mlp(self.mlp_norm(x))


class GLABlock(FlaBlock):
    """A GLA layer: :class:`FlaBlock` holding the layer's hook points."""

    def __init__(self, cfg: GLAConfig, layer: int):
        super().__init__(cfg, GatedLinearAttention(cfg))

        self.hook_C = HookPoint(layer)           # [b, l, h, k]: queries
        self.hook_B = HookPoint(layer)           # [b, l, h, k]: keys
        self.hook_x = HookPoint(layer)           # [b, l, h, v]: values
        self.hook_dt = HookPoint(layer)          # [b, l, h, k]: gk, the log-decay
        self.hook_decay = HookPoint(layer)       # [b, l, h, k]: alpha = exp(gk)
        self.hook_state = HookPoint(layer)       # [b, h, k, v]
        self.hook_conv_state = HookPoint(layer)  # [b, 0, 0]: GLA has no convolution
        self.hook_out = HookPoint(layer)         # [b, l, d]

    def forward(self, x: torch.Tensor, state: torch.Tensor, conv_state: torch.Tensor):
        """x [b, l, d]; state [b, h, k, v]; conv_state [b, 0, 0] -> (x, state, conv_state)."""
        out, state = self.attn(self.attn_norm(x), state, self)
        return self.with_mlp(x, out), state, self.hook_conv_state(conv_state)


# -- what the mitigations need (statelens.models.base.ScanAdapter) -------------------------------------
# The scan's inputs, as GatedLinearAttention hands them to ``scan``: q, k, gk [b, l, h, k], v [b, l, h, v],
# S0 [b, h, k, v], chunk the chunk length.

def _steps(q, k, v, gk, S0, chunk):
    """The GLA recurrence a token at a time (no block states)."""
    return gla_steps(q, k, v, gk), S0.to(q.dtype), q.shape[1], None


def _window(extend, q, k, v, gk, S0, chunk):
    """The GLA scan with the sliding window: the removal step of token t inserts
    (alpha_{t-r+1:t} k_{t-r})^T (-v_{t-r}), the decay being one number per key dimension."""
    (k_old, v_old, _), window = extend([k, v, gk])
    k_out = k_old * window.exp()                            # alpha_{t-r+1:t} k_{t-r}, per key dim
    o, S = gla_chunked(interleave(torch.zeros_like(q), q), interleave(k_out, k), interleave(-v_old, v),
                       interleave(gk, torch.zeros_like(gk)), S0, 2 * chunk)
    return o[:, 1::2], S


def _window_width(cfg: GLAConfig) -> int:
    """k [h, k], v [h, v] and gk [h, k] of one token."""
    return cfg.num_heads * (2 * cfg.head_k_dim + cfg.head_v_dim)


# flash-linear-attention's weight names: (ours, fla's) prefixes; lm_head.weight is the same in both.
_FLA_NAMES = (("blocks.", "model.layers."), ("embedding.", "model.embeddings."), ("norm_f.", "model.norm."))


@backends.register("gla")
class GLALM(LMHeadModel):
    """Gated linear attention language model. State per layer: ssm [b, num_heads, head_k_dim, head_v_dim],
    conv [b, 0, 0] (none).

    Parameter names are fla's with ``model.layers.`` -> ``blocks.``, ``model.embeddings.`` ->
    ``embedding.`` and ``model.norm.`` -> ``norm_f.``.
    """

    arch = "gla"
    config_class = GLAConfig
    layouts = (Layout("hf", "gla", gla_config_kwargs, _FLA_NAMES),)   # fla's config.json (model_type gla)
    # The keys are the input the scaling multiplies (hook_B); the scan lives on each block's attn.
    scan_adapter = ScanAdapter(mixer="attn", decay_hook="hook_decay", input_hook="hook_B", chunked=gla_chunked,
                               steps=_steps, window=_window, window_width=_window_width)

    def __init__(self, cfg: GLAConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(GLABlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.hook_points()  # names every HookPoint from its module path

    def layer_state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cfg = self.config
        return (cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim), (0, 0)

    @property
    def n_heads(self) -> int:
        return self.config.num_heads

    def by_head(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A hook's tensor with its heads made explicit: the state hooks give [b, heads, k], the
        per-token hooks [b, l, heads, k]. The (empty) conv state and hook_out have no heads (one "head" 0)."""
        kind = name.rsplit(".", 1)[-1]
        if kind == "hook_state":
            return t.flatten(2)                       # [b, h, k * v]
        if kind == "hook_conv_state":
            return t.flatten(1)[:, None]              # [b, 1, 0]
        if kind == "hook_out":
            return t[:, :, None]                      # [b, l, 1, d]
        return t  # hook_C, hook_B, hook_dt, hook_decay [b, l, h, k]; hook_x [b, l, h, v]
