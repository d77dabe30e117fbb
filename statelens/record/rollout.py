"""Long rollouts: feed a token stream of any length through a backend in chunks, carrying the state.

    for chunk in rollout(model, tokens, chunk=2048):
        chunk.hidden      # [batch, chunk.end - chunk.start, d_model]
        chunk.logits()    # the same positions' logits, computed only if asked for
        chunk.state       # the state at position chunk.end (tokens consumed so far)

Memory does not grow with the length: only one chunk of tokens is on the device at a time, and
``tokens`` may be a memory-mapped ``.npy`` array.

**Reset positions.** ``resets[i] = r`` restarts row ``i`` from the initial state after ``r`` tokens,
so the row's outputs from position ``r`` on are those of a separate run on ``tokens[i, r:]``. Many
truncated contexts of the same tokens then run as one batch (Effective Remembrance needs exactly
this). Chunks are cut at every reset position and every ``stops`` position, so a reset or a recording
always falls on a chunk boundary; the split is exact because the backends are exact for any chunk
length.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from statelens.errors import ParameterError
from statelens.models.base import RecurrentLM, State


@dataclass
class Chunk:
    """One forward call of a rollout: positions ``start`` to ``end`` (tokens ``start .. end - 1``)."""

    start: int
    end: int
    hidden: torch.Tensor  # [batch, end - start, d_model], final-normed
    state: State          # after ``end`` tokens
    model: RecurrentLM

    def logits(self) -> torch.Tensor:
        """[batch, end - start, vocab]"""
        with torch.no_grad():
            return self.model.unembed(self.hidden)


def as_batch(tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """A 1-D stream becomes a batch of one; a 2-D array is [batch, length]."""
    if tokens.ndim == 1:
        return tokens[None]
    if tokens.ndim != 2:
        raise ParameterError("tokens", f"tokens must be 1-D or 2-D, got shape {tuple(tokens.shape)}")
    return tokens


def boundaries(length: int, chunk: int, extra: Iterable[int] = ()) -> list[int]:
    """Sorted chunk ends: every ``chunk`` tokens, each position in ``extra`` inside (0, length), and length."""
    if chunk < 1:
        raise ParameterError("chunk", f"chunk must be >= 1, got {chunk}")
    ends = set(range(chunk, length, chunk)) | {int(p) for p in extra if 0 < int(p) < length}
    return sorted(ends | {length})


def rollout(
    model: RecurrentLM,
    tokens: np.ndarray | torch.Tensor,
    *,
    chunk: int = 2048,
    state: State | None = None,
    resets: Iterable[int] | None = None,
    stops: Iterable[int] = (),
) -> Iterator[Chunk]:
    """Runs ``tokens`` ([length] or [batch, length]) chunk by chunk; yields a :class:`Chunk` per call.

    ``state`` is the initial state (zeros by default); ``resets`` [batch] are per-row reset positions
    (0: none); ``stops`` are extra positions where a chunk must end.
    """
    tokens = as_batch(tokens)
    batch, length = tokens.shape
    initial = state if state is not None else model.zero_state(batch)
    reset_at = torch.as_tensor(list(resets) if resets is not None else [0] * batch, dtype=torch.long)
    if reset_at.shape != (batch,):
        raise ParameterError("resets", f"resets must have one position per row ({batch}), got {tuple(reset_at.shape)}")
    if (reset_at < 0).any() or (reset_at > length).any():
        raise ParameterError("resets", f"reset positions must lie in [0, {length}]")
    state, start = initial, 0
    for end in boundaries(length, chunk, [*stops, *reset_at.tolist()]):
        restart = reset_at == start
        if start > 0 and restart.any():
            state = state.where(restart.to(model.device), initial)
        x = torch.as_tensor(np.asarray(tokens[:, start:end]) if isinstance(tokens, np.ndarray) else tokens[:, start:end])
        with torch.no_grad():
            hidden, state = model.hidden(x.to(device=model.device, dtype=torch.long), state)
        yield Chunk(start, end, hidden, state, model)
        start = end
