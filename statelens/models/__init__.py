"""Backends behind one protocol (:mod:`statelens.models.base`) and checkpoint loading.

Start with :func:`load_checkpoint`; a backend file (``mamba2.py``, ``mamba1.py``) reads top to bottom.
"""
from statelens.models.base import RecurrentLM, State, backends
from statelens.models.checkpoint import Checkpoint, load_checkpoint, load_hf_adapter, save_checkpoint
from statelens.models.gla import GLAConfig, GLALM
from statelens.models.hooks import HookPoint, hooks
from statelens.models.mamba1 import Mamba1Config, Mamba1LM
from statelens.models.mamba2 import Mamba2Config, Mamba2LM
from statelens.models.rwkv7 import RWKV7LM, RWKV7Config

__all__ = ["Checkpoint", "GLAConfig", "GLALM", "HookPoint", "Mamba1Config", "Mamba1LM", "Mamba2Config", "Mamba2LM", "RecurrentLM", "RWKV7Config", "RWKV7LM",
           "State", "backends", "hooks", "load_checkpoint", "load_hf_adapter", "save_checkpoint"]
