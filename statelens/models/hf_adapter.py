"""Any local ``transformers`` causal LM whose cache holds recurrent states, behind statelens' protocol.

    model = HFRecurrentAdapter.from_pretrained("path/to/checkpoint")   # never runs remote code
    logits, state = model(tokens, state)

For architectures statelens has no native backend for (falcon_mamba, hybrids such as bamba, zamba2,
nemotron_h, ...), or to cross-check a native backend. Each call writes the
:class:`~statelens.models.base.State` into a fresh ``transformers`` ``DynamicCache`` built for the
model's config (every recurrent layer marked ``has_previous_state``), runs the backbone on the chunk,
and copies the states back out of the cache. The zero state run this way equals a run without a
cache: the conv sees zeros to its left and the scan starts from zeros either way.

State layout, per recurrent layer ``k`` (``hf_layer_index[k]`` is its index in the HF model):
    ssm[k]:  the cache's recurrent state as is: Mamba-2-like ``[b, heads, headdim, d_state]``,
             Mamba-1-like ``[b, d_inner, d_state]``.
    conv[k]: the cache's conv state as is, ``[b, conv_channels, w]``. For mamba / mamba2 ``w`` is
             ``conv_kernel``: one column more than statelens' native backends keep; the oldest
             column is never read (a width-k causal conv needs k - 1 past inputs), so
             ``conv[k][..., 1:]`` equals the native backend's conv state.
    Short-conv layers (LFM2's), whose cache keeps a conv window and no recurrent state: the window is
    the layer's whole state, so ``ssm[k]`` is its last ``conv_L_cache - 1`` inputs ``[b, hidden,
    conv_L_cache - 1]`` (the cache's oldest column is never read, and is zeros when written back) and
    ``conv[k]`` is empty, ``[b, hidden, 0]``.

RWKV-4 (``RwkvForCausalLM``) keeps its state in its forward's ``state`` argument instead of a cache; the adapter
carries it there (:mod:`statelens.models.hf_rwkv`, which gives its layout), every layer recurrent. MiniMax keeps its
lightning-attention states in its own ``MiniMaxCache``, xLSTM its mLSTM states in its own ``xLSTMCache``, which the
adapter builds instead of a ``DynamicCache`` (:mod:`statelens.models.hf_minimax`, :mod:`statelens.models.hf_xlstm`,
which gives xLSTM's layout). RecurrentGemma keeps its recurrent states on its modules, which the adapter sets and
reads around each call, continuing their conv in multi-token calls (:mod:`statelens.models.hf_recurrent_gemma`,
which gives its layout).

Hybrid models (layers with full attention beside the recurrent ones): the attention layers
(``attention_layer_index``, HF indices; Zamba2's and Falcon-H1's layers that hold both are in both
lists) keep a KV cache, which is not a recurrent state: it is carried from call to call in a
:class:`HybridState` (a ``State`` with the keys and values added) so that chunked runs equal one-shot
runs, but no hook sees it and no statistic is computed on it. Rows of a batch may have seen different
numbers of tokens (the rollout engine resets rows to the initial state): each row's keys are
right-aligned, the attention mask hides the positions before them, and the row's position ids count
its own tokens, so a reset row computes what a separate run on its suffix computes. Sliding-window caches
are carried for the model types in :data:`SLIDING_WINDOW_CARRIED` (RecurrentGemma's local attention: the
cache keeps the last ``sliding_window - 1`` keys, all that a later query reads, and a row's keys are still
right-aligned, so the window the mask draws by cache index is the window by position) and refused
elsewhere, as are other non-full attention caches. Layers without any cache (MLP / MoE) are skipped.

Multi-token chunks: on load, :func:`check_chunking` compares chunked with one-shot logits. Where the
model drops the carried state in multi-token calls (``transformers``' ``MambaForCausalLM`` ignores
the cached recurrent state unless the call has one token), the adapter runs every chunk token by
token (``token_by_token = True``, with a line in ``notes``): exact, and slow.

Other packages' kernels: transformers calls flash-linear-attention's (mamba-ssm's, causal-conv1d's) function
in place of its own torch code whenever that package imports, whatever the device; their Triton and CUDA
kernels cannot run on a CPU. On a CPU the adapter swaps transformers' torch function back in for each of its
calls (:func:`kernel_swaps`, :meth:`HFRecurrentAdapter.torch_path`) and restores the module afterwards.

Hook points: only ``blocks.{k}.hook_state`` (``[b, heads, headdim, d_state]``, ``[b, d_inner,
d_state]`` or a short conv's ``[b, hidden, conv_L_cache - 1]``), called with each recurrent layer's
state read back after each call (after each token when ``token_by_token``); a returned tensor
replaces the carried state. The per-token quantities of
the native backends (``hook_dt``, ``hook_decay``, ``hook_B`` ...) are inside the HF modules and are not
available through this adapter.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from statelens.errors import BadInput, CheckpointError
from statelens.models import hf_minimax, hf_recurrent_gemma, hf_rwkv, hf_xlstm
from statelens.models.base import RecurrentLM, State
from statelens.models.hooks import HookPoint


class _StateHooks(nn.Module):
    """One recurrent layer's hook point (so that its name is ``blocks.{k}.hook_state``)."""

    def __init__(self, layer: int):
        super().__init__()
        self.hook_state = HookPoint(layer)  # [b, heads, headdim, d_state] or [b, d_inner, d_state]


