"""Interventions on the recurrent state: initial-state samplers for post-training (:mod:`.samplers`)."""
from statelens.interventions.samplers import (FittedNoise, RandomNoise, StatePassing, ZeroState, final_states,
                                              mean_state_norm, tbtt_batch, tbtt_batches)

__all__ = ["FittedNoise", "RandomNoise", "StatePassing", "ZeroState", "final_states", "mean_state_norm",
           "tbtt_batch", "tbtt_batches"]
