"""statelens: diagnostics for the recurrent state of linear recurrent language models.

``statelens.load("ORG/NAME")`` or ``statelens.wrap(model)`` gives the model every analysis takes.
"""

__version__ = "0.1.0"


def wrap(model, *, check: bool = True):
    """A transformers, flash-linear-attention or statelens model as a statelens ``RecurrentLM``
    (:func:`statelens.models.auto.wrap`)."""
    from statelens.models.auto import wrap as _wrap  # torch is imported on use, so `statelens --help` stays quick

    return _wrap(model, check=check)


def load(spec, backend: str = "auto", *, device="cpu", dtype=None):
    """The ``RecurrentLM`` of a checkpoint directory or hub id ``ORG/NAME[@REVISION]``
    (:func:`statelens.models.auto.load`); ``dtype`` defaults to float32."""
    import torch

    from statelens.models.auto import load as _load

    return _load(spec, backend, device=device, dtype=dtype or torch.float32)
