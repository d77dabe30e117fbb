"""Which backend runs a checkpoint, chosen from its config: start with :func:`load_model` (a directory or
hub id) or :func:`wrap` (a model object in memory).

- ``native``: statelens' own backends, exact and with every hook point: mamba-ssm layouts (Mamba-1,
  Mamba-2) and the ``model_type`` s of their hf layouts (``mamba``, ``mamba2``, ``gla``, ``gated_deltanet``,
  ``delta_net``, ...: :data:`NATIVE_MODEL_TYPES`).
- ``hf``: the checkpoint's own ``transformers`` modules through
  :class:`~statelens.models.hf_adapter.HFRecurrentAdapter`, for any other ``model_type`` transformers
  knows whose cache holds recurrent states (falcon_mamba, bamba, zamba2, nemotron_h, ...).
- ``auto`` (the default): native where it exists, else hf where it runs, else a one-line refusal.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from statelens.errors import BadInput, CheckpointError
from statelens.models.base import RecurrentLM, backends
from statelens.models.checkpoint import (Checkpoint, _read_json, assemble, load_checkpoint, load_hf_adapter,
                                         parse_config, resolve_checkpoint)

BACKENDS = ("auto", "native", "hf")
# The model_types of the native backends' hf layouts, as each backend's file declares them.
NATIVE_MODEL_TYPES = tuple(sorted(layout.name for backend in backends for layout in backend.layouts
                                  if layout.format == "hf"))


def load_model(spec: str | os.PathLike, backend: str = "auto", *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Checkpoint:
    """A checkpoint directory or hub id, loaded by ``backend`` ("auto", "native" or "hf");
    ``Checkpoint.backend`` says which ran and ``Checkpoint.source`` where a hub id resolved to."""
    if backend not in BACKENDS:
        raise CheckpointError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    path, source = resolve_checkpoint(spec)
    if backend == "auto":
        backend = choose_backend(path)
    if backend == "native":
        loaded = load_checkpoint(path, device=device, dtype=dtype)
    else:
        model = load_hf_adapter(path, device=device, dtype=dtype)
        loaded = Checkpoint(model, path, "hf", "transformers", model.config.to_dict())
    loaded.source = source
    return loaded


def choose_backend(path: Path) -> str:
    """"native" or "hf" for the checkpoint directory ``path``, from its config.json alone.

    A directory native loading would refuse for its own reasons (no config.json, a bad value in a
    mamba config) gets "native", so that its message names the problem.
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        return "native"
    model_type = _read_json(config).get("model_type")
    if not isinstance(model_type, str) or model_type in NATIVE_MODEL_TYPES:
        return "native"  # a mamba-ssm layout (no model_type), a native family, or native's own refusal
    why = _why_not_hf(path, model_type)
    if why is None:
        return "hf"
    raise CheckpointError(f"{config}: model_type {model_type!r} is not supported: statelens runs "
                          f"{', '.join(NATIVE_MODEL_TYPES)} and mamba-ssm layouts natively, and through transformers "
                          f"(--backend hf) any causal LM whose cache holds recurrent states; {why}")


def _why_not_hf(path: Path, model_type: str) -> str | None:
    """None when transformers has a causal LM for ``model_type`` whose cache keeps a recurrent layer;
    else the reason, in a few words."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        from statelens.models.hf_adapter import OLDEST_TRANSFORMERS

        return f"transformers is not installed (pip install 'statelens[hf]': transformers >= {OLDEST_TRANSFORMERS})"
    from statelens.models.hf_adapter import (every_layer_recurrent, layer_kinds, state_outside_cache,
                                             transformers_too_old, unknown_model_type)

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return unknown_model_type(_read_json(Path(path) / "config.json"))
    too_old = transformers_too_old()
    if too_old is not None:
        return too_old

    hf_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    holder = state_outside_cache(hf_class) if hf_class is not None else None
    if holder is not None:
        return (f"it keeps its state between calls in {holder}, not in transformers' DynamicCache, which the hf "
                "adapter carries")
    if hf_class is not None and every_layer_recurrent(hf_class):
        return None  # RWKV's forward's `state` argument, xLSTM's own cache: every layer recurrent
    try:
        config = transformers.AutoConfig.from_pretrained(os.fspath(path), local_files_only=True,
                                                         trust_remote_code=False)
        kinds = layer_kinds(config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"transformers cannot read its config ({type(error).__name__}: {error})"
    if not any(kind in ("recurrent", "hybrid") for kind in kinds):
        return "its transformers cache keeps no recurrent state (an attention-only model)"
    return None


def wrap(model, *, check: bool = True) -> RecurrentLM:
    """A model object in memory as the :class:`RecurrentLM` every analysis takes.

    - a statelens model: returned as it is;
    - a transformers or flash-linear-attention model of a native family (``model_type`` in
      :data:`NATIVE_MODEL_TYPES`: mamba, mamba2, mamba3, gla, gated_deltanet, delta_net, rwkv7): the native backend holding the same tensors (shared, not copied), as ``--backend auto``
      would load it from disk, so the numbers equal the CLI's on the saved model;
    - any other transformers causal LM whose cache holds recurrent states: the
      :class:`~statelens.models.hf_adapter.HFRecurrentAdapter` around it (``check``: compare chunked
      with one-shot logits first).
    """
    if isinstance(model, RecurrentLM):
        return model
    config = getattr(model, "config", None)
    name = type(model).__name__
    if not hasattr(config, "to_dict") or not hasattr(model, "state_dict"):
        raise BadInput(f"{name}: not a model statelens can wrap (a statelens model, or a transformers or "
                       "flash-linear-attention causal LM)")
    raw = json.loads(json.dumps(config.to_dict(), default=str))  # as config.json would hold it
    if raw.get("model_type") not in NATIVE_MODEL_TYPES:
        from statelens.models.hf_adapter import HFRecurrentAdapter

        return HFRecurrentAdapter(model, check=check)
    fmt, arch, native_config = parse_config(raw, name)
    first = next(model.parameters())
    return assemble(arch, native_config, model.state_dict(), fmt, name, device=first.device, dtype=first.dtype)


def load(spec: str | os.PathLike, backend: str = "auto", *, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> RecurrentLM:
    """The :class:`RecurrentLM` of a checkpoint directory or hub id (:func:`load_model`'s model)."""
    return load_model(spec, backend, device=device, dtype=dtype).model
