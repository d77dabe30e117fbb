"""Post-training with initial-state interventions: :func:`posttrain` (read :mod:`.posttrain` top to bottom)."""
from statelens.train.posttrain import INTERVENTIONS, PosttrainConfig, lr_factor, posttrain

__all__ = ["INTERVENTIONS", "PosttrainConfig", "lr_factor", "posttrain"]
