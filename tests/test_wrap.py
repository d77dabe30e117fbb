"""Models in memory: ``statelens.wrap(model)`` and ``statelens.load(spec)`` give the RecurrentLM the analyses
take, with the numbers the CLI gives on the same model saved to disk."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import statelens
from conftest import hf_mamba1, hf_mamba2, run_cli, transformers
from hubcache import cache, no_network, publish  # noqa: F401  (fixtures)
from statelens.analysis.remembrance import remembrance
from statelens.analysis.states import state_stats
from statelens.errors import BadInput
from statelens.models import Mamba1LM, Mamba2LM
from statelens.models.hf_adapter import HFRecurrentAdapter


@pytest.mark.parametrize("make, native", [(hf_mamba2, Mamba2LM), (hf_mamba1, Mamba1LM)], ids=["mamba2", "mamba1"])
def test_a_wrapped_transformers_model_equals_its_own_logits_and_shares_its_weights(make, native, tmp_path):
    hf = make(tmp_path)
    wrapped = statelens.wrap(hf)
    assert type(wrapped) is native
    tokens = torch.randint(0, 64, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (wrapped(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-4
    assert wrapped.embedding.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()  # no copy


def test_remembrance_of_a_wrapped_model_equals_the_cli_on_the_saved_model(tmp_path, monkeypatch, capsys):
    """The issue's check: remembrance(wrap(hf_model), ...) against `statelens remembrance` on the directory
    the same model was saved to, with the same sequences (a 2-D .npy)."""
    hf = hf_mamba2(tmp_path / "ckpt")
    sequences = np.random.default_rng(0).integers(0, 64, size=(3, 64), dtype=np.int64)
    np.save(tmp_path / "tokens.npy", sequences)
    ts = [0, 1, 4, 16, 40, 63]
    code, _, err = run_cli(monkeypatch, capsys, "remembrance", "--ckpt", tmp_path / "ckpt", "--data",
                           tmp_path / "tokens.npy", "--T", 64, "--t", ",".join(map(str, ts)), "--num-seqs", 3,
                           "--train-len", 16, "--group", 3, "--out", tmp_path / "out")
    assert code == 0, err
    cli = pd.read_csv(tmp_path / "out" / "remembrance.csv")
    ours = remembrance(statelens.wrap(hf), sequences, T=64, ts=ts)
    assert list(ours.t) == list(cli.t) == ts
    np.testing.assert_array_equal(ours.effrem.to_numpy(), cli.effrem.to_numpy())  # same batches: same floats
    assert cli.effrem.iloc[1:].max() > 1e-3  # not trivially zero


def test_a_hybrid_is_wrapped_by_the_transformers_adapter(tmp_path):
    cfg = transformers.BambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=16, attn_layer_indices=[1])
    torch.manual_seed(0)
    hf = transformers.BambaForCausalLM(cfg).eval()
    wrapped = statelens.wrap(hf)
    assert isinstance(wrapped, HFRecurrentAdapter) and wrapped.hf is hf
    tokens = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    stats = state_stats(wrapped, tokens.numpy(), positions=[8, 40])
    assert set(stats.layer) == {0, 1} and stats.norm.gt(0).all()


def test_wrap_keeps_a_statelens_model_and_refuses_other_objects(tmp_path):
    model = statelens.load(hf_mamba2(tmp_path) and tmp_path)
    assert statelens.wrap(model) is model
    with pytest.raises(BadInput, match="not a model statelens can wrap"):
        statelens.wrap(torch.nn.Linear(2, 2))


def test_load_takes_a_hub_id(cache, tmp_path):
    hf_mamba2(tmp_path / "src", seed=2)
    publish(cache, "org/tiny", tmp_path / "src")
    tokens = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(statelens.load("org/tiny")(tokens)[0], statelens.load(tmp_path / "src")(tokens)[0])


def test_the_example_runs_the_analyses_on_a_model_built_in_the_script(tmp_path):
    """examples/wrap_transformers.py: its CSVs equal the analyses run here on the same transformers model."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "wrap_transformers.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Mamba2ForCausalLM wrapped as Mamba2LM" in done.stdout
    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16,
                                       head_dim=16, num_heads=8, n_groups=1, expand=2, chunk_size=64)
    hf = transformers.Mamba2ForCausalLM(config).eval()
    tokens = np.random.default_rng(0).integers(0, 256, size=(4, 128))
    hf_as_adapter = HFRecurrentAdapter(hf)  # transformers' own modules: an implementation independent of statelens'
    want = remembrance(hf_as_adapter, tokens, T=128, points=8)
    got = pd.read_csv(tmp_path / "remembrance.csv")
    np.testing.assert_allclose(got.effrem, want.effrem, rtol=1e-4, atol=1e-7)
    assert got.effrem.iloc[1:].gt(0).all()
    stats = pd.read_csv(tmp_path / "state_stats.csv")
    np.testing.assert_allclose(stats.norm, state_stats(hf_as_adapter, tokens, positions=32).norm, rtol=1e-4)
