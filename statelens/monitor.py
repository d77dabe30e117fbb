"""Watching the recurrent state while a model trains: :class:`StateMonitor`.

The failure past the training length T shows in the state before it shows in the loss (Buitrago Ruiz &
Gu, 2025; Chen et al., 2024). The monitor runs a small fixed probe of token sequences ``[n, L]``,
L >= 2T, through the model being trained, in eval mode and without gradients, and returns one tidy
row per number, each computed by the library's own analysis on the current weights:

=================== ========================================================================= ===========
metric              value                                                                     analysis
=================== ========================================================================= ===========
loss_in_context     mean next-token NLL (nats) of the predictions at positions p in [1, T]    positionwise
loss_beyond         the same over positions p in [T + 1, L - 1]                               positionwise
state_norm_ratio    per layer and head: mean state norm at position L / at position T         states
state_std_ratio     per layer and head: mean state std at position L / at position T          states
state_collapsed     per layer and head: 1 when a ratio exceeds ``collapse_k`` (2) or the      collapse
                    state turned non-finite at L, else 0 (the heads that cross the threshold)
effrem              per t: EffRem_L(t), horizon the probe length L (default t = T/8, T/2)     remembrance
oos_fraction        per layer and head: share of the n end-of-probe states (position L)       coverage
                    outside the support of the states at positions <= T
=================== ========================================================================= ===========

Columns: step, metric, layer, head, t, value; layer, head and t are NaN where they do not apply.

**The out-of-support reference is refitted every ``refit_every`` calls** (default 10): on those calls
the per-head support (PCA and k-NN threshold, :class:`statelens.analysis.coverage.Support`) is fitted on
the current states at the recorded positions stride, 2 stride, ... <= T and T; on the calls between, the
current end-of-probe states are scored against the last fitted support, so the fraction also moves when
the weights move the states away from where they were. On a refit call it equals
:func:`statelens.analysis.coverage.out_of_support` of this call's states.

Cost: one rollout of the probe, cut at the recorded positions, gives the losses, the states and their
statistics; EffRem adds its truncated rollouts (:func:`statelens.analysis.remembrance.remembrance`).

Memory: the monitor keeps its probe, its settings and the last fitted supports (per head, the reference
points in PCA coordinates), never anything per call; :meth:`StateMonitor.step` writes its rows to
``out`` and keeps none.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from statelens.analysis.collapse import collapse
from statelens.analysis.coverage import Support, StateSample, head_support, record_states
from statelens.analysis.positionwise import bucket_losses
from statelens.analysis.remembrance import remembrance
from statelens.analysis.states import recording_cubes, stats_from_cubes
from statelens.errors import ParameterError
from statelens.models.base import RecurrentLM
from statelens.outputs import write_table

COLUMNS = ["step", "metric", "layer", "head", "t", "value"]
METRICS = ("loss_in_context", "loss_beyond", "state_norm_ratio", "state_std_ratio", "state_collapsed", "effrem",
           "oos_fraction")


class StateMonitor:
    """A training-time monitor of the recurrent state on a fixed probe (module docstring).

    ``model``: a statelens ``RecurrentLM``, a transformers model (wrapped with :func:`statelens.wrap`
    afresh at every call, so the numbers follow the training weights wherever the trainer moved them),
    or a checkpoint directory or hub id (:func:`statelens.load`, loaded once). ``probe`` [n, L] int,
    L >= 2 ``train_len``. ``every``: the cadence of :meth:`step`. ``out``: the CSV :meth:`step` appends
    to. ``effrem_ts``: the EffRem truncation points (default T/8 and T/2). ``stride``: positions
    recorded within T for the out-of-support reference (default T // 16, at least 1). ``k``,
    ``components``, ``quantile``, ``projection_dim``, ``seed``: as in
    :func:`statelens.analysis.coverage.coverage`. ``collapse_k``: the k of
    :func:`statelens.analysis.collapse.collapse` (positions T and L). ``chunk``, ``batch``: rollout chunk and EffRem rows per
    forward. Every refusal is a :class:`~statelens.errors.ParameterError` raised here, never mid-training.
    """

    def __init__(self, model, probe, *, train_len: int, every: int = 200, out: str | os.PathLike | None = None,
                 effrem_ts: Sequence[int] | None = None, refit_every: int = 10, stride: int | None = None,
                 k: int = 5, components: int = 16, quantile: float = 0.99, projection_dim: int = 256,
                 seed: int = 0, chunk: int = 2048, batch: int = 32, collapse_k: float = 2.0):
        self.probe = _checked_probe(probe, train_len)
        for name, value in (("every", every), ("refit_every", refit_every), ("stride", stride or 1),
                            ("k", k), ("components", components), ("projection_dim", projection_dim)):
            if int(value) < 1:
                raise ParameterError(name, f"{name} must be a positive integer, got {value}")
        if not collapse_k > 0:
            raise ParameterError("collapse_k", f"collapse_k must be positive, got {collapse_k}")
        self.train_len, self.every, self.refit_every = int(train_len), int(every), int(refit_every)
        self.collapse_k = float(collapse_k)
        self.length = self.probe.shape[1]
        default_ts = (max(1, self.train_len // 8), self.train_len // 2)
        self.effrem_ts = sorted({int(t) for t in (default_ts if effrem_ts is None else effrem_ts)})
        if not self.effrem_ts or self.effrem_ts[0] < 1 or self.effrem_ts[-1] >= self.length:
            raise ParameterError("effrem_ts", f"EffRem truncation points must lie in [1, {self.length - 1}], "
                                              f"got {self.effrem_ts}")
        stride = stride or max(1, self.train_len // 16)
        # the reference positions stride, 2 stride, ... <= T, then T (the ratios' denominator), then L
        self.reference = sorted({*range(stride, self.train_len + 1, stride), self.train_len})
        self.positions = [*self.reference, self.length]
        self.support_options = {"k": k, "components": components, "quantile": quantile}
        self.record_options = {"projection_dim": projection_dim, "seed": seed, "chunk": chunk}
        self.batch, self.out = batch, None if out is None else Path(out)
        self.source = model
        self.fixed = _fixed_model(model)   # None: a transformers model, wrapped at every call
        self.calls = 0
        self.supports: list[list[Support | None]] = []
        if self.fixed is None:
            import statelens

            statelens.wrap(model, check=True)  # refuses a model it cannot carry state for, now

    def model(self) -> RecurrentLM:
        """The ``RecurrentLM`` on the current weights."""
        if self.fixed is not None:
            return self.fixed
        import statelens

        return statelens.wrap(self.source, check=False)

    def due(self, step: int) -> bool:
        """Whether :meth:`step` measures at ``step``: every ``every`` steps, from 0."""
        return step % self.every == 0

    def __call__(self, step: int) -> pd.DataFrame:
        """All metrics on the current weights, as rows labelled ``step`` (columns as COLUMNS)."""
        model = self.model()
        with _evaluating([self.source, model] if isinstance(self.source, torch.nn.Module) else [model]):
            sample, recording = record_states(model, self.probe, positions=self.positions, **self.record_options)
            stats = stats_from_cubes([recording_cubes(recording, len(self.probe))])
            stats = stats[stats.position.isin([self.train_len, self.length])]
            effrem = remembrance(model, self.probe, T=self.length, ts=self.effrem_ts,
                                 chunk=self.record_options["chunk"], batch=self.batch)
        if self.calls % self.refit_every == 0:
            self.supports = self._fit(sample)
        self.calls += 1
        rows = [*self._losses(sample), *_ratios(stats, self.train_len, self.length),
                *_collapsed(stats, self.train_len, self.collapse_k),
                *(("effrem", np.nan, np.nan, t, v) for t, v in zip(effrem.t, effrem.effrem) if t != 0),
                *self._oos(sample)]
        df = pd.DataFrame(rows, columns=COLUMNS[1:]).astype({c: np.float64 for c in COLUMNS[2:]})
        return pd.concat([pd.DataFrame({"step": np.full(len(df), int(step), dtype=np.int64)}), df], axis=1)

    def step(self, step: int) -> pd.DataFrame:
        """At a due ``step``: the metrics, also appended to ``out`` when set (atomically, the rows of steps
        >= ``step`` already there dropped first, so a rerun from an earlier step resumes cleanly). At
        other steps: an empty table with the same columns."""
        if not self.due(step):
            return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "step" else object if c == "metric"
                                              else np.float64) for c in COLUMNS})
        df = self(step)
        if self.out is not None:
            append_rows(self.out, df, step)
        return df

    def _losses(self, sample: StateSample) -> list[tuple]:
        """The two loss rows from the summed NLL of the probe's rollout [L]."""
        edges = np.array([1, self.train_len + 1, self.length])
        loss = bucket_losses(sample.nll, sample.n_seqs, edges).loss.to_numpy()
        return [("loss_in_context", np.nan, np.nan, np.nan, loss[0]), ("loss_beyond", np.nan, np.nan, np.nan, loss[1])]

    def _fit(self, sample: StateSample) -> list[list[Support | None]]:
        """Per layer and head, the support of the states at the recorded positions <= T."""
        ref = slice(0, len(self.positions) - 1)
        return [[head_support(states[:, ref, h].reshape(-1, states.shape[-1]), **self.support_options)[0]
                 for h in range(states.shape[2])] for states in sample.states]

    def _oos(self, sample: StateSample) -> list[tuple]:
        """Per layer and head, the share of end-of-probe states [n, d] outside the last fitted support."""
        rows = []
        for layer, states in enumerate(sample.states):                      # states [n, P, H, d]
            for h in range(states.shape[2]):
                support = self.supports[layer][h]
                value = support.score(states[:, -1, h])["oos_fraction"] if support else np.nan
                rows.append(("oos_fraction", layer, h, np.nan, value))
        return rows


def _checked_probe(probe, train_len: int) -> np.ndarray:
    """probe as an int64 array [n, L], checked: L >= 2 train_len, train_len >= 2."""
    array = np.asarray(probe.cpu() if isinstance(probe, torch.Tensor) else probe)
    if array.ndim != 2 or not array.size or not np.issubdtype(array.dtype, np.integer):
        raise ParameterError("probe", f"probe must be an int array [n, length], got {array.dtype} of shape "
                                      f"{array.shape}")
    if int(train_len) < 2:
        raise ParameterError("train_len", f"train_len must be >= 2, got {train_len}")
    if array.shape[1] < 2 * int(train_len):
        raise ParameterError("probe", f"probe holds {array.shape[1]} tokens per sequence, fewer than 2 x "
                                      f"train_len = {2 * int(train_len)}")
    return array.astype(np.int64)


def _fixed_model(model) -> RecurrentLM | None:
    """A statelens model as it is, a checkpoint loaded; None for an in-memory model to wrap."""
    if isinstance(model, RecurrentLM):
        return model
    if isinstance(model, (str, os.PathLike)):
        import statelens

        return statelens.load(model)
    return None


@contextlib.contextmanager
def _evaluating(roots: list[torch.nn.Module]) -> Iterator[None]:
    """Every module under ``roots`` in eval mode and no gradients, each module's own mode restored after."""
    modes = {m: m.training for root in roots for m in root.modules()}
    try:
        for root in roots:
            root.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def _ratios(stats: pd.DataFrame, train_len: int, length: int) -> list[tuple]:
    """state_stats at positions [T, L] -> per layer and head the norm and std ratios, L over T."""
    at_t = stats[stats.position == train_len].set_index(["layer", "head"])
    at_end = stats[stats.position == length].set_index(["layer", "head"])
    rows = []
    for metric, column in (("state_norm_ratio", "norm"), ("state_std_ratio", "std")):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = at_end[column] / at_t[column]
        rows += [(metric, layer, head, np.nan, value) for (layer, head), value in ratio.items()]
    return rows


def log_values(df: pd.DataFrame, prefix: str = "statelens/") -> dict[str, float]:
    """The rows of one call as a logger's flat dict: ``{prefix}{metric}``, then ``/layer{l}/head{h}`` or
    ``/t{t}`` where those apply, e.g. ``statelens/state_norm_ratio/layer1/head3``, ``statelens/effrem/t8``."""
    values = {}
    for row in df.itertuples():
        key = prefix + row.metric
        key += "" if np.isnan(row.layer) else f"/layer{int(row.layer)}/head{int(row.head)}"
        key += "" if np.isnan(row.t) else f"/t{int(row.t)}"
        values[key] = float(row.value)
    return values


def __getattr__(name: str):
    """``StateMonitorCallback`` (:mod:`statelens.monitor_hf`) and ``StateMonitorLightningCallback``
    (:mod:`statelens.monitor_lightning`), imported on first use: they subclass transformers' and Lightning's
    callbacks, and both packages are optional (importing this module must not need them)."""
    if name == "StateMonitorCallback":
        from statelens.monitor_hf import StateMonitorCallback

        return StateMonitorCallback
    if name == "StateMonitorLightningCallback":
        from statelens.monitor_lightning import StateMonitorLightningCallback

        return StateMonitorLightningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _collapsed(stats: pd.DataFrame, train_len: int, k: float) -> list[tuple]:
    """state_stats at positions [T, L] -> per layer and head 1.0 when it collapses past T, else 0.0."""
    heads = collapse(stats, train_len, k=k).sort_values(["layer", "head"], ignore_index=True)
    return [("state_collapsed", row.layer, row.head, np.nan, float(row.collapsed)) for row in heads.itertuples()]


def append_rows(out: Path, df: pd.DataFrame, step: int) -> None:
    """Writes ``out`` (CSV with a header) as its rows of steps < ``step`` followed by ``df``, atomically."""
    old = pd.read_csv(out) if out.exists() else None
    if old is not None and list(old.columns) != COLUMNS:
        raise ParameterError("out", f"{out}: not a monitor CSV (columns {list(old.columns)}, expected {COLUMNS})")
    keep = [] if old is None else [old[old.step < step].astype(df.dtypes.to_dict())]
    write_table(pd.concat([*keep, df], ignore_index=True), out)
