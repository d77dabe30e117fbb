"""Training-free mitigations of state collapse (Chen et al., 2024, "Stuffed Mamba"; DESIGN.md, "State
collapse").

A mitigation modifies a loaded model in place and keeps the :class:`~statelens.models.base.RecurrentLM`
protocol, so every rollout, analysis and task runs on the mitigated model unchanged::

    mitigation = parse_mitigation("window:r=256")      # the CLI's --mitigation
    with apply_mitigation(model, mitigation):           # or: handle = apply_mitigation(...); handle.remove()
        df = remembrance(model, tokens, T=8192)

The three mitigations, per layer and head (``alpha_t`` the decay, ``B_t`` the input, ``h_t`` the SSM
state after token t, read out by ``C_t``):

- ``scale:alpha=A,B=S`` (both optional, default 1, > 0): retention and insertion scaling,
  ``alpha_t -> A * alpha_t`` and ``B_t -> S * B_t``. Mamba-2 and Mamba-1: ``alpha_t = exp(dt_t * A)``,
  ``B_t`` the input projection (``dt_t * x_t`` and the ``D * x_t`` skip unchanged); GLA: the gate
  ``alpha_t = exp(gk_t)`` (per key dimension) and the keys. Done by patching ``hook_decay`` and
  ``hook_B``, so it is exact in every chunked path. On Mamba-1 the patched decay is materialised,
  ``[batch, chunk, d_inner, d_state]`` per call.
- ``cap:multiplier=M[,at=token|call]`` (M > 0): per-head state-norm cap. The threshold of each (layer,
  head) is ``tau = M * max ||h_p||_F``, the largest Frobenius norm of the head's state over the
  positions ``p = 1 .. T`` of the calibration sequences (their first T tokens; T the training
  length), run unmitigated. ``at=token`` (the default, the paper's): after every token's update,
  ``h_t -> h_t * min(1, tau / ||h_t||)``; the output at t reads the capped state and the capped state is
  carried. This is a Python loop over tokens in every layer (and so is the calibration). ``at=call``:
  the chunked scan runs uncapped and only the state carried out of each forward call is capped,
  i.e. every ``--chunk`` tokens of a rollout and at its recording and reset positions; outputs inside
  a call read uncapped states, so the result depends on the chunking. Mamba-1 heads are its groups of
  ``head_channels`` channels (see ``Mamba1LM.head_channels``).
- ``window:r=R`` (R >= 1): sliding window by state difference. The state each output reads, and the
  state carried, is ``h_t^(r) = h_t - alpha_{t-r+1:t} h_{t-r}``: the contributions of the last r tokens
  only (states before the first token are zero). The convolution, the ``D`` skip and the gate are
  unchanged. It satisfies ``h_t^(r) = alpha_t h_{t-1}^(r) + u_t - alpha_{t-r+1:t} u_{t-r}`` with
  ``u_t = x_t B_t^T`` the token's insertion, and this is what runs: the backend's own chunked scan
  over twice the tokens, each token preceded by a step that removes the token leaving the window.
  The last r tokens' scan inputs are carried between calls in ``State.extra`` (per layer
  ``[batch, r, ...]``), so the result does not depend on the chunking. A non-zero initial state
  decays but is never removed (analyses start from zero). On Mamba-1 the decay differs per (channel,
  state index), so the removal is a full input: ``[batch, 2 * chunk, d_inner, d_state]`` per call.
  A backend whose transition is not diagonal (RWKV-7's ``diag(alpha_t) - b_t kk_t^T``) declares
  ``ScanAdapter.no_window`` instead, and the window is refused in one line with that reason.

Hook points keep their meaning on the modified model: ``hook_state`` sees the state that is carried
(capped, or the window's ``h_t^(r)``), ``hook_state_blocks`` the same state at block starts.

Nothing here knows an architecture: what a backend contributes (where its scan lives and where decay
and input enter, its recurrence a token at a time, its window scan) is the
:class:`~statelens.models.base.ScanAdapter` declared in its file; a backend without one is refused.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Self

import numpy as np
import torch
import torch.nn.functional as F

from statelens.errors import BadInput
from statelens.models.base import RecurrentLM, ScanAdapter, State, backends
from statelens.models.hooks import hooks


# -- specs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    """Retention and insertion scaling: alpha_t -> alpha * alpha_t, B_t -> B * B_t."""

    alpha: float = 1.0
    B: float = 1.0
    kind: ClassVar[str] = "scale"

    def check(self) -> str | None:
        bad = [f"{f}={v:g}" for f, v in (("alpha", self.alpha), ("B", self.B)) if not (0 < v < math.inf)]
        return f"{', '.join(bad)} must be positive and finite" if bad else None


@dataclass(frozen=True)
class Cap:
    """Per-head state-norm cap at ``multiplier`` x the head's largest in-context state norm."""

    multiplier: float
    at: str = "token"
    kind: ClassVar[str] = "cap"

    def check(self) -> str | None:
        if not 0 < self.multiplier < math.inf:
            return f"multiplier={self.multiplier:g} must be positive and finite"
        if self.at not in ("token", "call"):
            return f"at={self.at!r} must be token or call"
        return None


