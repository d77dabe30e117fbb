"""Self-check of a backend: one-shot, chunked and token-by-token runs must give the same logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from statelens.models import fused
from statelens.models.base import RecurrentLM
from statelens.record.rollout import rollout


@dataclass
class Agreement:
    """Max abs differences against the one-shot run, and the tolerance they are held to."""

    length: int
    chunk: int
    chunked_logits: float      # one-shot vs chunked (``chunk`` tokens per call)
    stepwise_logits: float     # one-shot vs one token per call
    chunked_state: float       # final SSM states, one-shot vs chunked
    stepwise_state: float      # final SSM states, one-shot vs token by token
    logit_scale: float         # max |logit| of the one-shot run
    tolerance: float
    compiled_pieces: int = 0   # pieces of the one-shot run that went through the compiled path (--compile on)

    @property
    def ok(self) -> bool:
        return all(gap <= self.tolerance for gap in (self.chunked_logits, self.stepwise_logits))  # NaN fails


def tolerance(dtype: torch.dtype, logit_scale: float) -> float:
    """1e-4 (float32) or 1e-9 (float64) relative to the logits' scale, at least that absolutely."""
    return (1e-9 if dtype == torch.float64 else 1e-4) * max(1.0, logit_scale)


def check_agreement(model: RecurrentLM, *, length: int = 300, chunk: int = 37, seed: int = 0,
                    compile_mode: str = "off") -> Agreement:
    """Runs ``length`` random tokens one-shot, in chunks of ``chunk`` (choose one that does not divide
    ``length``) and token by token, and compares logits and final states. ``compile_mode`` ``on``: the one-shot
    run takes the compiled path (:mod:`statelens.models.fused`) where it applies, so it is checked against the
    two eager runs (shorter calls than a piece, which stay eager)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (1, length), generator=gen)

    def run(step: int):
        chunks = list(rollout(model, tokens, chunk=step))
        return torch.cat([c.logits() for c in chunks], dim=1), chunks[-1].state

    def gap(a, b) -> float:
        return (a.double() - b.double()).abs().max().item()

    before = fused.pieces_compiled()
    with fused.mode(compile_mode):
        ref, ref_state = run(length)
    compiled = fused.pieces_compiled() - before
    chunked, chunked_state = run(chunk)
    stepwise, stepwise_state = run(1)
    scale = ref.abs().max().item()
    return Agreement(
        length, chunk, gap(ref, chunked), gap(ref, stepwise),
        max(gap(a, b) for a, b in zip(ref_state.ssm, chunked_state.ssm)),
        max(gap(a, b) for a, b in zip(ref_state.ssm, stepwise_state.ssm)),
        scale, tolerance(model.dtype, scale), compiled,
    )
