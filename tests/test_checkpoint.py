"""Checkpoint formats: load -> save -> load is exact, in the format it came from."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import hf_mamba1, hf_mamba2, mamba_ssm_dir
from statelens.models import load_checkpoint, save_checkpoint
from statelens.models.checkpoint import content_hash


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("make", [hf_mamba2, hf_mamba1])
def test_hf_round_trip_is_exact(make, tmp_path, tokens):
    make(tmp_path / "a")
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    first = load_checkpoint(tmp_path / "a")
    save_checkpoint(first, tmp_path / "b")
    second = load_checkpoint(tmp_path / "b")
    assert second.format == "hf" and second.weights_kind == "safetensors"
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == json.loads((tmp_path / "a" / "config.json").read_text())
    assert (tmp_path / "b" / "tokenizer.json").read_text() == "{}"
    assert_same_model(first.model, second.model)
    assert torch.equal(first.model(tokens)[0], second.model(tokens)[0])
    # transformers reads what statelens wrote, and agrees with it.
    import transformers

    cls = transformers.Mamba2ForCausalLM if first.arch == "mamba2" else transformers.MambaForCausalLM
    reread = cls.from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        assert (reread(tokens).logits - second.model(tokens)[0]).abs().max().item() <= 1e-4


def test_mamba_ssm_bin_round_trip_keeps_its_layout(tmp_path):
    hf = hf_mamba2(tmp_path / "hf", tie=True)
    source = mamba_ssm_dir(tmp_path / "ssm", hf, layer="Mamba2", vocab_size=61, weights="bin")
    first = load_checkpoint(source)
    save_checkpoint(first, tmp_path / "out")
    written = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    original = torch.load(source / "pytorch_model.bin", weights_only=True)
    assert written.keys() == original.keys()  # backbone.embedding.weight, lm_head.weight included
    for k in original:
        assert torch.equal(written[k], original[k]), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 61
    assert_same_model(first.model, load_checkpoint(tmp_path / "out").model)


def test_tied_safetensors_omit_lm_head_like_transformers(tmp_path):
    hf_mamba1(tmp_path / "a", tie=True)
    save_checkpoint(load_checkpoint(tmp_path / "a"), tmp_path / "b")
    assert set(load_file(tmp_path / "b" / "model.safetensors")) == set(load_file(tmp_path / "a" / "model.safetensors"))


def test_sharded_checkpoint_loads(tmp_path, tokens):
    hf = hf_mamba2(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    one, sharded = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "sharded")
    assert_same_model(one.model, sharded.model)


def test_content_hash_follows_the_weights(tmp_path):
    hf_mamba2(tmp_path / "a")
    first = load_checkpoint(tmp_path / "a")
    save_checkpoint(first, tmp_path / "b")
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "a")
    with torch.no_grad():
        first.model.norm_f.weight.add_(1.0)
    save_checkpoint(first, tmp_path / "c")
    assert content_hash(tmp_path / "b") != content_hash(tmp_path / "c")


def test_check_command_reports_disagreement_with_exit_1(tmp_path, monkeypatch, capsys):
    """The verdict logic: a disagreement beyond tolerance (or NaN) fails the check."""
    import sys

    from statelens.cli import main as cli_main
    from statelens.models import verify

    hf_mamba2(tmp_path)
    real = verify.check_agreement

    def broken(model, **kw):
        result = real(model, **kw)
        result.stepwise_logits = float("nan")
        return result

    monkeypatch.setattr(verify, "check_agreement", broken)
    monkeypatch.setattr(sys, "argv", ["statelens", "check", "--ckpt", str(tmp_path), "--length", "20", "--chunk", "7"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main()
    assert exit_info.value.code == 1
    assert "FAILED" in capsys.readouterr().out


def test_gla_checkpoint_in_fla_layout_loads_and_round_trips(tmp_path, tokens):
    """An fla-layout directory (model_type gla, keys model.layers.{i}.attn.*, model.norm) loads into the
    GLA backend with the same logits, and saves back under the same names."""
    from safetensors.torch import save_file

    from statelens.models import GLAConfig, GLALM

    torch.manual_seed(0)
    fla_config = {"model_type": "gla", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64, "num_heads": 2,
                  "expand_k": 0.5, "expand_v": 1.0, "hidden_ratio": 2, "fuse_norm": False, "norm_eps": 1e-6,
                  "tie_word_embeddings": False, "hidden_act": "swish"}
    model = GLALM(GLAConfig(**{k: v for k, v in fla_config.items() if k != "model_type"})).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    fla_names = {}
    for key, value in model.state_dict().items():  # fla's names, written out by hand
        name = key.replace("blocks.", "layers.").replace("embedding.", "embeddings.").replace("norm_f.", "norm.")
        fla_names[name if key.startswith("lm_head.") else "model." + name] = value.clone()
    (tmp_path / "fla").mkdir()
    (tmp_path / "fla" / "config.json").write_text(json.dumps(fla_config))
    save_file(fla_names, tmp_path / "fla" / "model.safetensors")
    assert "model.norm.weight" in fla_names and "model.layers.0.attn.q_proj.weight" in fla_names

    loaded = load_checkpoint(tmp_path / "fla")
    assert loaded.arch == "gla"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens[:, :50] % 64)[0], model(tokens[:, :50] % 64)[0])
    save_checkpoint(loaded, tmp_path / "out")
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(fla_names)
    assert_same_model(loaded.model, load_checkpoint(tmp_path / "out").model)


def test_only_a_backend_declaring_a_mamba_ssm_layout_is_written_as_one(tmp_path):
    """mamba_ssm_checkpoint asks the backend's declared layouts: GLA declares fla's alone."""
    from statelens.errors import CheckpointError
    from statelens.models import GLAConfig, GLALM
    from statelens.models.checkpoint import mamba_ssm_checkpoint

    model = GLALM(GLAConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64, num_heads=2))
    with pytest.raises(CheckpointError, match="gla has no mamba_ssm layout"):
        mamba_ssm_checkpoint(model, tmp_path)
