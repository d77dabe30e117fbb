"""Real checkpoint layouts, as a researcher downloads them, in miniature: the published configs' own keys
(only sizes scaled down) and weight names. Each loads with the default ``--backend auto`` and its
``statelens perplexity`` equals transformers' own loss on the same weights.

- state-spaces/mamba-130m: mamba-ssm layout, ``ssm_cfg: {}`` (Mamba-1 defaults), vocab 50277 padded to
  50280 (``pad_vocab_size_multiple: 8``), ``pytorch_model.bin``, tied embeddings;
- state-spaces/mamba2-130m: mamba-ssm layout, ``ssm_cfg: {"layer": "Mamba2"}`` (d_state 128, headdim 64),
  ``d_intermediate: 0``, ``attn_layer_idx: []``, ``attn_cfg: {}``, ``fused_add_norm``, vocab padded to 50288;
- mistralai/Mamba-Codestral-7B-v0.1: transformers' mamba2 layout with ``n_groups: 8``,
  ``time_step_limit: [0.0, Infinity]``, sharded safetensors beside a ``consolidated.safetensors``;
- state-spaces/mamba-130m-hf: the transformers twin (``model_type: mamba``);
- tiiuae/falcon-mamba-7b: ``model_type: falcon_mamba`` (run through transformers' modules);
- the transformers hybrids (bamba): ``model_type`` run through transformers' modules.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import perturb, run_cli, transformers

LENGTH, NUM_SEQS = 40, 2
OPTIONS = ["--train-len", 8, "--length", LENGTH, "--num-seqs", NUM_SEQS, "--buckets", 4, "--chunk", 16]


def mamba_ssm_layout(path, hf_model, config: dict) -> None:
    """``hf_model``'s tensors under mamba-ssm's names (``backbone.embedding``), with ``config`` as config.json
    and the lm_head kept in the ``.bin`` as mamba-ssm saves it."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf_model.state_dict().items()}
    torch.save(state, path / "pytorch_model.bin")


def mamba_130m(path):
    cfg = transformers.MambaConfig(vocab_size=50280, hidden_size=32, num_hidden_layers=2, state_size=16, expand=2,
                                   conv_kernel=4, time_step_rank="auto", use_bias=False, use_conv_bias=True,
                                   tie_word_embeddings=True)
    hf = perturb(transformers.MambaForCausalLM(cfg), 0)
    mamba_ssm_layout(path, hf, {"d_model": 32, "n_layer": 2, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
                                "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8})
    return hf, "native"


def mamba2_130m(path):
    cfg = transformers.Mamba2Config(vocab_size=50288, hidden_size=64, num_hidden_layers=2, state_size=128, head_dim=64,
                                    num_heads=2, n_groups=1, expand=2, conv_kernel=4, chunk_size=256,
                                    tie_word_embeddings=True, use_bias=False, use_conv_bias=True)
    hf = perturb(transformers.Mamba2ForCausalLM(cfg), 0)
    mamba_ssm_layout(path, hf, {"d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 50277,
                                "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                                "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
                                "tie_embeddings": True})
    return hf, "native"


CODESTRAL_CONFIG = """{
  "architectures": ["Mamba2ForCausalLM"], "bos_token_id": 0, "chunk_size": 16, "conv_kernel": 4,
  "eos_token_id": 0, "expand": 2, "head_dim": 8, "hidden_act": "silu", "hidden_size": 64,
  "initializer_range": 0.1, "layer_norm_epsilon": 1e-05, "model_type": "mamba2", "n_groups": 8,
  "norm_before_gate": false, "num_heads": 16, "num_hidden_layers": 2, "pad_token_id": 0,
  "rescale_prenorm_residual": false, "residual_in_fp32": true, "rms_norm": true, "state_size": 16,
  "tie_word_embeddings": false, "time_step_floor": 0.0001, "time_step_limit": [0.0, Infinity],
  "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 256, "torch_dtype": "float32",
  "transformers_version": "4.44.0.dev0", "use_bias": false, "use_cache": true, "use_conv_bias": true,
  "vocab_size": 512
}"""


def codestral(path):
    cfg = transformers.Mamba2Config(**{k: v for k, v in json.loads(CODESTRAL_CONFIG).items()
                                       if k not in ("architectures", "transformers_version", "torch_dtype")})
    assert cfg.n_groups == 8
    hf = perturb(transformers.Mamba2ForCausalLM(cfg), 0)
    hf.save_pretrained(path, max_shard_size="200KB")
    (path / "config.json").write_text(CODESTRAL_CONFIG)  # the published text, Infinity and all
    (path / "consolidated.safetensors").write_bytes(b"mistral-inference's own copy: never read")
    (path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2}))
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return hf, "native"


def mamba_130m_hf(path):
    cfg = transformers.MambaConfig(vocab_size=50280, hidden_size=32, num_hidden_layers=2, state_size=16, expand=2,
                                   time_step_rank="auto", tie_word_embeddings=True)
    hf = perturb(transformers.MambaForCausalLM(cfg), 0)
    hf.save_pretrained(path)
    return hf, "native"


def falcon_mamba(path):
    cfg = transformers.FalconMambaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                         conv_kernel=4, time_step_rank=4, mixer_rms_eps=1e-6,
                                         tie_word_embeddings=False)
    hf = perturb(transformers.FalconMambaForCausalLM(cfg), 0)
    hf.save_pretrained(path)
    return hf, "hf"


def bamba(path):
    cfg = transformers.BambaConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=16, attn_layer_indices=[1])
    hf = perturb(transformers.BambaForCausalLM(cfg), 0)
    hf.save_pretrained(path)
    return hf, "hf"


LAYOUTS = {"mamba-130m": mamba_130m, "mamba2-130m": mamba2_130m, "mamba-codestral": codestral,
           "mamba-130m-hf": mamba_130m_hf, "falcon-mamba": falcon_mamba, "bamba": bamba}


def transformers_bucket_losses(hf, tokens: np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """transformers' own one-shot NLL of x[p] after x[0:p], averaged over the sequences and each row's
    positions [pos_start, pos_end)."""
    with torch.no_grad():
        logits = hf(torch.as_tensor(tokens)).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), torch.as_tensor(tokens[:, 1:]),
                                            reduction="none")  # [n, L - 1]: entry p - 1 is position p
    return np.array([nll[:, a - 1:b - 1].mean().item() for a, b in zip(table.pos_start, table.pos_end)])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_real_layout_loads_by_default_and_matches_transformers_loss(name, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    hf, backend = LAYOUTS[name](tmp_path / name)
    vocab = hf.config.vocab_size
    tokens = np.random.default_rng(0).integers(0, min(vocab, 50277), size=(NUM_SEQS, LENGTH), dtype=np.int64)
    np.save(tmp_path / "tokens.npy", tokens)
    code, out, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", tmp_path / name, "--data",
                             tmp_path / "tokens.npy", *OPTIONS, "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "run.json").read_text())["checkpoint"]["backend"] == backend
    table = pd.read_csv(tmp_path / "out" / "positionwise.csv")
    want = transformers_bucket_losses(hf.eval(), tokens, table)
    assert np.abs(table.loss.to_numpy() - want).max() <= 1e-4, (table.loss.to_numpy(), want)
    assert table.n_tokens.sum() == NUM_SEQS * (LENGTH - 1)
