"""Initial-state samplers for post-training (DESIGN.md, "Interventions on the initial state").

Buitrago Ruiz & Gu (2025) fix length generalization by training from initial states other than zero.
Each sampler here gives the initial state of one training batch: ``sampler.sample(batch) -> State``.

- :class:`ZeroState`: the all-zero state (plain training, the baseline).
- :class:`RandomNoise`: iid Gaussian, one mean/std for every layer and head.
- :class:`FittedNoise`: Gaussian with a mean/std per layer and per head, fitted to the final states of
  training sequences run from zero (:meth:`FittedNoise.fit`; saved with the run).
- :class:`StatePassing`: the previous batch's final state, detached (:meth:`StatePassing.update`).
- TBTT is a loader concern: :func:`tbtt_batches` serves consecutive chunks of the same documents, and
  :class:`StatePassing` carries the state between them (reset to zero when new documents start).

Conv states (the last ``d_conv - 1`` inputs of the causal convolution) are not part of the paper's
"state". ``pass_conv`` says whether they are carried too: noise samplers leave them zero unless
``pass_conv=True`` (then they get the same noise: ``RandomNoise``; or are left zero: ``FittedNoise``
fits SSM states only); state passing and TBTT carry them by default (``pass_conv=True``), which makes
a TBTT chunk see exactly the inputs an unchunked run would.

Every sampler has ``name``, ``state_dict()`` and ``load_state_dict(d)`` (plain tensors and numbers,
loadable with ``torch.load(weights_only=True)``) so a post-training run resumes exactly.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from statelens.errors import BadInput
from statelens.models.base import RecurrentLM, State


def _heads(model: RecurrentLM, layer: int, t: torch.Tensor) -> torch.Tensor:
    """A layer's SSM state [batch, ...] -> [batch, heads, k] (the backend's per-head view)."""
    return model.by_head(f"blocks.{layer}.hook_state", t)


class ZeroState:
    """The all-zero initial state: training as in pre-training."""

    name = "none"

    def __init__(self, model: RecurrentLM):
        self.model = model

    def sample(self, batch: int) -> State:
        return self.model.zero_state(batch, device=self.model.device, dtype=self.model.dtype)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RandomNoise:
    """iid Gaussian SSM states: every entry of every layer and head ~ N(mean, std^2).

    Conv states are zero unless ``pass_conv`` (then they are drawn from the same Gaussian).
    """

    name = "noise"

    def __init__(self, model: RecurrentLM, mean: float = 0.0, std: float = 1.0, seed: int = 0,
                 pass_conv: bool = False):
        if not std >= 0:
            raise BadInput(f"noise std must be >= 0, got {std!r}")
        self.model, self.mean, self.std, self.pass_conv = model, float(mean), float(std), pass_conv
        self.generator = torch.Generator().manual_seed(seed)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        z = torch.randn(like.shape, generator=self.generator, dtype=torch.float64)
        return (self.mean + self.std * z).to(device=like.device, dtype=like.dtype)

    def sample(self, batch: int) -> State:
        zero = ZeroState(self.model).sample(batch)
        conv = tuple(self._noise(c) for c in zero.conv) if self.pass_conv else zero.conv
        return State(tuple(self._noise(s) for s in zero.ssm), conv)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class FittedNoise:
    """Gaussian SSM states with a mean and std per layer and per head, fitted to final states.

    ``mean[layer][head]``, ``std[layer][head]``: float64 tensors [n_layers, n_heads]. A head's entries
    are drawn iid from N(mean, std^2) and laid out as the backend's ``by_head`` view. Conv states are zero
    (``pass_conv`` is accepted for symmetry and must be False: conv states are not fitted).
    """

    name = "fitted-noise"

    def __init__(self, model: RecurrentLM, mean: torch.Tensor, std: torch.Tensor, seed: int = 0,
                 pass_conv: bool = False):
        if pass_conv:
            raise BadInput("fitted noise fits SSM states only; pass_conv must be False")
        shape = (model.n_layers, model.n_heads)
        mean, std = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
        if tuple(mean.shape) != shape or tuple(std.shape) != shape:
            raise BadInput(f"fitted noise: mean/std have shapes {tuple(mean.shape)}/{tuple(std.shape)}, "
                           f"the model needs [n_layers, n_heads] = {list(shape)}")
        self.model, self.mean, self.std = model, mean, std
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def fit(cls, model: RecurrentLM, sequences, seq_len: int, seed: int = 0, *, batch: int = 8) -> FittedNoise:
        """Runs ``model`` from the zero state over each row of ``sequences`` [n, >= seq_len] (first
        ``seq_len`` tokens), takes the final SSM states, and per layer and head the mean and (population)
        std over sequences and the head's entries."""
        tokens = torch.as_tensor(np.asarray(sequences), dtype=torch.long)
        if tokens.dim() != 2 or tokens.shape[1] < seq_len or tokens.shape[0] < 1:
            raise BadInput(f"fitted noise: need sequences [n, >= {seq_len}], got {list(tokens.shape)}")
        finals = final_states(model, tokens[:, :seq_len], batch=batch)  # per layer [n, heads, k]
        mean = torch.stack([f.mean(dim=(0, 2)) for f in finals])
        std = torch.stack([f.std(dim=(0, 2), correction=0) for f in finals])
        return cls(model, mean, std, seed)

    def sample(self, batch: int) -> State:
        zero = ZeroState(self.model).sample(batch)
        ssm = []
        for layer, s in enumerate(zero.ssm):
            heads = _heads(self.model, layer, s)                                    # [b, H, k]
            z = torch.randn(heads.shape, generator=self.generator, dtype=torch.float64)
            h = self.mean[layer][None, :, None] + self.std[layer][None, :, None] * z
            ssm.append(h.reshape(s.shape).to(device=s.device, dtype=s.dtype))
        return State(tuple(ssm), zero.conv)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes mean and std ([n_layers, n_heads]) as safetensors, or JSON when ``path`` ends in .json."""
        from statelens.outputs import atomic_write

        path = Path(path)
        if path.suffix == ".json":
            data = {"mean": self.mean.tolist(), "std": self.std.tolist()}
            return atomic_write(path, lambda f: Path(f).write_text(json.dumps(data) + "\n"))
        from safetensors.torch import save_file

        return atomic_write(path, lambda f: save_file({"mean": self.mean.contiguous(), "std": self.std.contiguous()}, f))

    @classmethod
    def load(cls, path: str | os.PathLike, model: RecurrentLM, seed: int = 0) -> FittedNoise:
        path = Path(path)
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text())
                return cls(model, torch.tensor(data["mean"]), torch.tensor(data["std"]), seed)
            from safetensors.torch import load_file

            data = load_file(path)
            return cls(model, data["mean"], data["std"], seed)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{path}: not a fitted-noise file ({e})") from None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.mean, self.std = state["mean"], state["std"]


class StatePassing:
    """The previous batch's final state, detached, as the next batch's initial state.

    Zero before the first :meth:`update` and after :meth:`reset`. Conv states are carried too when
    ``pass_conv`` (default), else zero. Also the carrier for TBTT (reset when new documents start).
    """

    name = "state-passing"

    def __init__(self, model: RecurrentLM, pass_conv: bool = True):
        self.model, self.pass_conv = model, pass_conv
        self.previous: State | None = None

    def update(self, final_state: State) -> None:
        """Remembers ``final_state`` (detached: no gradient crosses batches)."""
        self.previous = final_state.detach()

    def reset(self) -> None:
        self.previous = None

    def sample(self, batch: int) -> State:
        zero = ZeroState(self.model).sample(batch)
        if self.previous is None:
            return zero
        if self.previous.batch_size != batch:
            raise BadInput(f"state passing: previous batch had {self.previous.batch_size} rows, this one {batch}")
        return State(self.previous.ssm, self.previous.conv if self.pass_conv else zero.conv)

    def state_dict(self) -> dict:
        if self.previous is None:
            return {}
        return {"ssm": list(self.previous.ssm), "conv": list(self.previous.conv)}

    def load_state_dict(self, state: dict) -> None:
        self.previous = State(tuple(state["ssm"]), tuple(state["conv"])) if state else None


def tbtt_batch(documents, batch: int, seq_len: int, index: int) -> tuple[np.ndarray, bool]:
    """The ``index``-th TBTT batch (cycling): chunk k of documents [g*batch, (g+1)*batch), and whether it
    starts new documents (k == 0: the carried state must be reset to zero)."""
    documents = np.asarray(documents)
    n_docs, length = documents.shape
    chunks, groups = length // seq_len, n_docs // batch
    if chunks < 1 or groups < 1:
        raise BadInput(f"TBTT: documents [{n_docs}, {length}] hold no batch of {batch} x {seq_len} tokens")
    group, k = divmod(index % (chunks * groups), chunks)
    rows = documents[group * batch:(group + 1) * batch, k * seq_len:(k + 1) * seq_len]
    return rows, k == 0


def tbtt_batches(documents, batch: int, seq_len: int) -> Iterator[tuple[np.ndarray, bool]]:
    """Truncated backpropagation through time: yields ([batch, seq_len] tokens, starts_new_documents)
    forever. Batch k serves chunk k of each of the first ``batch`` documents (row i =
    ``documents[i, k*seq_len:(k+1)*seq_len]``), so consecutive batches continue the same documents; after
    the last whole chunk the next ``batch`` documents start (flag True), cycling. Trailing tokens that fill
    no whole chunk, and documents that fill no whole batch, are not used."""
    index = 0
    while True:
        yield tbtt_batch(documents, batch, seq_len, index)
        index += 1


@torch.no_grad()
def final_states(model: RecurrentLM, tokens: torch.Tensor, *, batch: int = 8) -> list[torch.Tensor]:
    """Per layer, the final SSM states from the zero state, float64 [n, heads, k] (by_head view)."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.n_layers)]
    for i in range(0, tokens.shape[0], batch):
        rows = tokens[i:i + batch].to(model.device)
        _, state = model(rows, model.zero_state(rows.shape[0], device=model.device, dtype=model.dtype))
        for layer, s in enumerate(state.ssm):
            per_layer[layer].append(_heads(model, layer, s).double().cpu())
    return [torch.cat(chunks) for chunks in per_layer]


def mean_state_norm(model: RecurrentLM, state: State) -> float:
    """Mean over layers, heads and batch rows of each head's Frobenius state norm."""
    norms = [_heads(model, layer, s.detach()).double().norm(dim=-1).mean() for layer, s in enumerate(state.ssm)]
    return float(torch.stack(norms).mean())
