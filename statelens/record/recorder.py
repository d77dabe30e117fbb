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

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from statelens.models.base import RecurrentLM, State
from statelens.models.hooks import HookPoint, NamesFilter, hooks, name_hook_points, names_matcher
from statelens.record.rollout import Chunk, as_batch, rollout

STATS = ("norm", "mean", "std", "absmax", "finite")
STATE_HOOKS = ("hook_state", "hook_conv_state")


def resolve_positions(positions: int | Iterable[int], length: int) -> list[int]:
    """A stride ``s`` gives s, 2s, ... up to ``length``; a list is kept (sorted, deduplicated, in 1..length)."""
    if isinstance(positions, int):
        if positions < 1:
            raise ValueError(f"a recording stride must be >= 1, got {positions}")
        return list(range(positions, length + 1, positions))
    return sorted({int(p) for p in positions if 1 <= int(p) <= length})


def head_stats(x: torch.Tensor) -> torch.Tensor:
    """x [..., k] -> [..., 5]: Frobenius norm, mean, std (population), absmax, all-finite (1/0).

    Non-finite values are a finding: the statistics of such a head come out inf/NaN and finite = 0.
    Computed in float64, so a large but finite float32 state never reads as an infinite norm.
    """
    x = x.double()
    return torch.stack([
        torch.linalg.vector_norm(x, dim=-1), x.mean(-1), x.std(-1, correction=0), x.abs().amax(-1),
        torch.isfinite(x).all(-1).to(x.dtype),
    ], dim=-1)


@dataclass
class Recording:
    """What a recorder kept. ``stats`` columns: position, seq (batch row), name (hook kind, e.g.
    hook_state), layer, head, norm, mean, std, absmax, finite (bool). ``raw`` maps hook names to
    memory-mapped arrays [len(positions), batch, ...]."""

    positions: list[int]
    stats: pd.DataFrame
    raw: dict[str, np.ndarray] = field(default_factory=dict)


class Recorder:
    """Attaches to a model's hook points for the duration of a ``with`` block; ``update(chunk)`` after
    each rollout chunk turns what the hooks saw into statistics and raw snapshots."""

    def __init__(self, model: RecurrentLM, *, names: NamesFilter, positions: list[int], batch: int,
                 raw: NamesFilter | None = None, raw_dir: str | Path | None = None):
        self.model = model
        self.positions = positions
        self._index = {p: i for i, p in enumerate(positions)}
        self.batch = batch
        points = name_hook_points(model)
        match = names_matcher(names)
        self.points: dict[str, HookPoint] = {n: p for n, p in points.items() if match(n)}
        if not self.points:
            raise ValueError(f"no hook point matches {names!r}")
        raw_match = names_matcher(raw) if raw is not None else (lambda n: False)
        self.raw_names = [n for n in self.points if raw_match(n)]
        if self.raw_names and raw_dir is None:
            raise ValueError("raw recording needs raw_dir")
        self.raw_dir = Path(raw_dir) if raw_dir is not None else None
        self._raw: dict[str, np.ndarray] = {}
        self._seen: dict[str, torch.Tensor] = {}
        self._rows: list[tuple[str, int, list[int], np.ndarray]] = []  # (name, layer, positions, stats [P, b, H, 5])
        self._context = None

    def __enter__(self) -> Recorder:
        def stash(t: torch.Tensor, *, hook: HookPoint) -> None:
            self._seen[hook.name] = t.detach()

        self._context = hooks(self.model, [(list(self.points), stash)])
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
        for array in self._raw.values():
            array.flush()

    def update(self, chunk: Chunk) -> None:
        """Reads what the hooks saw during ``chunk`` at the recording positions inside it."""
        for name, t in self._seen.items():
            kind = name.rsplit(".", 1)[-1]
            if kind in STATE_HOOKS:
                if chunk.end not in self._index:
                    continue
                here, snapshot = [chunk.end], t[None]                     # [1, b, ...]
                by_head = self.model.by_head(name, t)[None]               # [1, b, H, k]
            else:
                here = [p for p in self.positions if chunk.start < p <= chunk.end]
                if not here:
                    continue
                local = torch.tensor([p - 1 - chunk.start for p in here], device=t.device)
                snapshot = t.index_select(1, local).transpose(0, 1)     # [P, b, ...]
                by_head = self.model.by_head(name, t).index_select(1, local).transpose(0, 1)  # [P, b, H, k]
            self._rows.append((name, self.points[name].layer, here, head_stats(by_head).cpu().numpy()))
            if name in self.raw_names:
                self._write_raw(name, here, snapshot)
        self._seen.clear()

    def _write_raw(self, name: str, here: list[int], snapshot: torch.Tensor) -> None:
        if name not in self._raw:
            self.raw_dir.mkdir(parents=True, exist_ok=True)
            self._raw[name] = np.lib.format.open_memmap(
                self.raw_dir / f"{name}.npy", mode="w+", dtype=np.float32,
                shape=(len(self.positions), *snapshot.shape[1:]))
        rows = [self._index[p] for p in here]
        self._raw[name][rows[0]:rows[-1] + 1] = snapshot.float().cpu().numpy()

    def result(self) -> Recording:
        frames = []
        for name, layer, here, values in self._rows:
            P, b, H, _ = values.shape
            frame = pd.DataFrame(values.reshape(-1, len(STATS)), columns=STATS)
            frame.insert(0, "position", np.repeat(here, b * H))
            frame.insert(1, "seq", np.tile(np.repeat(np.arange(b), H), P))
            frame.insert(2, "name", name.rsplit(".", 1)[-1])
            frame.insert(3, "layer", layer)
            frame.insert(4, "head", np.tile(np.arange(H), P * b))
            frames.append(frame)
        columns = ["position", "seq", "name", "layer", "head", *STATS]
        stats = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        stats["finite"] = stats["finite"].astype(bool)
        stats = stats.sort_values(["name", "position", "seq", "layer", "head"], kind="stable", ignore_index=True)
        raw = {n: np.load(self.raw_dir / f"{n}.npy", mmap_mode="r") for n in self._raw}
        return Recording(self.positions, stats, raw)


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
    with Recorder(model, names=names, positions=where, batch=batch, raw=raw, raw_dir=raw_dir) as rec:
        for piece in rollout(model, tokens, chunk=chunk, state=state, stops=where):
            rec.update(piece)
            if on_chunk is not None:
                on_chunk(piece)
    return rec.result()


def layer_of(name: str) -> int:
    """``blocks.3.hook_state`` -> 3."""
    found = re.match(r"blocks\.(\d+)\.", name)
    if not found:
        raise ValueError(f"{name!r} is not a per-layer hook point")
    return int(found.group(1))
