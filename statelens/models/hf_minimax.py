"""MiniMax (transformers' ``MiniMaxForCausalLM``) through the hf adapter: its lightning-attention layers keep their
state in the ``linear_cache`` of its own ``MiniMaxCache`` (a ``DynamicCache`` whose ``layers`` hold only the
full-attention layers' keys and values), which its forward requires.

Layout: a lightning-attention layer's state is ``linear_cache[i]`` as is, ``[b, heads, head_dim, head_dim]`` (the
decayed sum of ``k^T v``); it has no conv state (``conv[k]`` is ``[b, 0]``).

transformers builds the full-attention mask from ``cache.get_seq_length()``, which reads layer 0; when layer 0 is a
lightning layer that length stays 0 and a multi-token call after the first is masked as if nothing came before
(transformers' own chunked run then differs from its one-shot run). :func:`cache_from` gives layer 0 keys of the
carried length (zeros, never read by attention) so that the mask is built for the keys the attention layers hold.
"""
from __future__ import annotations

import sys

import torch

CACHE_CLASS = "MiniMaxCache"


def carried(cache_name: str) -> bool:
    """Whether the adapter carries the state of a model with a cache class of its own named ``cache_name``."""
    return cache_name == CACHE_CLASS


def new_cache(hf_model: torch.nn.Module):
    """An empty ``MiniMaxCache`` of ``hf_model``'s own module."""
    return getattr(sys.modules[type(hf_model).__module__], CACHE_CLASS)()


class LinearLayerView:
    """Lightning layer ``index`` of a ``MiniMaxCache`` under the names the adapter reads a transformers
    linear-attention cache layer by: ``recurrent_states[0]`` and an empty ``conv_states[0]``."""

    def __init__(self, cache, index: int):
        self.cache, self.index = cache, index

    @property
    def recurrent_states(self) -> list[torch.Tensor]:
        return [self.cache.linear_cache[self.index]]

    @property
    def conv_states(self) -> list[torch.Tensor]:
        state = self.cache.linear_cache[self.index]
        return [state.new_zeros(state.shape[0], 0)]


def cache_from(hf_model: torch.nn.Module, ssm: dict[int, torch.Tensor], kv: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """A ``MiniMaxCache`` holding the lightning states ``ssm`` (HF layer -> ``[b, heads, d, d]``, copied) and the
    keys and values ``kv`` (HF layer -> ``[b, kv_heads, L, head_dim]`` each), layer 0 padded to length L when it
    holds no keys (see the module docstring)."""
    cache = new_cache(hf_model)
    for i, (keys, values) in kv.items():
        cache.update(keys, values, i)
    if kv and 0 not in kv:
        keys = next(iter(kv.values()))[0]
        placeholder = keys.new_zeros(keys.shape[0], 1, keys.shape[2], 1)
        cache.layers[0].update(placeholder, placeholder)
    for i, state in ssm.items():
        cache.set_linear_cache(i, state.clone())
    return cache
