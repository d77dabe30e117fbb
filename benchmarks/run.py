"""``make bench``: one table of ratios, every figure measured in this run (these machines are noisy;
ratios within one run are what is reported).

    python benchmarks/run.py [--tokens N] [--rss-tokens 1000000]

- throughput (``throughput.py``): statelens recording state statistics every 256 tokens, and plain,
  against transformers' ``Mamba2ForCausalLM`` chunked forward with its cache (no recording) on the same
  weights, 1024-token calls, batch 1; Mamba-1 against transformers fed token by token;
- CPU efficiency (``efficiency.py``): statelens's plain rollout's model FLOP/s over fp32 ``torch.mm``
  FLOP/s at the model's projection sizes, timed interleaved with the rollouts;
- the diagnostics' costs (``diagnostics.py``): recording overhead, EffRem, peak RSS;
- the compiled path per mixer (``fused_mixers.py``): one 130M-shaped Mamba-2, Mamba-1 and GLA layer, eager
  against ``--compile on``, 4096 tokens at batch 1;
- the newer families (``families.py``): each backend's chunked forward against token by token, 4096 tokens
  (Mamba-3, Gated DeltaNet, DeltaNet, RWKV-7);
- remembrance through the transformers adapter (``adapter.py``): ``--backend hf`` against the native
  Mamba-2 backend on the same weights, EffRem at T = 128 over 2 sequences;
- the training monitor's cost (``monitor.py``): the demo baseline's post-training with the monitor at its
  default cadence against the same run without;
- where CUDA is available (``gpu.py``): the 130M shape on the kernels, 128k tokens recording every 1024
  against plain, and statelens's rollout and EffRem against mamba-ssm's own forward.

Columns: measure, value, target (issue 7), met.
"""
from __future__ import annotations

import argparse

import torch

from adapter import adapter_ratio
from diagnostics import effrem_cost, recording_overhead, rss_ratio
from efficiency import MatmulRate, flops_per_token
from families import FAMILIES, chunked_vs_steps
from fused_mixers import measure as fused_mixer
from monitor import monitor_overhead
from throughput import SHAPES, throughput

from statelens.models import Mamba2Config

