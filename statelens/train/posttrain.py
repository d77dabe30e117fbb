"""The post-training loop: a few hundred steps from other initial states (Buitrago Ruiz & Gu, 2025).

Read top to bottom: :func:`posttrain` builds the sampler for the intervention, then each step

    state0 = sampler.sample(batch).detach()             # initial state, no gradient into it
    logits, final = model(tokens[:, :-1] ... )           # tokens [batch, seq_len]
    loss = cross_entropy(logits[:, :-1], tokens[:, 1:])  # next-token prediction within the chunk
    loss.backward(); clip; AdamW step; scheduler step
    sampler.update(final)                                # state passing / TBTT only

The learning rate warms up linearly over ``warmup`` steps, then decays along a cosine to 10% of ``lr``
at ``steps``. Every ``save_every`` steps and at the end the run writes to ``out``: the checkpoint in the
input's format, ``statelens.json`` (``train_len``, ``intervention``, ``steps``: what the analyses read),
``train_log.csv`` and ``resume.pt`` (model, optimizer, scheduler, sampler and RNG state as plain tensors
and numbers, read back with ``torch.load(weights_only=True)``). ``resume=True`` continues from the last
save and ends with the same weights as an uninterrupted run.

Batches are a function of the step index alone (seeded permutations of the training chunks; TBTT: chunk
k of the same documents), so a resumed run sees exactly the batches the uninterrupted one would.
SIGINT or SIGTERM ends the run after the current step, saved (:class:`~statelens.resumable.Interrupted`).

Under ``torchrun`` (:mod:`statelens.distributed`) the model is wrapped in DistributedDataParallel and
rank r trains on rows [r b / W, (r + 1) b / W) of each step's batch of b (W must divide b); gradients are
averaged over ranks, so the step equals a single-process step up to float rounding. A state-passing
sampler holds its rank's rows; the noise samplers draw the whole batch on every rank and keep their rows.
Rank 0 alone writes. With ``fsdp=True`` the model is sharded instead (FSDP2's ``fully_shard`` on every
block, then on the whole): each rank holds 1/W of the parameters, gradients and optimizer state, for
models whose training state does not fit one device. Saves gather the full weights and optimizer state
to rank 0, so the checkpoint and ``resume.pt`` are the same files as without sharding.
"""
from __future__ import annotations

import math
import pickle
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from statelens import distributed
from statelens.errors import BadInput
from statelens.interventions.samplers import (FittedNoise, RandomNoise, StatePassing, ZeroState, mean_state_norm,
                                              tbtt_batch)
from statelens.models.checkpoint import Checkpoint, save_checkpoint
from statelens.outputs import atomic_write, write_json, write_table
from statelens.resumable import Interrupted, stop_on_signals

