"""RWKV-4 (transformers' ``RwkvForCausalLM``) through the hf adapter: its state travels as the ``state``
argument of its forward, not in a ``DynamicCache``.

transformers' state is five tensors ``[b, hidden, layers]``: 0 the feed-forward's token shift (its last
input), 1 the attention's token shift, 2 the WKV numerator, 3 the denominator, 4 their common exponent
(the running maximum; the true numerator is ``num * exp(max)``). Per layer ``k`` statelens keeps them as is:

    ssm[k]:  [b, hidden, 3]  (numerator, denominator, exponent): the recurrent state, what ``hook_state`` sees
    conv[k]: [b, hidden, 2]  (attention shift, feed-forward shift): the one-token windows the time mix and
             channel mix read

The initial state is transformers' own: zeros, the exponent -1e30 (:func:`initial_state`).
"""
from __future__ import annotations

import inspect

import torch

from statelens.models.base import State

INITIAL_EXPONENT = -1e30  # RwkvModel.forward's starting value of state[4]


def takes_state_argument(hf_class: type) -> bool:
    """Whether ``hf_class``'s forward carries its state as a ``state`` argument (transformers' RWKV)."""
    return "state" in inspect.signature(hf_class.forward).parameters


def to_transformers(state: State) -> list[torch.Tensor]:
    """statelens' per-layer state -> transformers' five ``[b, hidden, layers]`` tensors (fresh: its forward
    writes into them)."""
    ssm, conv = torch.stack(state.ssm, dim=-1), torch.stack(state.conv, dim=-1)  # [b, hidden, 3 | 2, layers]
    return [conv[:, :, 1].clone(), conv[:, :, 0].clone(), *(ssm[:, :, j].clone() for j in range(3))]


def from_transformers(tensors: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """transformers' five ``[b, hidden, layers]`` tensors -> (ssm, conv) per layer, as the module docstring."""
    ffn_shift, attention_shift, num, den, exponent = tensors
    layers = num.shape[-1]
    ssm = tuple(torch.stack([num[..., k], den[..., k], exponent[..., k]], dim=-1) for k in range(layers))
    conv = tuple(torch.stack([attention_shift[..., k], ffn_shift[..., k]], dim=-1) for k in range(layers))
    return ssm, conv


def initial_state(batch: int, hidden: int, layers: int, *, device, ssm_dtype, conv_dtype) -> State:
    """transformers' initial RWKV state in statelens' layout: zeros, the exponent at -1e30."""
    ssm = torch.zeros(batch, hidden, 3, device=device, dtype=ssm_dtype)
    ssm[..., 2] = INITIAL_EXPONENT
    conv = torch.zeros(batch, hidden, 2, device=device, dtype=conv_dtype)
    return State(tuple(ssm.clone() for _ in range(layers)), tuple(conv.clone() for _ in range(layers)))
