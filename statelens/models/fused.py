"""The compiled fast path of the Mamba-2, Mamba-1 and GLA mixers on CPU (``--compile``), beside the eager
reference. The other backends always run eager.

Two things made the eager mixer (:class:`statelens.models.mamba2.Mamba2Mixer`) spend a third of a long
forward outside matrix products (``benchmarks/profile_cpu.py``): each elementwise step (the conv's SiLU,
softplus, the segment sums and their exp, the decay-weighted ``C B^T``, the read-out's decay, the D skip,
the gated norm) is its own pass over memory, and over a call of thousands of tokens each pass streams
tens of MB (the pairwise decays ``[b, h, c, q, q]``, the block states ``[b, c, h, p, n]``) through a
2 MiB L2 cache. Here a call runs as consecutive pieces of :data:`PIECE` tokens (:func:`in_pieces`), each
continuing from the last one's states, so a piece's intermediates stay in cache and the layer's weights in
L3; and each full piece runs the mixer (:meth:`~statelens.models.mamba2.Mamba2Mixer.unhooked`) as one graph
compiled by torch.compile (inductor's CPU backend, static shapes: one compile per batch size, one graph for
every layer), which fuses each elementwise chain into one loop and leaves the matrix products to BLAS. A
call's last, shorter piece runs eager.

Piece boundaries are SSD block boundaries and the sums are the reference's, in three places ordered for the
machine (measured on one 512-token piece of a 130M layer: 27.8 ms before, 23.9 ms after, of which 18.6 ms
are the two projections):

- the conv's output is laid out token-major (:func:`statelens.models.layers.causal_conv`), as the scan reads
  it, not channel-major, which made the scan's loops gather across channels a token at a time;
- the segment sums are differences of float64 cumsums (:func:`statelens.models.ssd.segsum`), which inductor
  fuses into the decay's loop, where the masked cumsum was a separate pass;
- the carried state is read out and advanced a block at a time (``ssd._ssd_block_by_block``), so it stays in
  cache between its two products instead of every block's state going through memory.

So the two paths differ by float rounding only; tests hold them together. ``perplexity``'s per-token loss
on this path is one compiled loop too (:func:`token_nll`).

The other two mixers plug in the same way: their ``forward`` is the output hooks around one ``unhooked``, which
:func:`in_pieces` runs piece by piece with the states carried, each family choosing its piece length
(measured on one layer of the 130M shape over 4096 tokens at batch 1, one thread):

- Mamba-1 (:class:`statelens.models.mamba1.Mamba1Mixer`), pieces of ``mamba1.PIECE`` = 32 tokens: the eager
  chunked selective scan streams its [b, q, d, n] decays and partial products (12 MiB per 128-token block)
  through memory log2(q) times. Compiled, the scan is the recurrence itself, a token at a time
  (:func:`statelens.models.selective_scan.selective_scan_sequential`, the reference the chunked form is tested
  against), which inductor unrolls over the piece into loops over the [b, d, n] state, in L2: 1330 ms eager,
  449 ms compiled.
- GLA (:class:`statelens.models.gla.GatedLinearAttention`), pieces of ``gla.PIECE`` = 128 tokens in whole
  chunks: the chunked scan is the eager one (:func:`statelens.models.gla.gla_chunked`), whose eager run spends
  28% of its time copying einsum's operands into layout and 18% building the pairwise decays
  [b, c, h, k, q, q] (masked cumsum, exp); compiled, those are fused loops (the segment sums as differences of
  float64 cumsums, as for Mamba-2): 700 ms eager, 244 ms compiled. The block's MLP stays eager (matrix
  products and one SiLU).

Around the Mamba-1 and Mamba-2 mixers, the residual block's norm and residual add join the graph too
(:meth:`statelens.models.lm.Block.forward`), unless a hook watches the mixer's output (``hook_out``), which
must see it whole: eager, at batch 8 each is a pass over the whole call's ``[b, l, d]`` residual stream, more
than a piece holds in cache.

When it runs (:func:`applies`): ``mode`` ``on`` (``--compile on``, or ``auto`` resolved to on by
:func:`resolve`); a call of at least one piece; no gradient; on CPU, where mamba-ssm's and fla's kernels do not
run; no mitigation's scan and no hook on the scan's inputs (``hook_x``, ``hook_B``, ``hook_C``, ``hook_dt``,
``hook_decay``). The output hooks (``hook_state``, ``hook_state_blocks``, ``hook_conv_state``, ``hook_out``)
see the same tensors as on the eager path. Anything else runs eager.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator

import torch

MODES = ("auto", "on", "off")
_mode = "off"

#: ``auto`` compiles when the run's forward work, 2 x parameters x tokens, reaches this many FLOPs: about
#: 2 minutes of eager forward at the 2-core machine's ~100 GFLOP/s. There a graph compiles in 12 s (6 s from
#: inductor's on-disk cache), a recording run compiles two (with and without block states), and the
#: compiled path saves a sixth to a half of the eager time (README, "--compile").
AUTO_MIN_FLOPS = 1.2e13


def set_mode(mode: str) -> None:
    """``on``: the mixers take the compiled path where it applies; ``off``: always eager; ``auto``
    behaves as ``off`` until a run resolves it (:func:`resolve`)."""
    global _mode
    if mode not in MODES:
        from statelens.errors import ParameterError

        raise ParameterError("--compile", f"{mode!r} is not one of {', '.join(MODES)}")
    _mode = mode


@contextlib.contextmanager
def mode(value: str) -> Iterator[None]:
    """The compile mode within the block (restored after it)."""
    previous = _mode
    set_mode(value)
    try:
        yield
    finally:
        set_mode(previous)


def active() -> bool:
    """Whether the fast path is on (``mode`` on)."""
    return _mode == "on"


def auto_on(parameters: int, tokens: int) -> bool:
    """Whether ``auto`` compiles for a run pushing ``tokens`` tokens through a model of ``parameters``
    parameters. A rule on the work, not on measured time, so that a run's numbers do not depend on how
    busy the machine was."""
    return 2.0 * parameters * tokens >= AUTO_MIN_FLOPS


def compiler_available() -> bool:
    """Whether a C++ compiler is on PATH (``$CXX``, else g++, c++ or clang++): inductor's CPU backend
    compiles its loops with one."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(name) for name in names)


