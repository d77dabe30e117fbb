"""flash-linear-attention's own model classes run on CPU, as the oracle of the GLA, Gated DeltaNet / DeltaNet
and RWKV-7 tests.

fla's op modules import triton at import time, and triton is not installed here (its kernels need a GPU
anyway). :func:`fla_runs` (called by the tests) runs this file as a script in one subprocess per batch of
runs; the script answers ``import triton`` with inert stand-ins (tests/fla_stand_ins.py), in its own
process so that no other test sees a fake triton (transformers would route its Qwen3-Next layers to fla's
kernels), and swaps every Triton-backed function a forward calls for fla's own torch reference or an
independent torch equivalent (tests/fla_swaps.py). Nothing of triton runs; everything else (projections,
head layout, gates, convolutions' weights, MLP, residuals, parameter names) is fla's code.

A run (a dict, JSON): ``family`` ("gla", "gated_deltanet", "delta_net", "rwkv7"), ``config`` (fla config
kwargs; ``fuse_norm`` defaults to False, ``fuse_cross_entropy`` is False), ``seed``, ``dtype`` ("float32"
or "float64"), ``kernel`` (the scan inside: "fla", fla's naive recurrence; "transformers", transformers'
chunked torch delta rule; "statelens", our own, so that in float64 only the scan is ours), ``tokens``
([[...]] or None: no forward), and optionally ``save_to`` (a folder for ``save_pretrained``) and ``wrap``
(also run ``statelens.models.auto.wrap`` on the fla model in memory).

Its output (a dict): fla's ``state_dict``, ``config`` (config.json as a dict), ``num_parameters``,
``mlp_width`` (the first block's MLP ``intermediate_size``), and with tokens ``logits`` [b, l, vocab],
``states`` (per layer the scan's final state [b, h, k, v]), for RWKV-7 ``shifts`` (per layer the two
token-shift inputs of the last token [b, 2, d]), with ``wrap`` ``wrapped`` ({"type": the class name,
"logits": its logits}).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

FAMILIES = {"gla": "GLA", "gated_deltanet": "GatedDeltaNet", "delta_net": "DeltaNet", "rwkv7": "RWKV7"}


def fla_runs(runs: list[dict], folder: Path) -> list[dict]:
    """fla's outputs for ``runs`` (module docstring), computed in one subprocess; skips without fla."""
    import pytest
    import torch

    if importlib.util.find_spec("fla") is None:
        pytest.skip("flash-linear-attention is not installed")
    (folder / "spec.json").write_text(json.dumps({"runs": runs}))
    done = subprocess.run([sys.executable, __file__, str(folder / "spec.json"), str(folder / "out.pt")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "out.pt")


def build(spec: dict):
    """A tiny random fla model of the run's family and config, its weights randomised where fla's
    initialisation leaves them constant (norms at one, biases and some projections at zero)."""
    import torch

    from fla import models

    name = FAMILIES[spec["family"]]
    config = getattr(models, f"{name}Config")(**({"fuse_norm": False} | spec["config"]), fuse_cross_entropy=False)
    torch.manual_seed(spec["seed"])
    model = getattr(models, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if spec["family"] == "rwkv7":  # fla zeroes o_proj, the channel-mix value and LoRA inputs
                p.add_(torch.randn_like(p) * 0.2)
            elif "norm" in key or (spec["family"] == "gla" and key.endswith("bias")):
                p.add_(torch.randn_like(p) * 0.3)
    return model.to(getattr(torch, spec["dtype"]))


def run(spec: dict) -> dict:
    """One run of SPEC (module docstring)."""
    import torch

    from fla_swaps import SWAPS

    model = build(spec)
    layer = model.model.layers[0]
    mlp = getattr(layer, "mlp", None) or getattr(layer, "ffn", None)
    out = {"state_dict": dict(model.state_dict()), "config": model.config.to_dict(),
           "num_parameters": model.num_parameters(), "mlp_width": getattr(mlp, "intermediate_size", None)}
    if spec.get("save_to"):
        model.save_pretrained(spec["save_to"])
    if spec["tokens"] is None:
        return out
    tokens = torch.tensor(spec["tokens"])
    if spec.get("wrap"):
        from statelens.models.auto import wrap

        wrapped = wrap(model)
        with torch.no_grad():
            out["wrapped"] = {"type": type(wrapped).__name__, "logits": wrapped(tokens)[0]}
    states, extras = [], {}
    SWAPS[spec["family"]](model, spec["kernel"], states, extras)  # after the state_dict: swaps rename modules
    with torch.no_grad():
        out["logits"] = model(tokens, use_cache=False).logits
    return out | {"states": list(states)} | extras


def main(spec_path: str, out_path: str) -> None:
    from fla_stand_ins import install_triton_stand_ins

    install_triton_stand_ins()
    import torch

    torch.set_num_threads(1)  # tiny ops: threads only contend
    runs = json.loads(Path(spec_path).read_text())["runs"]
    torch.save([run(spec) for spec in runs], out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
