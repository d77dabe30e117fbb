"""Gated DeltaNet and DeltaNet language models, pure PyTorch, exact for any chunk length.

Yang, Kautz & Hatamizadeh, 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(arXiv:2412.06464) and Yang, Wang, Zhang, Shen & Kim, 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length" (arXiv:2406.06484). Mirrors flash-linear-attention's ``GatedDeltaNet``
/ ``DeltaNet`` layers and ``GatedDeltaNetForCausalLM`` / ``DeltaNetForCausalLM`` (same parameter
names; only a prefix differs between checkpoint keys and ours). One file serves both: DeltaNet is the
delta rule without the gate (log-decay 0), and the two layers differ only in how q, k, beta and the
gate are made, which two small config classes declare. Axis letters:

    b: batch    l: sequence length    h: heads of the state (value heads)    d: hidden_size
    k: key dim per head (d_k)         v: value dim per head (d_v)

The recurrence per head (:mod:`statelens.models.delta_rule`), with the gate ``alpha_t = exp(g_t)``
(one number per head; 1 for DeltaNet) and the write strength ``beta_t``:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T     (S_t: [k, v])
    o_t = S_t^T (q_t / sqrt(d_k))

One layer, for input u [b, l, d]:

    q, k, v = short_conv(q_proj(u)), short_conv(k_proj(u)), short_conv(v_proj(u))   # causal, depthwise
    q, k = l2norm(act(q)), l2norm(act(k)) per head   # DeltaNet: qk_activation, qk_norm l2 or sum
    v = silu(v)
    beta = sigmoid(b_proj(u)) (* 2 with allow_neg_eigval)   # DeltaNet without use_beta: 1
    g = -exp(A_log) * softplus(a_proj(u) + dt_bias)          # Gated DeltaNet only: Mamba-2's dt * A
    o, S = delta_rule(q, k, v, beta, g, S)
    o = rmsnorm(o) * act(g_proj(u)) per head over d_v (use_gate; else rmsnorm(o))
    out = o_proj(o)

Without short convolutions ``act(q_proj(u))`` etc. (the activation the conv would have applied). Gated
DeltaNet may have more value heads than query/key heads (``num_v_heads``, grouped value attention):
query/key head j serves value heads ``j * G .. j * G + G - 1``; the state has ``num_v_heads`` heads.
A block is ``x = x + attn(attn_norm(x)); x = x + mlp(mlp_norm(x))`` with fla's SwiGLU MLP.

Forgetting, for the decay analysis: ``alpha`` is the gate ``exp(g_t)`` per head (``hook_decay``);
DeltaNet's is 1 (reported as such: horizon inf). The delta rule also erases: along the key ``k_t`` the
state is multiplied by ``alpha_t (1 - beta_t ||k_t||^2)`` (``||k_t|| = 1`` after the l2 norm), so the
effective forgetting of what was stored under k_t is ``exp(g_t) (1 - beta_t)``, read from ``hook_beta``
beside ``hook_decay``; directions orthogonal to k_t only decay by alpha_t.

Hook points per block (shapes for a forward over ``l`` tokens):
    hook_C (queries), hook_B (keys) [b, l, h, k] (after the norm, repeated over value heads)
    hook_x (values) [b, l, h, v]         hook_beta [b, l, h] (write and erase strength)
    hook_dt [b, l, h] (Gated DeltaNet only: softplus(a_proj(u) + dt_bias), Mamba-2's dt)
    hook_decay [b, l, h] (alpha = exp(g) = exp(-exp(A_log) dt); ones for DeltaNet; patching it changes the scan)
    hook_state [b, h, k, v] (after the last token)    hook_conv_state [b, 2 key_dim + value_dim, conv_size - 1]
        (the q, k, v convolutions' last inputs; [b, 0, 0] without short convolutions)
    hook_out [b, l, d] (the attention's output, before the residual add)

Departure from fla: fla's cache keeps the state as [v, k] (``state_v_first``) and each convolution's
last ``conv_size`` inputs; ours is [k, v] as in fla's naive reference, and the last ``conv_size - 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from statelens.errors import ParameterError
from statelens.models.base import FlaTiedEmbeddings, Layout, ScanAdapter, backends, check_dims
from statelens.models.delta_rule import delta_rule_chunked, delta_rule_stepper
from statelens.models.gla import FlaBlock
from statelens.models.hooks import HookPoint
from statelens.models.layers import RMSNorm, causal_conv
from statelens.models.lm import LMHeadModel

QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
QK_NORMS = ("l2", "sum")
GATE_ACTIVATIONS = ("swish", "silu", "sigmoid")


@dataclass
class DeltaRuleConfig(FlaTiedEmbeddings):
    """The fields fla's ``GatedDeltaNetConfig`` and ``DeltaNetConfig`` share (defaults are fla's); the
    subclasses add their own and say how heads are sized."""

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    use_short_conv: bool = True
    conv_size: int = 4
    allow_neg_eigval: bool = False      # beta = 2 sigmoid(.): eigenvalues of I - beta k k^T down to -1
    hidden_ratio: int | None = 4        # MLP width when intermediate_size is None (fla's rounding to 256)
    intermediate_size: int | None = None
    hidden_act: str = "swish"           # the MLP's activation; only swish
    norm_eps: float = 1e-6              # every RMSNorm (block, final and the output norm)
    tie_word_embeddings: bool = False
    chunk_size: int = 64                # statelens's chunk length of the scan (results do not depend on it)

    gated: ClassVar[bool]               # a gate exp(g) (Gated DeltaNet) or none (DeltaNet)

    def __post_init__(self):
        check_dims(self, ("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "conv_size", "chunk_size"))
        if self.hidden_act not in ("swish", "silu"):
            raise ParameterError("hidden_act", f"hidden_act {self.hidden_act!r} is not supported (only swish)")
        if self.output_gate_activation not in GATE_ACTIVATIONS:
            raise ParameterError("output_gate_activation", f"output_gate_activation {self.output_gate_activation!r} "
                                 f"is not supported ({', '.join(GATE_ACTIVATIONS)})")
        self._check_heads()
        if self.intermediate_size is None:
            ratio = 4 if self.hidden_ratio is None else self.hidden_ratio
            self.intermediate_size = 256 * math.ceil(int(self.hidden_size * ratio * 2 / 3) / 256)
        check_dims(self, ("intermediate_size",))

    def _check_heads(self) -> None:
        raise NotImplementedError

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_channels(self) -> int:
        """Channels of the q, k, v convolutions together (0 without short convolutions)."""
        return (2 * self.key_dim + self.value_dim) * self.use_short_conv

    def num_parameters(self) -> int:
        """Parameter count, computed from the config alone (checked before allocating)."""
        d, K, V, H = self.hidden_size, self.key_dim, self.value_dim, self.num_v_heads
        attn = (d * (2 * K + V) + self.conv_channels * self.conv_size + d * V * self.use_gate
                + self.head_v_dim + V * d + d * H * self.use_beta + (d * H + 2 * H) * self.gated)
        block = attn + 2 * d + 3 * d * self.intermediate_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * block + d + head


def _integer(name: str, value: float) -> int:
    """``value`` as an int; ParameterError naming ``name`` when it is not a positive integer."""
    if value < 1 or not math.isclose(value, round(value)):
        raise ParameterError(name, f"{name} gives a dimension of {value:g}, not a positive integer")
    return round(value)


@dataclass
class GatedDeltaNetConfig(DeltaRuleConfig):
    """fla's ``GatedDeltaNetConfig`` fields that change the forward."""

    num_heads: int = 6                  # query/key heads
    num_v_heads: int | None = None      # value heads (= state heads); None: num_heads
    head_dim: int = 256                 # d_k
    expand_v: float = 2.0               # d_v = head_dim * expand_v
    use_gate: bool = True               # output gate rmsnorm(o) * act(g_proj(u))
    output_gate_activation: str = "swish"

    gated: ClassVar[bool] = True
    use_beta: ClassVar[bool] = True
    qk_activation: ClassVar[str] = "silu"
    qk_norm: ClassVar[str] = "l2"

    def _check_heads(self) -> None:
        self.num_v_heads = self.num_heads if self.num_v_heads is None else self.num_v_heads
        check_dims(self, ("num_v_heads", "head_dim"))
        _integer("expand_v", self.head_dim * self.expand_v)
        if self.num_v_heads % self.num_heads:
            raise ParameterError("num_v_heads", f"num_v_heads ({self.num_v_heads}) must be a multiple of num_heads "
                                 f"({self.num_heads})")

    @property
    def head_k_dim(self) -> int:
        return self.head_dim

    @property
    def head_v_dim(self) -> int:
        return round(self.head_dim * self.expand_v)


