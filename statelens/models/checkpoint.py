"""Loading and saving checkpoint directories: mamba-ssm's layout and Hugging Face's.

mamba-ssm: ``config.json`` with ``d_model, n_layer, vocab_size, ssm_cfg{layer, d_state, ...},
rms_norm, residual_in_fp32, pad_vocab_size_multiple, tie_embeddings``; weights ``pytorch_model.bin``
or ``model.safetensors``; keys ``backbone.embedding.weight``, ``backbone.layers.{i}.mixer.*``.

Hugging Face: ``config.json`` with ``model_type`` ``mamba`` or ``mamba2``; weights in safetensors or
bin, single or sharded (``*.index.json``); keys as mamba-ssm's but ``backbone.embeddings.weight``.

Weights load safely: safetensors, or ``torch.load(weights_only=True)``; nothing is unpickled as an
arbitrary object. The model's size is computed from the config and checked before anything is
allocated; weights are then assigned into a model built on the meta device (no second copy).
"""
from __future__ import annotations

import hashlib
import json
import math
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
from statelens.models import gla, mamba1, mamba2  # noqa: F401  (registers the backends)
from statelens.models.base import RecurrentLM, backends
from statelens.outputs import atomic_write

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json")
MAX_PARAMETERS = 10**11
# What a hub id fetches: the config, statelens' metadata and the tokenizer, then one kind of weights.
HUB_FILES = ["config.json", "statelens.json", *TOKENIZER_FILES]
HUB_WEIGHTS = (["model*.safetensors", "model.safetensors.index.json"], ["pytorch_model*.bin", "pytorch_model.bin.index.json"])

# ssm_cfg keys that only matter for initialisation or kernels, not for the forward pass.
_INIT_ONLY = {"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "conv_init",
              "use_fast_path", "use_mem_eff_path", "layer", "process_group", "sequence_parallel", "layer_idx"}
_HF_KEYS = {"d_model": "hidden_size", "n_layer": "num_hidden_layers", "d_state": "state_size", "d_conv": "conv_kernel",
            "headdim": "head_dim", "ngroups": "n_groups", "dt_rank": "time_step_rank", "d_ssm": "num_heads * head_dim"}
_MAMBA1_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias"}
_MAMBA2_KEYS = {"d_state", "d_conv", "expand", "headdim", "d_ssm", "ngroups", "chunk_size", "dt_limit", "bias",
                "conv_bias", "D_has_hdim", "rmsnorm", "norm_before_gate"}


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
        return "hf" if self.model.arch == "hf" else "native"

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
    try:
        if "model_type" in raw:
            fmt, arch, kwargs = "hf", *_hf_config(raw, where)
        elif "d_model" in raw and "n_layer" in raw:
            fmt, arch, kwargs = "mamba_ssm", *_mamba_ssm_config(raw, where)
        else:
            raise CheckpointError(
                f"{where}: neither a mamba-ssm config (d_model, n_layer) nor a Hugging Face one (model_type)")
        config = backends.get(arch).config_class(**kwargs)
    except (TypeError, ValueError) as e:
        message = str(e)
        if fmt == "hf":  # name the key the user's config.json has
            message = re.sub(r"^(\w+)", lambda m: _HF_KEYS.get(m.group(1), m.group(1)), message)
        raise CheckpointError(f"{where}: {message}") from None
    n = config.num_parameters()
    if n > MAX_PARAMETERS:
        raise CheckpointError(f"{where}: the config describes {n:.3g} parameters, more than statelens loads "
                              f"({MAX_PARAMETERS:.0e})")
    return fmt, arch, config


def _hf_config(raw: dict, where: Path) -> tuple[str, dict]:
    model_type = raw["model_type"]
    common = dict(
        d_model=raw.get("hidden_size", 768), n_layer=raw.get("num_hidden_layers", 32),
        vocab_size=raw.get("vocab_size"), d_conv=raw.get("conv_kernel", 4), expand=raw.get("expand", 2),
        bias=raw.get("use_bias", False), conv_bias=raw.get("use_conv_bias", True),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5), residual_in_fp32=raw.get("residual_in_fp32", True),
    )
    if model_type == "gla":  # flash-linear-attention's layout
        from statelens.models.gla import gla_config_kwargs

        return "gla", gla_config_kwargs(raw)
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if model_type == "mamba2":
        heads, headdim = raw.get("num_heads", 128), raw.get("head_dim", 64)
        return "mamba2", common | dict(
            d_state=raw.get("state_size", 128), headdim=headdim, d_ssm=heads * headdim,
            ngroups=raw.get("n_groups", 8), chunk_size=raw.get("chunk_size", 256),
            dt_limit=tuple(_number(v) for v in raw.get("time_step_limit", (0.0, math.inf))),
            gated_norm_eps=common["norm_eps"], tie_embeddings=raw.get("tie_word_embeddings", False),
        )
    if model_type == "mamba":
        rank = raw.get("time_step_rank", "auto")
        return "mamba1", common | dict(
            d_state=raw.get("state_size", 16), dt_rank=None if rank == "auto" else rank,
            tie_embeddings=raw.get("tie_word_embeddings", True),
        )
    raise CheckpointError(f"{where}: unknown model_type {model_type!r} (statelens reads mamba, mamba2, gla; "
                          "--backend hf runs other transformers models)")