def resolve(value: str, parameters: int, tokens: int) -> str:
    """``on`` or ``off``: what ``value`` means for a run of this size (``auto`` without a C++ compiler: off;
    ``on`` without one is refused)."""
    if value == "auto":
        return "on" if auto_on(parameters, tokens) and compiler_available() else "off"
    if value == "on" and not compiler_available():
        from statelens.errors import ParameterError

        raise ParameterError("--compile", "on needs a C++ compiler on PATH (g++, c++ or clang++, or $CXX) for "
                                          "torch.compile's CPU backend; install one or use --compile off")
    return value


def applies(mixer, u: torch.Tensor, input_hooks, piece: int) -> bool:
    """Whether this call of ``mixer`` (u [b, l, d]) takes the compiled path, ``piece`` its tokens per row of
    a piece (:func:`piece_length`) and ``input_hooks`` the hook points on its scan's inputs (the conditions in
    the module's docstring)."""
    return (active() and u.device.type == "cpu" and u.shape[1] >= piece and not torch.is_grad_enabled()
            and mixer.scan is None and not any(hook.active for hook in input_hooks))


#: Tokens per piece of a Mamba-2 mixer, over the batch: at the 130M shape a piece's intermediates (its
#: projections, pairwise decays, block states) stay in cache, and the layer's weights stay in L3 from one piece
#: to the next. Measured at batch 1: 512 a little faster than 256 and 1024, 128 slower.
PIECE = 512


