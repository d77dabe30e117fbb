"""Long chunked rollouts (:mod:`statelens.record.rollout`); hook-based recorders come with the diagnostics."""
from statelens.record.rollout import Chunk, rollout

__all__ = ["Chunk", "rollout"]
