"""RecurrentGemma (transformers' ``RecurrentGemmaForCausalLM``; Griffin, De et al. 2024) through the hf adapter.

Its recurrent blocks keep their states on the modules, not in the cache: ``rg_lru.recurrent_states`` (the RG-LRU's
state, float32 whatever the model's dtype) and ``conv1d_state`` (the last ``conv1d_width - 1`` inputs of the depthwise
conv). transformers continues both from a one-token call, but a multi-token call restarts the conv from zeros;
:func:`continued` runs the block's own submodules with the conv continued from ``conv1d_state`` instead (the RG-LRU
already continues from ``recurrent_states``), so that a chunked run equals a one-shot run. Its local-attention layers
keep a ``DynamicSlidingWindowLayer``: the last ``attention_window_size - 1`` keys and values, all that a later query
reads; the adapter carries them as a hybrid's KV caches.

Layout, per recurrent layer ``k`` (axes: h the RG-LRU's gate blocks, ``num_attention_heads``; w their width,
``lru_width / h``; c = ``lru_width`` channels):

    ssm[k]:  [b, h, w, 1]  the RG-LRU state (a diagonal recurrence: one number per channel), channel ``j * w + i``
             at ``[j, i]``: the heads are the blocks its input and recurrence gates mix within
    conv[k]: [b, c, conv1d_width - 1]  the conv's window, oldest input first

The RG-LRU restarts at position 0 (``position_ids == 0`` zeroes its recurrence gate): a row's first token after its
initial state ignores that state's RG-LRU part, as in transformers. An initial state is read only by a row that has
seen tokens (a :class:`~statelens.models.hf_adapter.HybridState` with ``seen > 0``).
"""
from __future__ import annotations

import torch
from torch import nn

MODEL_TYPE = "recurrent_gemma"


def recurrent_block(hf_model: nn.Module, i: int) -> nn.Module:
    """HF layer ``i``'s temporal block."""
    return hf_model.base_model.layers[i].temporal_block


def continued(block: nn.Module, input_states: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
    """transformers' ``RecurrentGemmaRecurrentBlock.forward`` (``use_cache`` on) with the conv continued from
    ``block.conv1d_state`` in multi-token calls too: input_states [b, l, hidden] -> ([b, l, hidden], None); the
    block's ``conv1d_state`` and ``rg_lru.recurrent_states`` move on by ``l`` tokens."""
    y_branch = block.act_fn(block.linear_y(input_states))
    x_branch = block.linear_x(input_states).transpose(1, 2)                          # [b, c, l]
    window = torch.cat([block.conv1d_state.to(x_branch.dtype), x_branch], dim=-1)    # [b, c, w - 1 + l]
    block.conv1d_state = window[..., window.shape[-1] - (block.conv1d_width - 1):]
    conv = block.conv_1d
    x_branch = nn.functional.conv1d(window, conv.weight, conv.bias, groups=conv.groups)  # [b, c, l], no padding
    x_branch = block.rg_lru(x_branch.transpose(1, 2), position_ids)
    return block.linear_out(x_branch * y_branch), None


class ModuleStateView:
    """A recurrent block's states under the names the adapter reads a cache layer by: ``recurrent_states[0]``
    ``[b, h, w, 1]`` and ``conv_states[0]`` ``[b, c, conv1d_width - 1]``."""

    def __init__(self, block: nn.Module):
        self.block = block

    @property
    def recurrent_states(self) -> list[torch.Tensor]:
        lru = self.block.rg_lru
        state = lru.recurrent_states                                                      # [b, c]
        return [state.reshape(state.shape[0], lru.num_attention_heads, lru.block_width, 1)]

    @property
    def conv_states(self) -> list[torch.Tensor]:
        return [self.block.conv1d_state]


def set_states(hf_model: nn.Module, layers: list[int], ssm, conv) -> None:
    """Writes recurrent layer ``k``'s state (``ssm[k]`` [b, h, w, 1], ``conv[k]`` [b, c, conv1d_width - 1], copies)
    onto the blocks of HF layers ``layers[k]``."""
    for k, i in enumerate(layers):
        block = recurrent_block(hf_model, i)
        block.rg_lru.recurrent_states = ssm[k].reshape(ssm[k].shape[0], -1).to(torch.float32).clone()
        block.conv1d_state = conv[k].clone()


def zero_states(hf_model: nn.Module, layers: list[int], batch: int, device, dtype) -> None:
    """The blocks' zero states: the RG-LRU's [b, c] in float32, the conv window [b, c, conv1d_width - 1] in ``dtype``
    (transformers' ``_setup_cache`` gives the window ``hidden_size`` channels, which differs from ``lru_width`` in a
    model where the two differ; its own multi-token calls then replace it before reading it)."""
    for i in layers:
        block = recurrent_block(hf_model, i)
        block.rg_lru.recurrent_states = torch.zeros(batch, block.lru_width, device=device, dtype=torch.float32)
        block.conv1d_state = torch.zeros(batch, block.lru_width, block.conv1d_width - 1, device=device, dtype=dtype)


def continued_forwards(hf_model: nn.Module, layers: list[int]) -> list[tuple[object, str, object]]:
    """(block, "forward", :func:`continued` bound to it) for the recurrent blocks of HF layers ``layers``, for the
    adapter's ``swapped``."""
    blocks = [recurrent_block(hf_model, i) for i in layers]
    return [(block, "forward", lambda *args, block=block, **kwargs: continued(block, *args, **kwargs))
            for block in blocks]
