"""Recording hook tensors at chosen positions of a rollout, reduced on the fly or raw to disk.

In the spirit of TransformerLens' ``run_with_cache``::

    rec = record(model, tokens, names="blocks.*.hook_state", positions=256, chunk=2048)
    rec.stats          # DataFrame: position, seq, name, layer, head, norm, mean, std, absmax, finite

Positions follow DESIGN.md: position ``p`` is the number of tokens consumed. A state hook
(``hook_state``, ``hook_conv_state``) is read at ``p`` itself (the rollout cuts a chunk there); a
per-token hook (``hook_dt``, ``hook_decay``, ``hook_x``, ...) is read at the token that takes the model
from ``p - 1`` to ``p``.

Statistics are taken per head (the backend's ``by_head`` layout) and kept as small arrays; raw tensors
of the hooks named in ``raw`` stream into memory-mapped ``.npy`` files ``[n_positions, batch, ...]``,
so a 1M-token rollout never holds more than one chunk of activations.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from statelens.errors import ParameterError
from statelens.models import fused
from statelens.models.base import RecurrentLM, State
from statelens.models.hooks import HookPoint, NamesFilter, hooks, name_hook_points, names_matcher
from statelens.outputs import remove_stale_temporaries, temporary_name
from statelens.record.rollout import Chunk, as_batch, rollout

STATS = ("norm", "mean", "std", "absmax", "finite")
STATE_HOOKS = ("hook_state", "hook_conv_state")
BLOCK_HOOK = "hook_state_blocks"  # read by the recorder itself, not recorded as such
Keep = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]  # (hook name, [P, b, H, k]) -> {key: [P, b, ...]}


def resolve_positions(positions: int | Iterable[int], length: int) -> list[int]:
    """A stride ``s`` gives s, 2s, ... up to ``length``; a list is kept (sorted, deduplicated, in 1..length)."""
    if isinstance(positions, int):
        if positions < 1:
            raise ParameterError("positions", f"a recording stride must be >= 1, got {positions}")
        return list(range(positions, length + 1, positions))
    return sorted({int(p) for p in positions if 1 <= int(p) <= length})


def head_stats(x: torch.Tensor) -> torch.Tensor:
    """x [..., k] -> [..., 5]: Frobenius norm, mean, std (population), absmax, all-finite (1/0).

    Non-finite values are a finding: the statistics of such a head come out inf/NaN and finite = 0
    (absmax is finite exactly when every entry is). Computed in the input's precision (this runs at
    every recorded position of every layer); heads whose entries are finite but whose norm or moments
    overflow it are recomputed in float64, so a large finite state never reads as an infinite norm.
    """
    fast = fused.active() and x.device.type == "cpu"  # --compile: one fused pass, the same to rounding
    stats = (fused.dynamic(_moments) if fast else _moments)(x)
    overflow = torch.isfinite(stats[..., 3]) & ~torch.isfinite(stats[..., :3]).all(-1)
    if overflow.any():
        stats = stats.double()
        stats[overflow] = _moments(x[overflow].double())
    return stats


def _moments(x: torch.Tensor) -> torch.Tensor:
    std, mean = torch.std_mean(x, dim=-1, correction=0)
    low, high = torch.aminmax(x, dim=-1)
    absmax = torch.maximum(low.abs(), high.abs())
    return torch.stack([torch.linalg.vector_norm(x, dim=-1), mean, std, absmax, torch.isfinite(absmax).to(x.dtype)], -1)


@dataclass
class Recording:
    """What a recorder kept. ``stats`` columns: position, seq (batch row), name (hook kind, e.g.
    hook_state), layer, head, norm, mean, std, absmax, finite (bool). ``raw`` maps hook names to
    memory-mapped arrays [len(positions), batch, ...]. ``kept`` maps state hook names to what the
    recorder's ``keep`` returned, by key, as CPU tensors [len(positions), batch, ...]."""

    positions: list[int]
    stats: pd.DataFrame
    raw: dict[str, np.ndarray] = field(default_factory=dict)
    kept: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Recorder:
    """Attaches to a model's hook points for the duration of a ``with`` block; ``update(chunk)`` after
    each rollout chunk turns what the hooks saw into statistics and raw snapshots."""

    def __init__(self, model: RecurrentLM, *, names: NamesFilter, positions: list[int], batch: int,
                 raw: NamesFilter | None = None, raw_dir: str | Path | None = None, block: int | None = None,
                 keep: Keep | None = None):
        """``block``: read SSM states inside a call from the backend's ``hook_state_blocks`` every
        ``block`` tokens of it (the caller guarantees recorded positions fall on those boundaries).
        ``keep(name, by_head)``: called with each state hook's per-head states [P, b, H, k] at the
        recorded positions P of a chunk; the tensors it returns ([P, b, ...] each, by key) are kept in
        memory, in :attr:`Recording.kept` (e.g. each head's state, projected)."""
        self.model = model
        self.keep = keep
        self._kept: dict[str, dict[str, torch.Tensor]] = {}
        self.positions = positions
        self._index = {p: i for i, p in enumerate(positions)}
        self.batch = batch
        self.block = block
        points = name_hook_points(model)
        match = names_matcher(names)
        self.points: dict[str, HookPoint] = {
            n: p for n, p in points.items() if match(n) and not n.endswith(f".{BLOCK_HOOK}")}
        if not self.points:
            raise ParameterError("names", f"no hook point matches {names!r}")
        self._block_points = {n.replace(".hook_state", f".{BLOCK_HOOK}"): n for n in self.points
                              if block and n.endswith(".hook_state")}
        raw_match = names_matcher(raw) if raw is not None else (lambda n: False)
        self.raw_names = [n for n in self.points if raw_match(n)]
        if self.raw_names and raw_dir is None:
            raise ParameterError("raw_dir", "raw recording needs raw_dir")
        self.raw_dir = Path(raw_dir) if raw_dir is not None else None
        self._raw: dict[str, np.ndarray] = {}
        self._seen: dict[str, torch.Tensor] = {}
        self._block_seen: dict[str, tuple[list[int], torch.Tensor]] = {}  # hook_state name -> (positions, [b, P, ...])
        self._start = 0  # where the call now running began: the previous chunk's end
        # Per hook name, statistics [n_positions, batch, heads, 5], allocated once when the hook is first
        # seen: nothing long-lived is allocated between the rollout's large transient tensors, so the
        # heap does not fragment and memory stays flat over a 1M-token rollout.
        self._stats: dict[str, np.ndarray] = {}
        self._context = None

    def __enter__(self) -> Recorder:
        def stash(t: torch.Tensor, *, hook: HookPoint) -> None:
            self._seen[hook.name] = t.detach()

        def stash_blocks(t: torch.Tensor, *, hook: HookPoint) -> None:
            # t [b, c, ...]: entry j is the state after j * block tokens of the call. Keep only the
            # entries at recorded positions, at once: all of them for every layer would be large.
            wanted = [j for j in range(1, t.shape[1]) if self._start + j * self.block in self._index]
            self._block_seen[self._block_points[hook.name]] = (
                [self._start + j * self.block for j in wanted], t[:, wanted].detach().clone())

        pairs = [(list(self.points), stash)] + ([(list(self._block_points), stash_blocks)] if self._block_points else [])
        self._context = hooks(self.model, pairs)
        self._context.__enter__()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._context.__exit__(exc_type, *exc)
        for name, array in self._raw.items():  # raw arrays fill under temporary names: complete, then renamed
            array.flush()
            if exc_type is None:
                os.replace(array.filename, self.raw_dir / f"{name}.npy")
            else:
                Path(array.filename).unlink(missing_ok=True)

    def update(self, chunk: Chunk) -> None:
        """Reads what the hooks saw during ``chunk`` at the recording positions inside it."""
        states: dict[tuple, list[tuple[str, torch.Tensor]]] = {}  # state hooks, grouped to reduce at once
        for name, t in self._seen.items():
            kind = name.rsplit(".", 1)[-1]
            if kind in STATE_HOOKS:
                here, snapshot = self._states_in(chunk, name, t)             # [P, b, ...]
                if here:
                    by_head = self.model.by_head(name, snapshot.flatten(0, 1)).unflatten(0, snapshot.shape[:2])
                    states.setdefault((kind, tuple(here), tuple(by_head.shape)), []).append((name, by_head))
                    if self.keep is not None:
                        self._keep(name, here, self.keep(name, by_head))
                    if name in self.raw_names:
                        self._write_raw(name, here, snapshot)
                continue
            here = [p for p in self.positions if chunk.start < p <= chunk.end]
            if not here:
                continue
            local = torch.tensor([p - 1 - chunk.start for p in here], device=t.device)
            by_head = self.model.by_head(name, t).index_select(1, local).transpose(0, 1)  # [P, b, H, k]
            self._store(name, here, head_stats(by_head).cpu().numpy())
            if name in self.raw_names:
                self._write_raw(name, here, t.index_select(1, local).transpose(0, 1))
        for (_, here, _), group in states.items():  # one reduction for all layers: [layers, P, b, H, k]
            stats = head_stats(torch.stack([t for _, t in group])).cpu().numpy()
            for (name, _), values in zip(group, stats):
                self._store(name, list(here), values)
        self._seen.clear()
        self._block_seen.clear()
        self._start = chunk.end

    def _states_in(self, chunk: Chunk, name: str, final: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """The recorded positions of a state hook inside ``chunk`` and its states there [P, b, ...]:
        the block states kept by ``stash_blocks``, then the call's final state at ``chunk.end``."""
        here, states = self._block_seen.get(name, ([], final[:, :0]))
        here, picked = list(here), list(states.unbind(1))
        if chunk.end in self._index:
            here.append(chunk.end)
            picked.append(final)
        return here, torch.stack(picked) if picked else final[None, :0]

    def _store(self, name: str, here: list[int], values: np.ndarray) -> None:
        if name not in self._stats:
            self._stats[name] = np.full((len(self.positions), *values.shape[1:]), np.nan)
        rows = [self._index[p] for p in here]
        self._stats[name][rows[0]:rows[-1] + 1] = values

    def _keep(self, name: str, here: list[int], values: dict[str, torch.Tensor]) -> None:
        kept = self._kept.setdefault(name, {})
        rows = [self._index[p] for p in here]
        for key, value in values.items():
            if key not in kept:
                kept[key] = torch.full((len(self.positions), *value.shape[1:]), math.nan, dtype=value.dtype)
            kept[key][rows[0]:rows[-1] + 1] = value.cpu()

    def _write_raw(self, name: str, here: list[int], snapshot: torch.Tensor) -> None:
        if name not in self._raw:
            self.raw_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.raw_dir / f"{name}.npy")
            self._raw[name] = np.lib.format.open_memmap(
                temporary_name(self.raw_dir / f"{name}.npy"), mode="w+", dtype=np.float32,
                shape=(len(self.positions), *snapshot.shape[1:]))
        rows = [self._index[p] for p in here]
        self._raw[name][rows[0]:rows[-1] + 1] = snapshot.float().cpu().numpy()

    def result(self) -> Recording:
        """Builds ``stats`` ordered by (name, position, seq, layer, head) without a sort: the arrays of
        all layers of one hook kind are stacked in that order."""
        frames = []
        kinds: dict[str, list[str]] = {}
        for name in self._stats:
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(name)
        for kind in sorted(kinds):
            names = sorted(kinds[kind], key=lambda n: self.points[n].layer)
            values = np.stack([self._stats[n] for n in names], axis=2)       # [P, b, layers, H, 5]
            P, b, L, H, _ = values.shape
            layers = np.asarray([self.points[n].layer for n in names], dtype=np.int32)
            flat = values.reshape(-1, len(STATS))
            frames.append(pd.DataFrame({
                "position": np.repeat(np.asarray(self.positions, dtype=np.int64), b * L * H),
                "seq": np.tile(np.repeat(np.arange(b, dtype=np.int32), L * H), P),
                "name": pd.Categorical.from_codes(np.zeros(len(flat), dtype=np.int8), [kind]),
                "layer": np.tile(np.repeat(layers, H), P * b),
                "head": np.tile(np.arange(H, dtype=np.int32), P * b * L),
                **{s: flat[:, i] for i, s in enumerate(STATS[:-1])},
                "finite": flat[:, -1] == 1,
            }))
        columns = ["position", "seq", "name", "layer", "head", *STATS]
        stats = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        raw = {n: np.load(self.raw_dir / f"{n}.npy", mmap_mode="r") for n in self._raw}
        return Recording(self.positions, stats, raw, self._kept)


