"""Hub ids (``--ckpt ORG/NAME[@REVISION]``) resolved through a Hugging Face cache built here by hand.

The cache has huggingface_hub's layout: ``models--org--name/refs/REVISION`` holds a commit hash,
``snapshots/HASH/FILE`` is a symlink to ``blobs/SHA256``. Every test runs with ``HF_HUB_OFFLINE=1``,
``HF_HUB_CACHE`` and ``HF_HOME`` in a tmp dir, and sockets that refuse to connect: nothing here
touches the network.
"""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch

from conftest import hf_mamba2, run_cli
from hubcache import cache, no_network, publish  # noqa: F401  (fixtures)
from statelens.errors import BadInput
from statelens.models import load_checkpoint


def logits(model, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)[0]


def test_a_cached_hub_id_loads_the_snapshot(cache, tmp_path):
    hf_mamba2(tmp_path / "src", seed=3)
    commit = publish(cache, "org/tiny", tmp_path / "src")
    loaded = load_checkpoint("org/tiny")
    assert loaded.source.to_json() == {"id": "org/tiny", "revision": "main", "commit": commit}
    assert loaded.path == cache / "models--org--tiny" / "snapshots" / commit
    assert torch.equal(logits(loaded.model), logits(load_checkpoint(tmp_path / "src").model))


def test_a_revision_selects_its_own_weights(cache, tmp_path):
    hf_mamba2(tmp_path / "v0", seed=0)
    hf_mamba2(tmp_path / "v1", seed=1)
    publish(cache, "org/tiny", tmp_path / "v0")
    commit = publish(cache, "org/tiny", tmp_path / "v1", revision="v1")
    want = logits(load_checkpoint(tmp_path / "v1").model)
    assert not torch.equal(logits(load_checkpoint("org/tiny").model), want)
    for spec in ("org/tiny@v1", f"org/tiny@{commit}"):
        loaded = load_checkpoint(spec)
        assert loaded.source.commit == commit
        assert torch.equal(logits(loaded.model), want), spec


