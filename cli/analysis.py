"""The analysis commands, generated from their specs: ``statelens perplexity|remembrance|states|decay|
coverage|...`` each take the options every analysis shares (:mod:`statelens.cli.options`) plus the fields
of the spec's options dataclass, and run :func:`statelens.cli.common.execute`."""
from __future__ import annotations

import inspect
from enum import Enum
from typing import Annotated, Optional

import typer

from statelens.cli.options import (Backend, BackendName, Chunk, Ckpt, Compile, CompileMode, Data, Device, DType, Dtype,
                                   Group, Length, MitigationSpec, NumSeqs, Out, Resume, Seed, TextField, TokenizerOpt,
                                   TrainLen)

#: (name, annotation, default) of the options every analysis takes; the spec's own go after ``num_seqs``.
BEFORE = [("ckpt", Ckpt, inspect.Parameter.empty), ("data", Data, None), ("train_len", TrainLen, None),
          ("length", Length, None), ("num_seqs", NumSeqs, 8)]
AFTER = [("chunk", Chunk, 2048), ("group", Group, 1), ("resume", Resume, False), ("device", Device, "cpu"),
         ("backend", Backend, BackendName.auto), ("dtype", Dtype, DType.float32), ("seed", Seed, 0),
         ("out", Out, None), ("mitigation", MitigationSpec, None), ("tokenizer", TokenizerOpt, None),
         ("text_field", TextField, "text"), ("compile", Compile, CompileMode.auto)]


def command(spec):
    """The typer command of an analysis spec: its signature is the shared options and the spec's."""
    from statelens.analysis.spec import option_fields

    own = [_spec_option(*field) for field in option_fields(spec.options)]
    shared = [p for p in BEFORE if p[0] in spec.shared] + own + [p for p in AFTER if p[0] in spec.shared]
    parameters = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                  for name, annotation, default in shared]

    def run_command(**given) -> None:
        from statelens.cli.common import execute
        from statelens.runs import RunSettings

        values = {name: value.value if isinstance(value, Enum) else value for name, value in given.items()}
        settings = RunSettings(**{name: values.pop(name) for name in spec.shared})
        execute(spec, settings, spec.options(**values))

    run_command.__signature__ = inspect.Signature(parameters)
    run_command.__doc__ = spec.summary
    run_command.__name__ = spec.name
    return run_command


def _spec_option(name: str, kind: type, default, meta: dict) -> tuple[str, object, object]:
    """(name, typer annotation, default) of one field of an options dataclass (see
    :func:`statelens.analysis.spec.option`); a field with ``choices`` takes that Enum's values."""
    optional = default is None  # the fields that default to None are the optional ones (X | None)
    choices = meta.get("choices")
    if choices is not None:
        kind, default = choices, (None if default is None else choices(default))
    elif optional:
        kind = next(t for t in kind.__args__ if t is not type(None))
    flag = meta.get("flag") or "--" + name.replace("_", "-")
    info = typer.Option(flag, help=meta["help"], min=meta.get("min"), show_default=meta.get("show_default", True),
                        case_sensitive=choices is None)
    return name, Annotated[Optional[kind] if optional else kind, info], default
