"""flash-linear-attention's ``RWKV7ForCausalLM`` run on CPU, as an oracle for tests/test_rwkv7.py.

Run as a script in a subprocess: ``python fla_rwkv7_oracle.py SPEC.json OUT.pt``. fla's op modules import
triton at import time, and triton is not installed here (it needs a GPU to run anyway); this script
answers those imports with inert stand-ins, in its own process so that no other test sees a fake
triton. Nothing of triton runs: every Triton-backed function the RWKV-7 forward calls is swapped for fla's
own torch reference (``torch_addcmul_rwkv7``, ``k_update_ref``, ``gate_output_correction_ref``,
``token_shift_ref`` plus the carried last token, ``dplr_recurrence`` for the scan, ``layer_norm_ref`` and
``group_norm_ref`` for the fused norms) or for torch's (``relu(x) ** 2`` for the compiled ``sqrelu``,
``x / sqrt(|x|^2 + 1e-6)`` for the ``l2_norm`` kernel, as that kernel computes it). ``fuse_norm`` defaults
to False here (fla's own unfused path: ``nn.LayerNorm``, ``nn.GroupNorm``, ``F.normalize``). Everything else (projections, LoRAs, token-shift mixing,
value residual, k_k / k_a / r_k, group norm, blocks, parameter names) is fla's code.

SPEC: {"runs": [run, ...]}, each run {"config": fla RWKV7Config kwargs, "tokens": [[...]], "dtype":
"float32" | "float64", "scan": "fla" (fla's naive DPLR recurrence, float32 inside) | "statelens"
(rwkv7_sequential, for float64: then only the scan is ours), "seed": int}. OUT: per run, a dict of the
fla state_dict, config.json (a dict), its parameter count, logits [b, l, vocab], and per layer the scan's
final state [b, h, k, v] and the two token-shift inputs of the last token [b, 2, d].
"""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types


class _Base:
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _Anything:
    """Any triton object at import time: calling, indexing or reading an attribute gives another."""

    __name__ = "triton_stand_in"

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        if name.startswith("__") or name == "driver":  # no driver: fla falls back to "cpu"
            raise AttributeError(name)
        return _Anything()

    def __getitem__(self, key):
        return _Anything()

    def __mro_entries__(self, bases):
        return (_Base,)


_CLASSES: dict[str, type] = {}


def _module_attribute(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if name[0].isupper():  # classes (isinstance checks, subclassing)
        return _CLASSES.setdefault(name, type(name, (_Base,), {}))
    return _Anything()


class _TritonStandIn:
    """A meta-path finder answering ``import triton`` (and submodules) with inert modules."""

    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_attribute
        module.__version__ = "3.4.0"
        return module

    def exec_module(self, module):
        pass


def _swap_kernels(scan_name: str, states: list):
    """Replaces the Triton-backed functions fla's RWKV-7 forward calls by torch references; ``states``
    collects each layer's final scan state."""
    import torch
    import torch.nn.functional as F

    import fla.layers.rwkv7 as layer
    import fla.models.rwkv7.modeling_rwkv7 as modeling
    import fla.modules.norm.layernorm as norms
    from fla.modules.norm.layernorm import group_norm_ref, layer_norm_ref
    from fla.modules.token_shift import token_shift_ref
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    def shift(x, cu_seqlens=None, cache=None, output_cache=False, **_):
        assert cache is None and cu_seqlens is None
        return token_shift_ref(x), x[:, -1:]

    def scan(r, w, k, v, a, b, scale=1.0, initial_state=None, **_):
        assert initial_state is None and scale == 1.0
        if scan_name == "fla":  # dplr_recurrence scales q by dk ** -0.5; RWKV-7 uses scale 1
            t = [x.transpose(1, 2) for x in (r * r.shape[-1] ** 0.5, k, v, a, b, w)]
            o, S = dplr_recurrence(*t, output_final_state=True)
            o = o.transpose(1, 2).to(v.dtype)
        else:
            from statelens.models.rwkv7 import rwkv7_sequential
            S0 = r.new_zeros(r.shape[0], r.shape[2], r.shape[3], v.shape[3])
            o, S = rwkv7_sequential(r, w, k, v, a, b, S0)
        states.append(S)
        return o, None

    def mul_scan(r, w, k, v, kk, a, **kwargs):
        return scan(r, w, k, v, -kk, kk * a, **kwargs)

    def layer_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
        return layer_norm_ref(x, weight, bias, residual, eps, prenorm)

    def group_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                   is_rms_norm=False, num_groups=1):
        return group_norm_ref(x, weight, bias, num_groups, residual, eps, is_rms_norm, prenorm)

    def l2_norm(x, eps=1e-6, output_dtype=None):  # fla's l2norm kernel: x / sqrt(sum(x * x) + eps)
        return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)

    for module, name, value in ((layer, "token_shift", shift), (modeling, "token_shift", shift),
                                (layer, "fused_addcmul_rwkv7", torch_addcmul_rwkv7),
                                (layer, "fused_k_rwkv7", k_update_ref),
                                (layer, "gate_output_correction", gate_output_correction_ref),
                                (layer, "chunk_rwkv7", scan), (layer, "fused_mul_recurrent_rwkv7", mul_scan),
                                (norms, "layer_norm", layer_norm), (norms, "group_norm", group_norm),
                                (layer, "l2_norm", l2_norm)):
        setattr(module, name, value)
    return lambda x: F.relu(x).square()


def run(spec: dict, states: list, sqrelu) -> dict:
    """One model and forward of SPEC's ``runs`` (module docstring)."""
    import torch

    from fla.models import RWKV7Config, RWKV7ForCausalLM

    states.clear()
    torch.manual_seed(spec["seed"])
    config = RWKV7Config(**({"fuse_norm": False} | spec["config"]), fuse_cross_entropy=False)
    model = RWKV7ForCausalLM(config).eval()
    with torch.no_grad():  # fla zeroes o_proj, the channel-mix value and LoRA inputs at init: randomise all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model = model.to(getattr(torch, spec["dtype"]))
    shifts = {}
    for i, block in enumerate(model.model.layers):
        block.ffn.act_fn = sqrelu
        for j, norm in enumerate((block.attn_norm, block.ffn_norm)):
            norm.register_forward_hook(lambda m, args, out, i=i, j=j: shifts.__setitem__(
                (i, j), (out[0] if isinstance(out, tuple) else out)[:, -1]))  # fused ffn_norm: (out, residual)
    with torch.no_grad():
        logits = model(torch.tensor(spec["tokens"]), use_cache=False).logits
    n = len(model.model.layers)
    return {"state_dict": model.state_dict(), "config": model.config.to_dict(), "logits": logits,
            "num_parameters": model.num_parameters(), "states": list(states),
            "shifts": [torch.stack([shifts[i, 0], shifts[i, 1]], dim=1) for i in range(n)]}


def main(spec_path: str, out_path: str) -> None:
    runs = json.loads(open(spec_path).read())["runs"]
    sys.meta_path.insert(0, _TritonStandIn())
    import torch

    torch.set_num_threads(1)  # tiny ops: threads only contend
    outputs, states = [], []
    for spec in runs:
        sqrelu = _swap_kernels(spec["scan"], states)
        outputs.append(run(spec, states, sqrelu))
    torch.save(outputs, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