def test_a_local_directory_of_the_same_name_wins(cache, tmp_path, monkeypatch):
    hf_mamba2(tmp_path / "src", seed=0)
    publish(cache, "org/tiny", tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    hf_mamba2(tmp_path / "org" / "tiny", seed=1)
    loaded = load_checkpoint("org/tiny")
    assert loaded.source is None and loaded.describe() == "org/tiny (local directory)"
    assert torch.equal(logits(loaded.model), logits(load_checkpoint(tmp_path / "org" / "tiny").model))


@pytest.mark.parametrize("spec, needles", [
    ("org/absent", ["org/absent", "not in the Hugging Face cache", "HF_HUB_OFFLINE", "`hf download org/absent`"]),
    ("org/tiny@v9", ["org/tiny@v9", "`hf download org/tiny --revision v9`"]),
], ids=["not-cached", "revision-not-cached"])
def test_offline_without_a_cached_copy_is_one_line_naming_how_to_fetch(spec, needles, cache, tmp_path,
                                                                      monkeypatch, capsys):
    hf_mamba2(tmp_path / "src")
    publish(cache, "org/tiny", tmp_path / "src")
    with pytest.raises(BadInput) as error:
        load_checkpoint(spec)
    assert all(n in str(error.value) for n in needles), str(error.value)
    code, out, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", spec, "--out", tmp_path / "out")
    assert code == 2 and err.splitlines() == [f"statelens: error: {error.value}"] and "Traceback" not in out + err
    assert not (tmp_path / "out").exists()


def test_a_cached_snapshot_without_weights_counts_as_absent(cache, tmp_path):
    """A cache that holds only config.json (as transformers' AutoConfig leaves it) is not a checkpoint."""
    hf_mamba2(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").unlink()
    publish(cache, "org/tiny", tmp_path / "src")
    with pytest.raises(BadInput, match="not in the Hugging Face cache"):
        load_checkpoint("org/tiny")


def _http_error(cls, message):
    return cls(message, response=types.SimpleNamespace(headers={}, request=None))


@pytest.mark.parametrize("error, needle", [
    ("RevisionNotFoundError", "org/tiny has no revision 'v9' on the Hugging Face Hub"),
    ("RepositoryNotFoundError", "no such repository on the Hugging Face Hub"),
    ("GatedRepoError", "a gated repository"),
], ids=["revision", "repository", "gated"])
def test_online_hub_errors_are_one_line(error, needle, cache, tmp_path, monkeypatch):
    """Online (HF_HUB_OFFLINE unset) and not cached: huggingface_hub's errors, raised by a stand-in for
    its download, become one line naming the id."""
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_download(repo_id, *, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise errors.LocalEntryNotFoundError("not cached")
        raise _http_error(getattr(errors, error), "from the stand-in")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(BadInput) as raised:
        load_checkpoint("org/tiny@v9")
    assert needle in str(raised.value) and "\n" not in str(raised.value)
    assert calls == [True, False]  # the cache first, then the download


def test_no_network_and_nothing_cached_names_how_to_fetch(cache, monkeypatch):
    """HF_HUB_OFFLINE unset, but the Hub cannot be reached (huggingface_hub then raises
    LocalEntryNotFoundError): one line naming the id, the cache and the command that fetches it."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(BadInput) as raised:
        load_checkpoint("org/tiny@v2")
    message = str(raised.value)
    assert "\n" not in message and "the Hub cannot be reached" in message and str(cache) in message
    assert "`hf download org/tiny --revision v2`" in message


def test_online_downloads_only_config_tokenizer_and_one_kind_of_weights(cache, tmp_path, monkeypatch):
    """The download asks for the config, metadata and tokenizer files, then the safetensors weights
    only (the repository also lists .bin weights); what it fetched then loads."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    hf_mamba2(tmp_path / "src")
    asked = []

    def fake_download(repo_id, *, revision, cache_dir, repo_type, local_files_only=False, allow_patterns=None):
        asked.append(None if local_files_only else list(allow_patterns))
        if local_files_only:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        commit = publish(Path(cache_dir), repo_id, tmp_path / "src")
        return str(Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit)

    class FakeApi:
        def list_repo_files(self, repo_id, revision, repo_type):
            return ["config.json", "model.safetensors", "pytorch_model.bin", "README.md"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    loaded = load_checkpoint("org/tiny")
    assert asked[0] is None and "config.json" in asked[1] and "tokenizer.json" in asked[1]
    assert not any("bin" in p or "safetensors" in p for p in asked[1])
    assert asked[2] == ["model*.safetensors", "model.safetensors.index.json"] and len(asked) == 3
    assert loaded.source.repo_id == "org/tiny"


def test_the_command_records_the_hub_id_and_equals_the_directory_run(cache, tmp_path, monkeypatch, capsys):
    hf_mamba2(tmp_path / "src", vocab=256)
    commit = publish(cache, "org/tiny", tmp_path / "src")
    options = ["--train-len", 16, "--length", 48, "--num-seqs", 2, "--buckets", 4]
    code, out, _ = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", "org/tiny@main", *options,
                           "--out", tmp_path / "hub")
    out = " ".join(out.split())  # rich wraps at the terminal width
    assert code == 0 and f"org/tiny@main (hub cache, commit {commit[:12]})" in out and "native backend" in out
    run = json.loads((tmp_path / "hub" / "run.json").read_text())
    assert run["checkpoint"]["hub"] == {"id": "org/tiny", "revision": "main", "commit": commit}
    assert run["checkpoint"]["backend"] == "native"
    code, _, _ = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", tmp_path / "src", *options,
                         "--out", tmp_path / "dir")
    assert code == 0
    assert (tmp_path / "hub" / "positionwise.csv").read_bytes() == (tmp_path / "dir" / "positionwise.csv").read_bytes()
    assert json.loads((tmp_path / "dir" / "run.json").read_text())["checkpoint"]["hub"] is None


def test_report_on_a_hub_id_reads_the_snapshots_metadata(cache, tmp_path, monkeypatch, capsys):
    """The training length and coverage's reference regime come from the snapshot's statelens.json, as
    for the directory it was published from (before, report read them from the id as a path: 2048, zero)."""
    hf_mamba2(tmp_path / "src", vocab=256)
    (tmp_path / "src" / "statelens.json").write_text(json.dumps({"train_len": 16, "intervention": "state-passing"}))
    publish(cache, "org/tiny", tmp_path / "src")
    options = ["--length", 48, "--num-seqs", 2, "--buckets", 4, "--stride", 4]
    for spec, folder in (("org/tiny", "hub"), (tmp_path / "src", "dir")):
        code, _, err = run_cli(monkeypatch, capsys, "report", "--ckpt", spec, "--label", "m", *options,
                               "--out", tmp_path / folder)
        assert code == 0, err
    coverage = json.loads((tmp_path / "hub" / "1-m" / "coverage" / "run.json").read_text())
    assert coverage["config"]["regime"] == "state-passing" and coverage["train_len"] == 16
    for name in ("coverage/coverage_buckets.csv", "perplexity/positionwise.csv"):
        assert (tmp_path / "hub" / "1-m" / name).read_bytes() == (tmp_path / "dir" / "1-m" / name).read_bytes()


def test_environment_is_read_at_call_time(cache, tmp_path, monkeypatch):
    """huggingface_hub reads HF_HUB_CACHE once, at import: statelens passes the current one."""
    from statelens import hub

    assert hub.cache_dir() == cache and hub.offline()
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub.cache_dir() == tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.offline()
    assert os.environ["HF_HOME"] == str(tmp_path / "hf-home")


@pytest.mark.parametrize("spec, parsed", [
    ("state-spaces/mamba2-130m", ("state-spaces/mamba2-130m", "main")),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("/abs/path", None), ("a/b/c", None), ("../x", None), ("name", None), ("org/..", None),
])
def test_hub_id_grammar(spec, parsed):
    from statelens.hub import parse_hub_id

    assert parse_hub_id(spec) == parsed


def test_the_network_is_off_limits():
    """The guard these tests rely on (hubcache.no_network) is in force."""
    import socket

    with pytest.raises(OSError, match="off limits"):
        socket.create_connection(("huggingface.co", 443))
