"""Backends behind one protocol (:mod:`statelens.models.base`) and checkpoint loading.

Start with :func:`load_checkpoint`; a backend file (``mamba2.py``, ``mamba1.py``) reads top to bottom.
"""
from statelens.models.base import RecurrentLM, State, backends
from statelens.models.checkpoint import Checkpoint, load_checkpoint, load_hf_adapter, save_checkpoint
from statelens.models.gated_deltanet import DeltaNetConfig, DeltaNetLM, GatedDeltaNetConfig, GatedDeltaNetLM
from statelens.models.gla import GLAConfig, GLALM
from statelens.models.hooks import HookPoint, hooks
from statelens.models.mamba1 import Mamba1Config, Mamba1LM
from statelens.models.mamba2 import Mamba2Config, Mamba2LM
from statelens.models.mamba3 import Mamba3Config, Mamba3LM
from statelens.models.rwkv7 import RWKV7Config, RWKV7LM

__all__ = ["Checkpoint", "DeltaNetConfig", "DeltaNetLM", "GatedDeltaNetConfig", "GatedDeltaNetLM", "GLAConfig", "GLALM",
           "HookPoint", "Mamba1Config", "Mamba1LM", "Mamba2Config", "Mamba2LM", "Mamba3Config", "Mamba3LM", "RecurrentLM",
           "RWKV7Config", "RWKV7LM", "State", "backends", "hooks", "load_checkpoint", "load_hf_adapter", "save_checkpoint"]
