"""Any local ``transformers`` causal LM whose cache holds only recurrent states, behind statelens' protocol.

    model = HFRecurrentAdapter.from_pretrained("path/to/checkpoint")   # never runs remote code
    logits, state = model(tokens, state)

For architectures statelens has no native backend for (falcon_mamba, pure-recurrent configs of
nemotron_h / qwen3_next-like models, ...), or to cross-check a native backend. Each call writes the
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

Hybrid models are refused: their attention layers carry a KV cache, which is not a recurrent state
(a :class:`~statelens.errors.CheckpointError` names the attention layers). Layers without any cache
(MLP / MoE layers) are skipped.

Multi-token chunks: on load, :func:`check_chunking` compares chunked with one-shot logits. Where the
model drops the carried state in multi-token calls (``transformers``' ``MambaForCausalLM`` ignores
the cached recurrent state unless the call has one token), the adapter runs every chunk token by
token (``token_by_token = True``, with a line in ``notes``): exact, and slow.

Hook points: only ``blocks.{k}.hook_state`` (``[b, heads, headdim, d_state]`` or ``[b, d_inner,
d_state]``), called with each recurrent layer's state read back after each call (after each token
when ``token_by_token``); a returned tensor replaces the carried state. The per-token quantities of
the native backends (``hook_dt``, ``hook_decay``, ``hook_B`` ...) are inside the HF modules and are not
available through this adapter.
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import torch
from torch import nn

from statelens.errors import BadInput, CheckpointError
from statelens.models.base import RecurrentLM, State
from statelens.models.hooks import HookPoint


class _StateHooks(nn.Module):
    """One recurrent layer's hook point (so that its name is ``blocks.{k}.hook_state``)."""

    def __init__(self, layer: int):
        super().__init__()
        self.hook_state = HookPoint(layer)  # [b, heads, headdim, d_state] or [b, d_inner, d_state]


def layer_kinds(config) -> list[str]:
    """Per HF layer: "recurrent" (a linear-attention cache layer), "attention" (a KV cache, alone or
    beside a recurrent state) or "none" (no cache: MLP / MoE layers).

    Read from the layers of the cache transformers builds for the config, by class name: an
    ``isinstance`` test breaks when another package has imported transformers' cache module anew.
    """
    from transformers import DynamicCache

    kinds = []
    for layer in DynamicCache(config=config).layers:
        names = {cls.__name__ for cls in type(layer).__mro__}
        if "LinearAttentionCacheLayerMixin" in names and not hasattr(layer, "keys"):
            kinds.append("recurrent")
        elif "DummyLayer" in names:
            kinds.append("none")
        else:
            kinds.append("attention")
    return kinds


