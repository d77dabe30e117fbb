"""The transformers adapter: against statelens' native backends, chunked against one-shot, hybrids with
attention layers against transformers' own runs, and refusals."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hf_mamba1, hf_mamba2, perturb, run_cli

from statelens.errors import BadInput, CheckpointError
from statelens.models import State, hooks, load_checkpoint
from statelens.models.auto import load_model
from statelens.models.hf_adapter import HFRecurrentAdapter, HybridState, check_chunking, fitted_chunk, ssd_mixers
from statelens.record.recorder import record
from statelens.record.rollout import rollout

transformers = pytest.importorskip("transformers")


def logits_of(model, tokens, chunk, **kw):
    """Rollout logits [b, l, vocab]; ``kw`` goes to rollout (state, resets)."""
    return torch.cat([c.logits() for c in rollout(model, tokens, chunk=chunk, **kw)], dim=1)


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


def test_ssd_chunk_length_follows_each_call_and_is_restored(tmp_path, short_tokens):
    """On a CPU each call runs the SSD mixers at the chunk length fitted to it (45 tokens at chunk_size 32: two
    chunks of 23; 10 tokens: one of 10), the logits stay the native backend's, and the config's comes back."""
    hf_mamba2(tmp_path, chunk_size=32)
    adapter = HFRecurrentAdapter.from_pretrained(tmp_path)
    native = load_checkpoint(tmp_path).model
    mixers = ssd_mixers(adapter.hf)
    assert len(mixers) == 2
    used = []
    handle = mixers[1].register_forward_pre_hook(lambda module, args: used.append(module.chunk_size))
    try:
        logits = logits_of(adapter, short_tokens, 45)
    finally:
        handle.remove()
    assert used == [23, 23, 10]
    assert [m.chunk_size for m in mixers] == [32, 32]
    with torch.no_grad():
        expected, _ = native(short_tokens)
    assert (logits - expected).abs().max().item() <= 1e-4


def test_fitted_chunk_keeps_the_number_of_chunks_and_pads_least():
    for size in (1, 16, 64, 256):
        for length in range(1, 600):
            fitted, chunks = fitted_chunk(length, size), -(-length // size)
            assert fitted <= size and -(-length // fitted) == chunks
            assert chunks * fitted - length < chunks  # under one token of padding per chunk


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


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: not a transformers causal LM checkpoint"):
        HFRecurrentAdapter.from_pretrained(tmp_path / "nowhere")


def test_transformers_own_classes_are_used_whatever_is_registered(tmp_path):
    """flash-linear-attention registers its own classes for "mamba2" with AutoModelForCausalLM; the
    adapter must still run transformers' Mamba2ForCausalLM."""
    import transformers

    hf_mamba2(tmp_path)
    assert type(HFRecurrentAdapter.from_pretrained(tmp_path).hf) is transformers.Mamba2ForCausalLM


# -- hybrids: attention layers beside the recurrent ones -------------------------------------------

def sharpen(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scales the attention's query and key projections up, so that which cached keys a query sees
    (the mask) and where they sit (the position ids) move the logits far beyond the tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)
    return model


def hf_bamba(path, seed: int = 0):
    """Mamba-2, attention (rotary on half the head), Mamba-2."""
    torch.manual_seed(seed)
    cfg = transformers.BambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=16, attn_layer_indices=[1])
    model = sharpen(perturb(transformers.BambaForCausalLM(cfg), seed))
    model.save_pretrained(path)
    return model


def hf_zamba2(path, seed: int = 0):
    """Four Mamba-2 layers; layers 1 and 3 first run the shared attention block (RoPE, per-layer adapters)."""
    torch.manual_seed(seed)
    cfg = transformers.Zamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid"] * 2,
        mamba_d_state=8, n_mamba_heads=4, num_attention_heads=2, intermediate_size=64, chunk_size=16,
        use_mem_rope=True, use_shared_attention_adapter=True, adapter_rank=4, num_mem_blocks=1)
    model = sharpen(perturb(transformers.Zamba2ForCausalLM(cfg), seed))
    model.save_pretrained(path)
    return model


# name -> (builder, HF indices of the attention layers, of the recurrent layers), read off the configs above
HYBRIDS = {"bamba": (hf_bamba, [1], [0, 2]), "zamba2": (hf_zamba2, [1, 3], [0, 1, 2, 3])}


@pytest.fixture(scope="module", params=sorted(HYBRIDS))
def hybrid(request, tmp_path_factory):
    """(name, transformers model, adapter, checkpoint path), built once per module."""
    path = tmp_path_factory.mktemp(request.param)
    hf = HYBRIDS[request.param][0](path)
    return request.param, hf, HFRecurrentAdapter.from_pretrained(path), path


def cache_keyword(hf) -> str:
    """The keyword ``hf``'s forward takes its cache by: "cache" from transformers 5.24, "cache_params" (pure SSMs,
    xLSTM) or "past_key_values" before."""
    import inspect

    params = inspect.signature(hf.forward).parameters
    return next((kw for kw in ("cache", "cache_params") if kw in params), "past_key_values")


def hf_cache_after(hf, tokens):
    """transformers' own DynamicCache after running ``tokens`` [b, l] in one call."""
    cache = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        hf(tokens, use_cache=True, **{cache_keyword(hf): cache})
    return cache


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


def test_hybrid_chunked_rollout_equals_transformers_one_shot(hybrid, short_tokens):
    _, hf, adapter, _ = hybrid
    assert not adapter.token_by_token
    expected = hf_logits(hf, short_tokens)
    for chunk in (7, 32, 100):
        assert (logits_of(adapter, short_tokens, chunk) - expected).abs().max().item() <= 1e-4
    assert (logits_of(adapter, short_tokens[:, :30], 1) - expected[:, :30]).abs().max().item() <= 1e-4