INTERVENTIONS = ("none", "noise", "fitted-noise", "state-passing", "tbtt")
METADATA = "statelens.json"
RESUME = "resume.pt"
FITTED = "fitted_noise.safetensors"
LOG_COLUMNS = ["step", "loss", "lr", "grad_norm", "mean_state_norm"]
# Settings a resumed run must share with the run it continues (steps and save_every may change).
_RESUME_KEYS = ("intervention", "seq_len", "batch", "lr", "warmup", "weight_decay", "clip", "seed",
                "noise_mean", "noise_std", "pass_conv", "fsdp")


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of ``lr`` at 0-based ``step``: linear warm-up to 1 over ``warmup`` steps, then a cosine
    from 1 down to 0.1 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Batches:
    """Non-TBTT data: every row of ``sequences`` [n, L] is cut into L // seq_len chunks; step s takes
    the next ``batch`` chunks of an endless sequence of seeded permutations (a function of s alone)."""

    def __init__(self, sequences: np.ndarray, batch: int, seq_len: int, seed: int):
        n, length = sequences.shape
        per_row = length // seq_len
        self.pool = sequences[:, :per_row * seq_len].reshape(n * per_row, seq_len)
        if len(self.pool) < batch:
            raise BadInput(f"data too small: {len(self.pool)} chunk(s) of {seq_len} tokens, fewer than one "
                           f"batch of {batch}")
        self.batch, self.seed, self._perms = batch, seed, {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))}
        return self._perms[epoch]

    def __call__(self, step: int) -> np.ndarray:
        rows = [self._perm(pos // len(self.pool))[pos % len(self.pool)]
                for pos in range(step * self.batch, (step + 1) * self.batch)]
        return self.pool[rows]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (embeddings, projections, convolution kernels) only. Vectors
    go undecayed -- biases, norm weights, and above all A_log, dt_bias and D (mamba-ssm exempts them too):
    decay would pull dt_bias towards 0, i.e. every head towards fast forgetting."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_sampler(intervention: str, model, pool: np.ndarray, seq_len: int, seed: int, *, noise_mean: float,
                 noise_std: float, pass_conv: bool | None):
    """The initial-state sampler of ``intervention`` (fitted noise is fitted on up to 64 rows of ``pool``)."""
    if intervention == "none":
        return ZeroState(model)
    if intervention == "noise":
        return RandomNoise(model, noise_mean, noise_std, seed, pass_conv=bool(pass_conv))
    if intervention == "fitted-noise":
        return FittedNoise.fit(model, pool[:64], seq_len, seed)
    if intervention in ("state-passing", "tbtt"):
        sampler = StatePassing(model, pass_conv=True if pass_conv is None else pass_conv)
        sampler.name = intervention
        return sampler
    raise BadInput(f"unknown intervention {intervention!r} (choose from {', '.join(INTERVENTIONS)})")


