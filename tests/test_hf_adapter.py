"""The transformers adapter: against statelens' native backends, chunked against one-shot, and refusals."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_mamba1, hf_mamba2

from statelens.errors import BadInput, CheckpointError
from statelens.models import hooks, load_checkpoint
from statelens.models.hf_adapter import HFRecurrentAdapter, check_chunking
from statelens.record.rollout import rollout

transformers = pytest.importorskip("transformers")


def logits_of(model, tokens, chunk):
    return torch.cat([c.logits() for c in rollout(model, tokens, chunk=chunk)], dim=1)


def final_state(model, tokens, chunk):
    return list(rollout(model, tokens, chunk=chunk))[-1].state


@pytest.fixture
def short_tokens(tokens):
    return tokens[:, :100]


def test_mamba2_matches_the_native_backend(tmp_path, short_tokens):
    hf_mamba2(tmp_path)
    adapter = HFRecurrentAdapter.from_pretrained(tmp_path)
    native = load_checkpoint(tmp_path).model
    assert adapter.arch == "hf" and not adapter.token_by_token and adapter.notes == []
    assert adapter.n_heads == native.n_heads and adapter.n_layers == native.n_layers
    with torch.no_grad():
        expected, _ = native(short_tokens)
        one_shot, _ = adapter(short_tokens)
    assert (one_shot - expected).abs().max().item() <= 1e-4
    for chunk in (7, 32):
        assert (logits_of(adapter, short_tokens, chunk) - expected).abs().max().item() <= 1e-4
        ours, theirs = final_state(adapter, short_tokens, chunk), final_state(native, short_tokens, chunk)
        for a, b in zip(ours.ssm, theirs.ssm, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        for a, b in zip(ours.conv, theirs.conv, strict=True):  # the adapter keeps one more (unread) column
            torch.testing.assert_close(a[..., 1:], b, atol=1e-5, rtol=1e-4)


def test_shapes_heads_and_hook_state(tmp_path, short_tokens):
    hf_mamba2(tmp_path)
    adapter = HFRecurrentAdapter.from_pretrained(tmp_path)
    assert adapter.state_shapes() == [{"ssm": (8, 8, 8), "conv": (96, 4)}] * 2
    assert sorted(adapter.hook_points()) == ["blocks.0.hook_state", "blocks.1.hook_state"]
    seen = []
    with torch.no_grad(), hooks(adapter, {"blocks.1.hook_state": lambda t, hook: seen.append(t.clone())}):
        _, state = adapter(short_tokens)
    assert len(seen) == 1 and torch.equal(seen[0], state.ssm[1])
    assert adapter.by_head("blocks.1.hook_state", seen[0]).shape == (2, 8, 64)
    with pytest.raises(BadInput, match="only blocks"):
        adapter.by_head("blocks.1.hook_decay", seen[0])


def test_mamba1_falls_back_to_token_by_token(tmp_path, short_tokens):
    hf = hf_mamba1(tmp_path)
    adapter = HFRecurrentAdapter.from_pretrained(tmp_path)
    assert adapter.token_by_token and "token by token" in adapter.notes[0]
    assert check_chunking(adapter) is True  # with the fallback on, chunked is exact
    tokens = short_tokens[:, :40]
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (logits_of(adapter, tokens, 16) - expected).abs().max().item() <= 1e-4
    native = load_checkpoint(tmp_path).model
    assert adapter.n_heads == native.n_heads
    ours, theirs = final_state(adapter, tokens, 16), final_state(native, tokens, 16)
    for a, b in zip(ours.ssm, theirs.ssm, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert adapter.by_head("blocks.0.hook_state", ours.ssm[0]).shape == (2, native.n_heads, 64 // native.n_heads * 8)


def test_mamba1_without_fallback_drops_the_state(tmp_path, short_tokens):
    hf_mamba1(tmp_path)
    adapter = HFRecurrentAdapter.from_pretrained(tmp_path, check=False)
    with torch.no_grad():
        expected, _ = adapter(short_tokens[:, :32])
    assert (logits_of(adapter, short_tokens[:, :32], 16) - expected).abs().max().item() > 1e-3


def test_hybrid_is_refused(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        attn_layer_indices=[1])
    transformers.BambaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"attention layers \[1\].*only pure recurrent"):
        HFRecurrentAdapter.from_pretrained(tmp_path)


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: not a transformers causal LM checkpoint"):
        HFRecurrentAdapter.from_pretrained(tmp_path / "nowhere")


def test_transformers_own_classes_are_used_whatever_is_registered(tmp_path):
    """flash-linear-attention registers its own classes for "mamba2" with AutoModelForCausalLM; the
    adapter must still run transformers' Mamba2ForCausalLM."""
    import transformers

    hf_mamba2(tmp_path)
    assert type(HFRecurrentAdapter.from_pretrained(tmp_path).hf) is transformers.Mamba2ForCausalLM
