"""Where the CPU time of a long Mamba-2 rollout goes (issue 21, item 1): torch.profiler over one forward
call of ``--tokens`` tokens (default 4096) of the 130M shape (``throughput.SHAPES``), from the zero state,
at each ``--batch`` (default 1 and 8), after one warm-up call. Self CPU time per operator, grouped:

- matmul: ``mm``, ``bmm``, ``addmm`` (the projections and the SSD's einsums);
- data movement: ``cat``, ``stack``, ``copy_``, ``clone`` (the SSD's block-state carry, dtype casts);
- convolution: the depthwise causal conv;
- elementwise and the rest: ``mul``, ``add``, ``exp``, ``cumsum``, ``masked_fill``, ``softplus``, norms...

The unembedding (the 50288-way vocabulary projection of every token) is profiled in its own label at
batch 1 only: at batch 8 its logits alone would take 6.6 GB.

With ``--compile on`` the forward takes the compiled path (``statelens.models.fused``; compiled in the
warm-up, untimed): its fused loops show as ``graph_...cpp_fused...`` rows, grouped as elementwise.

    python benchmarks/profile_cpu.py [--tokens 4096] [--batch 1 8] [--top 12] [--compile off|on]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from throughput import SHAPES

from statelens.models import Mamba2Config, Mamba2LM, fused

GROUPS = {"matmul": ("aten::mm", "aten::bmm", "aten::addmm"),
          "data movement": ("aten::cat", "aten::stack", "aten::copy_", "aten::clone"),
          "convolution": ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution")}


def group_of(op: str) -> str:
    return next((name for name, ops in GROUPS.items() if op in ops), "elementwise and the rest")


def profile_forward(model: Mamba2LM, batch: int, tokens: int, unembed: bool):
    """The profiler's averages over one ``hidden`` call (and ``unembed`` when asked) of [batch, tokens]."""
    x = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.hidden(x[:, :1024], model.zero_state(batch))         # warm-up: allocator, kernels chosen, compile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("mixer stack"):
                h, _ = model.hidden(x, model.zero_state(batch))
            if unembed:
                with record_function("unembed"):
                    model.unembed(h)
    return prof.key_averages()


def report(averages, top: int) -> None:
    ops = [e for e in averages if e.key.startswith("aten::") or "cpp_fused" in e.key]
    total = sum(e.self_cpu_time_total for e in ops)
    groups: dict[str, float] = {}
    for e in ops:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    print(f"  total self CPU time of aten ops and fused loops: {total / 1e6:.2f} s")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<26} {t / 1e6:8.2f} s  {100 * t / total:5.1f}%")
    print("  top operators:")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"    {e.key:<28} {e.self_cpu_time_total / 1e6:8.2f} s  {100 * e.self_cpu_time_total / total:5.1f}%  "
              f"{e.count:6d} calls")
    labels = {e.key: e.cpu_time_total for e in averages if e.key in ("mixer stack", "unembed")}
    print("  " + ", ".join(f"{k} {v / 1e6:.2f} s wall in the label" for k, v in labels.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--compile", default="off", choices=("off", "on"))
    args = parser.parse_args()
    if args.compile == "on":
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True  # the fused loops' own rows
    fused.set_mode(args.compile)
    d, n_layer, d_state, headdim, vocab = SHAPES["130m"]
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=d, n_layer=n_layer, vocab_size=vocab, d_state=d_state,
                                  headdim=headdim)).eval()
    print(f"130M-shaped Mamba-2, {args.tokens} tokens per call, torch threads {torch.get_num_threads()}, "
          f"--compile {args.compile}")
    for batch in args.batch:
        print(f"batch {batch}:")
        report(profile_forward(model, batch, args.tokens, unembed=batch == 1), args.top)


if __name__ == "__main__":
    main()
