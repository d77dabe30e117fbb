"""Loading and saving checkpoint directories: mamba-ssm's layout and Hugging Face's.

mamba-ssm: ``config.json`` with ``d_model, n_layer`` and ``ssm_cfg{layer, ...}``; Hugging Face (transformers,
flash-linear-attention): ``config.json`` with ``model_type``. Weights in safetensors or bin, single or
sharded (``*.index.json``). Which backend reads a directory, how its config keys and weight names map,
is declared by each backend as its :class:`~statelens.models.base.Layout` s (the Mamba ones from
:mod:`statelens.models.mamba_layouts`); nothing here knows an architecture.

Weights load safely: safetensors, or ``torch.load(weights_only=True)``; nothing is unpickled as an
arbitrary object. The model's size is computed from the config and checked before anything is
allocated; weights are then assigned into a model built on the meta device (no second copy).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import pickletools
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from statelens import hub
from statelens.errors import CheckpointError
from statelens.models import gated_deltanet, gla, mamba1, mamba2, mamba3, rwkv7  # noqa: F401  (registers the backends)
from statelens.models.base import Layout, RecurrentLM, backends
from statelens.outputs import atomic_write

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json")
MAX_PARAMETERS = 10**11
# What a hub id fetches: the config, statelens' metadata and the tokenizer, then one kind of weights.
HUB_FILES = ["config.json", "statelens.json", *TOKENIZER_FILES]
HUB_WEIGHTS = (["model*.safetensors", "model.safetensors.index.json"], ["pytorch_model*.bin", "pytorch_model.bin.index.json"])
# Per format: the config.json entry that names the backend (a Layout's ``name``), and what an unknown one adds.
_SELECTORS = {"hf": ("model_type", "; --backend hf runs other transformers models"), "mamba_ssm": ("ssm_cfg.layer", "")}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model and what is needed to write it back in its own format."""

    model: RecurrentLM
    path: Path
    format: str              # "mamba_ssm" or "hf"
    weights_kind: str        # "safetensors" or "bin"
    raw_config: dict         # config.json as read; written back verbatim
    source: hub.HubSource | None = None  # the hub id it was resolved from (None: a local directory)

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def backend(self) -> str:
        """Which backend runs it: "native" (statelens' own) or "hf" (transformers' modules)."""
        return "native" if self.model.layouts else "hf"  # a native backend declares the layouts it is read from

    def describe(self) -> str:
        """Where it came from, for the output: the hub id, revision and commit, or the directory (said to
        be a local directory when its name could also be a hub id)."""
        if self.source is not None:
            return self.source.describe()
        return f"{self.path} (local directory)" if hub.parse_hub_id(str(self.path)) else str(self.path)


def resolve_checkpoint(spec: str | os.PathLike) -> tuple[Path, hub.HubSource | None]:
    """A checkpoint directory for a path or a hub id ``ORG/NAME[@REVISION]`` (see :mod:`statelens.hub`)."""
    return hub.resolve(spec, HUB_FILES, HUB_WEIGHTS)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def parse_config(raw: dict, where: Path) -> tuple[str, str, object]:
    """config.json -> (format, arch, backend config). Raises CheckpointError naming ``where``."""
    layout = None
    try:
        fmt, name = _format(raw, where)
        arch, layout = _claimed_by(fmt, name, where)
        config = backends.get(arch).config_class(**layout.read_config(raw))
    except (TypeError, ValueError) as e:
        keys = layout.config_keys if layout else {}  # name the key the user's config.json has
        message = re.sub(r"^(\w+)", lambda m: keys.get(m.group(1), m.group(1)), str(e))
        raise CheckpointError(f"{where}: {message}") from None
    n = config.num_parameters()
    if n > MAX_PARAMETERS:
        raise CheckpointError(f"{where}: the config describes {n:.3g} parameters, more than statelens loads "
                              f"({MAX_PARAMETERS:.0e})")
    return fmt, arch, config


def _format(raw: dict, where: Path) -> tuple[str, object]:
    """The format of config.json ("hf" or "mamba_ssm") and the value in it that names the backend."""
    if "model_type" in raw:
        return "hf", raw["model_type"]
    if "d_model" in raw and "n_layer" in raw:
        return "mamba_ssm", dict(raw.get("ssm_cfg") or {}).get("layer", "Mamba1")  # mamba-ssm's default layer
    raise CheckpointError(f"{where}: neither a mamba-ssm config (d_model, n_layer) nor a Hugging Face one (model_type)")


