"""The Triton-backed pieces of fla's GLA, Gated DeltaNet / DeltaNet and RWKV-7 forwards, swapped for torch.

Only for the oracle subprocess of tests/fla_oracle.py (triton stand-ins installed, so fla imports): each
``swap_<family>(model, kernel, states, extras)`` replaces, in fla's modules and in ``model``, every function
the forward would run as a Triton kernel by fla's own naive/torch reference or an independent torch
equivalent, appends each layer's final scan state [b, h, k, v] to ``states`` during the forward and may
fill ``extras`` with more outputs. ``kernel`` names the scan inside (tests/fla_oracle.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate, y):
    """fla's fused ``swiglu`` (Triton) in torch."""
    return F.silu(gate) * y


def swap_gla(model, kernel: str, states: list, extras: dict) -> None:
    """``fused_recurrent_gla`` / ``chunk_gla`` / ``fused_chunk_gla`` -> fla's ``naive_recurrent_gla``; the
    per-head output RMSNorm -> ``nn.RMSNorm``; the swish output gate and the MLP's SwiGLU -> torch."""
    import fla.layers.gla as fla_gla
    import fla.modules.mlp as fla_mlp
    from fla.ops.gla.naive import naive_recurrent_gla

    assert kernel == "fla"

    def naive(q, k, v, gk=None, g=None, initial_state=None, **_):
        assert initial_state is None
        o, S = naive_recurrent_gla(q, k, v, gk if gk is not None else g, output_final_state=True)
        states.append(S)
        return o, None

    for name in ("fused_recurrent_gla", "chunk_gla", "fused_chunk_gla"):
        setattr(fla_gla, name, naive)
    fla_mlp.swiglu = swiglu
    for layer in model.model.layers:
        norm = nn.RMSNorm(layer.attn.g_norm.hidden_size, eps=layer.attn.g_norm.eps, dtype=torch.float32)
        with torch.no_grad():
            norm.weight.copy_(layer.attn.g_norm.weight)
        layer.attn.g_norm, layer.attn.gate_fn = norm, F.silu


class TorchNorm(nn.Module):
    """fla's o_norm (``RMSNorm`` or ``FusedRMSNormGated``, Triton) in torch: rmsnorm(x) * w (* act(g))."""

    def __init__(self, fla_norm):
        super().__init__()
        self.norm = nn.RMSNorm(fla_norm.hidden_size, eps=fla_norm.eps)
        self.norm.weight = fla_norm.weight
        self.activation = getattr(fla_norm, "activation", None)

    def forward(self, x, g=None):
        y = self.norm(x.to(torch.promote_types(x.dtype, torch.float32)))
        if g is None:
            return y
        return y * (g.sigmoid() if self.activation == "sigmoid" else F.silu(g))


def torch_conv(conv):
    """fla's ``ShortConvolution.forward`` (Triton) as nn.Conv1d's own forward, cut causal, then its activation."""
    def forward(x, cache=None, output_final_state=False, **_):
        y = nn.Conv1d.forward(conv, x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)
        return (F.silu(y) if conv.activation else y), None
    return forward


def transformers_delta_rule(q, k, v, g, beta):
    """transformers' chunked torch delta rule (the Qwen3-Next fallback), unwrapped (it would dispatch to
    fla's kernel, fla being importable here); in float64 its casts to float32 are casts to float64."""
    import inspect

    from transformers.models.qwen3_next import modeling_qwen3_next as qwen

    float32 = torch.float32
    torch.float32 = v.dtype
    try:
        return inspect.unwrap(qwen.torch_chunk_gated_delta_rule)(q, k, v, g=g, beta=beta, output_final_state=True)
    finally:
        torch.float32 = float32