@dataclass
class DeltaNetConfig(DeltaRuleConfig):
    """fla's ``DeltaNetConfig`` fields that change the forward (``use_output_norm`` is not one: fla's
    layer ignores it and always normalizes)."""

    num_heads: int = 16
    expand_k: float = 1.0               # key_dim = hidden_size * expand_k, split over heads
    expand_v: float = 1.0               # value_dim = hidden_size * expand_v
    use_gate: bool = False
    use_beta: bool = True               # False: beta = 1
    qk_activation: str = "silu"         # silu (inside the convolution), relu, elu (elu + 1) or identity
    qk_norm: str = "l2"                 # l2, or sum (L1)

    gated: ClassVar[bool] = False
    output_gate_activation: ClassVar[str] = "swish"

    def _check_heads(self) -> None:
        if self.qk_activation not in QK_ACTIVATIONS:
            raise ParameterError("qk_activation", f"qk_activation {self.qk_activation!r} is not supported "
                                 f"({', '.join(QK_ACTIVATIONS)})")
        if self.qk_norm not in QK_NORMS:
            raise ParameterError("qk_norm", f"qk_norm {self.qk_norm!r} is not supported ({', '.join(QK_NORMS)})")
        for name in ("expand_k", "expand_v"):
            dim = _integer(name, self.hidden_size * getattr(self, name))
            if dim % self.num_heads:
                raise ParameterError(name, f"hidden_size * {name} ({dim}) must be a multiple of num_heads "
                                     f"({self.num_heads})")

    @property
    def num_v_heads(self) -> int:
        return self.num_heads

    @property
    def head_k_dim(self) -> int:
        return round(self.hidden_size * self.expand_k) // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return round(self.hidden_size * self.expand_v) // self.num_heads