TOKENS = {"small": 16384, "130m": 4096}  # throughput, per shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="throughput tokens at every shape "
                        f"(default: {', '.join(f'{s} {n}' for s, n in TOKENS.items())})")
    parser.add_argument("--rss-tokens", type=int, default=1_000_000)
    args = parser.parse_args()
    rows, notes = [], []

    def row(measure: str, value: float, target: str = "", op=None, bound: float | None = None) -> None:
        met = "" if op is None else ("yes" if op(value, bound) else "no")
        rows.append((measure, value, target, met))

    at_least, at_most = (lambda v, b: v >= b), (lambda v, b: v <= b)
    targets = {"small": 1.5, "130m": 1.2}
    for shape in ("small", "130m"):
        tokens = args.tokens or TOKENS[shape]
        d, n_layer, d_state, headdim, vocab = SHAPES[shape]
        cfg = Mamba2Config(d_model=d, n_layer=n_layer, vocab_size=vocab, d_state=d_state, headdim=headdim)
        mm = MatmulRate(cfg, 1024)
        r = throughput("mamba2", shape, tokens, also=mm)
        q = r["model"].state_block
        flops = sum(flops_per_token(cfg, q).values())
        efficiency = r["plain"] * flops / mm.rate()
        row(f"mamba2 {shape}: statelens recording / transformers tok/s ({r['tokens']} tok)",
            r["recorded"] / r["hf"], f">= {targets[shape]}", at_least, targets[shape])
        row(f"mamba2 {shape}: statelens plain / transformers tok/s", r["plain"] / r["hf"])
        row(f"mamba2 {shape}: CPU efficiency, model / matmul FLOP/s",
            efficiency, *((">= 0.70", at_least, 0.70) if shape == "130m" else ()))
        big = shape == "130m"  # issue 21's targets for the compiled path (--compile on)
        row(f"mamba2 {shape}: compiled: statelens recording / transformers tok/s", r["recorded_compiled"] / r["hf"],
            *((">= 2.0", at_least, 2.0) if big else ()))
        row(f"mamba2 {shape}: compiled: CPU efficiency, model / matmul FLOP/s", r["plain_compiled"] * flops / mm.rate(),
            *((">= 0.85", at_least, 0.85) if big else ()))
        row(f"mamba2 {shape}: compiled: recording / plain time", r["plain_compiled"] / r["recorded_compiled"],
            *(("<= 1.10", at_most, 1.10) if big else ()))
        row(f"mamba2 {shape}: compiled / eager tok/s, plain", r["plain_compiled"] / r["plain"])
        notes.append(f"{shape}: {flops / 1e6:.1f} MFLOP/token (SSD block {q}); statelens plain "
                     f"{r['plain']:.0f} tok/s = {r['plain'] * flops / 1e9:.1f} GFLOP/s, recording {r['recorded']:.0f} "
                     f"tok/s, compiled {r['plain_compiled']:.0f} and {r['recorded_compiled']:.0f} tok/s, transformers "
                     f"{r['hf']:.0f} tok/s; torch.mm {mm.rate() / 1e9:.1f} GFLOP/s; logits rel. diff {r['gap']:.1e}")
    for family in ("mamba2", "mamba1", "gla"):  # one 130M-shaped mixer, 4096 tokens at batch 1 (fused_mixers.py)
        r = fused_mixer(family, 4096, 1, 3)
        row(f"{family} 130m mixer: compiled / eager time, 4096 tok", r["eager_ms"] / r["compiled_ms"])
        notes.append(f"{family} 130m mixer: eager {r['eager_ms']:.0f} ms, compiled {r['compiled_ms']:.0f} ms; outputs "
                     f"rel. diff {r['rel_diff']:.1e}")
    r = throughput("mamba1", "small", args.tokens or TOKENS["small"])
    row(f"mamba1 small: statelens / transformers token by token ({r['tokens']} tok)", r["plain"] / r["hf"])
    notes.append(f"mamba1 small: logits rel. diff {r['gap']:.1e}")

    for family in FAMILIES:
        r = chunked_vs_steps(family)
        row(f"{family}: chunked / token-by-token tok/s at 4k", r["chunked"] / r["steps"], ">= 5", at_least, 5)
        notes.append(f"{family}: chunked {r['chunked']:.0f} tok/s, token by token {r['steps']:.0f} tok/s; "
                     f"last logits rel. diff {r['gap']:.1e}")

    for shape, (tokens, ratio) in recording_overhead().items():
        row(f"recording every 256 tok / plain rollout, {shape} ({tokens} tok)", ratio, "<= 1.10", at_most, 1.10)
    what, ratio = effrem_cost()
    row(f"EffRem ({what}) / plain forward", ratio, "<= 1.25", at_most, 1.25)
    ratio, gap = adapter_ratio()
    row("remembrance T 128 x 2 seqs: hf adapter / native backend, same Mamba-2", ratio, "<= 3.0", at_most, 3.0)
    notes.append(f"adapter vs native EffRem difference {gap:.1e}")
    ratio = monitor_overhead()
    row("posttrain with the monitor every 200 steps / without (demo baseline, 2000 steps)", ratio, "<= 1.05",
        at_most, 1.05)
    small, large = rss_ratio(args.rss_tokens)
    row(f"peak RSS, recording {args.rss_tokens} / 32768 tok", large / small, "<= 1.20", at_most, 1.20)
    notes.append(f"peak RSS {large:.0f} / {small:.0f} MiB")

    if torch.cuda.is_available():
        from gpu import measure

        g = measure()
        row("cuda 130m: recording every 1024 / plain rollout (128k tok)", g["recorded"] / g["plain"], ">= 0.90",
            at_least, 0.90)
        row("cuda 130m: statelens plain / mamba-ssm forward tok/s", g["plain"] / g["mamba_ssm"])
        row("cuda 130m: EffRem (T 8192, 32 points x 16 seqs) / mamba-ssm forward tok/s", g["effrem"] / g["mamba_ssm"])
        notes.append(f"{torch.cuda.get_device_name()}, bfloat16: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in g.items()))

    width = max(len(m) for m, *_ in rows)
    print(f"{'measure':{width}}  {'value':>6}  {'target':>7}  met")
    for measure, value, target, met in rows:
        print(f"{measure:{width}}  {value:6.2f}  {target or '-':>7}  {met or '-'}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
