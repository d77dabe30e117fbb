"""The pieces of the checkpoint layouts (:class:`~statelens.models.base.Layout`) the Mamba backends
share: mamba-ssm's ``MambaLMHeadModel`` directory and transformers' ``mamba`` / ``mamba2`` one.
``mamba2.py`` and ``mamba1.py`` declare their layouts from these and their own keys.

mamba-ssm: ``config.json`` with ``d_model, n_layer, vocab_size, ssm_cfg{layer, d_state, ...}, rms_norm,
residual_in_fp32, pad_vocab_size_multiple, tie_embeddings``; weights ``backbone.embedding.weight``,
``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight``, ``lm_head.weight``.

transformers: ``config.json`` with ``model_type`` ``mamba`` or ``mamba2`` and its own key names
(``hidden_size``, ``state_size``, ...); weights as mamba-ssm's but ``backbone.embeddings.weight``.
"""
from __future__ import annotations

from statelens.errors import ParameterError

# ssm_cfg keys that only matter for initialisation or kernels, not for the forward pass.
INIT_ONLY = frozenset({"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "conv_init",
                       "use_fast_path", "use_mem_eff_path", "layer", "process_group", "sequence_parallel",
                       "layer_idx"})

# (backend prefix, file prefix) pairs for the names of statelens.models.lm.LMHeadModel.
MAMBA_SSM_NAMES = (("blocks.", "backbone.layers."), ("embedding.", "backbone.embedding."),
                   ("norm_f.", "backbone.norm_f."))
HF_NAMES = (("blocks.", "backbone.layers."), ("embedding.", "backbone.embeddings."), ("norm_f.", "backbone.norm_f."))

# Config fields -> the key transformers' mamba and mamba2 config.json both call them.
HF_KEYS = {"d_model": "hidden_size", "n_layer": "num_hidden_layers", "d_state": "state_size", "d_conv": "conv_kernel"}


def hf_kwargs(raw: dict) -> dict:
    """The part transformers' MambaConfig and Mamba2Config share (their config.json) -> config keyword
    arguments. ValueError for an activation other than SiLU."""
    if raw.get("hidden_act", "silu") != "silu":
        raise ParameterError("hidden_act", f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    return dict(
        d_model=raw.get("hidden_size", 768), n_layer=raw.get("num_hidden_layers", 32),
        vocab_size=raw.get("vocab_size"), d_conv=raw.get("conv_kernel", 4), expand=raw.get("expand", 2),
        bias=raw.get("use_bias", False), conv_bias=raw.get("use_conv_bias", True),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5), residual_in_fp32=raw.get("residual_in_fp32", True),
    )


def mamba_ssm_kwargs(raw: dict, layer: str, keys: frozenset[str]) -> dict:
    """mamba-ssm's config.json -> config keyword arguments: the top level, and the ``ssm_cfg`` keys
    (``keys``) the ``layer`` reads. ValueError for a hybrid model or an ``ssm_cfg`` key neither read nor
    in :data:`INIT_ONLY`."""
    ssm = dict(raw.get("ssm_cfg") or {})
    if raw.get("d_intermediate", 0) or raw.get("attn_layer_idx"):
        raise ParameterError("d_intermediate", "hybrid models (d_intermediate, attn_layer_idx) are not supported")
    unknown = set(ssm) - keys - INIT_ONLY
    if unknown:
        raise ParameterError("ssm_cfg", f"ssm_cfg key(s) {', '.join(sorted(unknown))} not understood for {layer}")
    vocab, multiple = raw.get("vocab_size"), raw.get("pad_vocab_size_multiple", 8)
    if isinstance(vocab, int) and isinstance(multiple, int) and multiple > 0 and vocab % multiple:
        vocab += multiple - vocab % multiple  # as MambaLMHeadModel pads it
    return dict(
        d_model=raw.get("d_model"), n_layer=raw.get("n_layer"), vocab_size=vocab,
        rms_norm=raw.get("rms_norm", True), residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_embeddings=raw.get("tie_embeddings", True),
        **{k: v for k, v in ssm.items() if k in keys},
    )


def mamba_ssm_config(cfg, layer: str, ssm_cfg: dict) -> dict:
    """MambaLMHeadModel's config.json for the config ``cfg`` of a model built in code; ``ssm_cfg`` the
    ``layer``'s own keys beyond those every Mamba layer has."""
    common = ("d_state", "d_conv", "expand", "bias", "conv_bias")  # those of them the layer has (Mamba-3: no conv)
    ssm_cfg = {"layer": layer} | {k: getattr(cfg, k) for k in common if hasattr(cfg, k)} | ssm_cfg
    return {"d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
            "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": cfg.rms_norm,
            "residual_in_fp32": cfg.residual_in_fp32, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
            "tie_embeddings": cfg.tie_embeddings}


def json_number(value):
    """A JSON number; transformers 5 writes infinities as ``{"__float__": "Infinity"}``."""
    return float(value["__float__"]) if isinstance(value, dict) and "__float__" in value else value
