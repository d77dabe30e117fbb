"""The backend protocol: what every recurrent language model in statelens provides.

A backend is an ``nn.Module`` subclass of :class:`RecurrentLM`. It runs

    logits, state = model(tokens, state)        # tokens [batch, length] -> logits [batch, length, vocab]

exactly, for any chunk length >= 1, so that a long input can be fed in pieces with the state carried.
``model.hidden`` and ``model.unembed`` split that call in two, so callers that need only a few
positions' logits (Effective Remembrance needs the last one) skip the vocabulary projection.

The recurrent state is a :class:`State`: per layer, the SSM state and the convolution state.
Everything above the backends (rollouts, recorders, analyses, interventions) is written against this
file only. What the mitigations need of a backend's recurrence (its :class:`ScanAdapter`) and what
checkpoint loading needs of its files (its :class:`Layout` s) are declared in the backend's file, like
everything else about its architecture.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from statelens.errors import ParameterError
from statelens.models.hooks import HookPoint, name_hook_points
from statelens.registry import Registry


@dataclass(frozen=True)
class State:
    """Recurrent state of a whole model for a batch.

    ssm:  per layer, the backend's SSM state (Mamba-2 ``[batch, nheads, headdim, d_state]``,
          Mamba-1 ``[batch, d_inner, d_state]``).
    conv: per layer, the last ``d_conv - 1`` inputs of the causal convolution,
          ``[batch, conv_channels, d_conv - 1]``.
    extra: anything else a modified model carries between calls, batch first (empty for the
          backends; the sliding-window mitigation keeps its last ``r`` inputs here, see
          :mod:`statelens.interventions.mitigations`).
    """

    ssm: tuple[torch.Tensor, ...]
    conv: tuple[torch.Tensor, ...]
    extra: tuple[torch.Tensor, ...] = ()

    @property
    def batch_size(self) -> int:
        return self.ssm[0].shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> State:
        """Applies ``fn`` to every tensor."""
        return State(*(tuple(fn(t) for t in part) for part in (self.ssm, self.conv, self.extra)))

    def detach(self) -> State:
        return self.map(torch.Tensor.detach)

    def clone(self) -> State:
        return self.map(torch.Tensor.clone)

    def to(self, *args, **kwargs) -> State:
        return self.map(lambda t: t.to(*args, **kwargs))

    def rows(self, index: torch.Tensor | slice | list[int]) -> State:
        """The state of a subset of the batch."""
        return self.map(lambda t: t[index])

    def where(self, rows: torch.Tensor, other: State) -> State:
        """Per batch row: ``other`` where ``rows`` [batch] is True, else this state."""
        def pick(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            mask = rows.view(-1, *([1] * (mine.dim() - 1)))
            return torch.where(mask, theirs.to(mine.dtype), mine)

        return State(
            tuple(pick(a, b) for a, b in zip(self.ssm, other.ssm)),
            tuple(pick(a, b) for a, b in zip(self.conv, other.conv)),
            tuple(pick(a, b) for a, b in zip(self.extra, other.extra, strict=True)),
        )

    def numel_per_sequence(self) -> int:
        """SSM state size of one sequence, in numbers (conv states excluded)."""
        return sum(t[0].numel() for t in self.ssm)


@dataclass(frozen=True)
class ScanAdapter:
    """What the training-free mitigations (:mod:`statelens.interventions.mitigations`) need of a backend's
    recurrence, declared in the backend's file as ``RecurrentLM.scan_adapter``.

    Each layer's module ``getattr(block, mixer)`` has an attribute ``scan``: None runs the backend's own
    scan; a callable taking the same ``*inputs`` and returning the same outputs as ``chunked`` replaces it.

    mixer:       the block attribute holding that module ("mixer", "attn").
    decay_hook, input_hook: the block's hook points whose tensors are the decay alpha_t and the input
                 B_t (``blocks.{i}.<name>``): what the scaling multiplies.
    chunked(*inputs) -> (y [b, l, ...], state [b, heads, ...], *more): the exact chunked scan the mixer
                 runs (heads first in the state, as the cap reads it per head).
    steps(*inputs) -> (step, h0, length, block): the same recurrence a token at a time,
                 ``step(t, h) -> (y_t [b, ...], h_t [b, heads, ...])``; the initial state, the number of
                 tokens, and the block length of the block states ``chunked`` also returns (None: none).
    window(extend, *inputs) -> chunked's outputs: the scan with the sliding window by state difference.
                 ``extend(parts)`` takes [b, l, ...] tensors of the call, the log-decay last, and returns
                 them r tokens earlier (the tokens leaving the window; zeros before the first) and the
                 log-decay of the window ending at each token [b, l, ...]; see :func:`interleave`.
    window_width(config) -> int: the numbers per token of the parts ``window`` hands to ``extend``.
    no_window:   where ``window`` is None, why the sliding window is not exact for this backend (the
                 window mitigation is refused with it).
    """

    mixer: str
    decay_hook: str
    input_hook: str
    chunked: Callable
    steps: Callable
    window: Callable | None = None
    window_width: Callable[[object], int] | None = None
    no_window: str = ""


@dataclass(frozen=True)
class Layout:
    """One checkpoint format a backend is read from (and written in), declared in the backend's file as an
    entry of ``RecurrentLM.layouts``; :mod:`statelens.models.checkpoint` knows no architecture but these.

    format:       "hf" (config.json has ``model_type``) or "mamba_ssm" (config.json has ``ssm_cfg``).
    name:         what selects this backend in that config.json: the ``model_type``, or ``ssm_cfg.layer``.
    read_config(raw) -> keyword arguments of the backend's ``config_class`` from config.json as read
                  (a dict); raises ValueError naming the setting it refuses.
    weight_names: (backend prefix, file prefix) pairs: ``("blocks.", "backbone.layers.")`` says the
                  backend's ``blocks.0.mixer.D`` is the file's ``backbone.layers.0.mixer.D``; a name no
                  pair matches is the same in both (``lm_head.weight``).
    config_keys:  backend config field -> the key this config.json calls it (``d_model`` ->
                  ``hidden_size``), so that an error names the key in the user's file.
    write_config(config) -> config.json (a dict) for a model built in code; None where statelens does
                  not write this format from scratch.
    """

    format: str
    name: str
    read_config: Callable[[dict], dict]
    weight_names: tuple[tuple[str, str], ...]
    config_keys: Mapping[str, str] = field(default_factory=dict)
    write_config: Callable[[object], dict] | None = None


def interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[b, l, ...] twice -> [b, 2l, ...]: first[:, 0], second[:, 0], first[:, 1], ...

    How a window scan runs: each token becomes two steps of the same recurrence, the removal of the
    token leaving the window (decay alpha_t, input -alpha_{t-r+1:t} u_{t-r}), then the token itself
    (decay 1, input u_t), whose output is kept. A chunked scan's block doubles with it, so block starts
    fall where the plain scan's do.
    """
    return torch.stack([first, second], dim=2).flatten(1, 2)


