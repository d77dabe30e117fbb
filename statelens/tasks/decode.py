"""Greedy continuation of a prompt of any length, with memory flat in the prompt length.

The prompt goes through :func:`statelens.record.rollout.rollout` chunk by chunk; only the last
position's hidden state and the state after the prompt are kept. New tokens are then decoded one at a
time from that state: token ``i`` is the argmax of the logits after the prompt and tokens ``0 .. i-1``.
"""
from __future__ import annotations

import numpy as np
import torch

from statelens.errors import ParameterError
from statelens.models.base import RecurrentLM
from statelens.record.rollout import as_batch, rollout


def greedy_continue(model: RecurrentLM, prompt_tokens: np.ndarray | torch.Tensor, n_new: int, *,
                    chunk: int = 2048) -> np.ndarray:
    """prompt_tokens [batch, L] (or [L]) int -> the ``n_new`` greedy tokens [batch, n_new] int64.

    Equal to recomputing ``argmax(model(prompt + new_so_far)[0][:, -1])`` from scratch at each step,
    but the prompt is fed ``chunk`` tokens at a time and each new token costs one recurrent step.
    """
    prompt = as_batch(prompt_tokens)
    batch, length = prompt.shape
    if length < 1:
        raise ParameterError("prompt_tokens", "the prompt must have at least one token")
    if n_new < 0:
        raise ParameterError("n_new", f"n_new must be >= 0, got {n_new}")
    state, last = None, None
    for piece in rollout(model, prompt, chunk=chunk):
        state, last = piece.state, piece.hidden[:, -1:]          # [batch, 1, d_model]
    out = torch.empty(batch, n_new, dtype=torch.long)
    with torch.no_grad():
        for i in range(n_new):
            token = model.unembed(last)[:, -1].argmax(-1)          # [batch]
            out[:, i] = token.cpu()
            if i + 1 < n_new:
                last, state = model.hidden(token[:, None], state)
    return out.numpy()