@dataclass(frozen=True)
class Window:
    """Sliding window by state difference over the last ``r`` tokens."""

    r: int
    kind: ClassVar[str] = "window"

    def check(self) -> str | None:
        return None if self.r >= 1 else f"r={self.r} must be >= 1"


Mitigation = Scale | Cap | Window
KINDS: dict[str, type] = {"scale": Scale, "cap": Cap, "window": Window}
EXAMPLES = "e.g. scale:alpha=0.99,B=0.5, cap:multiplier=1.5, cap:multiplier=1.5,at=call, window:r=256"


def spec(mitigation: Mitigation) -> str:
    """The canonical spec string, e.g. ``cap:multiplier=1.5,at=token``."""
    values = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in asdict(mitigation).items())
    return f"{mitigation.kind}:{values}"


def parse_mitigation(text: str) -> Mitigation:
    """``"window:r=256"`` -> ``Window(r=256)``; BadInput (one line, naming ``--mitigation``) if malformed."""
    def bad(why: str) -> BadInput:
        return BadInput(f"--mitigation {text!r}: {why} ({EXAMPLES})")

    kind, _, rest = text.strip().partition(":")
    cls = KINDS.get(kind.strip().lower())
    if cls is None:
        raise bad(f"unknown mitigation {kind.strip()!r}; expected one of {', '.join(KINDS)}")
    types = {f.name.lower(): (f.name, f.type) for f in fields(cls)}
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if key.lower() not in types or not eq:
            raise bad(f"{item!r} is not one of {', '.join(f'{n}=...' for n, _ in types.values())}")
        name, typ = types[key.lower()]
        if name in values:
            raise bad(f"{name} given twice")
        try:
            values[name] = {"float": float, "int": int}.get(typ, str)(value)
        except ValueError:
            raise bad(f"{name}={value!r} is not {'an integer' if typ == 'int' else 'a number'}")
    try:
        mitigation = cls(**values)
    except TypeError:  # a required value missing
        missing = [f.name for f in fields(cls) if f.name not in values]
        raise bad(f"{kind} needs {', '.join(f'{m}=...' for m in missing)}")
    why = mitigation.check()
    if why:
        raise bad(why)
    return mitigation


# -- applying ----------------------------------------------------------------------------------------

class Applied:
    """A mitigation in force on a model; ``remove()`` (or leaving the ``with`` block) restores it.

    ``thresholds`` [layers, heads]: the cap's tau (None for the other mitigations).
    """

    def __init__(self, model: RecurrentLM, mitigation: Mitigation):
        self.model = model
        self.mitigation = mitigation
        self.thresholds: torch.Tensor | None = None
        self.calibration: dict = {}
        self._undo: list = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def summary(self) -> dict:
        """What run.json records: the spec, and for the cap its calibration and thresholds."""
        out = {"spec": spec(self.mitigation), "kind": self.mitigation.kind, **asdict(self.mitigation)}
        if self.thresholds is not None:
            out |= {"calibration": self.calibration, "thresholds": self.thresholds.tolist()}
        return out