def _number(value):
    """A JSON number; transformers 5 writes infinities as ``{"__float__": "Infinity"}``."""
    return float(value["__float__"]) if isinstance(value, dict) and "__float__" in value else value


def _mamba_ssm_config(raw: dict, where: Path) -> tuple[str, dict]:
    ssm = dict(raw.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(f"{where}: unknown ssm_cfg.layer {layer!r} (statelens reads Mamba1, Mamba2)")
    if raw.get("d_intermediate", 0) or raw.get("attn_layer_idx"):
        raise CheckpointError(f"{where}: hybrid models (d_intermediate, attn_layer_idx) are not supported")
    known = _MAMBA2_KEYS if layer == "Mamba2" else _MAMBA1_KEYS
    unknown = set(ssm) - known - _INIT_ONLY
    if unknown:
        raise CheckpointError(f"{where}: ssm_cfg key(s) {', '.join(sorted(unknown))} not understood for {layer}")
    vocab, multiple = raw.get("vocab_size"), raw.get("pad_vocab_size_multiple", 8)
    if isinstance(vocab, int) and isinstance(multiple, int) and multiple > 0 and vocab % multiple:
        vocab += multiple - vocab % multiple  # as MambaLMHeadModel pads it
    kwargs = dict(
        d_model=raw.get("d_model"), n_layer=raw.get("n_layer"), vocab_size=vocab,
        rms_norm=raw.get("rms_norm", True), residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_embeddings=raw.get("tie_embeddings", True),
        **{k: v for k, v in ssm.items() if k in known},
    )
    if layer == "Mamba1" and kwargs.get("dt_rank") == "auto":
        kwargs["dt_rank"] = None
    if "dt_limit" in kwargs:
        kwargs["dt_limit"] = tuple(_number(v) for v in kwargs["dt_limit"])
    return layer.lower(), kwargs


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


def _internal_name(key: str) -> str:
    """A weight's name in a file -> in the backend (mamba's ``backbone.``, fla's ``model.`` prefix)."""
    if key.startswith("model."):  # flash-linear-attention: model.norm is the final norm
        key = re.sub(r"^norm\.", "norm_f.", key.removeprefix("model."))
    key = key.removeprefix("backbone.")
    key = re.sub(r"^embeddings?\.", "embedding.", key)
    return re.sub(r"^layers\.", "blocks.", key)


def _external_name(key: str, fmt: str, arch: str = "mamba2") -> str:
    """A backend weight's name -> in a file of format ``fmt`` for architecture ``arch``."""
    if key.startswith("lm_head."):
        return key
    key = re.sub(r"^blocks\.", "layers.", key)
    if fmt == "hf":
        key = re.sub(r"^embedding\.", "embeddings.", key)
    if arch == "gla":
        return "model." + re.sub(r"^norm_f\.", "norm.", key)
    return "backbone." + key


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
    with torch.device("meta"):
        model = backends.get(arch)(config)
    expected = model.state_dict()
    file_names = {_internal_name(k): k for k in tensors}
    state = {_internal_name(k): v for k, v in tensors.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the reference ties it to the embedding whatever the file holds
        if "embedding.weight" in state:
            state["lm_head.weight"] = state["embedding.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = (f"missing {_external_name(missing[0], fmt, arch)}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                  if missing else f"unexpected {file_names[unexpected[0]]}")
        raise CheckpointError(f"{where}: weights do not match config.json ({arch}): {detail}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{where}: {_external_name(name, fmt, arch)} has shape {tuple(tensor.shape)} in the weights "
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
    model, fmt = ckpt.model, ckpt.format
    weights = model.state_dict() if weights is None else weights
    state = {_external_name(k, fmt, model.arch): v.detach().cpu().contiguous() for k, v in weights.items()}
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
    """Wraps a model built in code as a mamba-ssm-layout checkpoint, ready for :func:`save_checkpoint`."""
    cfg = model.config
    ssm_cfg = {"layer": {"mamba2": "Mamba2", "mamba1": "Mamba1"}[model.arch], "d_state": cfg.d_state,
               "d_conv": cfg.d_conv, "expand": cfg.expand, "bias": cfg.bias, "conv_bias": cfg.conv_bias}
    if model.arch == "mamba2":
        ssm_cfg |= {k: getattr(cfg, k) for k in ("headdim", "ngroups", "d_ssm", "chunk_size", "D_has_hdim",
                                                  "rmsnorm", "norm_before_gate")}
        if cfg.dt_limit != (0.0, math.inf):
            ssm_cfg["dt_limit"] = list(cfg.dt_limit)
    else:
        ssm_cfg["dt_rank"] = cfg.dt_rank
    raw = {"d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
           "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": cfg.rms_norm,
           "residual_in_fp32": cfg.residual_in_fp32, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
           "tie_embeddings": cfg.tie_embeddings}
    return Checkpoint(model, Path(path), "mamba_ssm", "bin", raw)


def mamba_ssm_module(model: RecurrentLM):
    """mamba-ssm's own ``MambaLMHeadModel`` holding ``model``'s weights (Mamba-1 or Mamba-2; needs the
    cuda extra): the oracle the kernel tests and the GPU benchmark compare against."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    twin = MambaLMHeadModel(MambaConfig(**mamba_ssm_checkpoint(model).raw_config), device=model.device,
                            dtype=model.dtype)
    twin.load_state_dict({_external_name(k, "mamba_ssm", model.arch): v for k, v in model.state_dict().items()})
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

