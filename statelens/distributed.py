"""Running under ``torchrun``: who this process is, and how results reach rank 0.

``torchrun --nproc-per-node N`` starts N copies of a command with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment. Without them (or with ``WORLD_SIZE=1``) everything here is the
single-process identity: rank 0 of a world of 1, gathers return ``[obj]``, barriers return at once.

The process group is set up by :func:`init` (gloo on the CPU, nccl on CUDA) and torn down at exit.
"""
from __future__ import annotations

import atexit
import os


class RankDone(Exception):
    """On a torchrun rank other than 0: this rank's share of the work is sent to rank 0, which alone
    combines and writes. The CLI leaves the command quietly (exit 0); a caller running several commands
    in turn (``report``) goes on to the next."""


def world_size() -> int:
    """Number of processes: ``WORLD_SIZE`` (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index in 0 .. world_size() - 1: ``RANK`` (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that combines results and writes every output."""
    return rank() == 0


def active() -> bool:
    """More than one process, with the process group set up."""
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def device_for(device: str) -> str:
    """The device of this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def init(device: str = "cpu") -> None:
    """Joins the process group torchrun describes (idempotent; nothing outside torchrun): nccl when
    ``device`` is CUDA, else gloo."""
    import torch
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        return
    backend = "gloo"
    if device.startswith("cuda"):
        backend = "nccl"
        torch.cuda.set_device(torch.device(device_for(device)))
    dist.init_process_group(backend)
    atexit.register(_destroy)


def _destroy() -> None:
    """At exit: wait for the other ranks (so none tears its connections down while another is still
    finishing a collective with it), then leave the group. A rank already gone only ends the wait."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:
            pass
        dist.destroy_process_group()


def gather(obj) -> list | None:
    """Every rank's ``obj`` on rank 0 as a list in rank order (pickled over the process group); None
    on the other ranks."""
    if not active():
        return [obj]
    import torch.distributed as dist

    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks take the same branch)."""
    return bool(max_over_ranks(int(flag)))


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over ranks, on every rank."""
    if not active():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def same_on_all_ranks(value: int) -> bool:
    """Whether every rank passed the same ``value`` (the answer on every rank)."""
    return max_over_ranks(value) == -max_over_ranks(-value)


def mean(values: list[float]) -> list[float]:
    """The mean over ranks of each value (every rank gets the result), in float64."""
    if not active():
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def _device() -> str:
    """Where collective tensors live: nccl reduces CUDA tensors only."""
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()
