"""The post-training loop: a few hundred steps from other initial states (Buitrago Ruiz & Gu, 2025).

Read top to bottom: :func:`posttrain` takes its settings as one :class:`PosttrainConfig`; ``_prepare``
checks the data, restores a save (``_restore``), distributes the model and builds optimizer, scheduler and
the sampler for the intervention; then each step (``_train_step``)

    state0 = sampler.sample(batch).detach()             # initial state, no gradient into it
    logits, final = model(tokens, state0)                # tokens [batch, seq_len]
    loss = cross_entropy(logits[:, :-1], tokens[:, 1:])  # next-token prediction within the chunk
    loss.backward(); clip; AdamW step; scheduler step
    sampler.update(final)                                # state passing / TBTT only

and, when due, a save (``_checkpoint``).

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
from dataclasses import asdict, dataclass
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
#: train_log.csv watched for inf/NaN (statelens.analysis.nonfinite): its key column and watched columns.
LOG_WATCHED = {"train_log": (("step",), ("loss", "grad_norm", "mean_state_norm"))}
# Settings a resumed run must share with the run it continues (steps and save_every may change).
_RESUME_KEYS = ("intervention", "seq_len", "batch", "lr", "warmup", "weight_decay", "clip", "seed",
                "noise_mean", "noise_std", "pass_conv", "fsdp")


@dataclass(frozen=True)
class PosttrainConfig:
    """The settings of a post-training run (the CLI's options; ``resume.pt`` keeps them as its "config").
    Built, it has been checked: :class:`~statelens.errors.BadInput` names the first bad setting."""

    intervention: str = "state-passing"  # initial state of each training sequence: one of INTERVENTIONS
    steps: int = 500                     # optimizer steps
    seq_len: int = 2048                  # tokens per training sequence (the new training length)
    batch: int = 8                       # sequences per step (divided among torchrun ranks)
    lr: float = 3e-4                     # peak AdamW learning rate (warm-up, then cosine to 10%)
    warmup: int = 50                     # linear warm-up steps
    weight_decay: float = 0.1            # AdamW weight decay, on matrices only (param_groups)
    clip: float = 1.0                    # gradient-norm clipping threshold
    seed: int = 0                        # batch order, noise and torch's generator
    save_every: int = 100                # save the checkpoint and resume.pt every this many steps
    noise_mean: float = 0.0              # "noise": mean of the iid Gaussian initial state
    noise_std: float = 1.0               # "noise": its standard deviation
    pass_conv: bool | None = None        # carry/noise conv states too; None: True for state passing, TBTT
    fsdp: bool = False                   # under torchrun: shard (FSDP2) instead of replicate (DDP)
    monitor_every: int = 0               # StateMonitor cadence in steps (out/monitor.csv); 0: no monitor

    def __post_init__(self) -> None:
        if self.intervention not in INTERVENTIONS:
            raise BadInput(f"unknown intervention {self.intervention!r} (choose from {', '.join(INTERVENTIONS)})")
        for name, least in (("steps", 1), ("seq_len", 2), ("batch", 1), ("warmup", 0), ("save_every", 1),
                            ("monitor_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BadInput(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value!r}")
        if not self.lr > 0 or not self.clip > 0:
            raise BadInput(f"--lr and --clip must be positive, got {self.lr!r} and {self.clip!r}")


MAX_SEQUENCES = 256  # training chunks drawn from the data (fewer when it holds fewer; batches cycle)


def training_draw(config: PosttrainConfig) -> tuple[int, int]:
    """How many sequences of how many tokens post-training draws from the data: for tbtt, documents of up
    to 8 chunks of ``seq_len``, ``batch`` of them per group of steps; else one chunk per sequence, enough
    for every step up to :data:`MAX_SEQUENCES` (batches cycle). A caller with less data than that may
    draw one batch: the least that trains."""
    c = config
    if c.intervention == "tbtt":
        chunks = min(c.steps, 8)
        return c.batch * min(-(-c.steps // chunks), MAX_SEQUENCES // c.batch or 1), chunks * c.seq_len
    return max(c.batch, min(c.steps * c.batch, MAX_SEQUENCES)), c.seq_len


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


def make_sampler(config: PosttrainConfig, model, pool: np.ndarray):
    """The initial-state sampler of ``config.intervention`` (fitted noise is fitted on up to 64 rows of
    ``pool`` [n, L])."""
    intervention, pass_conv = config.intervention, config.pass_conv
    if intervention == "none":
        return ZeroState(model)
    if intervention == "noise":
        return RandomNoise(model, config.noise_mean, config.noise_std, config.seed, pass_conv=bool(pass_conv))
    if intervention == "fitted-noise":
        return FittedNoise.fit(model, pool[:64], config.seq_len, config.seed)
    if intervention in ("state-passing", "tbtt"):
        sampler = StatePassing(model, pass_conv=True if pass_conv is None else pass_conv)
        sampler.name = intervention
        return sampler
    raise BadInput(f"unknown intervention {intervention!r} (choose from {', '.join(INTERVENTIONS)})")


@dataclass
class _Run:
    """What the steps and the saves of one run share. ``trained`` is ``model`` itself or its DDP wrapper;
    ``mine`` this rank's rows of a batch; ``saved_config`` the config resume.pt records (``fsdp``: whether
    this run is sharded)."""

    ckpt: Checkpoint
    config: PosttrainConfig
    out: Path
    model: torch.nn.Module
    trained: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: object
    mine: slice
    shard: bool
    saved_config: dict
    log: list[dict]


def posttrain(ckpt: Checkpoint, sequences_or_documents, config: PosttrainConfig | None = None, *,
              out: str | Path, resume: bool = False, progress: Callable[[int], None] | None = None,
              monitor_probe: np.ndarray | None = None, **settings) -> pd.DataFrame:
    """Post-trains ``ckpt.model`` in place; returns the training log (also written to out/train_log.csv).

    sequences_or_documents: int tokens [n, L]. TBTT: documents, ``batch`` of them per group, each cut
        into L // seq_len consecutive chunks. Otherwise: every row is cut into seq_len chunks.
    config: the settings; or give them as keyword ``settings`` (``steps=...``), as :class:`PosttrainConfig`'s
        fields. ``fsdp`` has no effect in a single process; sharded, the parameters stay sharded after the run.
    resume: continue from the last save in ``out``.
    progress: called with 1 after each step (and its save).
    monitor_probe: int tokens [n, >= 2 seq_len], required with ``monitor_every``: the probe of a
        :class:`~statelens.monitor.StateMonitor` measured before the first step (or at the resumed step)
        and every ``monitor_every`` steps, on the main process, into out/monitor.csv (rows of steps at or
        after a resumed step are measured again; the out-of-support reference is refitted then).

    Log columns: step (1-based), loss (mean next-token NLL of the batch, nats), lr (the step's learning
    rate), grad_norm (total norm before clipping), mean_state_norm (mean Frobenius norm of the final SSM
    state per layer, head and row).
    """
    if config is not None and settings:
        raise TypeError(f"posttrain: give a config or settings, not both (got {', '.join(settings)})")
    config = config if config is not None else PosttrainConfig(**settings)
    run, start, batches = _prepare(ckpt, sequences_or_documents, config, Path(out), resume)
    monitor = _monitor(run, monitor_probe)
    started = time.perf_counter()
    run.model.train()
    with stop_on_signals() as stop:
        try:
            monitor(start)
            for step in range(start, config.steps):
                run.log.append({"step": step + 1, **_train_step(run, *batches(step))})
                monitor(step + 1)
                stopping = distributed.any_rank(stop.signum is not None)
                if (step + 1) % config.save_every == 0 or step + 1 == config.steps or stopping:
                    _checkpoint(run, step + 1)
                if stopping and step + 1 < config.steps:
                    raise Interrupted(stop.signum or signal.SIGTERM)
                if progress is not None:
                    progress(1)
        finally:
            run.model.eval()
    df = pd.DataFrame(run.log, columns=LOG_COLUMNS)
    if distributed.is_main():
        write_json({"command": "posttrain", "config": run.saved_config, "checkpoint": str(ckpt.path),
                    "format": ckpt.format, "arch": run.model.arch, "resumed_from_step": start,
                    "train_seconds": round(time.perf_counter() - started, 3),
                    "final_loss": float(df.loss.iloc[-1]) if len(df) else None}, run.out / "run.json")
    return df


def _prepare(ckpt: Checkpoint, tokens, config: PosttrainConfig, out: Path, resume: bool):
    """Checks the data, builds the batches, restores a save when resuming, distributes the model and
    builds optimizer, scheduler and sampler: (the run, the step to start from, step -> (rows, new_documents))."""
    mine = _my_rows(config.batch)
    data = _training_data(tokens, config.seq_len)
    model = ckpt.model
    shard = config.fsdp and distributed.active()
    saved_config = asdict(config) | {"fsdp": shard}  # a sharded run's resume.pt holds its optimizer state by name
    torch.manual_seed(config.seed)
    batches, pool = _batch_source(data, config)
    saved = _read_resume_everywhere(out) if resume else None
    if saved is not None:
        _check_same(saved["config"], saved_config)
        model.load_state_dict(saved["model"])                     # whole weights, before any sharding
    if shard:
        _fully_shard(model)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)  # over the shards, if any
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.steps, config.warmup))
    run = _Run(ckpt, config, out, model, model, optimizer, scheduler, None, mine, shard, saved_config, [])
    start = 0
    if saved is not None:
        start = _restore(run, saved)
    else:
        run.sampler = make_sampler(config, model, pool)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if isinstance(run.sampler, FittedNoise):
            run.sampler.save(out / FITTED)
    if distributed.active() and not shard:
        run.trained = torch.nn.parallel.DistributedDataParallel(model)
    return run, start, batches


def _monitor(run: _Run, probe: np.ndarray | None) -> Callable[[int], object]:
    """step -> measures when due: the :meth:`StateMonitor.step` of a run with ``monitor_every`` on the main
    process; a no-op elsewhere. Built (and its probe checked) on every rank, before any step."""
    every = run.config.monitor_every
    if not every:
        return lambda step: None
    if probe is None:
        raise BadInput(f"--monitor-every {every} needs a probe: token sequences [n, >= 2 x seq_len]")
    if run.shard:
        raise BadInput("--monitor-every with --fsdp: the monitor runs on one process and cannot run a sharded model")
    from statelens.monitor import StateMonitor

    monitor = StateMonitor(run.model, probe, train_len=run.config.seq_len, every=every, out=run.out / "monitor.csv")
    return monitor.step if distributed.is_main() else (lambda step: None)


def _my_rows(batch: int) -> slice:
    """This rank's rows [r b / W, (r + 1) b / W) of a batch of b (W ranks must divide b)."""
    world, rank = distributed.world_size(), distributed.rank()
    if batch % world:
        raise BadInput(f"--batch {batch} does not divide among {world} processes")
    return slice(rank * batch // world, (rank + 1) * batch // world)


def _training_data(tokens, seq_len: int) -> np.ndarray:
    """tokens as an integer array [n, L], checked to hold one sequence of ``seq_len``."""
    data = np.asarray(tokens)
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise BadInput(f"training data must be integer tokens [n, length], got {data.dtype} {list(data.shape)}")
    if data.shape[1] < seq_len:
        raise BadInput(f"--seq-len {seq_len} is longer than the documents ({data.shape[1]} tokens)")
    return data


def _batch_source(data: np.ndarray, config: PosttrainConfig):
    """(step -> (rows [batch, seq_len], whether they start new documents), the pool fitted noise is fitted
    on). TBTT: chunk k of the same documents; otherwise :class:`Batches` (never new documents)."""
    if config.intervention == "tbtt":
        tbtt_batch(data, config.batch, config.seq_len, 0)  # raises when no batch fits
        return (lambda step: tbtt_batch(data, config.batch, config.seq_len, step)), data
    batches = Batches(data, config.batch, config.seq_len, config.seed)
    return (lambda step: (batches(step), False)), batches.pool


def _train_step(run: _Run, rows: np.ndarray, new_documents: bool) -> dict:
    """One optimizer step on this rank's rows of ``rows`` [batch, seq_len]; the log row (but its step),
    averaged over ranks."""
    if new_documents:
        run.sampler.reset()
    model, optimizer = run.model, run.optimizer
    tokens = torch.as_tensor(np.ascontiguousarray(rows[run.mine]), dtype=torch.long, device=model.device)
    state0 = _initial_state(run.sampler, run.config.batch, run.mine)
    logits, final = run.trained(tokens, state0)                          # [rows, seq_len, vocab]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.config.clip)
    step_lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    run.scheduler.step()
    if isinstance(run.sampler, StatePassing):
        run.sampler.update(final)
    step_loss, state_norm = distributed.mean([loss.item(), mean_state_norm(model, final)])
    if hasattr(grad_norm, "full_tensor"):                                # sharded: a DTensor
        grad_norm = grad_norm.full_tensor()
    return {"loss": step_loss, "lr": step_lr, "grad_norm": float(grad_norm), "mean_state_norm": state_norm}


def _checkpoint(run: _Run, step: int) -> None:
    """Saves the run after ``step`` steps (a collective: every rank calls it; rank 0 writes)."""
    sampler_state = _whole_batch(run.sampler)
    weights, optimizer_state = _whole_training_state(run.model, run.optimizer, run.shard)
    if distributed.is_main():
        _save(run, step, weights, optimizer_state, sampler_state)


def _restore(run: _Run, saved: dict) -> int:
    """Loads a save's optimizer, scheduler, RNG, sampler and log into ``run`` (the weights are loaded
    before sharding); returns the step it was saved at."""
    config = run.config
    _load_optimizer(run.model, run.optimizer, saved["optimizer"], run.shard)
    run.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    run.sampler = _empty_sampler(config, run.model)
    run.sampler.load_state_dict(saved["sampler"])
    if isinstance(run.sampler, StatePassing) and run.sampler.previous is not None:
        run.sampler.previous = run.sampler.previous.rows(run.mine)          # saved whole: this rank's rows
    run.log = [dict(row) for row in saved["log"]]
    return int(saved["step"])


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


def _empty_sampler(config: PosttrainConfig, model):
    """A sampler to load saved state into (fitted noise: placeholder statistics, replaced on load)."""
    if config.intervention == "fitted-noise":
        zeros = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
        return FittedNoise(model, zeros, zeros, config.seed)
    return make_sampler(config, model, np.zeros((0, 0), dtype=np.int64))


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


def _save(run: _Run, step: int, weights: dict, optimizer_state: dict, sampler_state: dict | None) -> None:
    """Checkpoint, metadata and log first, resume.pt last: a save interrupted midway resumes from the
    previous complete one."""
    config, out = run.config, run.out
    save_checkpoint(run.ckpt, out, weights)
    write_json({"train_len": config.seq_len, "intervention": config.intervention, "steps": step,
                "pass_conv": config.pass_conv}, out / METADATA)
    write_table(pd.DataFrame(run.log, columns=LOG_COLUMNS), out / "train_log.csv")
    payload = {"step": step, "config": run.saved_config, "model": weights,
               "optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(),
               "sampler": sampler_state, "rng": torch.get_rng_state(), "log": run.log}
    atomic_write(out / RESUME, lambda f: torch.save(payload, f))


def _read_resume_everywhere(out: Path) -> dict | None:
    """The save in ``out`` (None if there is none), checked to be the same save on every rank."""
    saved = _read_resume(out)
    if not distributed.same_on_all_ranks(-1 if saved is None else int(saved["step"])):
        raise BadInput(f"--resume: the torchrun ranks see different saves in --out {out}; it must be a folder "
                       "every rank shares")
    return saved


def _read_resume(out: Path) -> dict | None:
    path = out / RESUME
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:  # corrupt or foreign
        raise BadInput(f"{path}: cannot resume from it ({str(e).strip().splitlines()[0][:160]})") from None


def _check_same(saved: dict, config: dict) -> None:
    """BadInput naming the first setting a resumed run must share (_RESUME_KEYS) that differs from the save's."""
    for key in _RESUME_KEYS:
        if saved.get(key, False if key == "fsdp" else None) != config[key]:  # runs saved before --fsdp: unsharded
            raise BadInput(f"--resume: {key} was {saved.get(key)!r} in the saved run, now {config[key]!r}")