def apply_mitigation(
    model: RecurrentLM,
    mitigation: Mitigation | str,
    *,
    calibration: np.ndarray | torch.Tensor | None = None,
    train_len: int | None = None,
    chunk: int = 2048,
) -> Applied:
    """Applies ``mitigation`` (a spec or its string) to ``model`` in place, now; returns the handle.

    The cap needs ``calibration`` tokens [n, length] (or [length]) and ``train_len`` T: its thresholds
    come from the unmitigated states at positions 1 .. min(T, length), rolled out ``chunk`` tokens
    per call.
    """
    if isinstance(mitigation, str):
        mitigation = parse_mitigation(mitigation)
    adapter = getattr(model, "scan_adapter", None)
    if adapter is None:
        able = [name for name in backends.names() if backends.get(name).scan_adapter is not None]
        raise BadInput(f"--mitigation {spec(mitigation)}: needs a native backend ({', '.join(able)}), "
                       f"got {model.arch or type(model).__name__}")
    if getattr(model, "mitigation", None) is not None:
        raise BadInput(f"--mitigation {spec(mitigation)}: the model already has a mitigation applied "
                       f"({spec(model.mitigation.mitigation)})")
    if isinstance(mitigation, Window) and adapter.window is None:
        raise BadInput(f"--mitigation {spec(mitigation)}: not exact on {model.arch}: {adapter.no_window}")
    applied = Applied(model, mitigation)
    model.mitigation = applied
    applied._undo.append(lambda: model.__dict__.pop("mitigation", None))
    try:
        if isinstance(mitigation, Scale):
            _apply_scale(applied, mitigation, adapter)
        elif isinstance(mitigation, Cap):
            _apply_cap(applied, mitigation, adapter, calibration, train_len, chunk)
        else:
            _apply_window(applied, mitigation, adapter)
    except BaseException:  # a failed calibration (or an interrupt) leaves the model as it was
        applied.remove()
        raise
    return applied


def _mixers(model: RecurrentLM, adapter: ScanAdapter) -> list:
    """The modules whose ``scan`` a mitigation replaces, one per layer."""
    return [getattr(block, adapter.mixer) for block in model.blocks]


def _set_scans(applied: Applied, mixers: list, scans: list) -> None:
    for mixer, scan in zip(mixers, scans):
        mixer.scan = scan
    applied._undo.append(lambda: [setattr(m, "scan", None) for m in mixers])


# -- scale -------------------------------------------------------------------------------------------

def _apply_scale(applied: Applied, m: Scale, adapter: ScanAdapter) -> None:
    context = hooks(applied.model, [(f"blocks.*.{adapter.decay_hook}", lambda alpha, hook: alpha * m.alpha),
                                    (f"blocks.*.{adapter.input_hook}", lambda B, hook: B * m.B)])
    context.__enter__()
    applied._undo.append(lambda: context.__exit__(None, None, None))


# -- cap ---------------------------------------------------------------------------------------------

