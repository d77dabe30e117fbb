"""Long computations that survive an interruption and share out across ``torchrun`` ranks.

Every analysis over N sequences is a reduction over fixed **groups** of consecutive sequences
(:func:`groups`): each group's partial result is a dict of numpy arrays, computed with the same batch
whatever the number of processes, and the final result combines the partials in group order. So a
single process, a run resumed after an interruption and a run shared over W ranks give the same
numbers bit for bit (float32 results can depend on which rows share a batch: the world size never
changes what a group is).

- :func:`run_groups`: rank r computes groups r, r + W, r + 2W, ...; rank 0 gathers the partials.
- :class:`Partials`: each finished group is saved atomically as ``group-NNNNN.npz`` (arrays only,
  read back without unpickling anything) next to ``config.json``; a resumed run loads the groups
  whose configuration matches and computes the rest.
- :func:`stop_on_signals`: SIGINT and SIGTERM set a flag that the work checks between chunks
  (:meth:`Stop.check` raises :class:`Interrupted`); the group in progress is dropped, the finished ones
  stay saved. A second signal raises at once.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from statelens import distributed
from statelens.errors import BadInput, ParameterError
from statelens.outputs import atomic_write, write_json

Partial = dict[str, np.ndarray]
Work = Callable[[Callable[[int], None]], dict]   # advance -> a group's partial result


def groups(n: int, size: int) -> list[slice]:
    """Sequences 0 .. n - 1 in consecutive groups of ``size`` (the last may be smaller), as slices."""
    if size < 1:
        raise ParameterError("size", f"group size must be >= 1, got {size}")
    return [slice(first, min(first + size, n)) for first in range(0, n, size)]


def sum_in_order(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """arrays[0] + arrays[1] + ..., added left to right: the groups' partial sums combined in one fixed
    order, so the same partials give the same total bit for bit."""
    total = np.array(arrays[0], copy=True)
    for array in arrays[1:]:
        total += array
    return total


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the work; ``exit_code`` is 128 + the signal number (130, 143);
    ``saved`` says what was kept for a rerun with --resume (set by whoever kept it)."""

    def __init__(self, signum: int, saved: str = ""):
        self.signum, self.exit_code, self.saved = signum, 128 + signum, saved
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")


class Stop:
    """The signal flag: ``signum`` once SIGINT or SIGTERM arrived."""

    signum: int | None = None

    def check(self) -> None:
        """Raises :class:`Interrupted` when a signal arrived."""
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """Within the block SIGINT and SIGTERM set ``stop.signum`` (the work stops at its next
    :meth:`Stop.check`); a second signal raises :class:`Interrupted` at once. The previous handlers
    come back on exit. Outside the main thread (where Python allows no handler) the flag never fires."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame):
        if stop.signum is not None:
            raise Interrupted(signum)
        stop.signum = signum

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Partials:
    """The finished groups of one run under ``folder`` (e.g. ``OUT/.partial``), with the ``config``
    (a JSON-able dict) that produced them."""

    def __init__(self, folder: Path, config: dict):
        self.folder = Path(folder)
        self.config = json.loads(json.dumps(config, default=str, sort_keys=True))

    def open(self, resume: bool) -> None:
        """Without ``resume`` clears what an earlier run left; with it keeps the saved groups, after
        checking they come from the same configuration (else BadInput). Every rank checks, rank 0
        alone clears and writes config.json; ranks wait for one another."""
        saved = self.folder / "config.json"
        if resume and saved.is_file():
            try:
                before = json.loads(saved.read_text())
            except (OSError, ValueError):
                before = None
            if before != self.config:
                raise BadInput(f"--resume: {self.folder} was saved by a run with other settings "
                               f"({_difference(before, self.config)}); rerun without --resume to start over")
        distributed.barrier()
        if distributed.is_main():
            if not resume:
                shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.config, saved)
        distributed.barrier()

    def path(self, index: int) -> Path:
        return self.folder / f"group-{index:05d}.npz"

    def load(self, index: int) -> Partial | None:
        """Group ``index``'s saved result, or None (not saved, or unreadable: computed again)."""
        try:
            with np.load(self.path(index), allow_pickle=False) as arrays:
                return {name: arrays[name] for name in arrays.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            return None

    def save(self, index: int, result: Partial) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **result)

        atomic_write(self.path(index), write)

    def count(self) -> int:
        return len(list(self.folder.glob("group-*.npz")))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _difference(before: dict | None, now: dict) -> str:
    """The first setting that differs, in words."""
    if not isinstance(before, dict):
        return "its config.json is unreadable"
    flat_before, flat_now = _flatten(before), _flatten(now)
    for key in sorted(flat_before.keys() | flat_now.keys()):
        if flat_before.get(key) != flat_now.get(key):
            return f"{key} was {flat_before.get(key)!r}, now {flat_now.get(key)!r}"
    return "unknown difference"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_groups(work: Sequence[Work], partials: Partials | None = None, *, costs: Sequence[int] | None = None,
               advance: Callable[[int], None] | None = None) -> list[Partial] | None:
    """Runs ``work[i](advance)`` for this rank's groups i = rank, rank + W, ... and returns every
    group's result (a dict of numpy arrays) in group order on rank 0, None on the other ranks.

    ``partials``: groups saved there are loaded instead of computed (``advance`` is told their
    ``costs[i]``), and each computed group is saved as soon as it finishes. SIGINT/SIGTERM stop the
    work at its next ``advance`` call or group boundary with :class:`Interrupted`; the group in
    progress is dropped. Under torchrun an interrupted rank still joins the gather (with what it
    finished), so a rank already waiting there is released; then every rank raises the interruption
    of any rank.
    """
    done: dict[int, Partial] = {}
    interrupted: int | None = None
    with stop_on_signals() as stop:
        def tick(n: int) -> None:
            if advance is not None:
                advance(n)
            stop.check()

        try:
            for i in range(distributed.rank(), len(work), distributed.world_size()):
                result = partials.load(i) if partials is not None else None
                if result is None:
                    result = {name: np.asarray(value) for name, value in work[i](tick).items()}
                    if partials is not None:
                        partials.save(i, result)
                elif advance is not None and costs is not None:
                    advance(costs[i])
                done[i] = result
                stop.check()
        except Interrupted as e:
            interrupted = e.signum
        gathered = distributed.gather(done)
        # A signal may also come while waiting in the gather. Every rank learns of any rank's.
        interrupted = distributed.max_over_ranks(interrupted or stop.signum or 0)
    if interrupted:
        raise Interrupted(interrupted)
    if gathered is None:
        return None
    merged = {i: result for part in gathered for i, result in part.items()}
    return [merged[i] for i in range(len(work))]