def delta_kernel(kernel: str, states: list):
    """A stand-in for fla's delta-rule kernels: the same arguments; fla's naive recurrences
    (``naive_recurrent_gated_delta_rule``, ``delta_rule_recurrence``) or transformers' chunked torch
    function inside, the l2 norm of queries and keys from transformers, the gate from fla's ``naive_gdn_gate``."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from transformers.models.qwen3_next.modeling_qwen3_next import l2norm

    def run(q, k, v, beta, g=None, initial_state=None, use_qk_l2norm_in_kernel=False, A_log=None,
            dt_bias=None, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, **_):
        assert initial_state is None
        if use_qk_l2norm_in_kernel:
            q, k = l2norm(q), l2norm(k)
        if use_beta_sigmoid_in_kernel:
            beta = beta.sigmoid() * (2 if allow_neg_eigval else 1)
        if A_log is None:
            g = torch.zeros_like(beta)
        elif v.dtype == torch.float32:
            g = naive_gdn_gate(g, A_log, dt_bias)
        else:  # naive_gdn_gate computes in float32; its formula, in float64
            g = -A_log.exp() * F.softplus(g + dt_bias)
        groups = v.shape[2] // q.shape[2]
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
        if kernel == "transformers":
            o, S = transformers_delta_rule(q, k, v, g, beta)
        elif A_log is None:
            o, S = delta_rule_recurrence(*(t.transpose(1, 2) for t in (q, k, v, beta)))
            o = o.transpose(1, 2)
        else:
            o, S = naive_recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True)
        states.append(S)
        return o.to(v.dtype), None
    return run


def swap_delta(model, kernel: str, states: list, extras: dict) -> None:
    """The delta-rule kernels -> :func:`delta_kernel`; the short convolutions -> ``nn.Conv1d``'s forward;
    the output norm -> :class:`TorchNorm`; the MLP's SwiGLU -> torch."""
    import fla.layers.delta_net as fla_dn
    import fla.layers.gated_deltanet as fla_gdn
    import fla.modules.mlp as fla_mlp

    assert kernel in ("fla", "transformers")
    run = delta_kernel(kernel, states)
    for module, names in ((fla_gdn, ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule")),
                          (fla_dn, ("chunk_delta_rule", "fused_recurrent_delta_rule"))):
        for name in names:
            setattr(module, name, run)
    fla_mlp.swiglu = swiglu
    for layer in model.model.layers:
        layer.attn.o_norm = TorchNorm(layer.attn.o_norm)
        layer.attn._use_fused_qkv_conv = lambda **_: False
        for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
            if hasattr(layer.attn, name):
                conv = getattr(layer.attn, name)
                conv.forward = torch_conv(conv)


def rwkv7_scan(kernel: str, states: list):
    """fla's ``chunk_rwkv7`` with fla's naive ``dplr_recurrence`` ("fla", which scales q by dk ** -0.5 and
    computes in float32; RWKV-7 uses scale 1) or our ``rwkv7_sequential`` ("statelens") inside."""
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    def scan(r, w, k, v, a, b, scale=1.0, initial_state=None, **_):
        assert initial_state is None and scale == 1.0
        if kernel == "fla":
            t = [x.transpose(1, 2) for x in (r * r.shape[-1] ** 0.5, k, v, a, b, w)]
            o, S = dplr_recurrence(*t, output_final_state=True)
            o = o.transpose(1, 2).to(v.dtype)
        else:
            from statelens.models.rwkv7 import rwkv7_sequential
            S0 = r.new_zeros(r.shape[0], r.shape[2], r.shape[3], v.shape[3])
            o, S = rwkv7_sequential(r, w, k, v, a, b, S0)
        states.append(S)
        return o, None
    return scan


def swap_rwkv7_functions(kernel: str, states: list) -> None:
    """fla's RWKV-7 functions -> its torch references (``torch_addcmul_rwkv7``, ``k_update_ref``,
    ``gate_output_correction_ref``, ``token_shift_ref`` plus the carried last token, ``layer_norm_ref`` and
    ``group_norm_ref`` for the fused norms) or torch's (``x / sqrt(|x|^2 + 1e-6)`` for the ``l2_norm``
    kernel, as that kernel computes it); the scan -> :func:`rwkv7_scan`."""
    import fla.layers.rwkv7 as layer
    import fla.models.rwkv7.modeling_rwkv7 as modeling
    import fla.modules.norm.layernorm as norms
    from fla.modules.norm.layernorm import group_norm_ref, layer_norm_ref
    from fla.modules.token_shift import token_shift_ref
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    def shift(x, cu_seqlens=None, cache=None, output_cache=False, **_):
        assert cache is None and cu_seqlens is None
        return token_shift_ref(x), x[:, -1:]

    scan = rwkv7_scan(kernel, states)

    def mul_scan(r, w, k, v, kk, a, **kwargs):
        return scan(r, w, k, v, -kk, kk * a, **kwargs)

    def layer_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
        return layer_norm_ref(x, weight, bias, residual, eps, prenorm)

    def group_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                   is_rms_norm=False, num_groups=1):
        return group_norm_ref(x, weight, bias, num_groups, residual, eps, is_rms_norm, prenorm)

    def l2_norm(x, eps=1e-6, output_dtype=None):
        return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)

    for module, name, value in ((layer, "token_shift", shift), (modeling, "token_shift", shift),
                                (layer, "fused_addcmul_rwkv7", torch_addcmul_rwkv7),
                                (layer, "fused_k_rwkv7", k_update_ref),
                                (layer, "gate_output_correction", gate_output_correction_ref),
                                (layer, "chunk_rwkv7", scan), (layer, "fused_mul_recurrent_rwkv7", mul_scan),
                                (norms, "layer_norm", layer_norm), (norms, "group_norm", group_norm),
                                (layer, "l2_norm", l2_norm)):
        setattr(module, name, value)


def swap_rwkv7(model, kernel: str, states: list, extras: dict) -> None:
    """:func:`swap_rwkv7_functions`, the compiled ``sqrelu`` -> ``relu(x) ** 2``; ``extras["shifts"]``: per
    layer the outputs of its two norms at the last token (the token-shift inputs) [b, 2, d]."""
    swap_rwkv7_functions(kernel, states)
    shifts = extras["shifts"] = [None] * len(model.model.layers)
    for i, block in enumerate(model.model.layers):
        block.ffn.act_fn = lambda x: F.relu(x).square()
        for j, norm in enumerate((block.attn_norm, block.ffn_norm)):
            norm.register_forward_hook(lambda m, args, out, i=i, j=j: record_shift(shifts, i, j, out))


def record_shift(shifts: list, layer: int, which: int, out) -> None:
    """The last token of a norm's output (a fused ffn_norm returns (out, residual)): the attention norm's
    alone, then stacked with the ffn norm's."""
    last = (out[0] if isinstance(out, tuple) else out)[:, -1]
    shifts[layer] = last if which == 0 else torch.stack([shifts[layer], last], dim=1)


SWAPS = {"gla": swap_gla, "gated_deltanet": swap_delta, "delta_net": swap_delta, "rwkv7": swap_rwkv7}