def _fla_reader(defaults: dict, family: str):
    """fla's ``config.json`` -> config keyword arguments, refusing what statelens does not implement
    (hybrid attention layers, attention residuals)."""
    def read(raw: dict) -> dict:
        for key in ("attn", "attnres_block_size"):
            if raw.get(key) is not None:
                raise ParameterError(key, f"{key} {raw[key]!r} is not supported ({family} layers only)")
        return {key: raw.get(key, default) for key, default in defaults.items()}
    return read


# fla's defaults for the fields each config reads from config.json.
_SHARED_DEFAULTS = {
    "hidden_size": 2048, "vocab_size": 32000, "use_short_conv": True, "conv_size": 4, "allow_neg_eigval": False,
    "hidden_ratio": 4, "intermediate_size": None, "hidden_act": "swish", "norm_eps": 1e-6, "tie_word_embeddings": False,
}
_GDN_DEFAULTS = _SHARED_DEFAULTS | {
    "num_hidden_layers": 21, "num_heads": 6, "num_v_heads": None, "head_dim": 256, "expand_v": 2.0, "use_gate": True,
    "output_gate_activation": "swish",
}
_DELTANET_DEFAULTS = _SHARED_DEFAULTS | {
    "num_hidden_layers": 24, "num_heads": 16, "expand_k": 1.0, "expand_v": 1.0, "use_gate": False, "use_beta": True,
    "qk_activation": "silu", "qk_norm": "l2",
}