def posttrain(ckpt: Checkpoint, sequences_or_documents, *, intervention: str = "state-passing", steps: int = 500,
              seq_len: int = 2048, batch: int = 8, lr: float = 3e-4, warmup: int = 50, weight_decay: float = 0.1,
              clip: float = 1.0, seed: int = 0, save_every: int = 100, out: str | Path, resume: bool = False,
              noise_mean: float = 0.0, noise_std: float = 1.0, pass_conv: bool | None = None, fsdp: bool = False,
              progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Post-trains ``ckpt.model`` in place; returns the training log (also written to out/train_log.csv).

    sequences_or_documents: int tokens [n, L]. TBTT: documents, ``batch`` of them per group, each cut
        into L // seq_len consecutive chunks. Otherwise: every row is cut into seq_len chunks.
    pass_conv: carry/noise the conv states too; default True for state passing and TBTT, False for noise.
    fsdp: under torchrun, shard the model across ranks (FSDP2) instead of replicating it (DDP); no effect
        in a single process. The model's parameters stay sharded after the run.
    progress: called with 1 after each step (and its save).

    Log columns: step (1-based), loss (mean next-token NLL of the batch, nats), lr (the step's learning
    rate), grad_norm (total norm before clipping), mean_state_norm (mean Frobenius norm of the final SSM
    state per layer, head and row).
    """
    check_settings(intervention, steps, seq_len, batch, lr, warmup, clip, save_every)
    if batch % distributed.world_size():
        raise BadInput(f"--batch {batch} does not divide among {distributed.world_size()} processes")
    mine = slice(distributed.rank() * batch // distributed.world_size(),
                 (distributed.rank() + 1) * batch // distributed.world_size())   # this rank's rows of a batch
    out = Path(out)
    data = np.asarray(sequences_or_documents)
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise BadInput(f"training data must be integer tokens [n, length], got {data.dtype} {list(data.shape)}")
    if data.shape[1] < seq_len:
        raise BadInput(f"--seq-len {seq_len} is longer than the documents ({data.shape[1]} tokens)")
    model = ckpt.model
    config = {"intervention": intervention, "steps": steps, "seq_len": seq_len, "batch": batch, "lr": lr,
              "warmup": warmup, "weight_decay": weight_decay, "clip": clip, "seed": seed, "save_every": save_every,
              "noise_mean": noise_mean, "noise_std": noise_std, "pass_conv": pass_conv}
    shard = fsdp and distributed.active()
    config["fsdp"] = shard   # a sharded run's resume.pt holds its optimizer state by parameter name
    torch.manual_seed(seed)

    batches = None
    if intervention == "tbtt":
        tbtt_batch(data, batch, seq_len, 0)  # raises when no batch fits
    else:
        batches = Batches(data, batch, seq_len, seed)
    pool = data if batches is None else batches.pool
    saved = _read_resume(out) if resume else None
    if not distributed.same_on_all_ranks(-1 if saved is None else int(saved["step"])):
        raise BadInput(f"--resume: the torchrun ranks see different saves in --out {out}; it must be a folder "
                       "every rank shares")
    if saved is not None:
        _check_same(saved["config"], config)
        model.load_state_dict(saved["model"])                     # whole weights, before any sharding
    if shard:
        _fully_shard(model)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)   # over the shards, if sharded
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))

    start, log = 0, []
    if saved is not None:
        _load_optimizer(model, optimizer, saved["optimizer"], shard)
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        sampler = _empty_sampler(intervention, model, seed, noise_mean, noise_std, pass_conv)
        sampler.load_state_dict(saved["sampler"])
        if isinstance(sampler, StatePassing) and sampler.previous is not None:
            sampler.previous = sampler.previous.rows(mine)          # saved whole: this rank's rows
        start, log = int(saved["step"]), [dict(row) for row in saved["log"]]
    else:
        sampler = make_sampler(intervention, model, pool, seq_len, seed, noise_mean=noise_mean,
                               noise_std=noise_std, pass_conv=pass_conv)
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if isinstance(sampler, FittedNoise):
            sampler.save(out / FITTED)

    trained = model
    if distributed.active() and not shard:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    started = time.perf_counter()
    model.train()
    with stop_on_signals() as stop:
        try:
            for step in range(start, steps):
                if batches is None:
                    rows, new_documents = tbtt_batch(data, batch, seq_len, step)
                    if new_documents:
                        sampler.reset()
                else:
                    rows = batches(step)
                tokens = torch.as_tensor(np.ascontiguousarray(rows[mine]), dtype=torch.long, device=model.device)
                state0 = _initial_state(sampler, batch, mine)
                logits, final = trained(tokens, state0)                    # [rows, seq_len, vocab]
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                step_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                if isinstance(sampler, StatePassing):
                    sampler.update(final)
                step_loss, state_norm = distributed.mean([loss.item(), mean_state_norm(model, final)])
                if hasattr(grad_norm, "full_tensor"):                  # sharded: a DTensor
                    grad_norm = grad_norm.full_tensor()
                log.append({"step": step + 1, "loss": step_loss, "lr": step_lr, "grad_norm": float(grad_norm),
                            "mean_state_norm": state_norm})
                stopping = distributed.any_rank(stop.signum is not None)
                if (step + 1) % save_every == 0 or step + 1 == steps or stopping:
                    sampler_state = _whole_batch(sampler)
                    weights, optimizer_state = _whole_training_state(model, optimizer, shard)
                    if main:
                        _save(ckpt, out, config, step + 1, weights, optimizer_state, scheduler, sampler_state, log)
                if stopping and step + 1 < steps:
                    raise Interrupted(stop.signum or signal.SIGTERM)
                if progress is not None:
                    progress(1)
        finally:
            model.eval()
    df = pd.DataFrame(log, columns=LOG_COLUMNS)
    if main:
        write_json({"command": "posttrain", "config": config, "checkpoint": str(ckpt.path), "format": ckpt.format,
                    "arch": model.arch, "resumed_from_step": start,
                    "train_seconds": round(time.perf_counter() - started, 3),
                    "final_loss": float(df.loss.iloc[-1]) if len(df) else None}, out / "run.json")
    return df


def _initial_state(sampler, batch: int, mine: slice):
    """This rank's rows ``mine`` of the step's initial state, detached. A state-passing sampler holds only
    this rank's rows; the others draw the whole batch on every rank (so their generators stay in step)."""
    if isinstance(sampler, StatePassing):
        return sampler.sample(mine.stop - mine.start).detach()
    return sampler.sample(batch).rows(mine).detach()


def _whole_batch(sampler) -> dict | None:
    """The sampler's state_dict with every rank's rows (a state-passing sampler's, gathered in rank order)
    on rank 0; None on the other ranks."""
    parts = distributed.gather(sampler.state_dict())
    if parts is None or len(parts) == 1 or not isinstance(sampler, StatePassing) or not parts[0]:
        return None if parts is None else parts[0]
    return {key: [torch.cat([part[key][i] for part in parts]) for i in range(len(parts[0][key]))]
            for key in parts[0]}


def check_settings(intervention, steps, seq_len, batch, lr, warmup, clip, save_every) -> None:
    """Raises BadInput naming the first bad setting (the CLI calls it before loading anything)."""
    if intervention not in INTERVENTIONS:
        raise BadInput(f"unknown intervention {intervention!r} (choose from {', '.join(INTERVENTIONS)})")
    for name, value, least in (("steps", steps, 1), ("seq_len", seq_len, 2), ("batch", batch, 1),
                               ("warmup", warmup, 0), ("save_every", save_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise BadInput(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value!r}")
    if not lr > 0 or not clip > 0:
        raise BadInput(f"--lr and --clip must be positive, got {lr!r} and {clip!r}")


def _empty_sampler(intervention, model, seed, noise_mean, noise_std, pass_conv):
    """A sampler to load saved state into (fitted noise: placeholder statistics, replaced on load)."""
    if intervention == "fitted-noise":
        zeros = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
        return FittedNoise(model, zeros, zeros, seed)
    return make_sampler(intervention, model, np.zeros((0, 0), dtype=np.int64), 0, seed,
                        noise_mean=noise_mean, noise_std=noise_std, pass_conv=pass_conv)


def _fully_shard(model: torch.nn.Module) -> None:
    """FSDP2: every block its own unit (its parameters gathered only while it runs), then the rest."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # The views FSDP warns of are the blocks' output states: nothing writes into them in place (samplers
    # detach them), so no pre-backward hook is skipped; the single-process comparison tests the gradients.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def _whole_training_state(model, optimizer, shard: bool) -> tuple[dict, dict]:
    """The weights (on the CPU) and the optimizer's state_dict, whole. Sharded, this gathers them to
    rank 0 (a collective: every rank calls it; the others get empty dicts)."""
    if not shard:  # replicated: rank 0's copy is the whole state
        if not distributed.is_main():
            return {}, {}
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=whole), get_optimizer_state_dict(model, optimizer, options=whole)


def _load_optimizer(model, optimizer, state: dict, shard: bool) -> None:
    """Loads a whole optimizer state_dict (as :func:`_whole_training_state` gives), onto the shards if sharded."""
    if not shard:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _save(ckpt, out: Path, config: dict, step: int, weights: dict, optimizer_state: dict, scheduler,
          sampler_state: dict, log: list[dict]) -> None:
    """Checkpoint, metadata and log first, resume.pt last: a save interrupted midway resumes from the
    previous complete one."""
    save_checkpoint(ckpt, out, weights)
    write_json({"train_len": config["seq_len"], "intervention": config["intervention"], "steps": step,
                "pass_conv": config["pass_conv"]}, out / METADATA)
    write_table(pd.DataFrame(log, columns=LOG_COLUMNS), out / "train_log.csv")
    payload = {"step": step, "config": config, "model": weights,
               "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
               "sampler": sampler_state, "rng": torch.get_rng_state(), "log": log}
    atomic_write(out / RESUME, lambda f: torch.save(payload, f))


def _read_resume(out: Path) -> dict | None:
    path = out / RESUME
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:  # corrupt or foreign
        raise BadInput(f"{path}: cannot resume from it ({str(e).strip().splitlines()[0][:160]})") from None


def _check_same(saved: dict, config: dict) -> None:
    for key in _RESUME_KEYS:
        if saved.get(key, False if key == "fsdp" else None) != config[key]:  # runs saved before --fsdp: unsharded
            raise BadInput(f"--resume: {key} was {saved.get(key)!r} in the saved run, now {config[key]!r}")