@dataclass(frozen=True)
class HybridState(State):
    """A hybrid model's state: the recurrent states (``ssm``, ``conv``, as in :class:`State`) plus the
    KV caches of its attention layers, which travel with it but are not recurrent states.

    keys, values: per attention layer ``[b, kv_heads, L, head_dim]``. Row ``r``'s cache is its last
        ``seen[r]`` positions; the ``L - seen[r]`` positions before them are padding (zeros, or keys
        from before the row was reset) that the adapter masks out.
    seen: per row, the tokens its attention layers have consumed since its initial state: its cache
        length and the position id of its next token.

    A plain :class:`State` given to a hybrid model means empty KV caches (nothing seen).
    """

    keys: tuple[torch.Tensor, ...] = ()
    values: tuple[torch.Tensor, ...] = ()
    seen: tuple[int, ...] = ()

    @classmethod
    def of(cls, state: State, keys, values, seen) -> HybridState:
        """``state``'s recurrent part (every field of :class:`State`) with these KV caches."""
        return cls(**{f.name: getattr(state, f.name) for f in fields(State)}, keys=tuple(keys), values=tuple(values),
                   seen=tuple(seen))

    @property
    def kv_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def map(self, fn) -> HybridState:
        """Applies ``fn`` to every tensor (``fn`` must keep the batch axis: use :meth:`rows` to select)."""
        return self.of(State.map(self, fn), map(fn, self.keys), map(fn, self.values), self.seen)

    def rows(self, index) -> HybridState:
        """The state of a subset of the batch."""
        picked = State.rows(self, index)
        index = index.cpu() if isinstance(index, torch.Tensor) else index
        seen = torch.tensor(self.seen, dtype=torch.long)[index].reshape(-1).tolist()
        return self.of(picked, picked.keys, picked.values, seen).trimmed()

    def where(self, rows: torch.Tensor, other: State) -> HybridState:
        """Per batch row: ``other`` where ``rows`` [batch] is True, else this state. Both KV caches are
        left-padded to a common length, so a row keeps its keys right-aligned whichever it takes."""
        picked = State.where(self, rows, other)
        if not isinstance(other, HybridState):
            other = self.empty_like(other)
        length = max(self.kv_length, other.kv_length)
        mask = rows.view(-1, 1, 1, 1)

        def pick(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, _left_pad(theirs.to(mine.dtype), length), _left_pad(mine, length))

        seen = [s_other if r else s_mine for r, s_mine, s_other in zip(rows.tolist(), self.seen, other.seen)]
        return self.of(picked, map(pick, self.keys, other.keys), map(pick, self.values, other.values), seen).trimmed()

    def empty_like(self, state: State) -> HybridState:
        """``state``'s recurrent part with empty KV caches shaped like this state's."""
        return self.of(state, (k[:, :, :0] for k in self.keys), (v[:, :, :0] for v in self.values),
                       (0,) * state.batch_size)

    def trimmed(self) -> HybridState:
        """Drops the leading cache positions that no row reads (none when a sliding window keeps fewer positions
        than a row has seen)."""
        drop = self.kv_length - max(self.seen, default=0)
        if drop <= 0:
            return self
        return self.of(self, (k[:, :, drop:] for k in self.keys), (v[:, :, drop:] for v in self.values), self.seen)


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """[b, h, L, d] -> [b, h, length, d] with zeros before."""
    return nn.functional.pad(t, (0, 0, length - t.shape[2], 0))


# The oldest transformers release the adapter runs on: the adapter tests pass on it (`make test-oldest`). Before
# 5.23 its caches and forwards differ (on 5.22 the Mamba-2 and Nemotron-H tests fail; before 5.14 the linear-attention cache layer takes no conv kernel size; before 5.5 it does not exist).
# pyproject.toml's `hf` and `test` extras name the same floor (tests/test_packaging.py holds them equal).
OLDEST_TRANSFORMERS = "5.23"


