"""Interventions on the recurrent state: initial-state samplers for post-training (:mod:`.samplers`) and
training-free mitigations of state collapse (:mod:`.mitigations`)."""
from statelens.interventions.mitigations import apply_mitigation, parse_mitigation
from statelens.interventions.samplers import (FittedNoise, RandomNoise, StatePassing, ZeroState, final_states,
                                              mean_state_norm, tbtt_batch, tbtt_batches)

__all__ = ["FittedNoise", "RandomNoise", "StatePassing", "ZeroState", "apply_mitigation", "final_states",
           "mean_state_norm", "parse_mitigation", "tbtt_batch", "tbtt_batches"]
