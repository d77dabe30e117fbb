"""State coverage: do the states reached past the training length lie inside the set of states the
model met in training? The quantitative test of the unexplored-states hypothesis (Buitrago Ruiz & Gu,
2025, "Understanding and Improving Length Generalization in Recurrent Models").

A model trained from the zero state on contexts of length T only sees the states of positions
p <= T. For each layer and head:

- **reference set**: the head's states at the recorded positions p <= T, over all sequences (regime
  "zero"); for a model post-trained with state passing or TBTT, the states along chains of T-token
  segments each started from the previous one's final state (:func:`collect_reference`);
- **query sets**: its states at the recorded positions p > T, one set per position bucket
  (:func:`~statelens.analysis.buckets.bucket_edges` over (T, L]).

:func:`out_of_support` compares a query set with a reference set: PCA fitted on the reference, then

- ``oos_fraction``: the share of query points whose k-th nearest reference neighbour (in PCA space) is
  farther than the ``quantile`` (0.99) of the reference's own leave-one-out k-NN distances. A query
  drawn from the reference's distribution gives about 1 - quantile; states the model never met, near 1;
- ``maha_median``, ``maha_p95``: Mahalanobis distance of the query points in PCA space, scaled by the
  reference's per-component variances (for Gaussian data about the chi distribution with
  ``components`` degrees of freedom);
- ``norm_ratio``: median state norm of the query over that of the reference, on the unprojected states.

:func:`coverage` puts this next to the loss of the same rollout in the same buckets, and correlates the
two over buckets (Spearman): if the hypothesis holds, the loss rises where the states leave the
reference's support.

**Random projection.** A head's state has ``kdim = headdim x d_state`` numbers (up to 8192), too many
to keep for every (sequence, position, layer, head). Each is projected as it is produced onto
``projection_dim`` (256) dimensions with one fixed Gaussian matrix ``R [kdim, projection_dim]``, entries
N(0, 1 / projection_dim), drawn from ``seed``, the same for every layer and head of that ``kdim``. By
Johnson-Lindenstrauss this keeps pairwise distances within a small relative error, which is all the
k-NN and PCA statistics need. Heads with ``kdim <= projection_dim`` are kept as they are. Norms for
``norm_ratio`` are taken on the unprojected states and kept separately. Memory is
O(N x recorded positions x layers x heads x projection_dim), never the raw states.

Axes: N sequences, L tokens each; P recorded positions; H heads per layer; d = min(kdim,
projection_dim); m reference points; q query points; D their dimension; c PCA components.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from statelens.analysis.buckets import bucket_edges, bucket_index
from statelens.analysis.positionwise import bucket_losses, position_losses
from statelens.analysis.spec import Analysis, Outcome, Plot, Section, Table, option
from statelens.errors import BadInput, ParameterError
from statelens.models.base import RecurrentLM
from statelens.record.recorder import Recorder, Recording
from statelens.record.rollout import as_batch, rollout

if TYPE_CHECKING:
    from statelens.runs import Run, RunSettings

HEAD_COLUMNS = ["pos_start", "pos_end", "layer", "head", "oos_fraction", "maha_median", "maha_p95", "norm_ratio",
                "n_query", "n_reference"]
BUCKET_COLUMNS = ["pos_start", "pos_end", "oos_fraction", "loss", "loss_increase"]
SCATTER_COLUMNS = ["pc1", "pc2", "position", "set"]
UNSCORED = ("oos_fraction", "maha_median", "maha_p95")  # NaN for a head with no finite reference to test against
REGIMES = ("zero", "state-passing", "tbtt")

STATE_HOOK = "blocks.*.hook_state"  # the hook points coverage records
# (work, costs) -> results: runs ``work[i](advance)`` (each returning a dict of arrays; ``costs[i]`` tokens)
RunGroups = Callable[[list[Callable], list[int]], list[dict]]
_BLOCK_ELEMENTS = 1 << 24   # distance-matrix entries computed at once (128 MiB in float64)


class CoverageInputError(ParameterError):
    """A parameter coverage cannot use; ``parameter`` names it (the command maps it to its option)."""


# -- support of a reference set --------------------------------------------------------------------

def _as_points(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """[n, D] float64 on the CPU."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to("cpu", torch.float64)
    if t.dim() != 2:
        raise CoverageInputError(name, f"{name} must be 2-D [points, dims], got shape {tuple(t.shape)}")
    return t


def _kth_distance(query: torch.Tensor, points: torch.Tensor, k: int, *, exclude_self: bool = False) -> torch.Tensor:
    """query [q, c], points [m, c] -> [q]: Euclidean distance to the k-th nearest point.

    ``exclude_self``: query is ``points`` itself and row i may not pick point i (leave-one-out; an exact
    duplicate of i elsewhere still counts at distance 0). Computed in blocks of rows, so memory is
    bounded whatever q and m; exact differences, not the |a|^2 - 2ab + |b|^2 shortcut, so that nearby
    points keep their distance.
    """
    out = []
    rows = max(1, _BLOCK_ELEMENTS // max(points.shape[0], 1))
    for first in range(0, query.shape[0], rows):
        block = query[first:first + rows]
        d = torch.cdist(block, points, compute_mode="donot_use_mm_for_euclid_dist")        # [b, m]
        if exclude_self:
            i = torch.arange(block.shape[0])
            d[i, first + i] = math.inf
        out.append(d.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(out) if out else torch.zeros(0, dtype=query.dtype)


@dataclass(frozen=True)
class Support:
    """A reference set's PCA and k-NN threshold: what :func:`out_of_support` scores queries against.

    mean [D], basis [D, c] (principal axes, each with its largest loading positive), variance [c]
    (per-component variance of the reference, unbiased), points [m, c] (the reference in PCA
    coordinates), threshold (the ``quantile`` of the reference's leave-one-out k-NN distances), k.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    variance: torch.Tensor
    points: torch.Tensor
    threshold: float
    k: int

    @classmethod
    def fit(cls, reference: np.ndarray | torch.Tensor, *, k: int = 5, components: int = 16,
            quantile: float = 0.99) -> Support:
        """reference [m, D] (m >= k + 2, finite) -> its support; c = min(components, m - 1, D)."""
        ref = _as_points(reference, "reference")
        m, dim = ref.shape
        if k < 1:
            raise CoverageInputError("k", f"k must be >= 1, got {k}")
        if components < 1:
            raise CoverageInputError("components", f"components must be >= 1, got {components}")
        if not 0 < quantile < 1:
            raise CoverageInputError("quantile", f"quantile must lie in (0, 1), got {quantile}")
        if m < k + 2:
            raise CoverageInputError("reference", f"the reference set holds {m} points; k-NN with k = {k} needs "
                                                  f"at least k + 2 = {k + 2}")
        if not torch.isfinite(ref).all():
            raise CoverageInputError("reference", "the reference set holds non-finite values")
        mean, basis, variance = _pca(ref, min(components, m - 1, dim))
        points = (ref - mean) @ basis                                                   # [m, c]
        loo = _kth_distance(points, points, k, exclude_self=True)                       # [m]
        threshold = float(np.quantile(loo.numpy(), quantile))
        return cls(mean, basis, variance, points, threshold, k)

    def project(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """x [q, D] -> [q, c] PCA coordinates (float64)."""
        return (_as_points(x, "query") - self.mean) @ self.basis

    def knn_distance(self, query: np.ndarray | torch.Tensor) -> np.ndarray:
        """query [q, D] -> [q] distance to the k-th nearest reference point in PCA space (inf where the
        query point is not finite)."""
        z = self.project(query)
        finite = torch.isfinite(z).all(1)
        d = torch.full((z.shape[0],), math.inf, dtype=torch.float64)
        d[finite] = _kth_distance(z[finite], self.points, self.k)
        return d.numpy()

    def outside(self, query: np.ndarray | torch.Tensor) -> np.ndarray:
        """query [q, D] -> [q] bool: k-NN distance above the threshold."""
        return self.knn_distance(query) > self.threshold

    def mahalanobis(self, query: np.ndarray | torch.Tensor) -> np.ndarray:
        """query [q, D] -> [q] Mahalanobis distance in PCA space. A tiny epsilon (1e-12 of the total
        variance) keeps zero-variance components finite."""
        eps = max(1e-12 * float(self.variance.sum()), 1e-30)
        z = self.project(query)
        d = (z.square() / (self.variance + eps)).sum(1).sqrt()
        return torch.where(torch.isfinite(z).all(1), d, math.inf).numpy()

    def score(self, query: np.ndarray | torch.Tensor) -> dict[str, float]:
        """query [q, D] -> oos_fraction, maha_median, maha_p95 (NaN for an empty query)."""
        if len(query) == 0:
            return {"oos_fraction": math.nan, "maha_median": math.nan, "maha_p95": math.nan}
        maha = self.mahalanobis(query)
        return {"oos_fraction": float(self.outside(query).mean()), "maha_median": _percentile(maha, 50),
                "maha_p95": _percentile(maha, 95)}


def _percentile(x: np.ndarray, q: float) -> float:
    """np.percentile (linear interpolation) of distances that may be infinite (exploded states), without
    the NaN that numpy's inf - inf gives when both neighbours of the quantile are infinite."""
    x = np.sort(x)
    at = q / 100 * (len(x) - 1)
    lo, frac = int(np.floor(at)), at - np.floor(at)
    if frac == 0:
        return float(x[lo])
    if np.isinf(x[lo + 1]):
        return math.inf
    return float(x[lo] + (x[lo + 1] - x[lo]) * frac)


def _pca(ref: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ref [m, D] float64 -> mean [D], basis [D, c], variance [c] (unbiased, descending)."""
    mean = ref.mean(0)
    _, s, vh = torch.linalg.svd(ref - mean, full_matrices=False)                      # vh [min(m, D), D]
    basis = vh[:c].T.clone()                                                           # [D, c]
    # SVD signs are arbitrary: make each axis's largest loading positive, so coordinates are reproducible.
    sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    basis *= torch.where(sign == 0, 1.0, sign)
    variance = s[:c].square() / max(ref.shape[0] - 1, 1)
    return mean, basis, variance


def _median_ratio(query_norms: np.ndarray, reference_norms: np.ndarray) -> float:
    """median(query_norms) / median(reference_norms); a NaN norm (a state that exploded) counts as inf."""
    if len(query_norms) == 0:
        return math.nan
    medians = [np.median(np.where(np.isnan(x), np.inf, x)) for x in (query_norms, reference_norms)]
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(medians[0]) / np.float64(medians[1]))


def out_of_support(reference: np.ndarray, query: np.ndarray, *, k: int = 5, components: int = 16,
                   quantile: float = 0.99) -> dict[str, float]:
    """reference [m, D], query [q, D] -> how far ``query`` lies outside the reference's support.

    Keys: oos_fraction (share of query points whose k-NN distance to the reference, in the reference's
    PCA space with c = min(components, m - 1, D), exceeds the ``quantile`` of the reference's own
    leave-one-out k-NN distances), maha_median and maha_p95 (Mahalanobis distance of the query in that
    PCA space), norm_ratio (median ||query|| / median ||reference||, on the vectors as given).
    Raises CoverageInputError (a BadInput and a ValueError) when m < k + 2.
    """
    support = Support.fit(reference, k=k, components=components, quantile=quantile)
    norms = [np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1) for x in (query, reference)]
    return support.score(query) | {"norm_ratio": _median_ratio(*norms)}


# -- head states along a rollout -------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def random_projection(kdim: int, dim: int, seed: int) -> torch.Tensor:
    """[kdim, dim] float64, entries N(0, 1 / dim): E ||x R||^2 = ||x||^2 (Johnson-Lindenstrauss).

    Cached (the last four shapes and seeds): drawing it costs as much as projecting a small sample, and a
    training monitor projects with the same matrix at every call. Read only: never modify it in place."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(kdim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)


@dataclass
class StateSample:
    """Head states recorded along one rollout, and its losses.

    positions [P] (recorded positions, ascending); states: per layer [N, P, H, d] (on the CPU; projected
    when kdim > projection_dim, else d = kdim); norms [N, P, layers, H] (Frobenius norms of the
    unprojected head states, float64); nll [L] (summed NLL over sequences per position p, as
    :func:`~statelens.analysis.positionwise.position_losses`); n_seqs N; length L; projected (whether a
    random projection was applied).
    """

    positions: np.ndarray
    states: list[torch.Tensor]
    norms: np.ndarray
    nll: np.ndarray
    n_seqs: int
    length: int
    projected: bool

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The sample as named numpy arrays (states as ``state_{layer}``), e.g. to save or gather it."""
        return {"positions": self.positions, "norms": self.norms, "nll": self.nll, "length": np.int64(self.length),
                "projected": np.bool_(self.projected)} | {f"state_{i}": s.numpy() for i, s in enumerate(self.states)}

    @classmethod
    def join(cls, parts: list[dict[str, np.ndarray]]) -> StateSample:
        """One sample from the :meth:`to_arrays` of consecutive groups of sequences (rows joined in order,
        summed NLL added in order)."""
        from statelens.resumable import sum_in_order

        first, layers = parts[0], sum(name.startswith("state_") for name in parts[0])
        states = [torch.from_numpy(np.concatenate([part[f"state_{i}"] for part in parts])) for i in range(layers)]
        norms = np.concatenate([part["norms"] for part in parts])
        return cls(first["positions"], states, norms, sum_in_order([part["nll"] for part in parts]), len(norms),
                   int(first["length"]), any(bool(part["projected"]) for part in parts))


def collect_states(model: RecurrentLM, sequences: np.ndarray | torch.Tensor, *, positions: list[int],
                   projection_dim: int = 256, chunk: int = 2048, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> StateSample:
    """sequences [N, L] -> each head's state at ``positions`` (in 1..L) from the zero state, projected
    as the module docstring says, plus the summed NLL per position from the same rollout.

    The rollout stops at every recorded position, where a :class:`~statelens.record.recorder.Recorder`
    reads each layer's ``hook_state`` and keeps it through :class:`_Projection`; ``progress(n)`` is told
    each time n more tokens have been consumed.
    """
    return record_states(model, sequences, positions=positions, projection_dim=projection_dim, chunk=chunk,
                         seed=seed, progress=progress)[0]


def record_states(model: RecurrentLM, sequences: np.ndarray | torch.Tensor, *, positions: list[int],
                  projection_dim: int = 256, chunk: int = 2048, seed: int = 0,
                  progress: Callable[[int], None] | None = None) -> tuple[StateSample, Recording]:
    """:func:`collect_states`, and the :class:`~statelens.record.recorder.Recording` it read them from,
    whose ``stats`` hold each sequence's unprojected state statistics at the same positions (what
    :func:`statelens.analysis.states.recording_cubes` reduces), so one rollout serves both."""
    sequences = as_batch(sequences if isinstance(sequences, np.ndarray) else sequences.cpu().numpy())
    n_seqs, length = sequences.shape
    positions = sorted({int(p) for p in positions})
    if not positions or positions[0] < 1 or positions[-1] > length:
        raise CoverageInputError("positions", f"recorded positions must lie in [1, {length}]")
    if projection_dim < 1:
        raise CoverageInputError("projection_dim", f"projection_dim must be >= 1, got {projection_dim}")
    projection = _Projection(projection_dim, seed)
    with Recorder(model, names=STATE_HOOK, positions=positions, batch=n_seqs, keep=projection) as recorder:
        nll = position_losses(model, sequences, chunk=chunk, stops=positions, progress=progress,
                              on_chunk=recorder.update)
    recording = recorder.result()
    return _sample(model, recording, projection.projected, nll, length), recording


class _Projection:
    """The ``keep`` of a :class:`~statelens.record.recorder.Recorder` that coverage records with: each
    head's state, projected as the module docstring says, and its norm before projecting."""

    def __init__(self, projection_dim: int, seed: int):
        self.projection_dim, self.seed = projection_dim, seed
        self.matrices: dict[int, torch.Tensor] = {}         # kdim -> R [kdim, d], on the model's device
        self.projected = False

    def __call__(self, name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [P, N, H, kdim] -> state [P, N, H, d] (at least float32), norm [P, N, H] (float64)."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        kdim = x.shape[-1]
        norm = torch.linalg.vector_norm(x.double(), dim=-1)
        if kdim > self.projection_dim:
            if kdim not in self.matrices:
                self.matrices[kdim] = random_projection(kdim, self.projection_dim, self.seed).to(x.device, x.dtype)
            x = x @ self.matrices[kdim]                                           # [P, N, H, d]
            self.projected = True
        return {"state": x, "norm": norm}


def _sample(model: RecurrentLM, recording, projected: bool, nll: np.ndarray, length: int) -> StateSample:
    """The :class:`StateSample` of a recording kept by :class:`_Projection` (per layer [P, N, ...] ->
    states [N, P, H, d], norms [N, P, layers, H])."""
    kept = [recording.kept[f"blocks.{i}.hook_state"] for i in range(model.n_layers)]
    states = [layer["state"].transpose(0, 1).contiguous() for layer in kept]
    norms = np.ascontiguousarray(torch.stack([layer["norm"] for layer in kept], dim=2).transpose(0, 1).numpy())
    return StateSample(np.asarray(recording.positions, dtype=np.int64), states, norms, nll, norms.shape[0], length,
                       projected)


def collect_reference(model: RecurrentLM, reference_sequences: np.ndarray | torch.Tensor, *, regime: str,
                      train_len: int, chain: int = 4, stride: int = 1, projection_dim: int = 256,
                      chunk: int = 2048, seed: int = 0, progress: Callable[[int], None] | None = None,
                      chains: slice = slice(None)) -> StateSample:
    """The states a model trained under ``regime`` ("state-passing" or "tbtt") met in training.

    reference_sequences [M, >= chain x train_len]: only the first chain x train_len tokens of each row
    are used, cut into ``chain`` segments of train_len tokens. Chain m runs segment 0, 1, ... chain - 1,
    segment j starting from the final state (SSM and convolution) of segment j - 1, the first from zero:

    - "tbtt": segment j of chain m is segment j of row m (consecutive chunks of one document: the same as
      rolling out the row's first chain x train_len tokens from zero);
    - "state-passing": segment j of chain m is segment j of row (m + j) mod M, so the segments of a
      chain come from different rows (unrelated sequences; needs M >= chain).

    Each head's state is recorded every ``stride`` tokens inside every segment (positions stride,
    2 stride, ... <= train_len within it, projected as :func:`collect_states`). The result has
    positions j x train_len + q (q those in-segment positions; P = chain x train_len // stride), states
    per layer [M, P, H, d] (row m: chain m), norms [M, P, layers, H], an all-zero nll. ``chains``: run only
    those chains m (rows of the result), e.g. one group of them at a time.
    """
    if regime not in ("state-passing", "tbtt"):
        raise CoverageInputError("regime", f"regime must be 'state-passing' or 'tbtt' here, got {regime!r}")
    if chain < 1:
        raise CoverageInputError("chain", f"chain must be >= 1, got {chain}")
    tokens = as_batch(reference_sequences if isinstance(reference_sequences, np.ndarray)
                      else reference_sequences.cpu().numpy())
    rows, have = tokens.shape
    if have < chain * train_len:
        raise CoverageInputError("reference_sequences", f"reference sequences hold {have} tokens, fewer than "
                                                        f"chain x train_len = {chain * train_len}")
    if regime == "state-passing" and rows < chain:
        raise CoverageInputError("reference_sequences", f"state passing chains {chain} unrelated sequences: "
                                                        f"it needs at least {chain} reference rows, got {rows}")
    if projection_dim < 1:
        raise CoverageInputError("projection_dim", f"projection_dim must be >= 1, got {projection_dim}")
    within = list(range(stride, train_len + 1, stride))
    if not within:
        raise CoverageInputError("stride", f"no recorded position lies in [1, train_len = {train_len}]; "
                                           f"lower the stride")
    positions = [j * train_len + q for j in range(chain) for q in within]
    ids = np.arange(rows)[chains]                                                    # the chains m run
    projection = _Projection(projection_dim, seed)
    state = None
    with Recorder(model, names=STATE_HOOK, positions=positions, batch=len(ids), keep=projection) as recorder:
        for j in range(chain):
            order = ids if regime == "tbtt" else (ids + j) % rows
            segment = np.ascontiguousarray(tokens[order, j * train_len:(j + 1) * train_len])  # [M, train_len]
            for piece in rollout(model, segment, chunk=chunk, state=state, stops=within):
                offset = j * train_len  # the piece's positions along the chain
                recorder.update(dataclasses.replace(piece, start=piece.start + offset, end=piece.end + offset))
                state = piece.state
                if progress is not None:
                    progress(len(ids) * (piece.end - piece.start))
    return _sample(model, recorder.result(), projection.projected, np.zeros(chain * train_len), chain * train_len)


# -- the analysis ----------------------------------------------------------------------------------

def _split(positions: np.ndarray, train_len: int) -> np.ndarray:
    """Indices of the recorded positions p <= train_len (the reference), checked non-empty."""
    ref = np.flatnonzero(positions <= train_len)
    if len(ref) == 0:
        raise CoverageInputError("stride", f"no recorded position lies in [1, train_len = {train_len}]; "
                                           f"lower the stride")
    return ref


def coverage_from_states(sample: StateSample, *, train_len: int, buckets: int = 8, scale: str = "log",
                         k: int = 5, components: int = 16, quantile: float = 0.99,
                         reference: StateSample | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The tables of :func:`coverage` from an already recorded :class:`StateSample`; ``reference`` (from
    :func:`collect_reference`), when given, replaces the reference set: all its recorded states."""
    n, length = sample.n_seqs, sample.length
    if length <= train_len:
        raise CoverageInputError("sequences", f"sequences hold {length} tokens, not more than train_len = "
                                              f"{train_len}: there are no positions past the training length")
    if reference is None:
        reference, ref = sample, _split(sample.positions, train_len)
    else:
        ref = np.arange(len(reference.positions))
    edges = bucket_edges(train_len + 1, length + 1, buckets, scale)
    which = bucket_index(sample.positions, edges)                                   # [P], -1: not a query
    rows = []
    for i, layer_states in enumerate(sample.states):
        ref_states = reference.states[i]
        for h in range(layer_states.shape[2]):
            points = ref_states[:, ref, h].reshape(-1, ref_states.shape[-1])        # [N * n_ref, d]
            support, n_finite = head_support(points, k=k, components=components, quantile=quantile)
            ref_norms = reference.norms[:, ref, i, h].ravel()
            for b, (lo, hi) in enumerate(itertools.pairwise(edges)):
                cols = np.flatnonzero(which == b)
                query = layer_states[:, cols, h].reshape(-1, layer_states.shape[-1])  # [N * n_cols, d]
                scores = support.score(query) if support else dict.fromkeys(UNSCORED, math.nan)
                ratio = _median_ratio(sample.norms[:, cols, i, h].ravel(), ref_norms)
                rows.append((int(lo), int(hi), i, h, scores["oos_fraction"], scores["maha_median"],
                             scores["maha_p95"], ratio, len(query), n_finite))
    per_head = pd.DataFrame(rows, columns=HEAD_COLUMNS)

    # Loss at p predicts token p, so it exists for p <= L - 1: a bucket's loss averages the predictions
    # at its positions below L (the state at L predicts nothing).
    loss_edges = np.minimum(edges, length)
    loss = np.full(len(edges) - 1, np.nan)
    filled = np.flatnonzero(loss_edges[1:] > loss_edges[:-1])
    for b in filled:
        loss[b] = bucket_losses(sample.nll, n, loss_edges[b:b + 2]).loss.iloc[0]
    in_context = float(bucket_losses(sample.nll, n, np.array([train_len // 2 + 1, train_len + 1])).loss.iloc[0])
    oos = per_head.groupby("pos_start", sort=True).oos_fraction.mean().reindex(edges[:-1]).to_numpy()
    per_bucket = pd.DataFrame({"pos_start": edges[:-1], "pos_end": edges[1:], "oos_fraction": oos, "loss": loss,
                               "loss_increase": loss - in_context}, columns=BUCKET_COLUMNS)
    rho, p_value, used = _spearman(per_bucket.oos_fraction.to_numpy(), per_bucket.loss_increase.to_numpy())
    summary = {"spearman_rho": rho, "spearman_p": p_value, "n_buckets": used, "in_context_loss": in_context}
    bad = first_nonfinite_state(sample)
    return per_head, per_bucket, summary | ({"first_nonfinite_state": bad} if bad else {})


def head_support(points: torch.Tensor, *, k: int = 5, components: int = 16,
                 quantile: float = 0.99) -> tuple[Support | None, int]:
    """One head's reference states [m, d] -> (its :class:`Support`, or None when it cannot be scored; the
    number of finite reference points).

    A state that overflowed is no reference point. A head whose states overflowed within the training
    length leaves too few finite reference states to test against: None, and its scores are NaN (a
    finding). A reference set too small from the start is still refused by :meth:`Support.fit`.
    """
    finite = points[torch.isfinite(points).all(1)]
    usable = len(finite) == len(points) or len(finite) >= k + 2
    return (Support.fit(finite, k=k, components=components, quantile=quantile) if usable else None), len(finite)


def first_nonfinite_state(sample: StateSample) -> dict | None:
    """The first recorded position, then layer and head, where some sequence's state is inf or NaN (its
    norm is): ``{"position", "layer", "head"}``, or None when every recorded state is finite."""
    bad = ~np.isfinite(sample.norms).all(axis=0)                                     # [P, layers, H]
    if not bad.any():
        return None
    p, layer, head = np.argwhere(bad)[0]
    return {"position": int(sample.positions[p]), "layer": int(layer), "head": int(head)}


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """Spearman rho and p over the buckets where both are finite; NaN for < 3 of them or a constant."""
    from scipy.stats import spearmanr

    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, len(x)
    result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue), len(x)


def coverage(
    model: RecurrentLM,
    sequences: np.ndarray | torch.Tensor,
    *,
    train_len: int,
    buckets: int = 8,
    scale: str = "log",
    stride: int | None = None,
    k: int = 5,
    components: int = 16,
    projection_dim: int = 256,
    quantile: float = 0.99,
    chunk: int = 2048,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    regime: str = "zero",
    chain: int = 4,
    reference_sequences: np.ndarray | torch.Tensor | None = None,
    group: int | None = None,
    run_groups: RunGroups | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """sequences [N, L] (L > train_len) -> coverage of the states past the training length by those
    within it, per head and per position bucket, and its correlation with the loss increase.

    One rollout from the zero state records each head's state every ``stride`` tokens (positions
    stride, 2 stride, ... <= L; default stride = max(1, train_len // 16)). Per (layer, head), the states at
    positions <= train_len of all sequences are the reference set; those in each bucket of
    ``bucket_edges(train_len + 1, L + 1, buckets, scale)`` a query set, scored by :func:`out_of_support`
    (``k``, ``components``, ``quantile``) after the random projection to ``projection_dim`` dimensions
    (module docstring; ``seed`` draws it).

    ``regime`` says which states the model was trained on, i.e. what the reference set is:

    - "zero" (trained from the zero state on train_len tokens): the states above at positions <= train_len;
    - "state-passing" / "tbtt" (trained on ``chain``-segment chains of train_len tokens, each segment
      starting from the previous one's final state): the states along such chains, run on
      ``reference_sequences`` [M, >= chain x train_len] (required for these regimes; rows must be other
      tokens than ``sequences``, e.g. further rows of the same draw) by :func:`collect_reference` -- for
      state passing segments of different rows, for TBTT consecutive segments of the same row. All
      their states recorded every ``stride`` tokens within each segment form the reference
      (M x chain x train_len // stride of them). The query sets are always the states of the rollouts
      of ``sequences`` from zero past train_len.

    Recording runs in units of ``group`` sequences, then ``group`` reference chains (default: all at once),
    through ``run_groups(work, costs)`` (a :meth:`statelens.runs.Run.groups`; by default in turn, with ``progress``).

    Returns three things:

    - per head, columns pos_start, pos_end (bucket [pos_start, pos_end) of positions p), layer, head,
      oos_fraction, maha_median, maha_p95, norm_ratio, n_query (query states: N x recorded positions in
      the bucket; 0 gives NaN statistics), n_reference (N x recorded positions <= train_len for
      "zero"; M x chain x recorded positions per segment otherwise);
    - per bucket, columns pos_start, pos_end, oos_fraction (mean over layers and heads), loss (mean NLL
      of the same rollout's predictions at the bucket's positions p < L, as
      :func:`~statelens.analysis.positionwise.positionwise`; NaN for a bucket holding only p = L),
      loss_increase (loss - in_context_loss);
    - ``{"spearman_rho", "spearman_p", "n_buckets", "in_context_loss", "regime"}``: Spearman correlation of
      the per-bucket oos_fraction and loss_increase over the ``n_buckets`` buckets where both are finite (NaN
      for fewer than 3 or a constant), and the mean loss over positions (train_len // 2, train_len];
      plus ``first_nonfinite_state`` ``{"position", "layer", "head"}`` when some recorded state is inf or NaN
      (a finding: such states are out of support, and a head left with fewer than k + 2 finite reference
      states gets NaN scores).

    Raises CoverageInputError (a BadInput, also a ValueError) naming the parameter when L <= train_len,
    when no recorded position is <= train_len, or when the reference set is smaller than k + 2.
    """
    sequences = as_batch(sequences if isinstance(sequences, np.ndarray) else sequences.cpu().numpy())
    n_seqs, length = sequences.shape
    stride = max(1, train_len // 16) if stride is None else stride
    reference_rows = None if reference_sequences is None else len(as_batch(reference_sequences))
    positions = recorded_positions(n_seqs, length, train_len=train_len, stride=stride, k=k, buckets=buckets,
                                   scale=scale, regime=regime, chain=chain, reference_rows=reference_rows).tolist()
    sample, reference = _record_in_groups(
        model, sequences, None if regime == "zero" else reference_sequences, positions=positions, regime=regime,
        train_len=train_len, chain=chain, stride=stride, group=group, run_groups=run_groups, progress=progress,
        record={"projection_dim": projection_dim, "chunk": chunk, "seed": seed})
    per_head, per_bucket, summary = coverage_from_states(sample, train_len=train_len, buckets=buckets, scale=scale,
                                                         k=k, components=components, quantile=quantile,
                                                         reference=reference)
    return per_head, per_bucket, summary | {"regime": regime}


def _record_in_groups(model: RecurrentLM, sequences: np.ndarray, reference_sequences, *, positions: list[int],
                      regime: str, train_len: int, chain: int, stride: int, group: int | None,
                      run_groups: RunGroups | None, progress: Callable[[int], None] | None,
                      record: dict) -> tuple[StateSample, StateSample | None]:
    """:func:`coverage`'s recording, in groups: the query sample of ``sequences`` [N, L] at ``positions``,
    and the reference sample of the chains of ``reference_sequences`` [M, ...] (None: none)."""
    from statelens.resumable import groups

    if group is not None and group < 1:
        raise CoverageInputError("group", f"group must be >= 1, got {group}")
    n_seqs, length = sequences.shape

    def queries(rows: slice, advance) -> dict[str, np.ndarray]:
        return collect_states(model, sequences[rows], positions=positions, progress=advance, **record).to_arrays()

    def chains(rows: slice, advance) -> dict[str, np.ndarray]:
        return collect_reference(model, reference_sequences, regime=regime, train_len=train_len, chain=chain,
                                 stride=stride, chains=rows, progress=advance, **record).to_arrays()

    query_groups = groups(n_seqs, group or n_seqs)
    n_chains = 0 if reference_sequences is None else len(as_batch(reference_sequences))
    chain_groups = groups(n_chains, group or n_chains) if n_chains else []
    work = [functools.partial(queries, rows) for rows in query_groups] + [
        functools.partial(chains, rows) for rows in chain_groups]
    costs = [(rows.stop - rows.start) * length for rows in query_groups] + [
        (rows.stop - rows.start) * chain * train_len for rows in chain_groups]
    parts = run_groups(work, costs) if run_groups is not None else [unit(progress) for unit in work]
    reference = StateSample.join(parts[len(query_groups):]) if chain_groups else None
    return StateSample.join(parts[:len(query_groups)]), reference


def recorded_positions(n_seqs: int, length: int, *, train_len: int, stride: int, k: int, buckets: int,
                       scale: str, regime: str, chain: int, reference_rows: int | None) -> np.ndarray:
    """The positions :func:`coverage` records (stride, 2 stride, ... <= length) for N = ``n_seqs`` query
    sequences of ``length`` tokens and ``reference_rows`` reference sequences (None: none given), after
    checking the settings leave it something to compare: else CoverageInputError naming the parameter."""
    if train_len < 1:
        raise CoverageInputError("train_len", f"train_len must be >= 1, got {train_len}")
    if length <= train_len:
        raise CoverageInputError("sequences", f"sequences hold {length} tokens, not more than train_len = "
                                              f"{train_len}: there are no positions past the training length")
    if stride < 1:
        raise CoverageInputError("stride", f"stride must be >= 1, got {stride}")
    if regime not in REGIMES:
        raise CoverageInputError("regime", f"regime must be one of {', '.join(REGIMES)}, got {regime!r}")
    positions = np.arange(stride, length + 1, stride)
    if regime == "zero":
        n_reference = n_seqs * len(_split(positions, train_len))
    else:
        if reference_rows is None:
            raise CoverageInputError("reference_sequences", f"regime {regime!r} needs reference_sequences "
                                                            f"(other tokens than the query sequences)")
        if chain < 1:
            raise CoverageInputError("chain", f"chain must be >= 1, got {chain}")
        n_reference = reference_rows * chain * len(_split(positions, train_len))
    if n_reference < k + 2:
        raise CoverageInputError("reference", f"the reference set holds {n_reference} states (sequences x "
                                              f"recorded positions <= {train_len}), fewer than k + 2 = {k + 2}; "
                                              f"use more sequences, a smaller stride or a smaller k")
    bucket_edges(train_len + 1, length + 1, buckets, scale)                          # checks scale early
    return positions


def scatter_points(sample: StateSample, *, train_len: int, layer: int, head: int) -> pd.DataFrame:
    """One head's recorded states on the first two principal axes of its reference set (the states at
    positions <= train_len), for the coverage scatter figure.

    Columns: pc1, pc2 (PCA coordinates; pc2 is 0 when the reference spans one axis), position (of the
    state), set ("reference" for p <= train_len, "query" beyond).
    """
    if not 0 <= layer < len(sample.states):
        raise CoverageInputError("layer", f"layer must lie in [0, {len(sample.states) - 1}], got {layer}")
    states = sample.states[layer]                                                      # [N, P, H, d]
    if not 0 <= head < states.shape[2]:
        raise CoverageInputError("head", f"head must lie in [0, {states.shape[2] - 1}], got {head}")
    ref = _split(sample.positions, train_len)
    reference = _as_points(states[:, ref, head].reshape(-1, states.shape[-1]), "reference")
    if reference.shape[0] < 2:
        raise CoverageInputError("reference", "the reference set holds fewer than 2 states")
    mean, basis, _ = _pca(reference, min(2, reference.shape[0] - 1, reference.shape[1]))
    every = _as_points(states[:, :, head].reshape(-1, states.shape[-1]), "states")   # [N * P, d], seq-major
    z = ((every - mean) @ basis).numpy()
    positions = np.tile(sample.positions, sample.n_seqs)
    return pd.DataFrame({"pc1": z[:, 0], "pc2": z[:, 1] if z.shape[1] > 1 else 0.0, "position": positions,
                         "set": np.where(positions <= train_len, "reference", "query")}, columns=SCATTER_COLUMNS)


# --- the command: statelens coverage ------------------------------------------------------------------------


class Regime(str, Enum):
    """Which states the model was trained on (the reference set): zero (from the zero state, positions
    <= the training length), state-passing (chains of unrelated training-length segments, each from the
    previous one's final state), tbtt (consecutive training-length chunks of one document)."""

    zero = "zero"
    state_passing = "state-passing"
    tbtt = "tbtt"


def default_regime(ckpt_path) -> str:
    """The regime of the checkpoint's ``statelens.json`` "intervention" (state-passing, tbtt), else zero."""
    import json
    from pathlib import Path

    try:
        intervention = json.loads((Path(ckpt_path) / "statelens.json").read_text()).get("intervention")
    except (OSError, ValueError, AttributeError):
        return "zero"
    return intervention if intervention in ("state-passing", "tbtt") else "zero"


@dataclass
class Options:
    buckets: int = option(8, "Position buckets past the training length (log-spaced).", min=1)
    stride: int | None = option(None, "Record the state every this many tokens. Default: training length // 16.",
                                min=1, show_default=False)
    k_nn: int = option(5, "Neighbours k of the k-NN support test.", flag="--k-nn", min=1)
    components: int = option(16, "PCA components fitted on the in-training states.", min=1)
    projection_dim: int = option(256, "Random-projection size of each head's state (heads this small or smaller "
                                      "are kept whole).", min=1)
    regime: str | None = option(
        None, "The states the model was trained on, i.e. the reference set: zero (positions <= the training length "
              "from the zero state), state-passing (chains of --chain unrelated segments, each from the previous "
              "one's final state) or tbtt (--chain consecutive segments of one document). Default: the checkpoint's "
              "statelens.json intervention (state-passing, tbtt), else zero.", choices=Regime, show_default=False)
    chain: int = option(4, "Training-length segments per chain for the state-passing and tbtt reference sets.", min=1)


# The analysis names the parameter it refuses (CoverageInputError); these are the options that set it.
OPTIONS = {"sequences": "--length", "train_len": "--train-len", "stride": "--stride", "k": "--k-nn",
           "components": "--components", "projection_dim": "--projection-dim",
           "reference": "--num-seqs/--stride/--k-nn", "chain": "--chain",
           "reference_sequences": "--num-seqs/--chain"}


def draw(run: Run, data, num_seqs: int, length: int, regime: str, chain: int):
    """The query sequences [num_seqs, length] and, for the state-passing and tbtt regimes, the reference
    sequences [max(num_seqs, chain), chain x train_len] (else None). One draw: the first num_seqs rows
    are the queries, the next rows (other tokens) feed the reference chains."""
    if regime == "zero":
        return run.sequences(data, num_seqs, length), None
    drawn = run.sequences(data, num_seqs + max(num_seqs, chain), max(length, chain * run.train_len))
    return drawn[:num_seqs, :length], drawn[num_seqs:, :chain * run.train_len]


def compute(run: Run, settings: RunSettings, options: Options) -> Outcome:
    """:func:`coverage` over ``settings.num_seqs`` sequences, resumable in groups; a parameter it refuses
    is bad input naming the option that set it."""
    o = options
    length = settings.length or 4 * run.train_len
    stride = o.stride or max(1, run.train_len // 16)
    regime = o.regime or default_regime(run.ckpt.path)
    run.config |= {"length": length, "stride": stride, "regime": regime}
    if length <= run.train_len:
        raise BadInput(f"--length {length}: must exceed the training length {run.train_len} "
                       f"(coverage compares states past it with those within it)")
    sequences, reference_sequences = draw(run, settings.data, settings.num_seqs, length, regime, o.chain)
    run.lap("data")
    try:
        per_head, per_bucket, results = coverage(
            run.model, sequences, train_len=run.train_len, buckets=o.buckets, stride=stride, k=o.k_nn,
            components=o.components, projection_dim=o.projection_dim, chunk=settings.chunk, seed=settings.seed,
            regime=regime, chain=o.chain, reference_sequences=reference_sequences, group=settings.group,
            run_groups=lambda work, costs: run.groups(work, tokens=costs, description=f"coverage L={length}"))
    except CoverageInputError as e:
        if e.parameter not in OPTIONS:  # a setting the command makes itself, not the user: a bug
            raise RuntimeError(f"coverage refused its own {e.parameter}: {e}") from e
        raise BadInput(f"{OPTIONS[e.parameter]}: {e}") from None
    reference = (f"positions <= {run.train_len}" if regime == "zero" else
                 f"{regime} chains of {o.chain} x {run.train_len} tokens over {len(reference_sequences)} "
                 f"other sequences")
    lines = [(f"states every {stride} tokens over {settings.num_seqs} sequences of {length}; reference: {reference}; "
              f"out of support: k-NN distance ({o.k_nn}-th neighbour, {o.components} PCA "
              f"components) above the reference's 99th percentile")]
    lines += [f"positions [{row.pos_start}, {row.pos_end}): out of support {row.oos_fraction:.3f}, "
              f"loss {row.loss:.4f} ({row.loss_increase:+.4f} vs in-context)" for row in per_bucket.itertuples()]
    lines.append(f"Spearman rho (out of support vs loss increase, {results['n_buckets']} buckets): "
                 f"{results['spearman_rho']:.3f} (p = {results['spearman_p']:.3g})")
    if bad := results.get("first_nonfinite_state"):
        lines.append(f"states first non-finite at position {bad['position']}, layer {bad['layer']}, head {bad['head']}")
    return Outcome({"coverage": per_head, "coverage_buckets": per_bucket}, lines=lines,
                   results={name: None if isinstance(v, float) and math.isnan(v) else v  # JSON has no NaN
                            for name, v in results.items()})


CHAIN = 4  # training-length segments per reference chain of report's state-passing and tbtt regimes
PLOT = Plot("coverage_figure", ("coverage",))
SPEC = Analysis(
    "coverage", "State coverage: the share of each head's states past the training length that fall outside the "
                "states it met within it (k-NN in PCA space), per position bucket, and its Spearman correlation "
                "with the loss increase; writes coverage.csv, coverage_buckets.csv, coverage.png and run.json.",
    Options, compute, tables=(Table("coverage", tuple(HEAD_COLUMNS)), Table("coverage_buckets", tuple(BUCKET_COLUMNS))),
    plot=PLOT, sections=(Section("coverage", "Coverage: states outside the training support", PLOT,
                                 tables=("coverage", "coverage_buckets")),),
    report=lambda plan: Options(stride=plan.stride, buckets=8, regime=plan.regime, chain=CHAIN)).register()
