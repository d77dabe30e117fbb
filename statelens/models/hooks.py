"""Hook points: named places inside a backend where a tensor can be observed or replaced.

Names follow TransformerLens: ``blocks.{layer}.hook_state``, ``blocks.{layer}.hook_decay``, ... A hook
is ``fn(tensor, *, hook) -> Tensor | None``: return None to observe, a tensor to patch. Each
:class:`HookPoint` knows its own ``name`` and ``layer``; nobody parses them out of strings.

Usage::

    with hooks(model, {"blocks.0.hook_state": fn}):
        model(tokens, state)
"""
from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from statelens.errors import BadInput

Hook = Callable[..., "torch.Tensor | None"]
NamesFilter = str | list[str] | tuple[str, ...] | Callable[[str], bool] | None


class HookPoint(nn.Module):
    """Identity module that runs the hooks attached to it, in order.

    ``layer`` is the block index (None for model-level points); ``name`` is filled in by
    :func:`name_hook_points` from the module path.
    """

    def __init__(self, layer: int | None = None):
        super().__init__()
        self.layer = layer
        self.name = ""
        self._hooks: list[Hook] = []

    @property
    def active(self) -> bool:
        """True when at least one hook is attached (backends skip optional work otherwise)."""
        return bool(self._hooks)

    def add(self, fn: Hook) -> None:
        self._hooks.append(fn)

    def remove(self, fn: Hook) -> None:
        self._hooks.remove(fn)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Skips nn.Module's call machinery: a hook point without hooks costs one attribute test.
        return self.forward(x) if self._hooks else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._hooks:
            out = fn(x, hook=self)
            if out is not None:
                x = out
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layer={self.layer}"


def name_hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Sets each HookPoint's ``name`` from its module path and returns them by name.

    Hook points live in a block's mixer; the public name drops the ``mixer`` component, so that
    ``blocks.3.mixer.hook_state`` is ``blocks.3.hook_state`` whatever the block's internals.
    """
    points = {}
    for path, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = ".".join(part for part in path.split(".") if part != "mixer")
            points[module.name] = module
    return points


def names_matcher(names: NamesFilter) -> Callable[[str], bool]:
    """Normalises a names filter: None (all), a glob string, a list of globs, or a predicate."""
    if names is None:
        return lambda name: True
    if callable(names):
        return names
    patterns = [names] if isinstance(names, str) else list(names)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


@contextlib.contextmanager
def hooks(model: nn.Module, fns: Mapping[str, Hook] | list[tuple[NamesFilter, Hook]]) -> Iterator[None]:
    """Attaches hooks for the duration of a ``with`` block; removes them even on error.

    ``fns`` maps a names filter (exact name or glob) to a hook, or is a list of (filter, hook) pairs.
    """
    points = name_hook_points(model)
    pairs = list(fns.items()) if isinstance(fns, Mapping) else list(fns)
    attached: list[tuple[HookPoint, Hook]] = []
    try:
        for names, fn in pairs:
            match = names_matcher(names)
            selected = [p for n, p in points.items() if match(n)]
            if not selected:
                raise BadInput(f"no hook point matches {names!r}; names look like {next(iter(points), '')!r}")
            for point in selected:
                point.add(fn)
                attached.append((point, fn))
        yield
    finally:
        for point, fn in attached:
            point.remove(fn)
