"""``--backend auto`` (the default): native where statelens has a backend, else transformers' modules where
the cache holds recurrent states, else one line; the output and run.json say which ran, and the tables
equal those of the forced backend."""
from __future__ import annotations

import json

import pytest

from conftest import hf_mamba2, perturb, run_cli, transformers
from statelens.errors import CheckpointError
from statelens.models.auto import choose_backend, load_model

OPTIONS = ["--train-len", 16, "--length", 48, "--num-seqs", 2, "--buckets", 4, "--chunk", 16]


def hf_bamba(path):
    cfg = transformers.BambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=16, attn_layer_indices=[1])
    perturb(transformers.BambaForCausalLM(cfg), 0).save_pretrained(path)
    return path


def hf_llama(path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def perplexity(monkeypatch, capsys, ckpt, out, *backend):
    code, stdout, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", ckpt, *OPTIONS, *backend, "--out", out)
    assert code == 0, err
    return " ".join(stdout.split()), json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("make, chosen", [(hf_mamba2, "native"), (hf_bamba, "hf")], ids=["mamba2", "bamba"])
def test_auto_runs_and_records_the_backend_it_chose(make, chosen, tmp_path, monkeypatch, capsys):
    make(tmp_path / "ckpt")
    assert choose_backend(tmp_path / "ckpt") == chosen
    said, run = perplexity(monkeypatch, capsys, tmp_path / "ckpt", tmp_path / "auto")
    assert f"{chosen} backend" in said
    assert run["checkpoint"]["backend"] == chosen and run["config"]["backend"] == "auto"
    perplexity(monkeypatch, capsys, tmp_path / "ckpt", tmp_path / "forced", "--backend", chosen)
    assert (tmp_path / "auto" / "positionwise.csv").read_bytes() == (tmp_path / "forced" / "positionwise.csv").read_bytes()


def test_forcing_a_backend_still_works(tmp_path, monkeypatch, capsys):
    """A Mamba-2 directory through transformers' modules when asked, though auto would go native."""
    hf_mamba2(tmp_path / "ckpt")
    _, run = perplexity(monkeypatch, capsys, tmp_path / "ckpt", tmp_path / "hf", "--backend", "hf")
    assert run["checkpoint"]["backend"] == "hf" and load_model(tmp_path / "ckpt", "native").backend == "native"


def test_check_says_which_backend_ran(tmp_path, monkeypatch, capsys):
    hf_bamba(tmp_path / "ckpt")
    code, out, _ = run_cli(monkeypatch, capsys, "check", "--ckpt", tmp_path / "ckpt", "--length", 20, "--chunk", 7)
    assert code == 0 and "hf backend" in " ".join(out.split())


def test_a_model_without_recurrent_state_is_one_line(tmp_path, monkeypatch, capsys):
    hf_llama(tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "ckpt")
    message = str(error.value)
    assert "model_type 'llama' is not supported" in message and "keeps no recurrent state" in message
    assert all(name in message for name in ("mamba", "mamba2", "gla", "gated_deltanet", "delta_net"))
    code, out, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "out")
    assert code == 2 and err.splitlines() == [f"statelens: error: {message}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["auto", "hf"])
def test_a_model_keeping_its_state_outside_the_cache_is_one_line(backend, tmp_path, monkeypatch, capsys):
    """Reformer keeps its state in its own ReformerDynamicCache, which the adapter does not carry (it carries
    MiniMax's and xLSTM's): refused in one line naming it, exit 2, by auto from the config and by the hf adapter on
    load (not an internal error from transformers' forward)."""
    cfg = transformers.ReformerConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                                      feed_forward_size=64, axial_pos_embds=False, is_decoder=True,
                                      attn_layers=["local", "local"])
    transformers.ReformerModelWithLMHead(cfg).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="keeps its state between calls in its own ReformerDynamicCache") as error:
        load_model(tmp_path / "ckpt", backend)
    code, _, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", tmp_path / "ckpt", "--backend", backend,
                           "--out", tmp_path / "out")
    assert code == 2 and err.splitlines() == [f"statelens: error: {error.value}"]
    assert (backend == "auto") == ("model_type 'reformer' is not supported" in str(error.value))


def test_the_native_model_types_are_those_the_backends_declare():
    """auto's list (its order is the refusal's text) holds the model_types of the backends' hf layouts, so a
    new backend's file cannot be forgotten there."""
    from statelens.models import backends
    from statelens.models.auto import NATIVE_MODEL_TYPES

    declared = [layout.name for arch in backends.names() for layout in backends.get(arch).layouts
                if layout.format == "hf"]
    assert sorted(NATIVE_MODEL_TYPES) == sorted(declared)


def test_a_model_type_transformers_does_not_know_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba9", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match=r"model_type 'mamba9' is not supported: .* has no causal LM for it"):
        load_model(tmp_path)


def test_without_transformers_auto_says_what_to_install(monkeypatch, tmp_path):
    """transformers absent (an import of it fails): the reason names the extra and the version floor."""
    import sys

    from statelens.models import auto
    from statelens.models.hf_adapter import OLDEST_TRANSFORMERS

    monkeypatch.setitem(sys.modules, "transformers", None)   # `import transformers` raises ImportError
    assert auto._why_not_hf(tmp_path, "llama") == (
        f"transformers is not installed (pip install 'statelens[hf]': transformers >= {OLDEST_TRANSFORMERS})")