def test_hybrid_recorded_states_equal_transformers_cache(hybrid, short_tokens, tmp_path):
    _, hf, adapter, _ = hybrid
    positions = [13, 50, 100]
    rec = record(adapter, short_tokens, positions=positions, chunk=32, raw="blocks.*.hook_state", raw_dir=tmp_path)
    for j, p in enumerate(positions):
        cache = hf_cache_after(hf, short_tokens[:, :p])
        for k, i in enumerate(adapter.hf_layer_index):
            theirs = cache.layers[i].recurrent_states[0]                        # [b, heads, headdim, d_state]
            torch.testing.assert_close(torch.from_numpy(np.array(rec.raw[f"blocks.{k}.hook_state"][j])), theirs,
                                       atol=1e-5, rtol=1e-4)
            norms = rec.stats[(rec.stats.position == p) & (rec.stats.layer == k)].sort_values(["seq", "head"]).norm
            np.testing.assert_allclose(norms, theirs.flatten(2).norm(dim=-1).flatten(), rtol=1e-4)
    state = final_state(adapter, short_tokens, 32)   # the KV caches carried are transformers' own too
    assert isinstance(state, HybridState) and state.seen == (100, 100)
    for j, i in enumerate(adapter.attention_layer_index):
        torch.testing.assert_close(state.keys[j], cache.layers[i].keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.values[j], cache.layers[i].values, atol=1e-5, rtol=1e-4)


def test_hybrid_reset_rows_equal_their_suffix_run_alone(hybrid, tokens):
    _, hf, adapter, _ = hybrid
    x = torch.stack([tokens[0, :90], tokens[1, :90], tokens[0, :90]])
    resets = [0, 37, 64]
    chunks = list(rollout(adapter, x, chunk=16, resets=resets))
    logits, state = torch.cat([c.logits() for c in chunks], dim=1), chunks[-1].state
    assert state.seen == (90, 53, 26)
    for r, start in enumerate(resets):
        suffix = x[r:r + 1, start:]
        assert (logits[r, start:] - hf_logits(hf, suffix)[0]).abs().max().item() <= 1e-4
        cache = hf_cache_after(hf, suffix)
        for k, i in enumerate(adapter.hf_layer_index):
            torch.testing.assert_close(state.ssm[k][r], cache.layers[i].recurrent_states[0][0], atol=1e-5, rtol=1e-4)
        for j, i in enumerate(adapter.attention_layer_index):  # the row's keys are the last 90 - start
            torch.testing.assert_close(state.keys[j][r, :, start:], cache.layers[i].keys[0], atol=1e-5, rtol=1e-4)


def test_hybrid_resets_to_a_carried_state_and_row_selection_are_exact(hybrid, tokens):
    """Rows reset to an initial state that has seen a prefix (its KV caches not empty), then one row
    is selected and continued: each equals transformers on the row's whole context in one call."""
    _, hf, adapter, _ = hybrid
    prefix, x, more = tokens[:, :20], tokens[:, 20:80], tokens[:, 80:95]
    initial = final_state(adapter, prefix, 8)
    chunks = list(rollout(adapter, x, chunk=16, state=initial, resets=[0, 25]))
    logits, state = torch.cat([c.logits() for c in chunks], dim=1), chunks[-1].state
    assert state.seen == (80, 55)
    whole = [torch.cat([prefix[0], x[0]]), torch.cat([prefix[1], x[1, 25:]])]
    assert (logits[0] - hf_logits(hf, whole[0][None])[0, 20:]).abs().max().item() <= 1e-4
    assert (logits[1, 25:] - hf_logits(hf, whole[1][None])[0, 20:]).abs().max().item() <= 1e-4
    alone = state.rows([1])
    assert alone.seen == (55,) and alone.kv_length == 55    # the other row's longer cache is trimmed away
    continued = logits_of(adapter, more[1:], 6, state=alone)
    expected = hf_logits(hf, torch.cat([whole[1], more[1]])[None])[0, -more.shape[1]:]
    assert (continued[0] - expected).abs().max().item() <= 1e-4


def test_a_plain_state_on_a_hybrid_means_empty_kv_caches(hybrid, short_tokens):
    """Initial-state samplers build plain States: a hybrid reads them as having seen nothing."""
    _, hf, adapter, _ = hybrid
    zero = adapter.zero_state(2)
    assert isinstance(zero, HybridState) and zero.seen == (0, 0) and zero.kv_length == 0
    plain = State(zero.ssm, zero.conv)
    logits = logits_of(adapter, short_tokens, 16, state=plain, resets=[0, 30])
    assert (logits[0] - hf_logits(hf, short_tokens[:1])[0]).abs().max().item() <= 1e-4
    assert (logits[1, 30:] - hf_logits(hf, short_tokens[1:, 30:])[0]).abs().max().item() <= 1e-4


def test_hybrid_attention_layers_are_reported(hybrid, monkeypatch, capsys):
    name, _, adapter, path = hybrid
    _, attention, recurrent = HYBRIDS[name]
    assert adapter.attention_layer_index == attention and adapter.hf_layer_index == recurrent
    assert adapter.n_layers == len(recurrent) and adapter.n_heads == 4
    assert sorted(adapter.hook_points()) == [f"blocks.{k}.hook_state" for k in range(len(recurrent))]
    assert adapter.state_shapes() == [{"ssm": (4, 16, 8), "conv": (80, 4)}] * len(recurrent)
    code, out, _ = run_cli(monkeypatch, capsys, "check", "--ckpt", path, "--backend", "hf", "--length", 24,
                           "--chunk", 7)
    out = " ".join(out.split())  # rich wraps long lines
    assert code == 0 and f"{len(recurrent)} recurrent layers" in out
    assert f"recurrent: HF layers {', '.join(map(str, recurrent))} (blocks.0 .. blocks.{len(recurrent) - 1})" in out
    assert f"attention: HF layers {', '.join(map(str, attention))} (their KV cache is carried" in out


def saved_recurrent_gemma(path):
    model = recurrent_gemma()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("build", [hf_bamba, saved_recurrent_gemma], ids=["bamba", "recurrent_gemma"])
