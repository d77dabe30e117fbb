"""Position-wise loss: the next-token negative log-likelihood at each position, averaged over
documents, in position buckets.

The loss at position ``p`` (tokens consumed) is ``-log q(x[p] | x[0:p])`` for p = 1 .. L - 1: the
prediction made after ``p`` tokens, of the token that follows. A model that length-generalizes keeps
a flat loss past the training length; one that does not sees it rise there.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from statelens.analysis.buckets import Scale, bucket_edges
from statelens.analysis.spec import Analysis, Outcome, Plot, Section, Table, option
from statelens.models import fused
from statelens.models.base import RecurrentLM
from statelens.record.rollout import Chunk, rollout

if TYPE_CHECKING:
    from statelens.runs import Run, RunSettings

COLUMNS = ["pos_start", "pos_end", "loss", "ppl", "n_tokens"]


def chunk_nll(chunk: Chunk, tokens: np.ndarray | torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """The losses a rollout chunk predicts: positions [n] (p = chunk.start + 1 ..) and nll [batch, n].

    The chunk's hidden state after token ``i`` predicts token ``i + 1``: position ``i + 1``. The last
    token of the sequence predicts nothing.
    """
    length = tokens.shape[-1]
    stop = min(chunk.end, length - 1)
    if stop <= chunk.start:
        return np.zeros(0, dtype=np.int64), torch.zeros(chunk.hidden.shape[0], 0)
    target = torch.as_tensor(np.asarray(tokens[:, chunk.start + 1: stop + 1]), device=chunk.hidden.device)
    with torch.no_grad():
        logits = chunk.model.unembed(chunk.hidden[:, : stop - chunk.start])          # [b, n, vocab]
        if fused.active():  # the fast path: one compiled loop over the logits as they lie (the same to rounding)
            nll = fused.token_nll(logits.flatten(0, 1).float(), target.long().flatten()).view(target.shape)
        else:
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), target.long(), reduction="none")
    return np.arange(chunk.start + 1, stop + 1), nll


def position_losses(model: RecurrentLM, sequences: np.ndarray, *, chunk: int = 2048, stops: Iterable[int] = (),
                    progress: Callable[[int], None] | None = None,
                    on_chunk: Callable[[Chunk], None] | None = None) -> np.ndarray:
    """sequences [N, L] -> summed NLL per position [L] (index p; entry 0 is unused and 0), in float64.

    Memory is one chunk's logits, whatever L. ``stops`` end chunks at those positions and ``on_chunk``
    sees each chunk, so a caller can read states from the same rollout.
    """
    total = np.zeros(sequences.shape[1], dtype=np.float64)
    for piece in rollout(model, sequences, chunk=chunk, stops=stops):
        positions, nll = chunk_nll(piece, sequences)
        total[positions] += nll.double().sum(0).cpu().numpy()
        if on_chunk is not None:
            on_chunk(piece)
        if progress is not None:
            progress(sequences.shape[0] * (piece.end - piece.start))
    return total


def bucket_losses(summed: np.ndarray, n_seqs: int, edges: np.ndarray) -> pd.DataFrame:
    """Per-position summed NLL [L] -> per-bucket mean loss and perplexity (columns as COLUMNS)."""
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        n_tokens = (hi - lo) * n_seqs
        loss = summed[lo:hi].sum() / n_tokens
        rows.append((int(lo), int(hi), loss, float(np.exp(loss)), int(n_tokens)))
    return pd.DataFrame(rows, columns=COLUMNS)


def positionwise(model: RecurrentLM, sequences: np.ndarray, *, buckets: int = 32, scale: str = "log",
                 chunk: int = 2048, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """sequences [N, L] -> loss per position bucket.

    Columns: pos_start, pos_end (bucket [pos_start, pos_end) of positions p, the tokens consumed before
    the prediction), loss (mean NLL in nats over the bucket's predictions and all sequences), ppl
    (exp(loss)), n_tokens (predictions averaged).
    """
    summed = position_losses(model, sequences, chunk=chunk, progress=progress)
    return bucket_losses(summed, sequences.shape[0], bucket_edges(1, sequences.shape[1], buckets, scale))


#: How far (nats) the smoothed loss may rise above the in-context level before a position counts as
#: past what the model generalizes to: 0.1 nats is a perplexity 10.5% higher.
TOLERANCE_NATS = 0.1


def in_context_loss(positionwise: pd.DataFrame, train_len: int) -> float:
    """Mean loss over the buckets that end within the training length, weighted by their tokens
    (NaN when none does)."""
    inside = positionwise[positionwise.pos_end <= train_len]
    if not len(inside) or inside.n_tokens.sum() <= 0:
        return float("nan")
    return float((inside.loss * inside.n_tokens).sum() / inside.n_tokens.sum())


def smoothed_loss(positionwise: pd.DataFrame) -> np.ndarray:
    """Each bucket's loss pooled with its two neighbours' [n buckets]: the mean loss over positions
    [pos_start of the previous bucket, pos_end of the next), weighted by tokens (one neighbour at the
    ends). A non-finite loss in the window makes the window's NaN or inf."""
    loss = positionwise.loss.to_numpy(dtype=float)
    weight = positionwise.n_tokens.to_numpy(dtype=float)
    padded_sum = np.pad(loss * weight, 1)
    padded_weight = np.pad(weight, 1)
    window_sum = padded_sum[:-2] + padded_sum[1:-1] + padded_sum[2:]
    window_weight = padded_weight[:-2] + padded_weight[1:-1] + padded_weight[2:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return window_sum / window_weight


def generalizes_to(positionwise: pd.DataFrame, train_len: int, tolerance: float = TOLERANCE_NATS) -> int | None:
    """How far the model length-generalizes (tokens), measured from the training length on.

    The ``pos_start`` of the first bucket starting at or beyond ``train_len`` whose
    :func:`smoothed_loss` exceeds :func:`in_context_loss` by more than ``tolerance`` nats (a
    non-finite loss exceeds it); the rollout's end (the last ``pos_end``) when none does. None when
    no bucket ends within the training length (there is no in-context level to compare with).
    ``positionwise``: the table of :func:`positionwise`, buckets in order.
    """
    level = in_context_loss(positionwise, train_len)
    if not np.isfinite(level):
        return None
    smoothed = smoothed_loss(positionwise)
    beyond = positionwise.pos_start.to_numpy() >= train_len
    failing = beyond & ~(smoothed <= level + tolerance)
    if failing.any():
        return int(positionwise.pos_start.to_numpy()[np.argmax(failing)])
    return int(positionwise.pos_end.iloc[-1])


# --- the command: statelens perplexity ------------------------------------------------------------------


@dataclass
class Options:
    buckets: int = option(32, "Position buckets.", min=1)
    scale: str = option("log", "Bucket spacing: log or linear.", choices=Scale)


def compute(run: Run, settings: RunSettings, options: Options) -> Outcome:
    """The loss over ``settings.num_seqs`` sequences of the rollout length, in buckets; how far it
    length-generalizes and where the loss first turns non-finite (exact, not per bucket)."""
    from statelens.analysis.nonfinite import first_nonfinite_position
    from statelens.resumable import sum_in_order

    length = settings.length or 4 * run.train_len
    run.config["length"] = length
    sequences = run.sequences(settings.data, settings.num_seqs, length)
    run.lap("data")
    parts = run.sequence_groups(settings.num_seqs, settings.group, lambda rows, advance: {"nll": position_losses(
        run.model, sequences[rows], chunk=settings.chunk, progress=advance)}, tokens_per_seq=length,
        description=f"loss over {length} tokens")
    summed = sum_in_order([part["nll"] for part in parts])
    df = bucket_losses(summed, settings.num_seqs, bucket_edges(1, length, options.buckets, options.scale))
    in_context = in_context_loss(df, run.train_len)
    reach = generalizes_to(df, run.train_len)
    bad_at = first_nonfinite_position(summed)  # exact; positionwise.csv only knows the bucket
    results = {"in_context_loss": in_context, "generalizes_to": reach, "tolerance_nats": TOLERANCE_NATS}
    last = df.iloc[-1]
    lines = [f"loss within the training length: {in_context:.4f} (ppl {2.718281828 ** in_context:.2f})",
             f"loss at positions [{int(last.pos_start)}, {int(last.pos_end)}): {last.loss:.4f} (ppl {last.ppl:.2f})",
             f"length-generalizes to position {reach} of {length} (from the training length on, the loss pooled "
             f"over neighbouring buckets stays within {TOLERANCE_NATS} nats of the in-context loss)"]
    if bad_at:
        results["first_nonfinite_loss_position"] = bad_at
        lines.append(f"the loss is first non-finite at position {bad_at}")
    return Outcome({"positionwise": df}, results, lines)


PLOT = Plot("perplexity_figure", ("positionwise",))
SPEC = Analysis(
    "perplexity", "Position-wise loss: next-token NLL at each position averaged over documents, in position "
                  "buckets; writes positionwise.csv, perplexity.png and run.json.",
    Options, compute, tables=(Table("positionwise", tuple(COLUMNS), keys=("pos_start", "pos_end"), watched=("loss",)),),
    plot=PLOT, sections=(Section("perplexity", "Loss by position", PLOT),),
    report=lambda plan: Options(buckets=plan.buckets)).register()