def _claimed_by(fmt: str, name, where: Path) -> tuple[str, Layout]:
    """The backend (its arch) that declares a ``fmt`` layout called ``name``, and that layout."""
    declared = [(arch, layout) for arch in backends.names() for layout in backends.get(arch).layouts
                if layout.format == fmt]
    for arch, layout in declared:
        if layout.name == name:  # compared, not hashed: config.json may hold anything there
            return arch, layout
    entry, hint = _SELECTORS[fmt]
    known = ", ".join(sorted(layout.name for _, layout in declared))
    raise CheckpointError(f"{where}: unknown {entry} {name!r} (statelens reads {known}{hint})")


def _layout(backend: type[RecurrentLM], fmt: str, where) -> Layout:
    """``backend``'s layout in format ``fmt``; CheckpointError naming ``where`` when it declares none."""
    for layout in backend.layouts:
        if layout.format == fmt:
            return layout
    raise CheckpointError(f"{where}: {backend.arch or backend.__name__} has no {fmt} layout")


# -- weights --------------------------------------------------------------------------------------

def _weights_file(path: Path) -> Path:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def _load_tensor_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a safetensors file ({_first_line(e)})") from None
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols; the verdict below says enough
            warnings.simplefilter("ignore")
            data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower() or _pickle_names_callables(file):
            raise CheckpointError(f"{file}: refused: the pickle holds objects other than tensors "
                                  "(loaded with weights_only=True; nothing in it was run)") from None
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), _first_line(e))
        raise CheckpointError(f"{file}: not a tensor archive ({reason})") from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError) as e:
        raise CheckpointError(f"{file}: not a tensor archive ({_first_line(e)})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state_dict)")
    return data


def _pickle_names_callables(file: Path) -> bool:
    """Whether a plain pickle imports anything (read with pickletools, which runs nothing): torch's
    weights_only unpickler stops at unsupported opcodes before it sees the imports."""
    try:
        with file.open("rb") as f:
            return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST") for op, _, _ in pickletools.genops(f))
    except Exception:  # not a readable pickle at all
        return False


def read_weights(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The directory's tensors by their file names, and the kind of file ("safetensors" or "bin")."""
    file = _weights_file(path)
    kind = "safetensors" if ".safetensors" in file.name else "bin"
    if not file.name.endswith(".index.json"):
        return kind, _load_tensor_file(file)
    index = _read_json(file).get("weight_map")
    if not isinstance(index, dict):
        raise CheckpointError(f"{file}: no weight_map")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        # Judge the name as written: a shard may be a symlink (the hub cache links into blobs/).
        name = Path(str(shard))
        if name.is_absolute() or len(name.parts) != 1 or name.name in ("", ".", "..") or not (path / name).is_file():
            raise CheckpointError(f"{file}: shard {shard!r} is not a file in {path}")
        tensors |= _load_tensor_file(path / name)
    missing = set(index) - set(tensors)
    if missing:
        raise CheckpointError(f"{file}: shards lack {len(missing)} listed tensor(s), e.g. {sorted(missing)[0]}")
    return kind, tensors


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:160] if lines else type(error).__name__


def _rename(key: str, prefixes) -> str:
    """``key`` with the first of ``prefixes`` (old, new) it starts with replaced; a key none matches as it is."""
    for old, new in prefixes:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def _internal_name(key: str, backend: type[RecurrentLM]) -> str:
    """A weight's name in a file -> in ``backend``, under the names of any of its layouts."""
    return _rename(key, [(theirs, ours) for layout in backend.layouts for ours, theirs in layout.weight_names])


def _external_name(key: str, layout: Layout) -> str:
    """A backend weight's name -> in a file of ``layout``."""
    return _rename(key, layout.weight_names)