def test_remembrance_command_on_a_hybrid_equals_brute_force(build, tmp_path, monkeypatch, capsys):
    """EffRem through the CLI (rows reset inside batches) against one transformers forward per (sequence, t);
    RecurrentGemma's rows keep an 8-token window of keys and their RG-LRU restarts at each reset."""
    hf = build(tmp_path / "ckpt")
    T, ts = 80, [0, 5, 40, 79]
    data = np.random.default_rng(3).integers(0, 64, (2, T))
    np.save(tmp_path / "tokens.npy", data)
    code, _, _ = run_cli(monkeypatch, capsys, "remembrance", "--ckpt", tmp_path / "ckpt", "--backend", "hf",
                         "--data", tmp_path / "tokens.npy", "--train-len", 20, "--T", T, "--num-seqs", 2,
                         "--t", "5,40,79", "--chunk", 16, "--batch", 3, "--out", tmp_path / "out")
    assert code == 0
    written = pd.read_csv(tmp_path / "out" / "remembrance.csv")
    x = torch.as_tensor(data)

    def q(n, t):
        return torch.softmax(hf_logits(hf, x[n:n + 1, t:T])[0, -1].double(), dim=-1)

    expected = [np.mean([0.5 * (q(n, 0) - q(n, t)).abs().sum().item() for n in range(2)]) for t in ts]
    assert list(written.t) == ts
    np.testing.assert_allclose(written.effrem, expected, rtol=1e-3, atol=1e-6)
    assert written.effrem.iloc[1] > 1e-4 and written.effrem.iloc[-1] > 1e-3  # far from the tolerance


# The multipliers of the released configs (Falcon-H1-0.5B's muP multipliers, Granite-4.0-H's logit scaling and
# residual/attention/embedding multipliers): the head's lm_head_multiplier and logits_scaling enter the logits.
FALCON_H1_MULTIPLIERS = dict(
    lm_head_multiplier=0.0390625, embedding_multiplier=5.656854249492381, key_multiplier=0.390625,
    attention_in_multiplier=1.0, attention_out_multiplier=0.9375, mlp_multipliers=[0.8838834764831844, 0.5859375],
    ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738], ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.23570226039551587)
GRANITE_4_H_MULTIPLIERS = dict(logits_scaling=4.0, embedding_multiplier=12.0, attention_multiplier=0.0078125,
                               residual_multiplier=0.22)


def granite_hybrid(**options):
    """Mamba-2, attention, Mamba-2 (MoE with one expert and a shared MLP), with ``options`` on top."""
    return transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_head=16,
        mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16, num_local_experts=1, num_experts_per_tok=1,
        shared_intermediate_size=64, **options))


def lfm2():
    """LFM2's short-conv and attention layers with LFM2-350M's options (conv_L_cache 3, no conv bias, tied
    embeddings, the feed-forward width adjusted as released), sizes scaled down."""
    return transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, layer_types=["conv", "conv", "full_attention", "conv"], conv_L_cache=3,
        conv_bias=False, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0, block_multiple_of=16,
        tie_word_embeddings=True))


DELTA_RULE_KINDS = ["recurrent", "recurrent", "recurrent", "attention"]


def delta_rule_hybrid(family: str, config: str | None = None, **options):
    """Gated DeltaNet layers (conv and delta-rule state) with one full-attention layer in four, as the released
    Qwen3-Next, Qwen3.5 and OLMo hybrid configs (their config class's defaults: twice as many value heads as
    key heads, the gated attention, partial rotary, the same conv width), sizes scaled down."""
    cfg = getattr(transformers, config or f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention"] * 3 + ["full_attention"], **options)
    return getattr(transformers, f"{family}ForCausalLM")(cfg)


def kimi_linear():
    """Kimi Delta Attention layers with one MLA layer in four, the layers named as the released config.json
    names them (``linear_attn_config``, 1-indexed), MoE with a shared expert, sizes scaled down."""
    return transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(
        vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0, hidden_size=32, intermediate_size=64,
        moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        linear_attn_config={"full_attn_layers": [4], "kda_layers": [1, 2, 3], "head_dim": 8, "num_heads": 2,
                            "short_conv_kernel_size": 4}))


def minimax():
    """Lightning attention with full attention, layer 0 a lightning layer as released, MiniMax-Text-01's residual
    scalings (alpha (2 x 80 layers)^(1/4)) and MoE routing, sizes scaled down (block_size 8, so 7-token chunks
    cross a block)."""
    alpha = 160 ** 0.25
    return transformers.MiniMaxForCausalLM(transformers.MiniMaxConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2, block_size=8,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        full_attn_alpha_factor=alpha, linear_attn_alpha_factor=alpha, mlp_alpha_factor=alpha))


