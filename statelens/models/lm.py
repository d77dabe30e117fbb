"""The residual stack shared by the Mamba backends: embedding, pre-norm blocks, final norm, lm_head.

A backend subclasses :class:`LMHeadModel`, builds its mixers and calls ``_build``; the mixer of layer
``i`` takes ``(u, ssm_state, conv_state)`` and returns ``(out, ssm_state, conv_state)``. A mixer with a compiled
CPU path (:mod:`statelens.models.fused`) also has ``fast_piece``, ``options`` and ``observe``, through which its
block runs the norm, the mixer and the residual add as one graph a piece at a time.
"""
from __future__ import annotations

import torch
from torch import nn

from statelens.models import fused
from statelens.models.base import RecurrentLM, State
from statelens.models.layers import block_norm


class Block(nn.Module):
    """Pre-norm residual block. With ``residual_in_fp32`` the residual stream is kept in float32
    (or wider), as mamba-ssm's fused add-norm does; the mixer runs in the model dtype."""

    def __init__(self, mixer: nn.Module, d_model: int, eps: float, rms: bool, residual_in_fp32: bool):
        super().__init__()
        self.norm = block_norm(d_model, eps, rms)
        self.mixer = mixer
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, residual: torch.Tensor, *states: torch.Tensor):
        """residual [b, l, d], the mixer's states -> (residual + mixer(norm(residual)), new states)."""
        if self.residual_in_fp32:
            residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        piece = self.mixer.fast_piece(residual) if isinstance(self.mixer, fused.Piecewise) else 0
        watched = self.mixer.hook_out.active or self.mixer._forward_hooks or self.mixer._forward_pre_hooks
        if piece and not watched:
            # --compile: the norm and the residual add join the mixer's graph, a piece at a time in cache, where
            # eager they are passes over the whole call (fused.in_pieces). A hook on the mixer's output, ours or
            # torch's on the module, must see its whole call: the mixer then runs (and compiles) alone.
            residual, *rest = fused.in_pieces(self, residual, states, piece, *self.mixer.options())
            return residual, *self.mixer.observe(*rest)
        out, *states = self.mixer(self.norm(residual.to(self.norm.weight.dtype)), *states)
        return residual + out, *states

    def unhooked(self, residual: torch.Tensor, *states_and_options):
        """:meth:`forward` with the mixer's ``unhooked`` (no hooks) -> (new residual, what ``unhooked`` returned
        after its output): what :func:`fused.in_pieces` runs a piece at a time."""
        out, *rest = type(self.mixer).unhooked(self.mixer, self.norm(residual.to(self.norm.weight.dtype)),
                                               *states_and_options)
        return residual + out, *rest


class LMHeadModel(RecurrentLM):
    """Embedding, blocks, final norm, lm_head: the part shared by the Mamba backends."""

    def _build(self, cfg, mixers: list[nn.Module]) -> None:
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(m, cfg.d_model, cfg.norm_eps, cfg.rms_norm, cfg.residual_in_fp32) for m in mixers)
        self.norm_f = block_norm(cfg.d_model, cfg.norm_eps, cfg.rms_norm)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.hook_points()  # names every HookPoint from its module path

    def hidden(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        x = self.embedding(tokens)
        ssm, conv = [], []
        for block, s, c in zip(self.blocks, state.ssm, state.conv):
            x, s, c = block(x, s, c)
            ssm.append(s)
            conv.append(c)
        return self.norm_f(x.to(self.norm_f.weight.dtype)), State(tuple(ssm), tuple(conv))

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def layer_state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One sequence's (SSM, conv) state shapes; the same in every layer."""
        raise NotImplementedError

    def zero_state(self, batch: int, *, device=None, dtype=None) -> State:
        """SSM states in float32 or wider whatever the model dtype; conv states in the model dtype."""
        device, dtype = device or self.device, dtype or self.dtype
        ssm_shape, conv_shape = self.layer_state_shapes()
        wide = torch.promote_types(dtype, torch.float32)
        return State(tuple(torch.zeros(batch, *ssm_shape, device=device, dtype=wide) for _ in self.blocks),
                     tuple(torch.zeros(batch, *conv_shape, device=device, dtype=dtype) for _ in self.blocks))