def _shrink(state: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """state [b, H, ...] (heads second) -> (its per-head norms [b, H], the factors min(1, tau / norm) [b, H])."""
    norms = state.flatten(2).norm(dim=-1)
    return norms, torch.where(norms > tau, tau / norms, torch.ones_like(norms))


def _by_head(t: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """t [b, ...] with its non-batch part laid out heads first, times factors [b, H] per head."""
    b, H = factors.shape
    return (t.reshape(b, H, -1) * factors[..., None]).reshape(t.shape)


class CapScan:
    """A scan that caps each head's state norm at ``tau`` [heads] after every token (Python loop).

    Until ``tau`` is set it caps nothing and records ``seen`` [heads], the largest norm of every state
    it produced (the calibration). ``steps(*the backend scan's arguments)`` (the backend's
    ``ScanAdapter.steps``) gives ``step(t, state) -> (y_t, state)``, one token of the backend's
    recurrence, with the initial state, the length and the block length of the block states to return
    (Mamba-2's) or None.
    """

    def __init__(self, steps, n_heads: int):
        self.steps, self.n_heads = steps, n_heads
        self.tau: torch.Tensor | None = None
        self.seen = torch.zeros(n_heads, dtype=torch.float64)

    def __call__(self, *args, **kwargs):
        step, state, length, block = self.steps(*args, **kwargs)
        calibrating = self.tau is None
        tau = torch.full((self.n_heads,), math.inf) if calibrating else self.tau
        tau = tau.to(state.device, state.dtype)
        seen = torch.zeros(self.n_heads, device=state.device, dtype=state.dtype)
        ys, starts = [], []
        for t in range(length):
            if block and t % block == 0:
                starts.append(state)
            y, state = step(t, state)
            norms, factors = _shrink(state.reshape(state.shape[0], self.n_heads, -1), tau)
            if calibrating:
                seen = torch.maximum(seen, norms.amax(0))
            state, y = _by_head(state, factors), _by_head(y, factors)
            ys.append(y)
        self.seen = torch.maximum(self.seen, seen.cpu().double())
        y = torch.stack(ys, dim=1)
        return (y, state, torch.stack(starts, dim=1)) if block else (y, state)


class CallCapScan:
    """The exact chunked scan, then the cap on the state it returns (``at=call``)."""

    def __init__(self, chunked, tau: torch.Tensor):
        self.scan, self.tau = chunked, tau

    def __call__(self, *args, **kwargs):
        y, state, *blocks = self.scan(*args, **kwargs)
        tau = self.tau.to(state.device, state.dtype)
        _, factors = _shrink(state.reshape(state.shape[0], len(tau), -1), tau)
        return (y, _by_head(state, factors), *blocks)


def _apply_cap(applied: Applied, m: Cap, adapter: ScanAdapter, calibration, train_len: int | None,
               chunk: int) -> None:
    from statelens.record.rollout import as_batch, rollout

    model = applied.model
    if calibration is None or train_len is None:
        raise BadInput(f"--mitigation {spec(m)}: the cap needs calibration sequences and the training length")
    tokens = as_batch(calibration)[:, :train_len]
    mixers = _mixers(model, adapter)
    scans = [CapScan(adapter.steps, model.n_heads) for _ in mixers]
    _set_scans(applied, mixers, scans)
    for _ in rollout(model, tokens, chunk=chunk):
        pass
    applied.thresholds = m.multiplier * torch.stack([s.seen for s in scans])      # [layers, heads]
    applied.calibration = {"sequences": int(tokens.shape[0]), "positions": int(tokens.shape[1]),
                           "statistic": "max state norm over positions 1..T and sequences"}
    for scan, tau in zip(scans, applied.thresholds):
        scan.tau = tau
    if m.at == "call":
        for mixer, tau in zip(mixers, applied.thresholds):
            mixer.scan = CallCapScan(adapter.chunked, tau)


# -- window ------------------------------------------------------------------------------------------

class WindowScan:
    """A backend's chunked scan with the sliding window by state difference over ``r`` tokens: its
    ``ScanAdapter.window``, handed :meth:`_extend`.

    ``history`` [b, r, width]: the last r tokens' scan inputs, oldest first (zeros: no token), set
    before each call and replaced by it (see :func:`_apply_window`).
    """

    def __init__(self, window, r: int):
        self.window, self.r = window, r
        self.history: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        return self.window(self._extend, *args, **kwargs)

    def _extend(self, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each [b, l, ...] part with its r history tokens prepended; and the log-decay of the window
        ending at each of the l tokens (the last part is the log-decay), [b, l, ...]."""
        b, l = parts[0].shape[:2]
        sizes = [math.prod(p.shape[2:]) for p in parts]
        history = self.history.split(sizes, dim=-1)
        extended = [torch.cat([h.reshape(b, self.r, *p.shape[2:]).to(p.dtype), p], dim=1)
                    for h, p in zip(history, parts)]
        self.history = torch.cat([e[:, -self.r:].flatten(2) for e in extended], dim=-1)
        # sum of the log-decays of tokens t-r+1 .. t, by a cumsum over r + l tokens (float64: no cancellation)
        cum = F.pad(extended[-1].double().cumsum(dim=1), (0, 0) * (parts[-1].dim() - 2) + (1, 0))
        window = (cum[:, self.r + 1:] - cum[:, 1:l + 1]).to(parts[-1].dtype)
        return [e[:, :l] for e in extended], window


def _apply_window(applied: Applied, m: Window, adapter: ScanAdapter) -> None:
    model = applied.model
    width = adapter.window_width(model.config)
    mixers = _mixers(model, adapter)
    scans = [WindowScan(adapter.window, m.r) for _ in mixers]
    _set_scans(applied, mixers, scans)
    plain_hidden, plain_zero_state = model.hidden, model.zero_state

    def zero_state(batch: int, *, device=None, dtype=None) -> State:
        """The backend's zero state, plus an empty window history per layer [batch, r, width]."""
        s = plain_zero_state(batch, device=device, dtype=dtype)
        ssm = s.ssm[0]
        return State(s.ssm, s.conv, tuple(ssm.new_zeros(batch, m.r, width) for _ in mixers))

    def hidden(tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The backend's ``hidden``, with each layer's history handed to its scan and collected back."""
        history = state.extra or zero_state(tokens.shape[0], device=state.ssm[0].device).extra
        for scan, h in zip(scans, history, strict=True):
            scan.history = h
        try:
            out, new = plain_hidden(tokens, State(state.ssm, state.conv))
            return out, State(new.ssm, new.conv, tuple(scan.history for scan in scans))
        finally:
            for scan in scans:
                scan.history = None

    model.hidden, model.zero_state = hidden, zero_state
    applied._undo.append(lambda: [model.__dict__.pop(name, None) for name in ("hidden", "zero_state")])