class FlaTiedEmbeddings:
    """For the configs read from flash-linear-attention's directories: fla names it ``tie_word_embeddings``,
    the checkpoint loader (mamba's name) reads ``tie_embeddings``."""

    @property
    def tie_embeddings(self) -> bool:
        return self.tie_word_embeddings


def check_dims(config, names: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of ``names`` that is not a positive integer (bools refused)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(name, f"{name} must be a positive integer, got {value!r}")


class RecurrentLM(nn.Module):
    """Base of every backend. Subclasses set ``arch`` and ``config`` and implement the abstract parts; a
    backend statelens loads from files declares its ``layouts`` (and ``config_class``), one whose scan
    the mitigations may replace its ``scan_adapter``.

    Hook points (per layer ``i``; shapes per backend docstring): ``blocks.{i}.hook_state``,
    ``hook_conv_state``, ``hook_dt``, ``hook_decay``, ``hook_B``, ``hook_C``, ``hook_x``, ``hook_out``.
    """

    arch: str = ""
    layouts: ClassVar[tuple[Layout, ...]] = ()          # none: not loaded by statelens (the hf adapter)
    scan_adapter: ClassVar[ScanAdapter | None] = None  # None: the mitigations refuse the backend

    # -- to implement --------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens [batch, length] (int64) -> final-normed hidden [batch, length, d_model], new state."""
        raise NotImplementedError

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d_model] -> logits [..., vocab] in float32 (or the model dtype if wider)."""
        raise NotImplementedError

    def zero_state(self, batch: int, *, device=None, dtype=None) -> State:
        """The all-zero initial state for ``batch`` sequences."""
        raise NotImplementedError

    @property
    def n_heads(self) -> int:
        """Heads per layer of the SSM state (what per-head statistics are reported over)."""
        raise NotImplementedError

    def by_head(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A hook point's tensor with heads explicit: [b, heads, k] for state hooks, [b, l, heads, k]
        for per-token hooks (``name`` is the hook point's name, e.g. ``blocks.3.hook_state``)."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """tokens [batch, length] -> logits [batch, length, vocab], state after the last token."""
        if state is None:
            state = self.zero_state(tokens.shape[0])
        hidden, state = self.hidden(tokens, state)
        return self.unembed(hidden), state

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point by name, e.g. ``blocks.3.hook_state``."""
        return name_hook_points(self)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied lm_head counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def state_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Per layer, the shapes of one sequence's SSM and conv states (batch axis dropped)."""
        state = self.zero_state(1, device="meta")
        return [{"ssm": tuple(s.shape[1:]), "conv": tuple(c.shape[1:])} for s, c in zip(state.ssm, state.conv)]


backends: Registry[type[RecurrentLM]] = Registry("backend")
"""Backends by architecture name; a new architecture is one file in ``models/`` that registers here."""