def transformers_too_old() -> str | None:
    """A few words naming the installed transformers release when it is older than
    :data:`OLDEST_TRANSFORMERS`, else None."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version(OLDEST_TRANSFORMERS):
        return None
    return (f"transformers {transformers.__version__} is older than {OLDEST_TRANSFORMERS}, the oldest release the hf "
            f"adapter runs on (pip install 'transformers>={OLDEST_TRANSFORMERS}')")


def unknown_model_type(config: dict) -> str:
    """Why transformers has no causal LM for ``config``'s (config.json's) model_type, in a few words: its code
    lives in the checkpoint (``auto_map``), which statelens never runs, or this release does not know it."""
    import transformers

    if "auto_map" in config:
        return "its code lives in the checkpoint (auto_map: remote code), which statelens never runs"
    return f"transformers {transformers.__version__} has no causal LM for it"


# The logit scales transformers' heads apply after lm_head, per model_type: (config key, how it enters), as the
# *ForCausalLM.forward of transformers 5.24 writes it (the same float operation, so the logits are the model's
# own bit for bit). check_chunking still compares with the model's own logits: a head not listed here that
# scales or caps its logits is refused, never silently run unscaled.
LOGIT_SCALES = {
    "falcon_h1": ("lm_head_multiplier", lambda logits, m: logits * m),          # FalconH1ForCausalLM
    "granitemoehybrid": ("logits_scaling", lambda logits, s: logits / s),       # GraniteMoeHybridForCausalLM
    "recurrent_gemma": ("logits_soft_cap", lambda logits, cap: nn.functional.tanh(logits / cap) * cap),
    # xLSTMForCausalLM: float32 logits (whatever the model's dtype), soft-capped unless the cap is None
    "xlstm": ("output_logit_soft_cap", lambda logits, cap: logits.float() if cap is None
              else cap * torch.tanh(logits.float() / cap)),
}

# Model types whose sliding-window attention caches the adapter carries (see the module docstring): those whose
# chunked runs with reset rows are tested against transformers' one-shot runs.
SLIDING_WINDOW_CARRIED = {hf_recurrent_gemma.MODEL_TYPE}


# Cache layer classes (by name) the adapter can carry: a recurrent state, a full-attention KV cache, or both; and
# the sliding-window KV cache, carried for SLIDING_WINDOW_CARRIED only.
_RECURRENT, _ATTENTION, _BOTH = "LinearAttentionLayer", "DynamicLayer", "LinearAttentionAndFullAttentionLayer"
_SLIDING = "DynamicSlidingWindowLayer"


def layer_kinds(config) -> list[str]:
    """Per HF layer: "recurrent" (a linear-attention cache layer), "attention" (a full-attention KV
    cache), "hybrid" (both: Zamba2's layers that run a shared attention block before the mamba mixer,
    Falcon-H1's parallel attention and mamba), "none" (no cache: MLP / MoE layers) or the cache layer's class name for any other kind (sliding
    window, except for :data:`SLIDING_WINDOW_CARRIED`, where it is "attention"), which the adapter refuses.

    Read from the layers of the cache transformers builds for the config, by class name: an
    ``isinstance`` test breaks when another package has imported transformers' cache module anew.
    """
    from transformers import DynamicCache

    known = {_RECURRENT: "recurrent", _ATTENTION: "attention", _BOTH: "hybrid", "DummyLayer": "none"}
    if getattr(config, "model_type", None) in SLIDING_WINDOW_CARRIED:
        known[_SLIDING] = "attention"
    return [known.get(type(layer).__name__, type(layer).__name__) for layer in DynamicCache(config=config).layers]


def state_outside_cache(hf_class: type) -> str | None:
    """Where a transformers model keeps its state between calls when neither in ``DynamicCache``'s layers nor
    in a ``state`` argument of its forward (RWKV's, which the adapter carries: :mod:`statelens.models.hf_rwkv`),
    in a few words; None when it keeps it in either or in a cache class of its own that the adapter carries
    (MiniMax's ``MiniMaxCache``, xLSTM's ``xLSTMCache``: :mod:`statelens.models.hf_minimax`,
    :mod:`statelens.models.hf_xlstm`). Read off the class's own module; nothing is built or run."""
    own = own_cache(hf_class)
    carried = own is None or hf_minimax.carried(own) or hf_xlstm.carried(own)
    return None if carried else f"its own {own}"


def every_layer_recurrent(hf_class: type) -> bool:
    """Whether ``hf_class`` carries a recurrent state in every layer outside ``DynamicCache``'s layers (which its
    config's cache layout then does not describe): RWKV's ``state`` argument, xLSTM's ``xLSTMCache``."""
    return hf_rwkv.takes_state_argument(hf_class) or hf_xlstm.carried(own_cache(hf_class) or "")


def own_cache(hf_class: type) -> str | None:
    """The name of the cache class ``hf_class``'s module defines for itself (xLSTM's ``xLSTMCache``, MiniMax's
    ``MiniMaxCache``), or None."""
    module = sys.modules.get(hf_class.__module__)
    own = sorted(name for name, obj in vars(module).items() if isinstance(obj, type)
                 and obj.__module__ == hf_class.__module__ and name.endswith("Cache")) if module else []
    return own[0] if own else None


def kernel_swaps(hf_model: nn.Module) -> list[tuple[object, str, object]]:
    """(module, name, torch function) for each function of ``hf_model``'s transformers modules that runs another
    package's kernel in place of transformers' torch code: transformers picks flash-linear-attention's (or
    mamba-ssm's, causal-conv1d's) function when that package imports, whatever the device, and their Triton and
    CUDA kernels cannot run on a CPU. Found by the wrapper's own closure (``use_kernel_func_from_hub_with_fallback``
    keeps ``torch_function`` and ``is_new_implementation`` there); the torch function is called as the wrapper
    calls it, with only the keywords it takes."""
    swaps = []
    modules = {type(m).__module__ for m in hf_model.modules()}
    for name in sorted(n for n in modules if n.startswith("transformers.")):
        for attr, fn in vars(sys.modules[name]).items():
            if not inspect.isfunction(fn) or fn.__closure__ is None:
                continue
            cells = dict(zip(fn.__code__.co_freevars, fn.__closure__))
            kernel = {"is_new_implementation", "torch_function"} <= set(cells)
            if kernel and cells["is_new_implementation"].cell_contents:
                swaps.append((sys.modules[name], attr, _with_its_keywords(cells["torch_function"].cell_contents)))
    return swaps


def _with_its_keywords(fn):
    """``fn`` called with only the keywords its signature names (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn
    return lambda *args, **kwargs: fn(*args, **{k: v for k, v in kwargs.items() if k in params})


_ABSENT = object()


@contextmanager
def swapped(swaps: list[tuple[object, str, object]]):
    """The functions ``swaps`` names replaced (attributes of modules or objects) while the block runs, restored
    after; one the object only had from its class (a torch module's ``forward``) is deleted again."""
    saved = [vars(owner).get(attr, _ABSENT) for owner, attr, _ in swaps]
    try:
        for owner, attr, fn in swaps:
            setattr(owner, attr, fn)
        yield
    finally:
        for (owner, attr, _), fn in zip(swaps, saved):
            if fn is _ABSENT:
                delattr(owner, attr)
            else:
                setattr(owner, attr, fn)


def ssd_mixers(hf_model: nn.Module) -> list[nn.Module]:
    """The Mamba-2 (SSD) mixers of ``hf_model`` (Mamba2, Bamba, Nemotron-H, Falcon-H1, Granite-4.0-H, Zamba2):
    the modules with a ``chunk_size`` and an ``A_log``. Their torch chunk scan pads every call to a multiple
    of ``chunk_size`` and builds ``[b, heads, chunks, chunk_size, chunk_size]`` tensors, so a 5-token call
    costs what a 256-token one does (the released configs' chunk_size)."""
    return [m for m in hf_model.modules() if isinstance(getattr(m, "chunk_size", None), int) and hasattr(m, "A_log")]


def fitted_chunk(length: int, chunk_size: int) -> int:
    """The chunk length that splits ``length`` tokens into as few chunks as ``chunk_size`` does, of equal
    lengths: no chunk longer than ``chunk_size``, at most one token of padding per chunk. The SSD scan is
    exact for any chunk length; only the rounding differs."""
    chunks = -(-length // chunk_size)
    return -(-length // chunks)


@contextmanager
def chunk_sizes(mixers: list[nn.Module], length: int):
    """Each mixer's ``chunk_size`` fitted to a call of ``length`` tokens (:func:`fitted_chunk`) while the
    block runs, restored after."""
    saved = [m.chunk_size for m in mixers]
    try:
        for m, size in zip(mixers, saved):
            m.chunk_size = fitted_chunk(length, size)
        yield
    finally:
        for m, size in zip(mixers, saved):
            m.chunk_size = size


def _refuse_state_outside_cache(hf_class: type) -> None:
    """A :class:`CheckpointError` naming where ``hf_class`` keeps its state, if not in DynamicCache's layers."""
    holder = state_outside_cache(hf_class)
    if holder is not None:
        raise CheckpointError(f"{hf_class.__name__} keeps its state between calls in {holder}, not in transformers' "
                              "DynamicCache; the hf adapter carries only DynamicCache's recurrent, conv and "
                              "full-attention layers")


class HFRecurrentAdapter(RecurrentLM):
    """A ``transformers`` causal LM with recurrent layers as a :class:`RecurrentLM` (see the module docstring).

    ``hf_model`` is a loaded ``*ForCausalLM``; ``check`` runs :func:`check_chunking` (and may switch on
    ``token_by_token``). ``hf_layer_index[k]``: HF index of recurrent layer ``k``;
    ``attention_layer_index``: HF indices of the layers with a KV cache (empty unless hybrid).
    """

    arch = "hf"

    def __init__(self, hf_model: nn.Module, *, check: bool = True):
        super().__init__()
        self.hf = hf_model.eval()
        self.config = hf_model.config
        name = type(hf_model).__name__
        too_old = transformers_too_old()
        if too_old is not None:
            raise CheckpointError(f"{name}: {too_old}")
        _refuse_state_outside_cache(type(hf_model))
        self._state_argument = hf_rwkv.takes_state_argument(type(hf_model))
        own = own_cache(type(hf_model)) or ""  # the own caches not refused above: MiniMax's, xLSTM's
        self._minimax, self._xlstm = hf_minimax.carried(own), hf_xlstm.carried(own)
        self._module_states = getattr(self.config, "model_type", None) == hf_recurrent_gemma.MODEL_TYPE
        self.layer_kinds = (["recurrent"] * self.config.num_hidden_layers if every_layer_recurrent(type(hf_model))
                            else layer_kinds(self.config))
        other = {i: kind for i, kind in enumerate(self.layer_kinds)
                 if kind not in ("recurrent", "attention", "hybrid", "none")}
        if other:
            raise CheckpointError(f"{name}: layers {sorted(other)} keep a {min(other.values())} cache; the "
                                  "hf adapter carries only recurrent states and full-attention KV caches")
        self.hf_layer_index = [i for i, kind in enumerate(self.layer_kinds) if kind in ("recurrent", "hybrid")]
        self.attention_layer_index = [i for i, kind in enumerate(self.layer_kinds) if kind in ("attention", "hybrid")]
        if not self.hf_layer_index:
            raise CheckpointError(f"{name} has no recurrent layers")
        backbone = hf_model.base_model
        params = inspect.signature(backbone.forward).parameters
        # transformers >= 5.24 takes the cache as ``cache`` (``cache_params`` / ``past_key_values`` before); an
        # unknown keyword lands in ``**kwargs`` and is silently dropped, so take the first name the signature has.
        self._cache_kw = next((kw for kw in ("cache", "cache_params") if kw in params), "past_key_values")
        if self.attention_layer_index and not {"attention_mask", "position_ids"} <= set(params):
            raise CheckpointError(f"{name} has attention layers but its forward takes no attention_mask and "
                                  "position_ids; the hf adapter cannot carry their KV cache exactly")
        self.token_by_token = False
        self.notes: list[str] = [self.layout()] if self.attention_layer_index else []
        self.blocks = nn.ModuleList(_StateHooks(k) for k in range(len(self.hf_layer_index)))
        self._kernel_swaps = kernel_swaps(hf_model)  # used on a CPU only (see torch_path)
        self._ssd_mixers = ssd_mixers(hf_model)       # likewise
        self._own_swaps = self._family_swaps()         # on every device, in the adapter's calls only
        try:
            self._shapes, self._kv_shapes = self._probe_shapes()
        except (RuntimeError, ValueError) as error:  # the HF model's own forward: a GPU-only kernel on the CPU, ...
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{name}: transformers' own forward fails on {self.device}: {first}") from error
        self.hook_points()  # names the hook points
        if check:
            check_chunking(self)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, check: bool = True) -> HFRecurrentAdapter:
        """Loads a local checkpoint directory with transformers' own class for its ``model_type`` (no
        download, no remote code). The class is looked up in transformers' own table, not through
        ``AutoModelForCausalLM``: other packages (flash-linear-attention does) register their own
        classes for "mamba2" and "mamba" there, and the adapter must run transformers' modules."""
        import json

        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        try:
            config = json.loads((Path(path) / "config.json").read_text())
            model_type = config["model_type"]
            if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                raise CheckpointError(f"{path}: model_type {model_type!r}: {unknown_model_type(config)}; the hf "
                                      "adapter runs transformers' own causal LMs whose cache holds recurrent states")
            hf_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{path}: not a transformers causal LM checkpoint "
                                  f"({type(error).__name__}: {error})") from None
        too_old = transformers_too_old()
        if too_old is not None:  # before its weights are read
            raise CheckpointError(f"{path}: {too_old}")
        _refuse_state_outside_cache(hf_class)
        from huggingface_hub.errors import StrictDataclassError  # a config value transformers' config class refuses

        try:
            own = hf_xlstm.torch_kernel_config(hf_class, config)
            hf_model = hf_class.from_pretrained(os.fspath(path), local_files_only=True, trust_remote_code=False,
                                                dtype=dtype, **({"config": own} if own is not None else {}))
        except (OSError, ValueError, KeyError, StrictDataclassError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{path}: transformers cannot load it: {first}") from error
        return cls(hf_model.to(device), check=check)

    def layout(self) -> str:
        """One line: which HF layers are recurrent (they are ``blocks.0``, ``blocks.1``, ... in that order)
        and which keep a KV cache."""
        line = (f"recurrent: HF layers {', '.join(map(str, self.hf_layer_index))} "
                f"(blocks.0 .. blocks.{len(self.hf_layer_index) - 1})")
        if self.attention_layer_index:
            line += (f"; attention: HF layers {', '.join(map(str, self.attention_layer_index))} (their KV cache is "
                     "carried between chunks but is not a recurrent state: no hook, no statistics)")
        return line

    # -- the cache round trip ------------------------------------------------------------------
    @contextmanager
    def torch_path(self, length: int | None = None):
        """A context in which the HF model runs transformers' torch code where, on a CPU, it would call another
        package's GPU kernel (empty on other devices and where no such package is installed). Given the call's
        ``length``, on a CPU the SSD mixers' chunk length is also fitted to it (:func:`chunk_sizes`): the torch
        scan would otherwise pad a short call, as the rollout engine makes between reset positions, to a whole
        chunk (remembrance on a Mamba-2 with chunk_size 256 ran 46x slower than statelens' own backend)."""
        on_cpu = self.device.type == "cpu"
        mixers = self._ssd_mixers if on_cpu and length is not None else []
        with swapped(self._kernel_swaps if on_cpu else []), chunk_sizes(mixers, length or 1):
            yield

    def _family_swaps(self) -> list[tuple[object, str, object]]:
        """What the adapter's calls swap into the HF model (:func:`swapped`): RecurrentGemma's recurrent blocks
        continue their conv (:mod:`statelens.models.hf_recurrent_gemma`); a float64 xLSTM keeps its recurrent
        kernels' states in float64 (:mod:`statelens.models.hf_xlstm`)."""
        if self._module_states:
            return hf_recurrent_gemma.continued_forwards(self.hf, self.hf_layer_index)
        if self._xlstm:
            return hf_xlstm.state_dtype_swaps(self.hf, self.dtype)
        return []

    def _new_cache(self):
        """An empty cache of the kind the HF model takes, for one sequence (RecurrentGemma: its modules' recurrent
        states zeroed, for one sequence)."""
        from transformers import DynamicCache

        if self._minimax:
            return hf_minimax.new_cache(self.hf)
        if self._xlstm:
            return hf_xlstm.new_cache(self.hf, 1, self.device, self.dtype)
        if self._module_states:
            hf_recurrent_gemma.zero_states(self.hf, self.hf_layer_index, 1, self.device, self.dtype)
        return DynamicCache(config=self.config)

    def _probe_shapes(self):
        """Per recurrent layer: (ssm shape, dtype, conv shape, dtype); per attention layer: (key shape,
        value shape, dtype) with a zero-length sequence axis. One sequence, batch axis dropped."""
        tokens = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        if self._state_argument:
            with torch.no_grad():
                ssm, conv = hf_rwkv.from_transformers(self.hf.base_model(input_ids=tokens, use_cache=True).state)
            self._conv_only = [False] * len(ssm)
            return [(tuple(s.shape[1:]), s.dtype, tuple(c.shape[1:]), c.dtype) for s, c in zip(ssm, conv)], []
        cache = self._new_cache()
        with torch.no_grad(), self.torch_path(), swapped(self._own_swaps):
            self.hf.base_model(input_ids=tokens, use_cache=True, **{self._cache_kw: cache})
        shapes, self._conv_only = [], []
        for i in self.hf_layer_index:
            layer = self._layer(cache, i)
            ssm, conv = layer.recurrent_states[0], layer.conv_states[0]
            if conv is None:
                held = "a recurrent state but " if ssm is not None else ""
                raise CheckpointError(f"layer {i} of {type(self.hf).__name__} keeps {held}no conv state in its "
                                      "cache; the hf adapter carries a conv state with or without a recurrent state")
            self._conv_only.append(ssm is None)
            if ssm is None:  # a short-conv layer (LFM2): its state is the window the conv reads, no column unread
                ssm, conv = conv[..., 1:], conv[..., :0]
            shapes.append((tuple(ssm.shape[1:]), ssm.dtype, tuple(conv.shape[1:]), conv.dtype))
        kv_shapes = []
        for i in self.attention_layer_index:
            keys, values = cache.layers[i].keys, cache.layers[i].values
            kv_shapes.append(((keys.shape[1], 0, keys.shape[3]), (values.shape[1], 0, values.shape[3]), keys.dtype))
        return shapes, kv_shapes

    def _as_hybrid(self, state: State) -> HybridState:
        """A hybrid model's state; a plain State gets empty KV caches."""
        if isinstance(state, HybridState):
            return state
        return self.zero_state(state.batch_size, device=state.ssm[0].device).empty_like(state)

    def _layer(self, cache, i: int):
        """HF layer ``i`` of ``cache``: its cache layer, or for MiniMax's lightning layers and xLSTM's layers a view of
        it, for RecurrentGemma's recurrent layers a view of the states on their modules."""
        if i not in self.hf_layer_index:
            return cache.layers[i]
        if self._minimax:
            return hf_minimax.LinearLayerView(cache, i)
        if self._xlstm:
            return hf_xlstm.LayerView(cache, i)
        if self._module_states:
            return hf_recurrent_gemma.ModuleStateView(hf_recurrent_gemma.recurrent_block(self.hf, i))
        return cache.layers[i]

    def _cache_from(self, state: State):
        """A fresh DynamicCache holding ``state``, every recurrent layer marked as continuing (MiniMax's and xLSTM's
        own caches; RecurrentGemma's recurrent states go onto its modules)."""
        from transformers import DynamicCache

        if self._xlstm:
            return hf_xlstm.cache_from(self.hf, [s.to(shape[1]) for s, shape in zip(state.ssm, self._shapes)],
                                       [c.to(shape[3]) for c, shape in zip(state.conv, self._shapes)])
        if self._minimax:
            kv = {i: (state.keys[j], state.values[j]) for j, i in enumerate(self.attention_layer_index)
                  } if isinstance(state, HybridState) and state.kv_length else {}
            return hf_minimax.cache_from(self.hf, {i: state.ssm[k].to(self._shapes[k][1])
                                                   for k, i in enumerate(self.hf_layer_index)}, kv)
        cache = DynamicCache(config=self.config)
        if self._module_states:
            hf_recurrent_gemma.set_states(self.hf, self.hf_layer_index, state.ssm,
                                          [c.to(shape[3]) for c, shape in zip(state.conv, self._shapes)])
        else:
            self._write_recurrent(cache, state)
        if isinstance(state, HybridState) and state.kv_length:
            for j, i in enumerate(self.attention_layer_index):
                dtype = self._kv_shapes[j][2]
                cache.layers[i].update(state.keys[j].to(dtype), state.values[j].to(dtype))
        return cache

    def _write_recurrent(self, cache, state: State) -> None:
        """Writes ``state``'s recurrent and conv states into ``cache``'s linear-attention layers, each marked as
        continuing."""
        for k, i in enumerate(self.hf_layer_index):
            layer = cache.layers[i]
            _, ssm_dtype, _, conv_dtype = self._shapes[k]
            ssm, conv = state.ssm[k].to(ssm_dtype), state.conv[k].to(conv_dtype)
            if self._conv_only[k]:  # the cache's window has one more (oldest, never read) column: zeros
                conv, ssm = nn.functional.pad(ssm, (1, 0)), None
            layer.lazy_initialization(conv_states=conv, recurrent_states=ssm, conv_kernel_size=conv.shape[-1])
            layer.conv_states[0].copy_(conv)
            if ssm is not None:
                layer.recurrent_states[0].copy_(ssm)
            layer.has_previous_state[0] = True

    def _call(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One backbone call on ``tokens`` [b, l] from ``state``; the states read back pass the hooks."""
        if self._state_argument:
            out = self.hf.base_model(input_ids=tokens, state=hf_rwkv.to_transformers(state), use_cache=True)
            ssm, conv = hf_rwkv.from_transformers(out.state)
            ssm = tuple(block.hook_state(s) for block, s in zip(self.blocks, ssm))
            return out.last_hidden_state, State(ssm, conv)
        extra = {}
        if self.attention_layer_index:
            state = self._as_hybrid(state)
            extra = self._mask_and_positions(state, tokens.shape[1])
        cache = self._cache_from(state)
        with self.torch_path(tokens.shape[1]), swapped(self._own_swaps):
            out = self.hf.base_model(input_ids=tokens, use_cache=True, **{self._cache_kw: cache}, **extra)
        ssm, conv = [], []
        for k, i in enumerate(self.hf_layer_index):
            layer_ssm, layer_conv = self._read_layer(self._layer(cache, i), k)
            ssm.append(self.blocks[k].hook_state(layer_ssm))
            conv.append(layer_conv)
        if not self.attention_layer_index:
            return out.last_hidden_state, State(tuple(ssm), tuple(conv))
        keys = tuple(cache.layers[i].keys for i in self.attention_layer_index)
        values = tuple(cache.layers[i].values for i in self.attention_layer_index)
        seen = tuple(s + tokens.shape[1] for s in state.seen)
        return out.last_hidden_state, HybridState.of(State(tuple(ssm), tuple(conv)), keys, values, seen)

    def _read_layer(self, layer, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Recurrent layer ``k``'s (ssm, conv) copied out of its cache layer; a short-conv layer's ssm is
        its conv window less the column no later token reads, its conv empty."""
        conv = layer.conv_states[0].clone()
        if self._conv_only[k]:
            return conv[..., 1:], conv[..., :0]
        return layer.recurrent_states[0].clone(), conv

    def _mask_and_positions(self, state: HybridState, length: int) -> dict[str, torch.Tensor]:
        """position_ids [b, length]: each row's own positions (``seen`` on); attention_mask [b, L + length]
        (only when some row's cache is shorter than the L cached positions): 1 on the positions the row
        reads, 0 on its left padding."""
        device = state.ssm[0].device
        seen = torch.tensor(state.seen, dtype=torch.long, device=device)[:, None]               # [b, 1]
        extra = {"position_ids": seen + torch.arange(length, device=device)}
        if min(state.seen) < state.kv_length:
            columns = torch.arange(state.kv_length + length, device=device)
            extra["attention_mask"] = (columns >= state.kv_length - seen).long()
        return extra

    # -- the protocol --------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens [b, l] -> final-normed hidden [b, l, d_model] (the backbone's last_hidden_state), state."""
        if not self.token_by_token or tokens.shape[1] == 1:
            return self._call(tokens, state)
        outs = []
        for j in range(tokens.shape[1]):
            h, state = self._call(tokens[:, j:j + 1], state)
            outs.append(h)
        return torch.cat(outs, dim=1), state

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d_model] -> logits [..., vocab]: the HF model's output embedding (lm_head), then
        the logit scale its ``*ForCausalLM`` applies (:data:`LOGIT_SCALES`), in the same operation."""
        logits = self.hf.get_output_embeddings()(hidden)
        scale = LOGIT_SCALES.get(getattr(self.config, "model_type", None))
        if scale is not None:
            key, op = scale
            logits = op(logits, getattr(self.config, key))
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def zero_state(self, batch: int, *, device=None, dtype=None) -> State:
        """Zero recurrent states; for a hybrid, a :class:`HybridState` with empty KV caches."""
        device = self.device if device is None else device
        if self._state_argument:  # RWKV's initial state is not zeros
            (hidden, _), ssm_dtype, _, conv_dtype = self._shapes[0]
            return hf_rwkv.initial_state(batch, hidden, len(self._shapes), device=device, ssm_dtype=dtype or ssm_dtype,
                                         conv_dtype=dtype or conv_dtype)
        ssm = tuple(torch.zeros(batch, *s, device=device, dtype=dtype or sd) for s, sd, _, _ in self._shapes)
        conv = tuple(torch.zeros(batch, *c, device=device, dtype=dtype or cd) for _, _, c, cd in self._shapes)
        if not self.attention_layer_index:
            return State(ssm, conv)
        keys = tuple(torch.zeros(batch, *k, device=device, dtype=dtype or kd) for k, _, kd in self._kv_shapes)
        values = tuple(torch.zeros(batch, *v, device=device, dtype=dtype or vd) for _, v, vd in self._kv_shapes)
        return HybridState.of(State(ssm, conv), keys, values, (0,) * batch)

    @property
    def n_heads(self) -> int:
        """Mamba-2-like states: their head axis. Mamba-1-like [d_inner, d_state] and short-conv windows
        [hidden, w]: groups of 64 consecutive channels (fewer when 64 does not divide the channels), as
        statelens' Mamba-1 backend."""
        shape = self._shapes[0][0]
        return shape[0] if len(shape) == 3 else shape[0] // math.gcd(shape[0], 64)

    def by_head(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``blocks.{k}.hook_state`` with heads explicit: [b, heads, k]. No other hook point exists here."""
        if name.rsplit(".", 1)[-1] != "hook_state":
            raise BadInput(f"{name}: the hf adapter has only blocks.{{k}}.hook_state hook points")
        if t.dim() == 4:
            return t.flatten(2)                              # [b, h, p * n]
        return t.reshape(t.shape[0], self.n_heads, -1)       # [b, H, c * n]


def check_chunking(model: HFRecurrentAdapter, *, length: int = 64, chunk: int = 16, seed: int = 0) -> bool:
    """Compares chunked with one-shot logits and final recurrent states on random tokens; returns True when
    they agree. The states are compared too because a model that drops the carried state in multi-token
    calls can move the logits of a small random model by less than the tolerance (transformers' Zamba did).

    When they do not, switches ``model.token_by_token`` on (with a line in ``model.notes``) and checks
    again. Also checks the adapter's one-shot logits against the HF model's own. Raises
    :class:`CheckpointError` when the adapter cannot reproduce the HF model.
    """
    vocab = model.hf.get_input_embeddings().weight.shape[0]
    tokens = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed)).to(model.device)

    def chunked() -> tuple[torch.Tensor, State]:
        state, out = model.zero_state(1), []
        for start in range(0, length, chunk):
            logits, state = model(tokens[:, start:start + chunk], state)
            out.append(logits)
        return torch.cat(out, dim=1), state

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # the tolerance `statelens check` holds backends to
        from statelens.models.verify import tolerance

        a, b = a.float(), b.float()
        return (a - b).abs().max().item() <= tolerance(model.dtype, b.abs().max().item())

    def agrees(run: tuple[torch.Tensor, State]) -> bool:
        return close(run[0], one_shot) and all(map(close, run[1].ssm, final.ssm))

    with torch.no_grad():
        with model.torch_path():
            reference = model.hf(input_ids=tokens).logits.float()
        one_shot, final = model(tokens)
        if not close(one_shot, reference):
            raise CheckpointError(f"{type(model.hf).__name__}: lm_head(last hidden state) differs from the "
                                  "model's logits (a logit scale or cap?); the hf adapter cannot run it")
        if agrees(chunked()):
            return True
        model.token_by_token = True
        model.notes.append(f"{type(model.hf).__name__} drops the carried state in multi-token calls; "
                           "every chunk runs token by token (exact, slow)")
        if not agrees(chunked()):
            raise CheckpointError(f"{type(model.hf).__name__}: neither chunked nor token-by-token "
                                  "continuation reproduces the one-shot logits and states")
    return False
