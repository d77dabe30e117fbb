"""Inert stand-ins for ``triton``, so that flash-linear-attention's modules import on a machine without it.

Only for the oracle subprocess of tests/fla_oracle.py: installed there, never in the test process. No
kernel of fla can run with these (every one the oracle's forwards reach is swapped, tests/fla_swaps.py);
they only let ``@triton.jit``, ``@triton.autotune(...)``, ``tl.constexpr`` annotations, ``triton.Config``
lists and ``isinstance`` checks at import time evaluate to something.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types


class _Base:
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _Anything:
    """Any triton object at import time: calling, indexing or reading an attribute gives another."""

    __name__ = "triton_stand_in"

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        if name.startswith("__") or name == "driver":  # no driver: fla falls back to "cpu"
            raise AttributeError(name)
        return _Anything()

    def __getitem__(self, key):
        return _Anything()

    def __mro_entries__(self, bases):
        return (_Base,)


_CLASSES: dict[str, type] = {}


def _module_attribute(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if name[0].isupper():  # classes (isinstance checks, subclassing)
        return _CLASSES.setdefault(name, type(name, (_Base,), {}))
    return _Anything()


class _TritonStandIn:
    """A meta-path finder answering ``import triton`` (and submodules) with inert modules."""

    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_attribute
        module.__version__ = "3.4.0"
        return module

    def exec_module(self, module):
        pass


def install_triton_stand_ins() -> None:
    """Answers every later ``import triton`` / ``import triton.*`` in this process with a stand-in."""
    sys.meta_path.insert(0, _TritonStandIn())
