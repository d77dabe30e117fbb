"""xLSTM (transformers' ``xLSTMForCausalLM``; Beck et al. 2024, the mLSTM blocks of xLSTM-7b) through the hf adapter:
its state travels in its own ``xLSTMCache``, a dict ``rnn_state`` of per-layer tuples (C, n, m), not in a
``DynamicCache``; the adapter builds one per call from the carried state and reads it back.

Layout, per layer ``k`` (axes: h ``num_heads``; d the query/key head width; e the value head width):

    ssm[k]:  [b, h, d, e]  the matrix memory C, what ``hook_state`` sees
    conv[k]: [b, h, d + 1] the normalizer n (``[..., :d]``) and the stabilizer m (``[..., d]``)

C and n are stored as transformers stores them, scaled by ``exp(-m)`` so that they stay finite: the memory
itself is ``C * exp(m)`` (the output ``q C / max(|q n|, exp(-m))`` does not depend on the scaling). The initial
state is zeros (m = 0), transformers' own.

transformers' recurrent kernels keep C, n and m in ``inference_state_dtype`` (float32 at most) even in a float64
model, while its chunkwise kernel, which one-shot calls run on whole ``chunk_size`` blocks, keeps them in the
model's dtype; :func:`state_dtype_swaps` sets the recurrent kernels' state dtype to a float64 model's own, so that a
float64 run computes in float64 throughout and chunked equals one-shot to float64 rounding.

Kernel names: without the ``xlstm`` package transformers runs its own torch kernels whatever config.json names, yet
its config accepts only their names; the released xLSTM-7b config names Triton kernels, which transformers refuses
to load. :func:`torch_kernel_config` loads such a config with the torch kernels' names, which changes nothing it
computes (with the package installed transformers runs that package's Triton kernels, which need a GPU).
"""
from __future__ import annotations

import sys
from functools import partial

import torch
from torch import nn

CACHE_CLASS = "xLSTMCache"
MODEL_TYPE = "xlstm"
# The kernels transformers' own xLSTM runs (without the xlstm package), by the config keys that name them.
TORCH_KERNELS = {"chunkwise_kernel": "chunkwise--native_autograd", "sequence_kernel": "native_sequence__native",
                 "step_kernel": "native"}
_STATE_KERNELS = ("mlstm_sequence_kernel", "mlstm_step_kernel")  # the recurrent kernels, bound with dtype_state


def carried(cache_name: str) -> bool:
    """Whether ``cache_name`` is xLSTM's own cache."""
    return cache_name == CACHE_CLASS


def torch_kernel_config(hf_class: type, config: dict):
    """``hf_class``'s config from config.json's ``config`` with transformers' torch kernels named (see the module
    docstring), or None when config.json may be loaded as it is: it names them already, or it is not an xLSTM
    config, or transformers runs the xlstm package's kernels (then the adapter loads the config as written)."""
    if config.get("model_type") != MODEL_TYPE:
        return None
    import transformers.models.xlstm.modeling_xlstm as modeling

    named = {key: config.get(key, torch_name) for key, torch_name in TORCH_KERNELS.items()}
    if named == TORCH_KERNELS or modeling.external_xlstm:
        return None
    return hf_class.config_class.from_dict({**config, **TORCH_KERNELS})


def new_cache(hf_model: nn.Module, batch: int, device, dtype):
    """A zero ``xLSTMCache`` of ``hf_model``'s own module for ``batch`` rows."""
    cache_class = getattr(sys.modules[type(hf_model).__module__], CACHE_CLASS)
    return cache_class(hf_model.config, batch, dtype=dtype, device=device)


def cache_from(hf_model: nn.Module, ssm, conv):
    """An ``xLSTMCache`` holding layer ``k``'s C ``ssm[k]`` [b, h, d, e] and n, m ``conv[k]`` [b, h, d + 1]
    (copies: transformers' forward writes into them)."""
    cache = new_cache(hf_model, ssm[0].shape[0], ssm[0].device, ssm[0].dtype)
    d = ssm[0].shape[2]
    cache.rnn_state = {k: (c.clone(), nm[..., :d].clone(), nm[..., d:].clone()) for k, (c, nm) in enumerate(zip(ssm, conv))}
    return cache


class LayerView:
    """Layer ``index`` of an ``xLSTMCache`` under the names the adapter reads a transformers cache layer by:
    ``recurrent_states[0]`` (C) and ``conv_states[0]`` (n and m side by side)."""

    def __init__(self, cache, index: int):
        self.cache, self.index = cache, index

    @property
    def recurrent_states(self) -> list[torch.Tensor]:
        return [self.cache.rnn_state[self.index][0]]

    @property
    def conv_states(self) -> list[torch.Tensor]:
        _, n, m = self.cache.rnn_state[self.index]
        return [torch.cat([n, m.to(n.dtype)], dim=-1)]


def state_dtype_swaps(hf_model: nn.Module, dtype: torch.dtype) -> list[tuple[object, str, object]]:
    """(backend, "_inference_fn", the same function with its recurrent kernels' ``dtype_state`` = ``dtype``) for
    each mLSTM backend of ``hf_model`` whose recurrent kernels keep a state narrower than ``dtype``, for the adapter's
    ``swapped``; empty when none does (float32 and narrower models)."""
    swaps = []
    for module in hf_model.modules():
        inference = getattr(module, "_inference_fn", None)
        if not isinstance(inference, partial):
            continue
        kernels = {name: inference.keywords[name] for name in _STATE_KERNELS if name in inference.keywords}
        narrower = [k for k in kernels.values() if isinstance(k, partial)
                    and torch.finfo(k.keywords.get("dtype_state", dtype)).bits < torch.finfo(dtype).bits]
        if narrower:
            widened = {name: partial(k.func, *k.args, **{**k.keywords, "dtype_state": dtype}) for name, k in kernels.items()}
            swaps.append((module, "_inference_fn", partial(inference.func, *inference.args,
                                                           **{**inference.keywords, **widened})))
    return swaps
