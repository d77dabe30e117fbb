"""``make bench``: statelens's chunked rollout against transformers' chunked forward with its cache,
on the same random weights, in one run (ratios only: these machines are noisy).

    python benchmarks/run.py [--tokens 4096] [--chunk 1024] [--shapes small,130m]

Prints one table: tokens/s of each, the speed ratio (statelens / transformers), and the max abs
difference of the chunks' last logits relative to the largest logit, a check that both computed the
same thing. ``chunks`` gives the tokens per call of statelens / of transformers.
"""
from __future__ import annotations

import argparse
import time

import torch

from statelens.models import Mamba1Config, Mamba1LM, Mamba2Config, Mamba2LM
from statelens.record import rollout

SHAPES = {  # name: (d_model, n_layer, d_state, headdim, vocab)
    "small": (256, 4, 64, 32, 256),
    "130m": (768, 24, 128, 64, 50288),
}


def pair(arch: str, d: int, n_layer: int, n: int, p: int, vocab: int):
    """A transformers model and the statelens backend holding the same weights."""
    import transformers

    torch.manual_seed(0)
    if arch == "mamba2":
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layer, state_size=n, head_dim=p,
            num_heads=2 * d // p, n_groups=1, chunk_size=256, tie_word_embeddings=True))
        ours = Mamba2LM(Mamba2Config(d_model=d, n_layer=n_layer, vocab_size=vocab, d_state=n, headdim=p))
    else:
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layer, state_size=16))
        ours = Mamba1LM(Mamba1Config(d_model=d, n_layer=n_layer, vocab_size=vocab, d_state=16))
    state = {k.removeprefix("backbone.").replace("embeddings.", "embedding.").replace("layers.", "blocks."): v
             for k, v in hf.state_dict().items()}
    ours.load_state_dict(state)
    return hf.eval(), ours.eval()


def hf_rollout(hf, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    cache, out = None, []
    with torch.no_grad():
        for start in range(0, tokens.shape[1], chunk):
            result = hf(tokens[:, start:start + chunk], cache_params=cache, use_cache=True)
            cache = result.cache_params
            out.append(result.logits[:, -1])
    return torch.stack(out, 1)


def ours_rollout(model, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.stack([c.logits()[:, -1] for c in rollout(model, tokens, chunk=chunk)], 1)


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--shapes", default="small,130m")
    args = parser.parse_args()
    rows = []
    for arch in ("mamba2", "mamba1"):
        for shape in args.shapes.split(","):
            if arch == "mamba1" and shape != "small":
                continue  # transformers' Mamba-1 steps token by token on CPU: too slow to time at 130M
            hf, ours = pair(arch, *SHAPES[shape])
            tokens = torch.randint(0, SHAPES[shape][-1], (1, args.tokens))
            # transformers' Mamba-1 drops the state between multi-token chunks: its only exact
            # continuation is token by token, which is what a user of it would have to run.
            hf_chunk = args.chunk if arch == "mamba2" else 1
            n = args.tokens if arch == "mamba2" else min(args.tokens, 512)
            timed(ours_rollout, ours, tokens[:, :64], args.chunk)  # warm-up
            t_hf, ref = timed(hf_rollout, hf, tokens[:, :n], hf_chunk)
            t_ours, got = timed(ours_rollout, ours, tokens[:, :n], args.chunk)
            if hf_chunk != args.chunk:  # compare the same positions' logits
                ref = ref[:, [min(k + args.chunk, n) - 1 for k in range(0, n, args.chunk)]]
            gap = ((got - ref).abs().max() / ref.abs().max()).item()
            rows.append((arch, shape, args.chunk, hf_chunk, n / t_ours, n / t_hf, t_hf / t_ours, gap))
    print(f"{'arch':7} {'shape':6} {'chunks':>11} {'statelens tok/s':>16} {'transformers tok/s':>19} "
          f"{'ratio':>6} {'rel. diff':>10}")
    for arch, shape, ours_chunk, hf_chunk, ours_tps, hf_tps, ratio, gap in rows:
        print(f"{arch:7} {shape:6} {f'{ours_chunk}/{hf_chunk}':>11} {ours_tps:16.0f} {hf_tps:19.0f} "
              f"{ratio:6.2f} {gap:10.1e}")


if __name__ == "__main__":
    main()
