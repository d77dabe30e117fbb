"""The right tokenizer or a clear refusal: ``--tokenizer``, the family's tokenizer for mamba-ssm checkpoints
(GPT-NeoX-20B, from a hub cache built by hand), bytes only for byte-sized vocabularies."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from hubcache import cache, no_network, publish  # noqa: F401  (fixtures)
from statelens.data import load_tokenizer
from statelens.data.tokenizer import GPT_NEOX, family_tokenizer
from statelens.errors import BadInput, DataError
from statelens.models import Mamba2Config, Mamba2LM
from statelens.models.checkpoint import mamba_ssm_checkpoint, save_checkpoint

TEXT = "the cat sat on the mat and the dog sat on the log " * 20
NEOX_VOCAB = 50280  # 50277 ids padded to a multiple of 8, as the published mamba-ssm configs give it


def word_tokenizer(path):
    """A small word-level tokenizer.json, standing in for GPT-NeoX-20B's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return Tokenizer.from_file(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def mamba_ssm_ckpt(tmp_path_factory):
    """A miniature of state-spaces/mamba2-130m's directory: mamba-ssm layout, vocab 50277 padded to 50280,
    no tokenizer files."""
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=16, n_layer=1, vocab_size=NEOX_VOCAB, d_state=8, headdim=8, chunk_size=16))
    path = tmp_path_factory.mktemp("mamba2-130m")
    ckpt = mamba_ssm_checkpoint(model, path)
    ckpt.raw_config |= {"vocab_size": 50277, "pad_vocab_size_multiple": 8}
    save_checkpoint(ckpt, path)
    return path


def test_the_family_of_a_published_mamba_ssm_config_is_gpt_neox(mamba_ssm_ckpt):
    raw = json.loads((mamba_ssm_ckpt / "config.json").read_text())
    assert family_tokenizer(raw) == GPT_NEOX
    assert family_tokenizer({"model_type": "mamba2", "vocab_size": 50280}) is None  # -hf twins ship their own
    assert family_tokenizer(raw | {"vocab_size": 256}) is None


def test_the_family_tokenizer_comes_from_the_hub_cache(mamba_ssm_ckpt, cache, tmp_path):
    direct = word_tokenizer(tmp_path / "neox")
    commit = publish(cache, GPT_NEOX, tmp_path / "neox")
    tok = load_tokenizer(mamba_ssm_ckpt, NEOX_VOCAB, family=GPT_NEOX)
    assert tok.encode(TEXT).tolist() == direct.encode(TEXT).ids
    record = tok.record()
    assert record["hub"] == {"id": GPT_NEOX, "revision": "main", "commit": commit}
    import hashlib

    content = (tmp_path / "neox" / "tokenizer.json").read_bytes()
    assert record["sha256"] == hashlib.sha256(b"tokenizer.json" + content).hexdigest()
    assert GPT_NEOX in tok.name


def test_without_the_family_tokenizer_cached_offline_it_refuses_naming_the_option(mamba_ssm_ckpt, cache):
    with pytest.raises(DataError) as error:
        load_tokenizer(mamba_ssm_ckpt, NEOX_VOCAB, family=GPT_NEOX)
    message = str(error.value)
    assert f"hf download {GPT_NEOX}" in message and "--tokenizer" in message and str(mamba_ssm_ckpt) in message


def test_a_large_vocabulary_without_tokenizer_or_family_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"vocabulary \(1000 ids\) is far larger than 256 bytes; pass --tokenizer"):
        load_tokenizer(tmp_path, 1000)


def test_tokenizer_option_bytes_a_file_and_a_hub_id(cache, tmp_path):
    assert load_tokenizer(tmp_path, NEOX_VOCAB, spec="bytes").encode("ab").tolist() == [97, 98]
    direct = word_tokenizer(tmp_path / "tok")
    assert load_tokenizer(None, 1000, spec=str(tmp_path / "tok" / "tokenizer.json")).encode(TEXT).tolist() \
        == direct.encode(TEXT).ids
    publish(cache, "org/tok", tmp_path / "tok")
    assert load_tokenizer(None, 1000, spec="org/tok").encode(TEXT).tolist() == direct.encode(TEXT).ids
    with pytest.raises(BadInput, match="hf download org/missing"):
        load_tokenizer(None, 1000, spec="org/missing")
    with pytest.raises(DataError, match="fewer than 256 bytes"):
        load_tokenizer(None, 64, spec="bytes")


def test_perplexity_on_text_uses_and_records_the_family_tokenizer(mamba_ssm_ckpt, cache, tmp_path, monkeypatch,
                                                                 capsys):
    direct = word_tokenizer(tmp_path / "neox")
    commit = publish(cache, GPT_NEOX, tmp_path / "neox")
    (tmp_path / "doc.txt").write_text(TEXT)
    options = ["--data", tmp_path / "doc.txt", "--train-len", 8, "--length", 32, "--num-seqs", 2, "--buckets", 2]
    code, out, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", mamba_ssm_ckpt, *options,
                             "--out", tmp_path / "family")
    assert code == 0, err
    run = json.loads((tmp_path / "family" / "run.json").read_text())
    assert run["tokenizer"]["hub"]["commit"] == commit and GPT_NEOX in run["data"]
    # the same numbers as with the tokenizer named explicitly
    code, _, _ = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", mamba_ssm_ckpt, *options,
                         "--tokenizer", tmp_path / "neox" / "tokenizer.json", "--out", tmp_path / "named")
    assert code == 0
    assert (tmp_path / "family" / "positionwise.csv").read_bytes() == (tmp_path / "named" / "positionwise.csv").read_bytes()
    assert len(direct.encode(TEXT).ids) < len(TEXT.encode())  # words, not bytes, were scored


def test_perplexity_on_text_without_a_tokenizer_is_one_line(mamba_ssm_ckpt, cache, tmp_path, monkeypatch, capsys):
    (tmp_path / "doc.txt").write_text(TEXT)
    code, out, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", mamba_ssm_ckpt, "--data", tmp_path / "doc.txt",
                             "--train-len", 8, "--length", 32, "--num-seqs", 2, "--out", tmp_path / "out")
    assert code == 2 and len(err.splitlines()) == 1 and "--tokenizer" in err and GPT_NEOX in err
    assert not (tmp_path / "out").exists()


def test_report_passes_tokenizer_to_its_analyses(mamba_ssm_ckpt, tmp_path, monkeypatch, capsys):
    """`report --tokenizer` scores the text as `perplexity --tokenizer` does (same CSV bytes); without it
    the same report refuses in one line naming --tokenizer (the checkpoint has none, nothing cached)."""
    word_tokenizer(tmp_path / "words")
    (tmp_path / "doc.txt").write_text(TEXT)
    options = ["--data", tmp_path / "doc.txt", "--train-len", 8, "--length", 32, "--num-seqs", 2, "--buckets", 2,
               "--tokenizer", tmp_path / "words" / "tokenizer.json"]
    code, _, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", mamba_ssm_ckpt, *options,
                           "--out", tmp_path / "alone")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "report", "--ckpt", mamba_ssm_ckpt, "--label", "m", *options,
                           "--out", tmp_path / "report")
    assert code == 0, err
    assert (tmp_path / "report" / "1-m" / "perplexity" / "positionwise.csv").read_bytes() \
        == (tmp_path / "alone" / "positionwise.csv").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "report", "--ckpt", mamba_ssm_ckpt, *options[:-2],
                           "--out", tmp_path / "refused")
    assert code == 2 and len(err.splitlines()) == 1 and "--tokenizer" in err