def record(
    model: RecurrentLM,
    tokens: np.ndarray | torch.Tensor,
    *,
    names: NamesFilter = "blocks.*.hook_state",
    positions: int | Iterable[int] = 256,
    chunk: int = 2048,
    raw: NamesFilter | None = None,
    raw_dir: str | Path | None = None,
    state: State | None = None,
    on_chunk: Callable[[Chunk], None] | None = None,
) -> Recording:
    """Rolls ``tokens`` ([length] or [batch, length]) through ``model`` and records the hooks matching
    ``names`` at ``positions`` (a stride or a list). ``on_chunk`` sees every chunk (progress bars, or
    a caller's own reductions of the logits)."""
    tokens = as_batch(tokens)
    batch, length = tokens.shape
    where = resolve_positions(positions, length)
    # Where the backend exposes its SSD block states and every position falls on a block boundary,
    # the rollout need not be cut at each position: block states are read inside a call.
    block = getattr(model, "state_block", None)
    selected = [n for n in name_hook_points(model) if names_matcher(names)(n)]
    conv_states = any(n.endswith(".hook_conv_state") for n in selected)  # read only at chunk ends
    if not (block and not conv_states and chunk % block == 0 and all(p % block == 0 for p in where)):
        block = None
    stops = [] if block else where
    with Recorder(model, names=names, positions=where, batch=batch, raw=raw, raw_dir=raw_dir, block=block) as rec:
        for piece in rollout(model, tokens, chunk=chunk, state=state, stops=stops):
            rec.update(piece)
            if on_chunk is not None:
                on_chunk(piece)
    return rec.result()


def layer_of(name: str) -> int:
    """``blocks.3.hook_state`` -> 3."""
    found = re.match(r"blocks\.(\d+)\.", name)
    if not found:
        raise ParameterError("name", f"{name!r} is not a per-layer hook point")
    return int(found.group(1))