class HFRecurrentAdapter(RecurrentLM):
    """A pure recurrent ``transformers`` causal LM as a :class:`RecurrentLM` (see the module docstring).

    ``hf_model`` is a loaded ``*ForCausalLM``; ``check`` runs :func:`check_chunking` (and may switch on
    ``token_by_token``).
    """

    arch = "hf"

    def __init__(self, hf_model: nn.Module, *, check: bool = True):
        super().__init__()
        self.hf = hf_model.eval()
        self.config = hf_model.config
        self.layer_kinds = layer_kinds(self.config)
        attention = [i for i, kind in enumerate(self.layer_kinds) if kind == "attention"]
        if attention:
            raise CheckpointError(
                f"{type(hf_model).__name__} has attention layers {attention}: the hf adapter runs only pure "
                "recurrent models (a KV cache is not a recurrent state)")
        self.hf_layer_index = [i for i, kind in enumerate(self.layer_kinds) if kind == "recurrent"]
        if not self.hf_layer_index:
            raise CheckpointError(f"{type(hf_model).__name__} has no recurrent layers")
        backbone = hf_model.base_model
        params = inspect.signature(backbone.forward).parameters
        self._cache_kw = "cache_params" if "cache_params" in params else "past_key_values"
        self.token_by_token = False
        self.notes: list[str] = []
        self.blocks = nn.ModuleList(_StateHooks(k) for k in range(len(self.hf_layer_index)))
        self._shapes = self._probe_shapes()
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
            model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
            hf_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{path}: not a transformers causal LM checkpoint "
                                  f"({type(error).__name__}: {error})") from None
        try:
            hf_model = hf_class.from_pretrained(os.fspath(path), local_files_only=True, trust_remote_code=False,
                                                dtype=dtype)
        except (OSError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{path}: transformers cannot load it: {first}") from error
        return cls(hf_model.to(device), check=check)

    # -- the cache round trip ------------------------------------------------------------------
    def _probe_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype, tuple[int, ...], torch.dtype]]:
        """Per recurrent layer: (ssm shape, dtype, conv shape, dtype) for one sequence, batch axis dropped."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        with torch.no_grad():
            self.hf.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device),
                               use_cache=True, **{self._cache_kw: cache})
        shapes = []
        for i in self.hf_layer_index:
            ssm, conv = cache.layers[i].recurrent_states[0], cache.layers[i].conv_states[0]
            if ssm is None or conv is None:
                raise CheckpointError(f"layer {i} of {type(self.hf).__name__} keeps no recurrent state and "
                                      "conv state; the hf adapter needs both")
            shapes.append((tuple(ssm.shape[1:]), ssm.dtype, tuple(conv.shape[1:]), conv.dtype))
        return shapes

    def _cache_from(self, state: State):
        """A fresh DynamicCache holding ``state``, every recurrent layer marked as continuing."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for k, i in enumerate(self.hf_layer_index):
            layer = cache.layers[i]
            _, ssm_dtype, _, conv_dtype = self._shapes[k]
            ssm, conv = state.ssm[k].to(ssm_dtype), state.conv[k].to(conv_dtype)
            layer.lazy_initialization(conv_states=conv, recurrent_states=ssm, conv_kernel_size=conv.shape[-1])
            layer.conv_states[0].copy_(conv)
            layer.recurrent_states[0].copy_(ssm)
            layer.has_previous_state[0] = True
        return cache

    def _call(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One backbone call on ``tokens`` [b, l] from ``state``; the states read back pass the hooks."""
        cache = self._cache_from(state)
        out = self.hf.base_model(input_ids=tokens, use_cache=True, **{self._cache_kw: cache})
        ssm, conv = [], []
        for k, i in enumerate(self.hf_layer_index):
            layer = cache.layers[i]
            ssm.append(self.blocks[k].hook_state(layer.recurrent_states[0].clone()))
            conv.append(layer.conv_states[0].clone())
        return out.last_hidden_state, State(tuple(ssm), tuple(conv))

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
        """hidden [..., d_model] -> logits [..., vocab]: the HF model's output embedding (lm_head)."""
        logits = self.hf.get_output_embeddings()(hidden)
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def zero_state(self, batch: int, *, device=None, dtype=None) -> State:
        device = self.device if device is None else device
        return State(
            tuple(torch.zeros(batch, *s, device=device, dtype=dtype or sd) for s, sd, _, _ in self._shapes),
            tuple(torch.zeros(batch, *c, device=device, dtype=dtype or cd) for _, _, c, cd in self._shapes),
        )

    @property
    def n_heads(self) -> int:
        """Mamba-2-like states: their head axis. Mamba-1-like [d_inner, d_state]: groups of 64
        consecutive channels (fewer when 64 does not divide d_inner), as statelens' Mamba-1 backend."""
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
    """Compares chunked with one-shot logits on random tokens; returns True when they agree.

    When they do not, switches ``model.token_by_token`` on (with a line in ``model.notes``) and checks
    again. Also checks the adapter's one-shot logits against the HF model's own. Raises
    :class:`CheckpointError` when the adapter cannot reproduce the HF model.
    """
    vocab = model.hf.get_input_embeddings().weight.shape[0]
    tokens = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed)).to(model.device)

    def chunked() -> torch.Tensor:
        state, out = model.zero_state(1), []
        for start in range(0, length, chunk):
            logits, state = model(tokens[:, start:start + chunk], state)
            out.append(logits)
        return torch.cat(out, dim=1)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # the tolerance `statelens check` holds backends to
        from statelens.models.verify import tolerance

        return (a - b).abs().max().item() <= tolerance(model.dtype, b.abs().max().item())

    with torch.no_grad():
        reference = model.hf(input_ids=tokens).logits.float()
        one_shot = model(tokens)[0].float()
        if not close(one_shot, reference):
            raise CheckpointError(f"{type(model.hf).__name__}: lm_head(last hidden state) differs from the "
                                  "model's logits (a logit scale or cap?); the hf adapter cannot run it")
        if close(chunked().float(), one_shot):
            return True
        model.token_by_token = True
        model.notes.append(f"{type(model.hf).__name__} drops the carried state in multi-token calls; "
                           "every chunk runs token by token (exact, slow)")
        if not close(chunked().float(), one_shot):
            raise CheckpointError(f"{type(model.hf).__name__}: neither chunked nor token-by-token "
                                  "continuation reproduces the one-shot logits")
    return False