RELATIVES = {  # name -> (model, expected layer kinds)
    "minimax": (lambda: minimax(), ["recurrent", "attention", "recurrent", "attention"]),
    "nemotron_h": (lambda: transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
        vocab_size=64, hidden_size=32, layers_block_type=["mamba", "attention", "mlp", "mamba"], num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, intermediate_size=64, ssm_state_size=8, mamba_num_heads=4,
        mamba_head_dim=16, n_groups=1, chunk_size=16)), ["recurrent", "attention", "none", "recurrent"]),
    "falcon_h1": (lambda: transformers.FalconH1ForCausalLM(transformers.FalconH1Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
        mamba_chunk_size=16, **FALCON_H1_MULTIPLIERS)), ["hybrid", "hybrid"]),
    "granitemoehybrid": (lambda: granite_hybrid(position_embedding_type="rope"),
                         ["recurrent", "attention", "recurrent"]),
    "granitemoehybrid-nope": (lambda: granite_hybrid(position_embedding_type="nope", **GRANITE_4_H_MULTIPLIERS),
                              ["recurrent", "attention", "recurrent"]),
    "lfm2": (lambda: lfm2(), ["recurrent", "recurrent", "attention", "recurrent"]),
    "lfm2_moe": (lambda: transformers.Lfm2MoeForCausalLM(transformers.Lfm2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, layer_types=["conv", "conv", "full_attention", "conv"],
        num_experts=4, num_experts_per_tok=2, num_dense_layers=1)),
                 ["recurrent", "recurrent", "attention", "recurrent"]),
    "zamba": (lambda: transformers.ZambaForCausalLM(transformers.ZambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, n_mamba_heads=2,
        mamba_dt_rank=4)), ["recurrent", "recurrent", "hybrid", "recurrent", "hybrid", "recurrent"]),
    "qwen3_next": (lambda: delta_rule_hybrid("Qwen3Next", num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=32, shared_expert_intermediate_size=32),
                   DELTA_RULE_KINDS),
    "qwen3_5": (lambda: delta_rule_hybrid("Qwen3_5", config="Qwen3_5TextConfig"), DELTA_RULE_KINDS),
    "olmo_hybrid": (lambda: delta_rule_hybrid("OlmoHybrid", pad_token_id=0, eos_token_id=0), DELTA_RULE_KINDS),
    "kimi_linear": (lambda: kimi_linear(), DELTA_RULE_KINDS),
    "jamba": (lambda: transformers.JambaForCausalLM(transformers.JambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_experts=1, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
        mamba_d_state=8, mamba_dt_rank=4)), ["recurrent", "attention"]),
}


@pytest.mark.parametrize("name", sorted(RELATIVES))
def test_other_hybrids_match_transformers_chunked_and_reset(name, tmp_path, tokens):
    make, kinds = RELATIVES[name]
    torch.manual_seed(0)
    hf = sharpen(perturb(make(), 0))
    hf.save_pretrained(tmp_path)
    adapter = HFRecurrentAdapter.from_pretrained(tmp_path)
    assert adapter.layer_kinds == kinds
    # Jamba's Mamba-1 mixer and Zamba's per-head Mamba mixer drop the carried state in multi-token calls
    assert adapter.token_by_token == (name in ("jamba", "zamba"))
    x = tokens[:, :40]
    logits = logits_of(adapter, x, 7, resets=[0, 17])
    assert (logits[0] - hf_logits(hf, x[:1])[0]).abs().max().item() <= 1e-4
    assert (logits[1, 17:] - hf_logits(hf, x[1:, 17:])[0]).abs().max().item() <= 1e-4


def reset_rollout_is_transformers(adapter, hf, x, reset, hook, tol=1e-4):
    """Asserts that 7-token chunks of ``x`` [2, l], row 1 reset after ``reset`` tokens, give transformers' one-shot
    logits of x[0] and of x[1, reset:] within ``tol``; returns row 0's final state and the tensors ``hook`` saw on it."""
    logits = logits_of(adapter, x, 7, resets=[0, reset])
    assert (logits[0] - hf_logits(hf, x[:1])[0]).abs().max().item() <= tol
    assert (logits[1, reset:] - hf_logits(hf, x[1:, reset:])[0]).abs().max().item() <= tol
    seen = []
    with hooks(adapter, {hook: lambda t, hook: seen.append(t.clone())}):
        return final_state(adapter, x[:1], 7), seen