def piece_length(batch: int, block: int, tokens: int = PIECE) -> int:
    """Tokens per row of a piece: ``tokens`` over the batch, in whole scan blocks of ``block`` (at least one)."""
    return max(tokens // batch // block, 1) * block


def in_pieces(mixer, u: torch.Tensor, states: tuple[torch.Tensor, ...], piece: int, *options):
    """``type(mixer).unhooked(mixer, u, *states, *options)`` over consecutive pieces of ``piece`` tokens per
    row, each continuing from the last one's states, the full pieces through the compiled graph. ``mixer`` is a
    mixer, or the residual block around one (:class:`statelens.models.lm.Block`, whose ``unhooked`` adds the
    norm before the mixer and the residual add after it to the graph).

    ``unhooked`` returns ``(out [b, l, d], *new states, *extras)``, one new state per state given; each extra is
    None or a tensor laid along the call's length in dim 1 (Mamba-2's block states [b, c, h, p, n]). Returns the
    same: the outputs and extras concatenated over the pieces, the last piece's states. Piece boundaries are
    scan block boundaries, so every block is computed as in one call; what changes is the memory the
    intermediates occupy, and the fusion."""
    outs, extras = [], []
    for start in range(0, u.shape[1], piece):
        part = u[:, start:start + piece].contiguous()  # one stride for every piece: one compiled graph
        run = _compiled(type(mixer)) if part.shape[1] == piece else type(mixer).unhooked
        _count[0] += part.shape[1] == piece
        out, *rest = run(mixer, part, *(s.contiguous() for s in states), *options)
        states, piece_extras = tuple(rest[:len(states)]), rest[len(states):]
        outs.append(out)
        extras.append(piece_extras)
    joined = [None if parts[0] is None else torch.cat(parts, dim=1) for parts in zip(*extras)]
    return torch.cat(outs, dim=1), *states, *joined


class Piecewise:
    """Mixin of a mixer with a compiled path (Mamba-2's, Mamba-1's). It provides ``fast_piece(u)`` (tokens per row
    of a piece when the compiled path applies to a call on u, else 0), ``options()`` (``unhooked``'s arguments after
    the states) and ``observe(*new states, *extras)`` (the hooks on what ``unhooked`` returned -> the new states);
    its ``forward`` is then those hooks and ``hook_out`` around one ``unhooked`` call, run :func:`in_pieces` where
    the compiled path applies. :class:`statelens.models.lm.Block` uses the same three to run itself in pieces."""

    def forward(self, u: torch.Tensor, *states: torch.Tensor):
        """u [b, l, d] and the mixer's states -> (out [b, l, d], *new states)."""
        piece = self.fast_piece(u)
        if piece:  # --compile: the same numbers to float rounding
            out, *rest = in_pieces(self, u, states, piece, *self.options())
        else:
            out, *rest = self.unhooked(u, *states, *self.options())
        states = self.observe(*rest)  # the states' hooks first, then hook_out, as always
        return self.hook_out(out), *states


_count = [0]  # full pieces run through a compiled graph in this process


def pieces_compiled() -> int:
    """How many pieces have run through a compiled graph in this process (``statelens check --compile on``
    reports it, so a user sees the path it verified really ran)."""
    return _count[0]


@functools.cache
def _compiled(mixer_class):
    """``mixer_class.unhooked`` compiled once per process (and per batch size: static shapes). Past dynamo's
    recompile limit (8 graphs of one function by default) a function runs eager without a word; a process that
    meets several models, batch sizes or dtypes (a notebook, the tests) would lose the fast path unseen, so the
    limit is raised to :data:`GRAPHS` (never lowered)."""
    import torch._dynamo.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, GRAPHS)
    return torch.compile(mixer_class.unhooked, dynamic=False, backend=BACKEND)


#: Compiled graphs one mixer class may have in a process (dynamo's recompile limit, raised to this).
GRAPHS = 64
#: torch.compile's backend for the mixers' graphs. The tests of dynamo's bookkeeping (how many graphs a process
#: keeps) set "eager", which traces the same graphs without inductor's C++ compile of each.
BACKEND = "inductor"


def token_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each row's negative log-likelihood of its target, logits [rows, vocab], target [rows] -> [rows]:
    ``cross_entropy(..., reduction="none")`` as one compiled loop (logsumexp less the target's logit), which
    reads the logits twice and writes nothing of their size; the eager function writes a log-softmax as
    large as the logits first (at the 130M shape, 4096 x 50288 floats per call: 6x slower)."""
    return dynamic(_nll)(logits, target)


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, target[:, None])[:, 0]


@functools.cache
def dynamic(fn):
    """``fn`` compiled once per process, dynamic in its inputs' sizes: for the reductions around the model
    (the loss, the recorder's statistics), whose shapes change with the chunk and the positions recorded."""
    return torch.compile(fn, dynamic=True)
