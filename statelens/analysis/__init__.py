"""Analyses: each a function from a model and token sequences (or a recording) to a tidy DataFrame.

Registered by name in :data:`analyses`; each lives in its own module and documents its columns.
"""
from statelens.registry import Registry

analyses: Registry = Registry("analysis")

from statelens.analysis import collapse, coverage, decay, positionwise, remembrance, states  # noqa: E402,F401