def test_falcon_mamba_chunked_resets_and_states_equal_transformers(tmp_path, tokens):
    """Falcon-Mamba (Mamba-1 with RMS-normed B, C and dt; the released config's mixer_rms_eps, untied head) has no
    native backend: through the adapter, token by token, chunked logits with a reset row equal transformers'
    one-shot runs, and the states the hook sees equal transformers' own cache after the same tokens."""
    torch.manual_seed(0)
    cfg = transformers.FalconMambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                         conv_kernel=4, time_step_rank=4, mixer_rms_eps=1e-6, tie_word_embeddings=False)
    hf = perturb(transformers.FalconMambaForCausalLM(cfg), 0)
    hf.save_pretrained(tmp_path)
    adapter = HFRecurrentAdapter.from_pretrained(tmp_path)
    assert adapter.layer_kinds == ["recurrent", "recurrent"] and adapter.token_by_token
    x = tokens[:, :30]
    state, seen = reset_rollout_is_transformers(adapter, hf, x, 11, "blocks.1.hook_state")
    cache = hf_cache_after(hf, x[:1])
    for k, i in enumerate(adapter.hf_layer_index):
        torch.testing.assert_close(state.ssm[k], cache.layers[i].recurrent_states[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(seen[-1], state.ssm[1]) and state.ssm[1].shape == (1, 64, 8)


def rwkv():
    """RWKV-4 with RWKV/rwkv-4-169m-pile's options (attention width = hidden, 4x feed-forward, untied head, hidden
    states halved every rescale_every layers in eval), sizes scaled down; its time-mix and decay parameters moved
    off transformers' layer-wise initialisation so that swapping the two token shifts cannot hide."""
    model = transformers.RwkvForCausalLM(transformers.RwkvConfig(
        vocab_size=64, hidden_size=32, attention_hidden_size=32, intermediate_size=128, num_hidden_layers=4,
        rescale_every=2, layer_norm_epsilon=1e-5, tie_word_embeddings=False))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".time_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def test_rwkv_carries_its_state_argument(tmp_path, tokens, monkeypatch, capsys):
    """RWKV keeps its state in its forward's `state` argument: through --backend auto, chunked logits with a reset row
    equal transformers' one-shot runs, and the state hook_state sees (and the token shifts) equal transformers'
    own state after the same tokens."""
    torch.manual_seed(0)
    hf = rwkv()
    hf.save_pretrained(tmp_path / "ckpt")  # as trained: both copies rescale their weights on their first eval forward
    checkpoint = load_model(tmp_path / "ckpt")
    adapter = checkpoint.model
    assert checkpoint.backend == "hf" and adapter.layer_kinds == ["recurrent"] * 4 and not adapter.token_by_token
    x = tokens[:, :40]
    state, seen = reset_rollout_is_transformers(adapter, hf, x, 17, "blocks.2.hook_state")
    with torch.no_grad():
        theirs = hf(x[:1], use_cache=True).state  # five [1, hidden, layers]: ffn shift, attention shift, num, den, max
    for k in range(4):
        torch.testing.assert_close(state.ssm[k], torch.stack([t[..., k] for t in theirs[2:]], -1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.conv[k], torch.stack([theirs[1][..., k], theirs[0][..., k]], -1))
    assert torch.equal(seen[-1], state.ssm[2]) and state.ssm[2].shape == (1, 32, 3)
    code, out, _ = run_cli(monkeypatch, capsys, "check", "--ckpt", tmp_path / "ckpt", "--length", 20, "--chunk", 7)
    assert code == 0 and "4 recurrent layers" in out


def test_minimax_lightning_states_equal_transformers_one_shot(tokens):
    """The lightning-attention states hook_state sees after 7-token chunks equal the linear_cache of transformers'
    own one-shot run (its block form), and the chunked logits its one-shot logits; transformers' own MiniMaxCache
    continued in the same chunks misses the earlier keys (the mask reads layer 0), which the adapter corrects."""
    torch.manual_seed(0)
    hf = sharpen(perturb(minimax(), 0))
    adapter = HFRecurrentAdapter(hf)
    x = tokens[:1, :40]
    seen = []
    with hooks(adapter, {"blocks.1.hook_state": lambda t, hook: seen.append(t.clone())}):
        state = final_state(adapter, x, 7)
    with torch.no_grad():
        out = hf(x, use_cache=True)
    one_shot = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.24
    for k, i in enumerate(adapter.hf_layer_index):
        torch.testing.assert_close(state.ssm[k], one_shot.linear_cache[i], atol=1e-5, rtol=1e-4)
    assert torch.equal(seen[-1], state.ssm[1]) and state.ssm[1].shape == (1, 2, 16, 16)
    cache, theirs = type(one_shot)(), []
    with torch.no_grad():
        for start in range(0, 40, 7):
            theirs.append(hf(x[:, start:start + 7], **{adapter._cache_kw: cache}, use_cache=True).logits)
    ours = logits_of(adapter, x, 7)
    assert (ours - out.logits).abs().max().item() <= 1e-4 < (torch.cat(theirs, 1) - out.logits).abs().max().item()


# -- states outside DynamicCache's layers: xLSTM's own cache, RecurrentGemma's modules ------------------------------

def xlstm(**options):
    """mLSTM blocks with NX-AI/xLSTM-7b's options (8 heads, q/k half the width and v the whole width, separate gate
    projections ("single" weights), gate soft cap 15, logit soft cap 30, float32 kernel states, the 2.667x feed-forward
    rounded to 64), sizes scaled down: 128 wide, the narrowest whose q/k width transformers' xLSTMCache sizes as its
    layers do (it rounds it up to a multiple of 64), chunk_size 16 (released: 64) so that 48-token calls run its
    chunkwise kernel; the gate and norm parameters moved off transformers' constant initialisation."""
    model = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(**{
        **dict(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_heads=8, qk_dim_factor=0.5, v_dim_factor=1.0,
               weight_mode="single", gate_soft_cap=15.0, output_logit_soft_cap=30.0, ffn_proj_factor=2.667,
               ffn_round_up_to_multiple_of=64, inference_state_dtype="float32", chunk_size=16), **options}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def xlstm_steps(hf, x):
    """transformers' own xLSTMCache after running ``x`` [1, l] one token at a time (its recurrent step kernel)."""
    from transformers.models.xlstm.modeling_xlstm import xLSTMCache

    cache = xLSTMCache(hf.config, 1, dtype=hf.dtype)
    with torch.no_grad():
        for j in range(x.shape[1]):
            hf(x[:, j:j + 1], use_cache=True, **{cache_keyword(hf): cache})
    return cache


def test_xlstm_carries_its_own_cache(tmp_path, tokens, monkeypatch, capsys):
    """xLSTM keeps C, n and m in its own xLSTMCache: through --backend auto, from a config.json naming xLSTM-7b's
    Triton kernels (which transformers' config refuses without the xlstm package, and which its torch code never
    runs), 7-token chunks with a reset row equal transformers' one-shot runs (its chunkwise kernel), and the states
    hook_state sees (C) and the conv state carries (n, m) equal transformers' own token-by-token run (its recurrent
    step kernel) on the same tokens."""
    import json

    from huggingface_hub.errors import StrictDataclassError

    torch.manual_seed(0)
    hf = xlstm()
    hf.save_pretrained(tmp_path / "ckpt")
    released = json.loads((tmp_path / "ckpt" / "config.json").read_text()) | {
        "chunkwise_kernel": "chunkwise--triton_xl_chunk", "sequence_kernel": "native_sequence__triton",
        "step_kernel": "triton"}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(released))
    with pytest.raises(StrictDataclassError, match="chunkwise_kernel"):
        transformers.AutoConfig.from_pretrained(tmp_path / "ckpt")
    checkpoint = load_model(tmp_path / "ckpt")
    adapter = checkpoint.model
    assert checkpoint.backend == "hf" and adapter.layer_kinds == ["recurrent"] * 2 and not adapter.token_by_token
    assert adapter.state_shapes() == [{"ssm": (8, 8, 16), "conv": (8, 9)}] * 2 and adapter.n_heads == 8
    x = tokens[:, :48]
    # float32: transformers' own chunkwise (one-shot) and recurrent (short chunks) kernels differ by up to 2.2e-4
    # on these logits of size 2.4, depending on the thread count; float64 holds the exact check (next test)
    state, seen = reset_rollout_is_transformers(adapter, hf, x, 16, "blocks.1.hook_state", tol=1e-3)
    theirs = xlstm_steps(hf, x[:1])
    for k in range(2):
        c, n, m = theirs.rnn_state[k]
        torch.testing.assert_close(state.ssm[k], c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.conv[k], torch.cat([n, m], dim=-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(seen[-1], state.ssm[1]) and state.ssm[1].abs().max() > 1.0  # far above the tolerance
    code, out, _ = run_cli(monkeypatch, capsys, "check", "--ckpt", tmp_path / "ckpt", "--length", 20, "--chunk", 7)
    assert code == 0 and "2 recurrent layers" in out


def test_xlstm_in_float64_keeps_float64_states(tokens):
    """transformers' recurrent kernels keep float32 states even in a float64 xLSTM; the adapter runs them in float64,
    so that 7-token chunks end in the states of transformers' one-shot run (whose chunkwise kernel keeps the model's
    float64) to float64 rounding. transformers' own chunked continuation misses them by float32 rounding."""
    from transformers.models.xlstm.modeling_xlstm import xLSTMCache

    torch.manual_seed(0)
    hf = xlstm().double()
    adapter = HFRecurrentAdapter(hf)
    backends = [m for m in hf.modules() if hasattr(m, "_inference_fn")]
    kernels = [m._inference_fn for m in backends]
    x = tokens[:1, :48]                                          # 3 chunks of 16: one-shot is chunkwise throughout
    state = final_state(adapter, x, 7)
    with torch.no_grad():
        out = hf(x, use_cache=True)
        one_shot = out.cache if hasattr(out, "cache") else out.cache_params  # renamed in transformers 5.24
        own = xLSTMCache(hf.config, 1, dtype=torch.float64)
        for start in range(0, 48, 7):
            hf(x[:, start:start + 7], use_cache=True, **{cache_keyword(hf): own})
    for k in range(2):
        c, n, m = one_shot.rnn_state[k]
        assert state.ssm[k].dtype == torch.float64
        torch.testing.assert_close(state.ssm[k], c, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(state.conv[k], torch.cat([n, m], dim=-1), atol=1e-10, rtol=1e-10)
    assert (own.rnn_state[1][0] - one_shot.rnn_state[1][0]).abs().max().item() > 1e-7
    assert len(backends) == 2 and all(m._inference_fn is f for m, f in zip(backends, kernels))  # put back after each call


def recurrent_gemma(**options):
    """RecurrentGemma with google/recurrentgemma-2b's options (two recurrent blocks then local attention, one
    key-value head, rotary on half of each head, conv width 4, logit soft cap 30, tied embeddings), sizes scaled
    down: an 8-token attention window, so that 3- and 7-token chunks carry keys across it; the conv bias moved off
    zero, the queries and keys sharpened (:func:`sharpen`) so that a key outside the window moves the logits."""
    model = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(**{
        **dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
               intermediate_size=96, attention_window_size=8, conv1d_width=4, logits_soft_cap=30.0,
               block_types=["recurrent", "recurrent", "attention"], tie_word_embeddings=True), **options}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv_1d.bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return sharpen(perturb(model, 0))


def recurrent_gemma_after(hf, x):
    """transformers' own recurrent states (per recurrent layer: RG-LRU [1, lru_width], conv window) and attention
    cache after one call on ``x`` [1, l], from zero states as its forward starts them."""
    cache = transformers.DynamicCache(config=hf.config)
    hf.model._setup_cache(hf.config, 1, x.device, hf.dtype)  # what its forward does when given no cache
    with torch.no_grad():
        hf(x, use_cache=True, **{cache_keyword(hf): cache})
    blocks = [layer.temporal_block for layer in hf.model.layers if hasattr(layer.temporal_block, "rg_lru")]
    return [(b.rg_lru.recurrent_states.clone(), b.conv1d_state.clone()) for b in blocks], cache


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_recurrent_gemma_carries_its_module_states_and_the_window(dtype, tol, tokens):
    """RecurrentGemma's RG-LRU and conv states live on its modules and its local attention reads the last 8 keys: in
    3- and 7-token chunks with a reset row, the logits equal transformers' one-shot runs (its conv restarts from
    zeros in multi-token calls: the adapter continues it), the states hook_state sees and the conv windows equal
    its modules' after one call on the same tokens, and the keys carried are its sliding-window cache's: the last
    window - 1."""
    torch.manual_seed(0)
    hf = recurrent_gemma().to(dtype)
    adapter = HFRecurrentAdapter(hf)
    assert adapter.layer_kinds == ["recurrent", "recurrent", "attention"] and not adapter.token_by_token
    assert adapter.state_shapes() == [{"ssm": (2, 16, 1), "conv": (32, 3)}] * 2 and adapter.n_heads == 2
    x = tokens[:, :40]
    expected = [hf_logits(hf, x[:1])[0], hf_logits(hf, x[1:, 10:])[0]]
    size = expected[0].abs().max().item()
    for chunk in (3, 7):  # the reset, after 10 tokens, is when the window holds fewer keys than row 0 has seen
        logits = logits_of(adapter, x, chunk, resets=[0, 10])
        assert (logits[0] - expected[0]).abs().max().item() <= tol * size
        assert (logits[1, 10:] - expected[1]).abs().max().item() <= tol * size
    seen = []
    with hooks(adapter, {"blocks.1.hook_state": lambda t, hook: seen.append(t.clone())}):
        state = final_state(adapter, x[:1], 3)
    theirs, cache = recurrent_gemma_after(hf, x[:1])
    for k, (lru, conv) in enumerate(theirs):
        torch.testing.assert_close(state.ssm[k].flatten(1), lru, atol=tol, rtol=tol)
        torch.testing.assert_close(state.conv[k], conv, atol=tol, rtol=tol)
    assert state.seen == (40,) and state.kv_length == 7
    torch.testing.assert_close(state.keys[0], cache.layers[2].keys, atol=tol, rtol=tol)
    torch.testing.assert_close(state.values[0], cache.layers[2].values, atol=tol, rtol=tol)
    assert torch.equal(seen[-1], state.ssm[1]) and state.ssm[1].abs().max() > 0.1


def test_recurrent_gemma_through_the_cli(tmp_path, monkeypatch, capsys):
    recurrent_gemma().save_pretrained(tmp_path / "ckpt")
    code, out, _ = run_cli(monkeypatch, capsys, "check", "--ckpt", tmp_path / "ckpt", "--length", 20, "--chunk", 7)
    out = " ".join(out.split())
    assert code == 0 and "2 recurrent layers" in out and "attention: HF layers 2" in out


SHORT_CONV = ["lfm2", "lfm2_moe"]  # conv-only recurrent layers


@pytest.mark.parametrize("name", sorted(set(RELATIVES) - {*SHORT_CONV, "minimax"}))  # minimax: its own cache
def test_other_hybrids_hook_states_equal_transformers_cache(name, tokens):
    """The recurrent and conv states that hook_state sees and the chunked run carries equal transformers' own
    cache after one call on the same tokens."""
    torch.manual_seed(0)
    hf = sharpen(perturb(RELATIVES[name][0](), 0))
    adapter = HFRecurrentAdapter(hf)
    x = tokens[:1, :30]
    seen = []
    with hooks(adapter, {f"blocks.{adapter.n_layers - 1}.hook_state": lambda t, hook: seen.append(t.clone())}):
        state = final_state(adapter, x, 7)
    cache = hf_cache_after(hf, x)
    for k, i in enumerate(adapter.hf_layer_index):
        torch.testing.assert_close(state.ssm[k], cache.layers[i].recurrent_states[0], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(state.conv[k], cache.layers[i].conv_states[0], atol=1e-6, rtol=1e-4)
    assert torch.equal(seen[-1], state.ssm[-1]) and state.ssm[-1].abs().max() > 1e-3  # far above the tolerance


@pytest.mark.parametrize("name", SHORT_CONV)
def test_lfm2_short_conv_states_are_the_window_transformers_caches(name, tokens):
    """LFM2's conv layers keep only a conv window: its state is the last conv_L_cache - 1 inputs of the
    conv, which the hook sees and the chunked run carries; after the same tokens it equals the columns of
    transformers' own cache that a later token reads."""
    torch.manual_seed(0)
    hf = sharpen(perturb(RELATIVES[name][0](), 0))
    adapter = HFRecurrentAdapter(hf)
    assert adapter.state_shapes() == [{"ssm": (32, 2), "conv": (32, 0)}] * 3 and adapter.n_heads == 1
    x = tokens[:1, :30]
    seen = []
    with hooks(adapter, {"blocks.2.hook_state": lambda t, hook: seen.append(t.clone())}):
        state = final_state(adapter, x, 7)
    cache = hf_cache_after(hf, x)
    for k, i in enumerate(adapter.hf_layer_index):
        torch.testing.assert_close(state.ssm[k], cache.layers[i].conv_states[0][..., 1:], atol=1e-5, rtol=1e-4)
    assert len(seen) == 5 and torch.equal(seen[-1], state.ssm[2]) and state.ssm[2].abs().max() > 1e-2


def test_a_released_qwen3_5_checkpoint_runs_its_text_model(tmp_path, tokens):
    """Qwen3.5 is released as an image-text model (``model_type`` qwen3_5, a vision tower beside the text model):
    ``--backend auto`` loads its text model through transformers' Qwen3_5ForCausalLM, whose chunked logits with
    a reset row equal the released class's own on text."""
    from statelens.models.auto import load_model

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=8,
                layer_types=["linear_attention"] * 3 + ["full_attention"])
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32)
    released = transformers.Qwen3_5ForConditionalGeneration(transformers.Qwen3_5Config(text_config=text,
                                                                                        vision_config=vision))
    sharpen(perturb(released, 0)).save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.backend == "hf" and type(loaded.model.hf).__name__ == "Qwen3_5ForCausalLM"
    x = tokens[:, :30]
    logits = logits_of(loaded.model, x, 7, resets=[0, 9])
    assert (logits[0] - hf_logits(released, x[:1])[0]).abs().max().item() <= 1e-4
    assert (logits[1, 9:] - hf_logits(released, x[1:, 9:])[0]).abs().max().item() <= 1e-4


def test_kernels_of_other_packages_are_not_run_on_a_cpu(monkeypatch, tokens):
    """transformers runs flash-linear-attention's delta-rule kernel whenever that package imports, whatever the
    device, and its Triton kernels cannot run on a CPU. Imitated with transformers' own decorator over a stand-in
    package whose kernel fails: the adapter runs transformers' torch code instead, with the model's own logits,
    and leaves the model as it found it."""
    import sys
    import types

    from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback
    from transformers.models.qwen3_next import modeling_qwen3_next as modeling

    torch.manual_seed(0)
    hf = sharpen(perturb(RELATIVES["qwen3_next"][0](), 0))
    x = tokens[:, :24]
    expected = hf_logits(hf, x)  # transformers' torch code: flash-linear-attention's kernels do not import here

    def kernel(*args, **kwargs):
        raise RuntimeError("Triton kernels need a GPU")

    ops = types.ModuleType("stand_in_fla.ops.gated_delta_rule")
    ops.chunk_gated_delta_rule = kernel
    for name, module in [("stand_in_fla", types.ModuleType("stand_in_fla")),
                         ("stand_in_fla.ops", types.ModuleType("stand_in_fla.ops")), (ops.__name__, ops)]:
        monkeypatch.setitem(sys.modules, name, module)
    decorate = use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "stand_in_fla")
    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule",
                        decorate(modeling.torch_chunk_gated_delta_rule.__wrapped__))
    with pytest.raises(RuntimeError, match="Triton"):
        hf_logits(hf, x)
    adapter = HFRecurrentAdapter(hf)
    assert len(adapter._kernel_swaps) == 1
    assert (logits_of(adapter, x, 5) - expected).abs().max().item() <= 1e-4
    with pytest.raises(RuntimeError, match="Triton"):  # the module's function is put back after each call
        hf_logits(hf, x)


# Soft caps far below the released 30, so that capping moves the miniature models' logits by more than their size.
CAPPED = {"recurrent_gemma": lambda: recurrent_gemma(logits_soft_cap=0.25),
          "xlstm": lambda: xlstm(output_logit_soft_cap=0.25)}


@pytest.mark.parametrize("name, key", [("falcon_h1", "lm_head_multiplier"),
                                       ("granitemoehybrid-nope", "logits_scaling"),
                                       ("recurrent_gemma", "logits_soft_cap"), ("xlstm", "output_logit_soft_cap")])
def test_scaled_heads_give_the_models_own_logits(name, key, tokens):
    """The released configs scale or cap the logits after lm_head: chunked with carried state, the adapter's logits
    are the model's own to float32 rounding (relative to their size, which the scale shrinks), far from the
    unscaled lm_head's."""
    torch.manual_seed(0)
    hf = CAPPED[name]() if name in CAPPED else sharpen(perturb(RELATIVES[name][0](), 0))
    adapter = HFRecurrentAdapter(hf)
    x = tokens[:, :40]
    expected = hf_logits(hf, x)
    with torch.no_grad():
        unscaled = hf.lm_head(hf.base_model(input_ids=x).last_hidden_state)
    size = expected.abs().max().item()
    assert getattr(hf.config, key) != 1.0
    # a cap (slope at most 1) shrinks the logits more than the rounding they carry: that scales with the uncapped ones
    rounding = 1e-5 * (unscaled.abs().max().item() if name in CAPPED else size)
    for chunk in (6, 40):
        assert (logits_of(adapter, x, chunk) - expected).abs().max().item() <= rounding
    assert (unscaled - expected).abs().max().item() > size


@pytest.mark.parametrize("config, message", [
    (lambda: transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, sliding_window=8),
     r"layers \[0, 1\] keep a DynamicSlidingWindowLayer cache; the hf adapter carries only recurrent states"),
    (lambda: transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1),
     "LlamaForCausalLM has no recurrent layers"),
    # transformers' xLSTMCache rounds the q/k width up to a multiple of 64, its layers do not: its own forward with a
    # cache fails on a width of 32 (16 per q/k), which the adapter reports in one line
    (lambda: transformers.xLSTMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2),
     r"xLSTMForCausalLM: transformers' own forward fails on cpu: matC_old has wrong shape"),
], ids=["sliding-window", "no-recurrent-layer", "xlstm-width-transformers-cannot-cache"])
def test_caches_the_adapter_cannot_carry_are_refused(config, message):
    cfg = config()
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(CheckpointError, match=message):
        HFRecurrentAdapter(model)


