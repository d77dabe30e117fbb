"""Tiny random checkpoints written by transformers (the oracle) and in mamba-ssm's layout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

# Property tests: the same examples on every run (a fresh clone reproduces the suite), and no timing checks
# (hypothesis' per-example deadline and its too-slow health check fail on a busy machine).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("statelens", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("statelens")


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves the parameters that transformers initialises to constants (norm weights, D, A_log,
    dt_bias) away from them, so that a wrong norm, skip or decay cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "A_log", "dt_bias", "conv1d.bias", "dt_proj.bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_mamba2(path: Path, *, ngroups: int = 2, tie: bool = False, vocab: int = 64, seed: int = 0,
              chunk_size: int = 16, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.Mamba2Config(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, num_heads=8,
        n_groups=ngroups, expand=2, conv_kernel=4, chunk_size=chunk_size, tie_word_embeddings=tie,
        use_conv_bias=True)
    model = perturb(transformers.Mamba2ForCausalLM(cfg), seed).to(dtype)
    model.save_pretrained(path)
    return model


def hf_mamba1(path: Path, *, tie: bool = True, vocab: int = 64, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=8,
                                   expand=2, conv_kernel=4, tie_word_embeddings=tie)
    model = perturb(transformers.MambaForCausalLM(cfg), seed).to(dtype)
    model.save_pretrained(path)
    return model


def mamba_ssm_dir(path: Path, hf_model, *, layer: str, vocab_size: int, weights: str = "bin") -> Path:
    """Writes ``hf_model``'s weights in mamba-ssm's layout: its config.json and key names."""
    cfg = hf_model.config
    ssm_cfg = {"layer": layer, "d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": cfg.expand}
    if layer == "Mamba2":
        ssm_cfg |= {"headdim": cfg.head_dim, "ngroups": cfg.n_groups, "chunk_size": cfg.chunk_size}
    config = {"d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_hidden_layers,
              "vocab_size": vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": 8, "tie_embeddings": cfg.tie_word_embeddings}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in hf_model.state_dict().items()}
    if weights == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        state.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
        save_file(state, path / "model.safetensors")
    return path


@pytest.fixture
def tokens():
    return torch.randint(0, 64, (2, 300), generator=torch.Generator().manual_seed(1))


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``statelens ARGS`` in-process through ``main()``, which owns the exit codes: (code, stdout, stderr)."""
    from statelens.cli.main import main

    capsys.readouterr()  # drop what fixtures wrote (transformers' progress bars)
    monkeypatch.setattr(sys, "argv", ["statelens", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_rollouts_equal_one_shot(model, x: torch.Tensor, *, logits_tol: float, state_rtol: float,
                                   state_atol: float, chunks=(1, 7, 64, 100)) -> torch.Tensor:
    """For each chunk length, the rollout's logits (all chunks together) and final states equal one call over x
    [b, l] within the tolerances (1: token by token); returns that call's logits."""
    from statelens.record import rollout

    with torch.no_grad():
        expected, final = model(x)
    for chunk in chunks:
        pieces = list(rollout(model, x, chunk=chunk))
        got = torch.cat([c.logits() for c in pieces], dim=1)
        torch.testing.assert_close(got, expected, rtol=logits_tol, atol=logits_tol)
        for part in ("ssm", "conv"):
            for s, s_ref in zip(getattr(pieces[-1].state, part), getattr(final, part)):
                torch.testing.assert_close(s, s_ref, rtol=state_rtol, atol=state_atol)
    return expected


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as torchrun's workers and the recorded golden outputs run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CompiledCalls(list):
    """The input shape of each piece that went through a compiled graph; ``classes``: the compiled module's class
    of each (a mixer, or the block around it)."""

    def __init__(self):
        super().__init__()
        self.classes: list[str] = []


@pytest.fixture
def compiled_calls(monkeypatch):
    """The input shape of each piece that went through a compiled graph (``--compile``: the fast path really
    ran; statelens.models.fused). Dynamo starts afresh, and past its recompile limit (8 graphs of one function:
    configurations, batch sizes, dtypes) it raises instead of quietly running the function eager, which a count
    of calls would not see (so it did for test_fused.py's later tests before this)."""
    from statelens.models import fused

    torch._dynamo.reset()
    calls = CompiledCalls()
    compiled = fused._compiled

    def counting(cls):
        graph = compiled(cls)
        return lambda *args: calls.classes.append(cls.__name__) or calls.append(args[1].shape) or graph(*args)
    monkeypatch.setattr(fused, "_compiled", counting)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield calls


@pytest.fixture(scope="module")
def byte_vocab_ckpt(tmp_path_factory):
    """A tiny Mamba-2 checkpoint with a 256-id vocabulary, so text is tokenized as bytes."""
    path = tmp_path_factory.mktemp("ckpt")
    hf_mamba2(path, vocab=256)
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """One ``statelens demo`` (about a minute on 2 cores) that every test of its outputs reads: its
    folder and what it printed on stdout. Run as `make demo` runs it, in a process of its own."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    done = subprocess.run([sys.executable, "-m", "statelens.cli.main", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout
