"""statelens's chunked rollout against transformers' chunked forward with its cache, on the same random
weights, timed in one run with the runs interleaved (``best_of``): tokens/s of transformers, of
statelens plain, and of statelens recording per-head state statistics every ``STRIDE`` tokens (the
recorder ``statelens states`` uses). Both sides compute the logits of every token; the chunks' last
logits are compared, a check that both computed the same thing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from diagnostics import best_of

from statelens.models import Mamba1Config, Mamba1LM, Mamba2Config, Mamba2LM, fused
from statelens.record import rollout
from statelens.record.recorder import record

SHAPES = {  # name: (d_model, n_layer, d_state, headdim, vocab)
    "small": (256, 4, 64, 32, 256),
    "130m": (768, 24, 128, 64, 50288),
}
STRIDE = 256  # recorded positions: every 256 tokens, 4 per 1024-token call


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


def ours_recording(model, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """The rollout recording per-head statistics of every layer's SSM state every ``STRIDE`` tokens."""
    out = []
    rec = record(model, tokens, positions=STRIDE, chunk=chunk, on_chunk=lambda c: out.append(c.logits()[:, -1]))
    assert len(rec.positions) == tokens.shape[1] // STRIDE
    return torch.stack(out, 1)


def compiled(fn: Callable, *args) -> Callable:
    """``fn(*args)`` with the compiled path on (``--compile on``)."""
    def run():
        with fused.mode("on"):
            return fn(*args)
    return run


def throughput(arch: str, shape: str, tokens: int, chunk: int = 1024, repeats: int = 2,
               also: Callable[[], None] | None = None) -> dict:
    """tokens/s of transformers (``hf``), statelens plain (``plain``) and recording (``recorded``, Mamba-2
    only, each also with the compiled path: ``plain_compiled``, ``recorded_compiled``), and ``gap``: the
    largest difference of the chunks' last logits relative to the largest logit. ``also`` runs
    interleaved with them (the matmul timing, so that a slow spell of this shared machine falls on it
    too). transformers' Mamba-1 drops the state between multi-token chunks: its only exact continuation
    is token by token, fed over at most 512 tokens. The compile itself happens in the warm-up, untimed."""
    hf, ours = pair(arch, *SHAPES[shape])
    stream = torch.randint(0, SHAPES[shape][-1], (1, tokens), generator=torch.Generator().manual_seed(0))
    hf_chunk = chunk if arch == "mamba2" else 1
    n = tokens if arch == "mamba2" else min(tokens, 512)
    stream = stream[:, :n]
    results = {}

    def keep(name, fn, *args):
        def run():
            results[name] = fn(*args)
        return run

    fns = {"hf": keep("hf", hf_rollout, hf, stream, hf_chunk), "plain": keep("plain", ours_rollout, ours, stream, chunk)}
    if arch == "mamba2":
        fns["recorded"] = keep("recorded", ours_recording, ours, stream, chunk)
        fns["plain_compiled"] = keep("plain_compiled", compiled(ours_rollout, ours, stream, chunk))
        fns["recorded_compiled"] = keep("recorded_compiled", compiled(ours_recording, ours, stream, chunk))
        compiled(ours_recording, ours, stream[:, :2 * chunk], chunk)()  # warm-up: compiles both graphs
        compiled(ours_rollout, ours, stream[:, :chunk], chunk)()
    ours_rollout(ours, stream[:, :64], chunk)  # warm-up
    times = dict(zip(fns, best_of(*fns.values(), *([also] if also else []), repeats=repeats)))
    ref = results["hf"]
    if hf_chunk != chunk:  # compare the same positions' logits
        ref = ref[:, [min(k + chunk, n) - 1 for k in range(0, n, chunk)]]
    gap = max(((results[name] - ref).abs().max() / ref.abs().max()).item() for name in fns if name != "hf")
    return {"tokens": n, "gap": gap, "model": ours, **{name: n / t for name, t in times.items()}}