# -- load and save --------------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Reads a mamba-ssm or Hugging Face directory (or a hub id, resolved through the local cache) into a
    backend, in ``dtype`` on ``device``."""
    path, source = resolve_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory with config.json)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json")
    raw = _read_json(path / "config.json")
    fmt, arch, config = parse_config(raw, path / "config.json")
    kind, tensors = read_weights(path)
    model = assemble(arch, config, tensors, fmt, path, device=device, dtype=dtype)
    return Checkpoint(model, path, fmt, kind, raw, source)


def assemble(arch: str, config, tensors: dict[str, torch.Tensor], fmt: str, where, *,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> RecurrentLM:
    """The backend ``arch`` with ``config``, holding ``tensors`` (named as in a file of format ``fmt``),
    built on the meta device and assigned the tensors (no copy when device and dtype already match).
    Raises CheckpointError naming ``where`` when names or shapes disagree with the config."""
    backend = backends.get(arch)
    layout = _layout(backend, fmt, where)
    with torch.device("meta"):
        model = backend(config)
    expected = model.state_dict()
    file_names = {_internal_name(k, backend): k for k in tensors}
    state = {_internal_name(k, backend): v for k, v in tensors.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the reference ties it to the embedding whatever the file holds
        if "embedding.weight" in state:
            state["lm_head.weight"] = state["embedding.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = (f"missing {_external_name(missing[0], layout)}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                  if missing else f"unexpected {file_names[unexpected[0]]}")
        raise CheckpointError(f"{where}: weights do not match config.json ({arch}): {detail}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{where}: {_external_name(name, layout)} has shape {tuple(tensor.shape)} in the weights "
                                  f"but config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    return model.eval()


def load_hf_adapter(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> RecurrentLM:
    """Any local transformers causal LM with recurrent layers (hybrids too), run through its own modules (see
    :mod:`statelens.models.hf_adapter`); checked chunked against one-shot on load."""
    from statelens.models.hf_adapter import HFRecurrentAdapter

    return HFRecurrentAdapter.from_pretrained(resolve_checkpoint(path)[0], device=device, dtype=dtype)


def save_checkpoint(ckpt: Checkpoint, out: str | os.PathLike, weights: dict | None = None) -> Path:
    """Writes ``ckpt.model`` in the format it came from (config verbatim, weights, tokenizer files);
    ``weights``, when given, is the model's state_dict to write (e.g. gathered from shards).

    Each file is written under a temporary name and renamed, so no file is ever half-written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = ckpt.model
    layout = _layout(type(model), ckpt.format, ckpt.path)
    weights = model.state_dict() if weights is None else weights
    state = {_external_name(k, layout): v.detach().cpu().contiguous() for k, v in weights.items()}
    tied = model.config.tie_embeddings
    if ckpt.weights_kind == "safetensors":
        from safetensors.torch import save_file

        if tied:
            state.pop("lm_head.weight")  # safetensors refuses shared storage; transformers omits it too
        atomic_write(out / "model.safetensors", lambda f: save_file(state, f, metadata={"format": "pt"}))
    else:
        atomic_write(out / "pytorch_model.bin", lambda f: torch.save(state, f))
    atomic_write(out / "config.json", lambda f: Path(f).write_text(json.dumps(ckpt.raw_config, indent=2) + "\n"))
    for name in TOKENIZER_FILES:
        if (ckpt.path / name).is_file() and ckpt.path.resolve() != out.resolve():
            atomic_write(out / name, lambda f, src=ckpt.path / name: shutil.copyfile(src, f))
    return out


def mamba_ssm_checkpoint(model: RecurrentLM, path: str | os.PathLike = ".") -> Checkpoint:
    """Wraps a model built in code as a mamba-ssm-layout checkpoint, ready for :func:`save_checkpoint`
    (a backend whose mamba_ssm layout has a ``write_config``: Mamba-1 and Mamba-2)."""
    layout = _layout(type(model), "mamba_ssm", path)
    if layout.write_config is None:
        raise CheckpointError(f"{path}: {model.arch} is not written in the mamba_ssm layout from scratch")
    return Checkpoint(model, Path(path), "mamba_ssm", "bin", layout.write_config(model.config))


def mamba_ssm_module(model: RecurrentLM):
    """mamba-ssm's own ``MambaLMHeadModel`` holding ``model``'s weights (Mamba-1 or Mamba-2; needs the
    cuda extra): the oracle the kernel tests and the GPU benchmark compare against."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    twin = MambaLMHeadModel(MambaConfig(**mamba_ssm_checkpoint(model).raw_config), device=model.device,
                            dtype=model.dtype)
    layout = _layout(type(model), "mamba_ssm", model.arch)
    twin.load_state_dict({_external_name(k, layout): v for k, v in model.state_dict().items()})
    return twin.eval()


def content_hash(path: str | os.PathLike) -> str:
    """sha256 over config.json and the weight files (names and bytes), for run manifests. A hub id is
    resolved first (through the cache)."""
    path = resolve_checkpoint(path)[0]
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.name == "config.json" or p.name.startswith(("model", "pytorch_model"))):
        digest.update(file.name.encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

