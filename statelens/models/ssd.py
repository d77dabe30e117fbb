"""Mamba-2's state space dual (SSD) scan: the sequential recurrence and its chunked form.

Dao & Gu, 2024, "Transformers are SSMs" (arXiv:2405.21060), section 6 / Listing 1. Axis letters:

    b: batch             l: sequence length (t, s: positions inside a chunk; q: chunk length)
    c: chunk index       h: heads, split as (g, r) = (group, head within group); h = g * r
    p: headdim (P)       n: d_state (N)

The recurrence, per head, with ``alpha_t = exp(dt_t * A) = exp(log_a_t)``:

    h_t = alpha_t * h_{t-1} + x_t B_t^T        (h_t: [p, n]; x_t already multiplied by dt_t)
    y_t = h_t C_t                              (y_t: [p])

B and C are shared by the ``r`` heads of a group; heads are grouped group-major, as mamba-ssm's
``repeat(B, "b l g n -> b l (g h) n")`` does. The D skip connection is not part of the scan.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def ssd_steps(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The recurrence one token at a time: ``step(t, h) -> (y_t [b, h, p], h_t [b, h, p, n])`` from
    h = h_{t-1}. x [b, l, h, p] (times dt), log_a [b, l, h], B and C [b, l, g, n]."""
    r = x.shape[2] // B.shape[2]
    B, C = B.repeat_interleave(r, dim=2), C.repeat_interleave(r, dim=2)  # [b, l, h, n]

    def step(t: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = log_a[:, t, :, None, None].exp() * h + x[:, t, :, :, None] * B[:, t, :, None, :]
        return torch.einsum("bhpn,bhn->bhp", h, C[:, t]), h
    return step


def ssd_sequential(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one step per token (:func:`ssd_steps`).

    x [b, l, h, p] (times dt), log_a [b, l, h], B and C [b, l, g, n], h0 [b, h, p, n]
    -> y [b, l, h, p], final state [b, h, p, n].
    """
    step, h, ys = ssd_steps(x, log_a, B, C), h0, []
    for t in range(x.shape[1]):
        y, h = step(t, h)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., q] -> [..., q, q] with entry (t, s) = a[s+1] + ... + a[t] for t >= s, -inf above.

    Summed by a masked cumsum rather than as ``cumsum[t] - cumsum[s]``, which cancels badly once
    the cumulative log-decay is large. Inside a compiled graph (:mod:`statelens.models.fused`) it is
    that difference after all, of float64 cumsums, which inductor fuses into the loop that uses it:
    float64 keeps the cancellation below float32's rounding, and the log-decays are clamped at -1e4
    (a decay exp(-1e4) is 0 in either precision), so that a decay of 0 (-inf) gives 0, not inf - inf.
    """
    if torch.compiler.is_compiling():
        position = torch.arange(a.shape[-1], device=a.device)
        cum = a.to(torch.float64).clamp(min=-1e4).cumsum(dim=-1)
        out = (cum[..., :, None] - cum[..., None, :]).to(a.dtype)
        return out.masked_fill(position[None, :] > position[:, None], -torch.inf)
    above_diagonal, on_or_above = _masks(a.shape[-1], a.device)
    out = a[..., :, None].expand(*a.shape, a.shape[-1]).masked_fill(on_or_above, 0).cumsum(dim=-2)
    return out.masked_fill(above_diagonal, -torch.inf)


@functools.lru_cache(maxsize=16)
def _masks(q: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [q, q] masks of the entries above the diagonal, and on or above it. Made outside inference
    mode even when first asked for inside it: a cached inference tensor could not be saved for a later backward."""
    with torch.inference_mode(False):
        lower = torch.ones(q, q, dtype=torch.bool, device=device).tril(-1)
        return ~lower.logical_or(torch.eye(q, dtype=torch.bool, device=device)), ~lower


def ssd_chunked(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD form; same inputs and outputs as :func:`ssd_sequential`.

    ``chunk`` is the SSD block length (the config's ``chunk_size``); the result does not depend on
    it beyond float rounding. A sequence shorter than ``chunk`` is one block, unpadded.
    """
    y, state, _ = _ssd(x, log_a, B, C, h0, chunk)
    return y, state


def ssd_chunked_with_block_states(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ssd_chunked`, and the state at the start of each block: [b, c, h, p, n], entry j the
    state after j * q tokens (entry 0 is ``h0``), q = min(chunk, l). The chunked form computes these
    states anyway (step 3), so a recorder reads them rather than cutting the sequence at every
    position it records."""
    return _ssd(x, log_a, B, C, h0, chunk)


def _ssd(x, log_a, B, C, h0, chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked form; returns y [b, l, h, p], the final state [b, h, p, n] and the state at the
    start of each block [b, c, h, p, n]."""
    if torch.compiler.is_compiling() and x.shape[1] % min(chunk, x.shape[1]) == 0:
        return _ssd_block_by_block(x, log_a, B, C, h0, min(chunk, x.shape[1]))
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = min(chunk, l)
    pad = (-l) % q
    if pad:  # zero input and zero log-decay (alpha = 1) past the end leave the final state exact
        x, log_a, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, log_a, B, C))
    c = (l + pad) // q
    x, B, C, a_cum, y, x_to_end = _within_blocks(x, log_a, B, C, q)
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", B, x_to_end)

    # 3. Carry the state across chunk boundaries (a short loop: c = l / chunk).
    chunk_decay = a_cum[..., -1].exp()  # [b, g, r, c]
    state = h0.view(b, g, r, p, n).to(x.dtype)
    starts = []
    for k in range(c):
        starts.append(state)
        state = chunk_decay[..., k, None, None] * state + chunk_states[:, k]
    starts = torch.stack(starts, dim=1)  # [b, c, g, r, p, n]

    # 4. The state at each chunk's start, decayed to position t and read out by C_t.
    y = y + torch.einsum("bctgn,bcgrpn->bctgrp", C, starts) * a_cum.exp().permute(0, 3, 4, 1, 2)[..., None]
    return y.reshape(b, c * q, h, p)[:, :l], state.reshape(b, h, p, n), starts.reshape(b, c, h, p, n)



def _within_blocks(x, log_a, B, C, q):
    """Steps 1 and 2 of the chunked form, for a length that is a whole number of blocks ``q``: the inputs as
    blocks (x [b, c, q, g, r, p], B and C [b, c, q, g, n]), the cumulative log-decays within each block
    a_cum [b, g, r, c, q], the output from the block's own tokens y [b, c, q, g, r, p], and x decayed to its
    block's end x_to_end [b, c, q, g, r, p]."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r, c = h // g, l // q
    x = x.view(b, c, q, g, r, p)
    B, C = B.view(b, c, q, g, n), C.view(b, c, q, g, n)
    a = log_a.view(b, c, q, g, r).permute(0, 3, 4, 1, 2)  # [b, g, r, c, q]
    a_cum = a.cumsum(dim=-1)

    # 1. Within each chunk (diagonal blocks): y_t = sum_{s <= t} (C_t . B_s) exp(a_{s+1} + ... + a_t) x_s
    CB = torch.einsum("bctgn,bcsgn->bgcts", C, B)
    decay = segsum(a).exp()  # [b, g, r, c, t, s]
    y = torch.einsum("bgrcts,bcsgrp->bctgrp", CB[:, :, None] * decay, x)

    # 2. Each chunk's own contribution to the state at its end. The decays to the end are the last
    # row of step 1's: no cum[q] - cum[s], which is nan when a patched alpha is 0 (log-decay -inf).
    x_to_end = x * decay[..., -1, :].permute(0, 3, 4, 1, 2)[..., None]  # [b, c, q, g, r, p]
    return x, B, C, a_cum, y, x_to_end


def _ssd_block_by_block(x, log_a, B, C, h0, q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_ssd` as the compiled path runs it (:mod:`statelens.models.fused`), for a length that is a
    whole number of blocks ``q``: steps 1 and 2 as there, then steps 3 and 4 a block at a time, so that the
    carried state [b, h, p, n] stays in cache between its two products (read out by the block's C, then
    decayed and added to the block's own contribution) instead of every block's state making a round trip
    through memory. The same sums in another order: equal to float rounding."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r, c = h // g, l // q
    x, B, C, a_cum, y, x_to_end = _within_blocks(x, log_a, B, C, q)
    chunk_decay = a_cum[..., -1].exp()  # [b, g, r, c]
    chunk_decay = chunk_decay.view(b, g, r, 1, c).expand(b, g, r, p, c).reshape(b, g, r * p, 1, c)
    state = h0.view(b, g, r * p, n).to(x.dtype)
    starts, from_state = [], []
    for k in range(c):  # the products as [r p, n] x [n, q] and [r p, q] x [q, n]: BLAS's fastest orientation here
        starts.append(state)
        from_state.append(C[:, k].transpose(1, 2) @ state.transpose(-1, -2))         # [b, g, t, r p]
        own = x_to_end[:, k].permute(0, 2, 3, 4, 1).reshape(b, g, r * p, q) @ B[:, k].transpose(1, 2)
        state = chunk_decay[..., k] * state + own                                      # [b, g, r p, n]
    from_state = torch.stack(from_state, dim=1).view(b, c, g, q, r, p).transpose(2, 3)
    y = y + from_state * a_cum.exp().permute(0, 3, 4, 1, 2)[..., None]
    return y.reshape(b, l, h, p), state.reshape(b, h, p, n), torch.stack(starts, dim=1).reshape(b, c, h, p, n)