def test_the_claimed_transformers_floor_is_the_one_tested():
    """pyproject's `hf` and `test` extras claim the adapter's OLDEST_TRANSFORMERS, `make test-oldest` installs
    exactly it, the pinned release satisfies it, and the adapter's tests are among those `make test-latest` runs
    on the newest releases."""
    import subprocess
    from pathlib import Path

    from packaging.version import Version

    from statelens.models.hf_adapter import OLDEST_TRANSFORMERS
    tomllib = pytest.importorskip("tomllib")

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    claimed = f"transformers>={OLDEST_TRANSFORMERS}"
    assert extras["hf"] == [claimed] and claimed in extras["test"]
    assert Version(transformers.__version__) >= Version(OLDEST_TRANSFORMERS)
    make = subprocess.run(["make", "-s", "-n", "test-oldest", "test-latest"], cwd=root, capture_output=True,
                          text=True, check=True).stdout
    assert f'echo "transformers=={OLDEST_TRANSFORMERS}"' in make
    latest_pytest = next(line for line in make.splitlines() if ".venv-latest/bin/python -m pytest" in line)
    assert "tests/test_hf_adapter.py" in latest_pytest.split()


def test_a_transformers_older_than_the_floor_is_one_line(tmp_path, monkeypatch, capsys):
    import importlib

    hf_bamba(tmp_path / "ckpt")
    live = importlib.import_module("transformers")  # the module the adapter imports (tests may have re-imported it)
    monkeypatch.setattr(live, "__version__", "5.23.0")
    HFRecurrentAdapter.from_pretrained(tmp_path / "ckpt", check=False)  # the floor itself runs
    monkeypatch.setattr(live, "__version__", "5.22.2")
    older = "transformers 5.22.2 is older than 5.23, the oldest release the hf adapter runs on"
    with pytest.raises(CheckpointError, match=f"ckpt: {older}"):
        HFRecurrentAdapter.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=f"BambaForCausalLM: {older}"):
        HFRecurrentAdapter(hf_bamba(tmp_path / "again"))  # statelens.wrap's path
    for backend in ("auto", "hf"):
        code, _, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", tmp_path / "ckpt", "--backend", backend,
                               "--out", tmp_path / "out")
        assert code == 2 and len(err.splitlines()) == 1 and older in err
        assert (backend == "auto") == ("model_type 'bamba' is not supported" in err)  # auto names what runs


@pytest.mark.parametrize("backend", ["auto", "hf"])
@pytest.mark.parametrize("config, why", [
    ({"model_type": "mamba9", "hidden_size": 8}, r"transformers \S+ has no causal LM for it"),
    ({"model_type": "hgrn2", "auto_map": {"AutoModelForCausalLM": "modeling_hgrn2.HGRN2ForCausalLM"}},
     r"its code lives in the checkpoint \(auto_map: remote code\), which statelens never runs"),
], ids=["unknown", "remote-code"])
def test_unknown_and_remote_code_model_types_are_one_line(config, why, backend, tmp_path, monkeypatch, capsys):
    """Either backend: one line, exit 2, naming the model type, why, and what statelens runs."""
    import json
    import re

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", tmp_path / "ckpt", "--backend", backend,
                           "--out", tmp_path / "out")
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
    assert f"model_type {config['model_type']!r}" in err and re.search(why, err)
    supported = ("statelens runs delta_net, gated_deltanet, gla, mamba, mamba2, mamba3, rwkv7" if backend == "auto" else
                 "the hf adapter runs transformers' own causal LMs whose cache holds recurrent states")
    assert supported in err