# -- the model -------------------------------------------------------------------------------------

def _qk_features(x: torch.Tensor, cfg: DeltaRuleConfig) -> torch.Tensor:
    """Queries or keys [b, l, h, k] after the convolution's activation -> after qk_activation (the ones
    the convolution does not apply) and the norm: l2 ``x / sqrt(|x|^2 + 1e-6)`` (fla's kernel) or sum
    ``x / max(|x|_1, 1e-6)``."""
    if cfg.qk_activation == "relu":
        x = x.relu()
    elif cfg.qk_activation == "elu":
        x = F.elu(x) + 1
    if cfg.qk_norm == "sum":
        return x / x.abs().sum(-1, keepdim=True).clamp_min(1e-6)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


class DeltaRuleAttention(nn.Module):
    """fla's ``GatedDeltaNet`` (``cfg.gated``) or ``DeltaNet`` layer. Its hook points live on the
    enclosing :class:`DeltaRuleBlock` (so they are named ``blocks.{i}.hook_*``)."""

    def __init__(self, cfg: DeltaRuleConfig):
        super().__init__()
        self.cfg = cfg
        d, K, V, H = cfg.hidden_size, cfg.key_dim, cfg.value_dim, cfg.num_v_heads
        self.q_proj = nn.Linear(d, K, bias=False)
        self.k_proj = nn.Linear(d, K, bias=False)
        self.v_proj = nn.Linear(d, V, bias=False)
        if cfg.gated:
            self.a_proj = nn.Linear(d, H, bias=False)
            self.A_log = nn.Parameter(torch.zeros(H))
            self.dt_bias = nn.Parameter(torch.zeros(H))
        if cfg.use_beta:
            self.b_proj = nn.Linear(d, H, bias=False)
        if cfg.use_short_conv:
            for name, channels in (("q_conv1d", K), ("k_conv1d", K), ("v_conv1d", V)):
                setattr(self, name, nn.Conv1d(channels, channels, cfg.conv_size, groups=channels, bias=False))
        if cfg.use_gate:
            self.g_proj = nn.Linear(d, V, bias=False)
        self.o_norm = RMSNorm(cfg.head_v_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(V, d, bias=False)
        # The scan, replaceable by a training-free mitigation (statelens.interventions.mitigations):
        # same inputs and outputs as _chunked. None: that exact scan.
        self.scan = None

    def _qkv(self, u: torch.Tensor, conv_state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """u [b, l, d] -> q, k [b, l, num_heads, d_k], v [b, l, num_v_heads, d_v] (activated, in float32
        or wider; q, k not yet normed) and the convolution state [b, conv_channels, conv_size - 1]."""
        cfg = self.cfg
        b, l, _ = u.shape
        qkv = torch.cat([self.q_proj(u), self.k_proj(u), self.v_proj(u)], dim=-1)   # [b, l, 2K + V]
        if cfg.use_short_conv:
            weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])
            qkv, conv_state = causal_conv(qkv.transpose(1, 2), conv_state, weight, None, silu=False)
            qkv = qkv.transpose(1, 2)
        wide = torch.promote_types(u.dtype, torch.float32)
        q, k, v = qkv.to(wide).split([cfg.key_dim, cfg.key_dim, cfg.value_dim], dim=-1)
        if cfg.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        return (q.view(b, l, cfg.num_heads, cfg.head_k_dim), k.view(b, l, cfg.num_heads, cfg.head_k_dim),
                F.silu(v).view(b, l, cfg.num_v_heads, cfg.head_v_dim), conv_state)

    def _beta_and_gate(self, u: torch.Tensor, hooks: DeltaRuleBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """u [b, l, d] -> beta and the log-decay g [b, l, num_v_heads] (float32 or wider), through hooks."""
        cfg = self.cfg
        b, l, _ = u.shape
        wide = torch.promote_types(u.dtype, torch.float32)
        beta = self.b_proj(u).to(wide).sigmoid() if cfg.use_beta else u.new_ones(b, l, cfg.num_v_heads, dtype=wide)
        beta = hooks.hook_beta(beta * 2 if cfg.allow_neg_eigval else beta)
        if cfg.gated:
            dt = hooks.hook_dt(F.softplus(self.a_proj(u).to(wide) + self.dt_bias.to(wide)))
            log_g = -self.A_log.to(wide).exp() * dt
        else:
            log_g = beta.new_zeros(beta.shape)
        if hooks.hook_decay.active:  # round-trip through alpha only when somebody looks or patches
            log_g = hooks.hook_decay(log_g.exp()).log()
        return beta, log_g

    def forward(self, u: torch.Tensor, state: torch.Tensor, conv_state: torch.Tensor,
                hooks: DeltaRuleBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u [b, l, d]; state [b, h, k, v]; conv_state [b, conv_channels, conv_size - 1] ->
        (out [b, l, d], state, conv_state). ``hooks`` holds the hook points."""
        cfg = self.cfg
        b, l, _ = u.shape
        q, k, v, conv_state = self._qkv(u, conv_state)
        groups = cfg.num_v_heads // cfg.num_heads   # query/key head j serves value heads j * G .. j * G + G - 1
        q, k = (_qk_features(x, cfg).repeat_interleave(groups, dim=2) for x in (q, k))
        q, k, v = hooks.hook_C(q), hooks.hook_B(k), hooks.hook_x(v)
        beta, log_g = self._beta_and_gate(u, hooks)
        o, state = (self.scan or _chunked)(q, k, v, beta, log_g, state, cfg.chunk_size)
        state = hooks.hook_state(state)

        o = self.o_norm(o)                         # per head over d_v, in float32 or wider
        if cfg.use_gate:
            gate = self.g_proj(u).view(b, l, cfg.num_v_heads, cfg.head_v_dim).to(o.dtype)
            o = o * (gate.sigmoid() if cfg.output_gate_activation == "sigmoid" else F.silu(gate))
        out = self.o_proj(o.reshape(b, l, cfg.value_dim).to(u.dtype))
        return hooks.hook_out(out), state, conv_state


class DeltaRuleBlock(FlaBlock):
    """A Gated DeltaNet or DeltaNet layer: :class:`~statelens.models.gla.FlaBlock` holding the layer's hook
    points."""

    def __init__(self, cfg: DeltaRuleConfig, layer: int):
        super().__init__(cfg, DeltaRuleAttention(cfg))

        self.hook_C = HookPoint(layer)           # [b, l, h, k]: queries
        self.hook_B = HookPoint(layer)           # [b, l, h, k]: keys
        self.hook_x = HookPoint(layer)           # [b, l, h, v]: values
        self.hook_beta = HookPoint(layer)        # [b, l, h]: write and erase strength
        if cfg.gated:
            self.hook_dt = HookPoint(layer)      # [b, l, h]: softplus(a_proj(u) + dt_bias)
        self.hook_decay = HookPoint(layer)       # [b, l, h]: alpha = exp(g) (ones for DeltaNet)
        self.hook_state = HookPoint(layer)       # [b, h, k, v]
        self.hook_conv_state = HookPoint(layer)  # [b, 2 key_dim + value_dim, conv_size - 1]
        self.hook_out = HookPoint(layer)         # [b, l, d]

    def forward(self, x: torch.Tensor, state: torch.Tensor, conv_state: torch.Tensor):
        """x [b, l, d]; state [b, h, k, v]; conv_state [b, c, conv_size - 1] -> (x, state, conv_state)."""
        out, state, conv_state = self.attn(self.attn_norm(x), state, conv_state, self)
        return self.with_mlp(x, out), state, self.hook_conv_state(conv_state)


# -- what the mitigations need (statelens.models.base.ScanAdapter) -------------------------------------
# The scan's inputs, as DeltaRuleAttention hands them to ``scan``: q, k [b, l, h, k], v [b, l, h, v],
# beta, log_g [b, l, h], S0 [b, h, k, v], chunk the chunk length.

def _chunked(q, k, v, beta, log_g, S0, chunk):
    """The exact chunked scan -> (o [b, l, h, v], state [b, h, k, v])."""
    return delta_rule_chunked(q, k, v, beta, log_g, S0, chunk=chunk)


def _steps(q, k, v, beta, log_g, S0, chunk):
    """The same recurrence a token at a time (no block states)."""
    step, S, length = delta_rule_stepper(q, k, v, beta, log_g, S0)
    return step, S, length, None


# flash-linear-attention's weight names: (ours, fla's) prefixes; lm_head.weight is the same in both.
_FLA_NAMES = (("blocks.", "model.layers."), ("embedding.", "model.embeddings."), ("norm_f.", "model.norm."))


class DeltaRuleLM(LMHeadModel):
    """The delta-rule language model; :class:`GatedDeltaNetLM` and :class:`DeltaNetLM` are its two
    registered families. State per layer: ssm [b, num_v_heads, head_k_dim, head_v_dim], conv
    [b, 2 key_dim + value_dim, conv_size - 1] ([b, 0, 0] without short convolutions).

    Parameter names are fla's with ``model.layers.`` -> ``blocks.``, ``model.embeddings.`` ->
    ``embedding.`` and ``model.norm.`` -> ``norm_f.``.
    """

    def __init__(self, cfg: DeltaRuleConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(DeltaRuleBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.hook_points()  # names every HookPoint from its module path

    def layer_state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cfg = self.config
        width = cfg.conv_size - 1 if cfg.use_short_conv else 0
        return (cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim), (cfg.conv_channels, width)

    @property
    def n_heads(self) -> int:
        return self.config.num_v_heads

    def by_head(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A hook's tensor with its heads made explicit: the state hooks give [b, heads, k], the
        per-token hooks [b, l, heads, k]. The conv state and hook_out have no heads (one "head" 0)."""
        kind = name.rsplit(".", 1)[-1]
        if kind == "hook_state":
            return t.flatten(2)                       # [b, h, k * v]
        if kind == "hook_conv_state":
            return t.flatten(1)[:, None]              # [b, 1, c * (conv_size - 1)]
        if kind == "hook_out":
            return t[:, :, None]                      # [b, l, 1, d]
        if kind in ("hook_beta", "hook_dt", "hook_decay"):
            return t[..., None]                       # [b, l, h, 1]
        return t  # hook_C, hook_B [b, l, h, k]; hook_x [b, l, h, v]


# The sliding window by state difference needs transitions that commute (h_t - alpha h_{t-r}); the delta
# rule's (I - beta k k^T) do not.
_NO_WINDOW = ("the sliding window by state difference does not hold for the delta rule's non-commuting "
              "transitions alpha (I - beta k k^T)")
# The decay scaling multiplies the gate exp(g) (DeltaNet's 1); the insertion scaling multiplies beta, the
# write (and erase) strength.
_ADAPTER = ScanAdapter(mixer="attn", decay_hook="hook_decay", input_hook="hook_beta", chunked=_chunked,
                       steps=_steps, no_window=_NO_WINDOW)


@backends.register("gated_deltanet")
class GatedDeltaNetLM(DeltaRuleLM):
    """Gated DeltaNet (fla's ``GatedDeltaNetForCausalLM``, ``model_type: gated_deltanet``)."""

    arch = "gated_deltanet"
    config_class = GatedDeltaNetConfig
    layouts = (Layout("hf", "gated_deltanet", _fla_reader(_GDN_DEFAULTS, "Gated DeltaNet"), _FLA_NAMES),)
    scan_adapter = _ADAPTER


@backends.register("delta_net")
class DeltaNetLM(DeltaRuleLM):
    """DeltaNet (fla's ``DeltaNetForCausalLM``, ``model_type: delta_net``): no gate, alpha = 1."""

    arch = "delta_net"
    config_class = DeltaNetConfig
    layouts = (Layout("hf", "delta_net", _fla_reader(_DELTANET_DEFAULTS, "DeltaNet"), _FLA_NAMES),)
    scan_adapter = _ADAPTER
