"""Bad input to :func:`statelens.models.load_checkpoint` and to ``statelens check --ckpt DIR``.

The policy under test: a bad checkpoint (or option) raises :class:`CheckpointError` (a ``BadInput``,
exit code 2) whose message names the offending file or option and the problem; the CLI turns it into
exactly one stderr line ``statelens: error: ...``, exit code 2, and no traceback; and nothing in a
weights file is ever executed (pickles carrying code are refused, proven by a marker file that the
payload would create).

Every bad directory starts as a copy of one tiny, valid Hugging Face Mamba-2 checkpoint written by
transformers, which the positive controls show loads and passes ``statelens check``. Library-level
tests call ``load_checkpoint``; CLI tests run ``main()`` in-process (it owns the error policy), and a
few run the installed console script in a subprocess to hold the real entry point to the policy.
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hf_mamba2, mamba_ssm_dir, run_cli
from statelens.errors import BadInput, CheckpointError
from statelens.models import load_checkpoint

# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A valid HF Mamba-2 checkpoint (untied, safetensors) and the transformers model that wrote it.

    Shapes: d_model 32, d_inner 64, 2 layers, vocab 64, state_size 8, 2 groups, 8 heads;
    in_proj [168, 32], conv1d [96, 1, 4]."""
    path = tmp_path_factory.mktemp("tiny") / "good"
    model = hf_mamba2(path)
    return path, model


@pytest.fixture
def ckpt(tmp_path, tiny) -> Path:
    """A fresh copy of the good checkpoint, for a test to break."""
    return Path(shutil.copytree(tiny[0], tmp_path / "ckpt"))


def load_error(path: Path) -> str:
    """The one-line message of the CheckpointError that loading ``path`` raises (exit code 2)."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert isinstance(info.value, BadInput) and info.value.exit_code == 2
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    return message


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


def write_config(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def run_cli_subprocess(*args: str, cwd: Path) -> tuple[int, str, str]:
    """The installed console script in a fresh process: (exit code, stdout, stderr)."""
    script = Path(sys.executable).with_name("statelens")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "statelens.cli.main"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    return done.returncode, done.stdout, done.stderr


def assert_cli_error(code: int, out: str, err: str, *needles: str) -> None:
    """Exit 2, exactly one non-empty stderr line ``statelens: error: ...`` holding every needle,
    and no traceback anywhere."""
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("statelens: error:") and lines[0].removeprefix("statelens: error:").strip(), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# -- positive controls ----------------------------------------------------------------------------


def _sharded(path: Path) -> None:
    """Splits model.safetensors into two shards in the same directory plus an index."""
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[:7], keys[7:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, path / name)
        weight_map |= dict.fromkeys(part, name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["hf safetensors", "hf sharded safetensors", "mamba-ssm bin"])
def test_good_checkpoint_loads(layout, ckpt, tiny, tmp_path):
    hf = tiny[1]
    if layout == "hf sharded safetensors":
        _sharded(ckpt)
    if layout == "mamba-ssm bin":
        ckpt = mamba_ssm_dir(tmp_path / "ssm", hf, layer="Mamba2", vocab_size=64, weights="bin")
    loaded = load_checkpoint(ckpt)
    assert loaded.arch == "mamba2"
    assert loaded.weights_kind == ("bin" if layout == "mamba-ssm bin" else "safetensors")
    assert loaded.model.num_parameters() == sum(p.numel() for p in hf.parameters())
    torch.testing.assert_close(loaded.model.embedding.weight, hf.backbone.embeddings.weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.model.lm_head.weight, hf.lm_head.weight, rtol=0, atol=0)


def test_good_checkpoint_passes_check_cli(tiny, tmp_path):
    code, out, err = run_cli_subprocess("check", "--ckpt", str(tiny[0]), "--length", "40", "--chunk", "7",
                                        cwd=tmp_path)
    assert code == 0, err
    assert "Traceback" not in err and "error" not in err
    assert "mamba2" in out and "ok" in out


# -- 1-3: the path itself -------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    message = load_error(missing)
    assert str(missing) in message and "no such file or directory" in message


def test_missing_path_cli(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    code, out, err = run_cli_subprocess("check", "--ckpt", str(missing), cwd=tmp_path)
    assert_cli_error(code, out, err, str(missing), "no such file or directory")


def test_file_instead_of_directory(ckpt, monkeypatch, capsys):
    file = ckpt / "model.safetensors"
    message = load_error(file)
    assert str(file) in message and "not a directory" in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(file)), str(file), "not a directory")


def test_directory_without_config(ckpt, monkeypatch, capsys):
    (ckpt / "config.json").unlink()
    message = load_error(ckpt)
    assert str(ckpt) in message and "no config.json" in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(ckpt)), str(ckpt), "config.json")


# -- 4-6, 13, 14: config.json ---------------------------------------------------------------------


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
    (b"[1, 2, 3]", "JSON object"),
], ids=["malformed", "empty", "binary", "array"])
def test_config_not_json(content, problem, ckpt, monkeypatch, capsys):
    (ckpt / "config.json").write_bytes(content)
    message = load_error(ckpt)
    assert str(ckpt / "config.json") in message and problem in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(ckpt)), "config.json", problem)


@pytest.mark.parametrize("changes, needle", [
    ({"model_type": "llama"}, "'llama'"),
    ({"model_type": "mamba4"}, "'mamba4'"),
    ({"model_type": None}, "None"),
], ids=["llama", "mamba4", "null"])
def test_unknown_model_type(changes, needle, ckpt, monkeypatch, capsys):
    edit_config(ckpt, **changes)
    message = load_error(ckpt)
    assert str(ckpt / "config.json") in message and "model_type" in message and needle in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(ckpt)), "config.json", needle)


def test_config_of_neither_format(tmp_path):
    path = write_config(tmp_path / "ckpt", {"hidden_size": 32, "num_hidden_layers": 2})
    message = load_error(path)
    assert str(path / "config.json") in message and "model_type" in message and "d_model" in message


@pytest.mark.parametrize("layer", ["Mamba4", "MHA", None])
def test_mamba_ssm_unknown_layer(layer, tiny, tmp_path):
    path = mamba_ssm_dir(tmp_path / "ssm", tiny[1], layer="Mamba2", vocab_size=64)
    config = json.loads((path / "config.json").read_text())
    config["ssm_cfg"]["layer"] = layer
    (path / "config.json").write_text(json.dumps(config))
    message = load_error(path)
    assert str(path / "config.json") in message and "ssm_cfg.layer" in message and repr(layer) in message


@pytest.mark.parametrize("config", [
    {"d_model": 10**6, "n_layer": 1000, "vocab_size": 50_000},
    {"d_model": 10**6, "n_layer": 1000, "vocab_size": 50_000, "ssm_cfg": {"layer": "Mamba2"}},
    {"model_type": "mamba", "hidden_size": 10**6, "num_hidden_layers": 1000, "vocab_size": 50_000},
    {"model_type": "mamba2", "hidden_size": 10**6, "num_hidden_layers": 1000, "vocab_size": 50_000},
], ids=["mamba-ssm Mamba1", "mamba-ssm Mamba2", "hf mamba", "hf mamba2"])
def test_huge_model_fails_fast(config, tmp_path, monkeypatch, capsys):
    # No weights file at all: the size must be refused from the config alone, before any weights.
    path = write_config(tmp_path / "huge", config)
    start = time.perf_counter()
    message = load_error(path)
    assert time.perf_counter() - start < 5
    assert str(path / "config.json") in message and "parameters" in message
    assert any(float(n) >= 1e12 for n in re.findall(r"\d+(?:\.\d+)?e\+\d+", message)), message
    start = time.perf_counter()
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(path)), "config.json", "parameters")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("where, key, value", [
    ("top", "d_model", 0),
    ("top", "d_model", -32),
    ("top", "n_layer", 0),
    ("ssm_cfg", "d_state", 0),
    ("ssm_cfg", "headdim", -8),
])
def test_non_positive_dimension(where, key, value, tiny, tmp_path):
    path = mamba_ssm_dir(tmp_path / "ssm", tiny[1], layer="Mamba2", vocab_size=64)
    config = json.loads((path / "config.json").read_text())
    (config if where == "top" else config["ssm_cfg"])[key] = value
    (path / "config.json").write_text(json.dumps(config))
    message = load_error(path)
    assert str(path / "config.json") in message and key in message and str(value) in message


def test_non_positive_dimension_hf(ckpt, monkeypatch, capsys):
    edit_config(ckpt, hidden_size=0)
    message = load_error(ckpt)
    assert str(ckpt / "config.json") in message and "positive integer" in message and "0" in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(ckpt)), "config.json", "positive integer")


def test_non_positive_dimension_hf_names_the_hf_key(ckpt):
    edit_config(ckpt, hidden_size=0)
    assert "hidden_size" in load_error(ckpt)


def test_mamba_ssm_config_without_vocab_size(tmp_path):
    path = write_config(tmp_path / "ckpt", {"d_model": 32, "n_layer": 2})
    message = load_error(path)
    assert str(path / "config.json") in message and "vocab_size" in message


@pytest.mark.parametrize("where, key, value", [
    ("top", "n_layer", 2.5),
    ("top", "vocab_size", 64.5),
    ("ssm_cfg", "d_state", 8.5),
    ("ssm_cfg", "d_conv", 4.5),
])
def test_non_integer_dimension(where, key, value, tiny, tmp_path):
    path = mamba_ssm_dir(tmp_path / "ssm", tiny[1], layer="Mamba2", vocab_size=64)
    config = json.loads((path / "config.json").read_text())
    (config if where == "top" else config["ssm_cfg"])[key] = value
    (path / "config.json").write_text(json.dumps(config))
    message = load_error(path)
    assert str(path / "config.json") in message and key in message


# -- 7, 8: config and weights disagree ------------------------------------------------------------

# (file shape, shape the edited config implies) for every tensor the edit changes, by hand:
# state_size 8 -> 16: in_proj rows 2*64 + 2*2*N + 8 heads = 168 -> 200; conv channels 64 + 2*2*N = 96 -> 128.
_STATE_16 = {f"backbone.layers.{i}.mixer.{name}": shapes for i in range(2) for name, shapes in {
    "in_proj.weight": ((168, 32), (200, 32)),
    "conv1d.weight": ((96, 1, 4), (128, 1, 4)),
    "conv1d.bias": ((96,), (128,)),
}.items()}
_VOCAB_128 = {"backbone.embeddings.weight": ((64, 32), (128, 32)), "lm_head.weight": ((64, 32), (128, 32))}


def _assert_names_a_mismatch(message: str, table: dict) -> None:
    found = [name for name in table if re.search(rf"{re.escape(name)}\b", message)]
    assert len(found) == 1, message
    in_file, implied = table[found[0]]
    assert str(in_file) in message and str(implied) in message, message
    assert message.index(str(in_file)) < message.index(str(implied)), "file's shape first, then config's"


@pytest.mark.parametrize("changes, table", [({"state_size": 16}, _STATE_16), ({"vocab_size": 128}, _VOCAB_128)],
                         ids=["state_size", "vocab_size"])
def test_shape_mismatch(changes, table, ckpt):
    edit_config(ckpt, **changes)
    message = load_error(ckpt)
    assert str(ckpt) in message and "config.json" in message
    _assert_names_a_mismatch(message, table)


def test_shape_mismatch_cli(ckpt, tmp_path):
    edit_config(ckpt, state_size=16)
    code, out, err = run_cli_subprocess("check", "--ckpt", str(ckpt), cwd=tmp_path)
    assert_cli_error(code, out, err, str(ckpt))
    _assert_names_a_mismatch(err, _STATE_16)


@pytest.mark.parametrize("key", ["backbone.layers.1.mixer.D", "backbone.norm_f.weight", "lm_head.weight"])
def test_weights_missing_a_tensor(key, ckpt, monkeypatch, capsys):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors[key]
    save_file(tensors, ckpt / "model.safetensors")
    message = load_error(ckpt)
    assert str(ckpt) in message and f"missing {key}" in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(ckpt)), str(ckpt), f"missing {key}")


def test_weights_with_an_unexpected_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    save_file(tensors, ckpt / "model.safetensors")
    message = load_error(ckpt)
    assert "unexpected" in message and "backbone.layers.0.mixer.extra" in message


# -- 9, 10, 12: weight files that are not weights -------------------------------------------------


def _torch_zip_truncated(file: Path) -> None:
    torch.save({"w": torch.zeros(64, 64)}, file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("write", [
    pytest.param(lambda f: f.write_bytes(random.Random(0).randbytes(4096)), id="random bytes"),
    pytest.param(lambda f: f.write_bytes(b""), id="empty"),
    pytest.param(_torch_zip_truncated, id="truncated torch zip"),
])
def test_bin_that_is_not_a_tensor_archive(write, ckpt):
    (ckpt / "model.safetensors").unlink()
    write(ckpt / "pytorch_model.bin")
    message = load_error(ckpt)
    assert str(ckpt / "pytorch_model.bin") in message
    assert "refused" not in message and "not a tensor archive" in message


def test_bin_that_is_not_a_state_dict(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], ckpt / "pytorch_model.bin")
    message = load_error(ckpt)
    assert str(ckpt / "pytorch_model.bin") in message and "state_dict" in message


@pytest.mark.parametrize("content", [
    random.Random(0).randbytes(4096),
    b"",
    (2**40).to_bytes(8, "little") + b"{}",
    None,  # the good file cut in half
], ids=["random bytes", "empty", "header length past the end", "truncated"])
def test_safetensors_that_is_garbage(content, ckpt, monkeypatch, capsys):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2] if content is None else content)
    message = load_error(ckpt)
    assert str(file) in message and "not a safetensors file" in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(ckpt)), str(file), "safetensors")


def test_config_without_weights(ckpt, monkeypatch, capsys):
    (ckpt / "model.safetensors").unlink()
    message = load_error(ckpt)
    assert str(ckpt) in message and "no weights" in message and "model.safetensors" in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(ckpt)), str(ckpt), "no weights")


# -- 11: pickles that carry code ------------------------------------------------------------------


class _Payload:
    """Unpickles as ``call[0](*call[1])``: what a malicious pytorch_model.bin does."""

    def __init__(self, call):
        self.call = call

    def __reduce__(self):
        return self.call


def _payload(kind: str, marker: Path) -> _Payload:
    if kind == "open":
        return _Payload((builtins.open, (str(marker), "w")))
    return _Payload((os.system, (f"touch {shlex.quote(str(marker))}",)))


def _write_pickle(directory: Path, fmt: str, payload: _Payload) -> Path:
    """Writes the payload as the directory's only weights; returns the file that holds it."""
    obj = {"backbone.embeddings.weight": payload}
    file = directory / ("pytorch_model-00001-of-00001.bin" if fmt == "sharded zip" else "pytorch_model.bin")
    if fmt in ("zip", "sharded zip"):
        torch.save(obj, file)
    elif fmt == "legacy":
        torch.save(obj, file, _use_new_zipfile_serialization=False)
    else:
        with file.open("wb") as f:
            pickle.dump(obj, f)
    if fmt == "sharded zip":
        index = {"weight_map": {"backbone.embeddings.weight": file.name}}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return file


FORMATS = ["zip", "legacy", "pickle", "sharded zip"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_is_live(fmt, tmp_path):
    """Control: each payload file does run its code when unpickled without protection."""
    marker = tmp_path / "MARKER"
    file = _write_pickle(tmp_path, fmt, _payload("open", marker))
    if fmt == "pickle":
        with file.open("rb") as f:
            pickle.load(f)
    else:
        torch.load(file, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["open", "os.system"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_pickle_with_code_is_refused(fmt, kind, ckpt, tmp_path, monkeypatch, capsys):
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    file = _write_pickle(ckpt, fmt, _payload(kind, marker))
    message = load_error(ckpt)
    assert not marker.exists()
    assert str(file) in message and "refused" in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(ckpt)), file.name, "refused")
    assert not marker.exists()


def test_pickle_with_code_is_refused_cli(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    file = _write_pickle(ckpt, "zip", _payload("open", marker))
    code, out, err = run_cli_subprocess("check", "--ckpt", str(ckpt), cwd=tmp_path)
    assert not marker.exists()
    assert_cli_error(code, out, err, str(file), "refused")


def test_plain_pickle_with_code_is_refused_cli(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    file = _write_pickle(ckpt, "pickle", _payload("open", marker))
    code, out, err = run_cli_subprocess("check", "--ckpt", str(ckpt), cwd=tmp_path)
    assert not marker.exists()
    assert_cli_error(code, out, err, str(file), "refused")


# -- 15: options ----------------------------------------------------------------------------------


def test_bad_device(tiny, tmp_path):
    code, out, err = run_cli_subprocess("check", "--ckpt", str(tiny[0]), "--device", "nonsense", cwd=tmp_path)
    assert_cli_error(code, out, err, "--device", "nonsense")


def test_meta_device(tiny, monkeypatch, capsys):
    result = run_cli(monkeypatch, capsys, "check", "--ckpt", str(tiny[0]), "--device", "meta",
                     "--length", "4", "--chunk", "3")
    assert_cli_error(*result, "--device", "meta")


def test_bad_option_value(tiny, monkeypatch, capsys):
    result = run_cli(monkeypatch, capsys, "check", "--ckpt", str(tiny[0]), "--dtype", "float16")
    assert_cli_error(*result, "--dtype", "float16")


# -- 16: sharded index ----------------------------------------------------------------------------


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_shard_outside_the_directory(outside, ckpt, tmp_path, monkeypatch, capsys):
    # The outside file is a complete, valid checkpoint: only its location can make the load fail.
    evil = tmp_path / "evil.safetensors"
    (ckpt / "model.safetensors").rename(evil)
    shard = "../evil.safetensors" if outside == "relative" else str(evil)
    weight_map = dict.fromkeys(load_file(evil), shard)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = load_error(ckpt)
    assert str(ckpt / "model.safetensors.index.json") in message and repr(shard) in message
    assert "not a file in" in message
    assert_cli_error(*run_cli(monkeypatch, capsys, "check", "--ckpt", str(ckpt)), "index.json", shard)


def test_shards_symlinked_like_the_hf_cache_load(ckpt, tiny, tmp_path):
    _sharded(ckpt)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in ckpt.glob("model-*.safetensors"):
        target = blobs / shard.name.replace("model-", "sha-")
        shard.rename(target)
        shard.symlink_to(os.path.relpath(target, ckpt))
    loaded = load_checkpoint(ckpt)
    torch.testing.assert_close(loaded.model.lm_head.weight, tiny[1].lm_head.weight, rtol=0, atol=0)


# -- 17: every command's options and data (the catalogue in docs/bad-input.md) ----------------------

# Placeholders filled per test: the tiny byte-vocabulary checkpoint, the output folder, bad data files.
CKPT, OUT = "{ckpt}", "{out}"
COMMANDS = {  # id -> (argv, text the one stderr line must hold)
    "unknown-command": (["nonsense"], ["nonsense"]),
    "unknown-option": (["perplexity", "--ckpt", CKPT, "--bogus", "1", "--out", OUT], ["--bogus"]),
    "missing-ckpt": (["states", "--out", OUT], ["--ckpt"]),
    "bad-device": (["decay", "--ckpt", CKPT, "--device", "nonsense", "--out", OUT], ["--device", "nonsense"]),
    "decay-buckets-0": (["decay", "--ckpt", CKPT, "--buckets", "0", "--out", OUT], ["--buckets"]),
    "decay-scale": (["decay", "--ckpt", CKPT, "--scale", "cubic", "--out", OUT], ["--scale", "cubic"]),
    "perplexity-length-1": (["perplexity", "--ckpt", CKPT, "--length", "1", "--out", OUT], ["--length"]),
    "remembrance-t-not-integers": (["remembrance", "--ckpt", CKPT, "--t", "0,x", "--out", OUT], ["--t", "integers"]),
    "remembrance-t-beyond-T": (["remembrance", "--ckpt", CKPT, "--train-len", "16", "--T", "32", "--t", "40",
                                "--out", OUT], ["--t", "[0, 31]"]),
    "states-k-0": (["states", "--ckpt", CKPT, "--k", "0", "--out", OUT], ["--k 0", "positive"]),
    "states-stride-beyond-train-len": (["states", "--ckpt", CKPT, "--train-len", "16", "--stride", "32",
                                        "--out", OUT], ["--stride 32", "training length 16"]),
    "states-length-within-train-len": (["states", "--ckpt", CKPT, "--train-len", "64", "--length", "64",
                                        "--out", OUT], ["--length 64", "does not exceed"]),
    "coverage-length-within-train-len": (["coverage", "--ckpt", CKPT, "--train-len", "64", "--length", "32",
                                          "--out", OUT], ["--length 32", "must exceed"]),
    "coverage-regime": (["coverage", "--ckpt", CKPT, "--regime", "bogus", "--out", OUT], ["--regime", "bogus"]),
    "coverage-reference-too-small": (["coverage", "--ckpt", CKPT, "--train-len", "16", "--length", "48",
                                      "--num-seqs", "1", "--stride", "8", "--out", OUT],
                                     ["--num-seqs/--stride/--k-nn", "fewer than k + 2 = 7"]),
    "data-missing": (["decay", "--ckpt", CKPT, "--data", "{missing}", "--out", OUT], ["{missing}", "no such file"]),
    "data-3d-npy": (["states", "--ckpt", CKPT, "--data", "{npy3d}", "--out", OUT], ["{npy3d}", "(2, 2, 2)"]),
    "data-ids-beyond-vocab": (["perplexity", "--ckpt", CKPT, "--data", "{big_ids}", "--out", OUT],
                              ["{big_ids}", "token id 300", "vocabulary of 256"]),
    "data-empty-directory": (["coverage", "--ckpt", CKPT, "--data", "{empty_dir}", "--out", OUT],
                             ["{empty_dir}", "no .txt, .md, .jsonl files"]),
    "report-nothing-to-report": (["report", "--out", OUT], ["at least one --ckpt"]),
    "report-three-checkpoints": (["report", "--ckpt", CKPT, "--ckpt", CKPT, "--ckpt", CKPT, "--out", OUT],
                                 ["3 checkpoints", "one or two"]),
    "report-unreadable-csv": (["report", "--from", "{bad_csv}", "--out", OUT], ["positionwise.csv", "not a readable CSV"]),
    "report-blank-label": (["report", "--ckpt", CKPT, "--label", " ", "--out", OUT], ["--label", "empty"]),
    "compare-one-checkpoint": (["compare", CKPT, "--out", OUT], ["Missing argument", "'b'"]),
    "babilong-task-not-generated": (["babilong", "--ckpt", CKPT, "--tasks", "qa7", "--out", OUT],
                                    ["--tasks", "'qa7'"]),
    "posttrain-missing-out": (["posttrain", "--ckpt", CKPT], ["--out"]),
    "posttrain-lr-0": (["posttrain", "--ckpt", CKPT, "--lr", "0", "--out", OUT], ["--lr", "positive"]),
    "posttrain-seq-len-beyond-data": (["posttrain", "--ckpt", CKPT, "--data", "{short}", "--seq-len", "64",
                                       "--batch", "1", "--out", OUT], ["{short}", "1 sequences of length 32"]),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-files")
    np.save(root / "npy3d.npy", np.zeros((2, 2, 2), dtype=np.int64))
    np.save(root / "big_ids.npy", np.array([[1, 2, 300, 4] * 8], dtype=np.int64))
    np.save(root / "short.npy", np.array([[1, 2, 3, 4] * 8], dtype=np.int64))
    (root / "empty_dir").mkdir()
    (root / "bad_csv").mkdir()
    (root / "bad_csv" / "positionwise.csv").write_bytes(b"\xff\xfe\x00 not text")
    return {"missing": str(root / "missing.txt"), "npy3d": str(root / "npy3d.npy"),
            "big_ids": str(root / "big_ids.npy"), "short": str(root / "short.npy"), "empty_dir": str(root / "empty_dir"),
            "bad_csv": str(root / "bad_csv")}


@pytest.mark.parametrize("case", list(COMMANDS))
def test_command_bad_input(case, byte_vocab_ckpt, bad_files, tmp_path, monkeypatch, capsys):
    """One stderr line naming the option or file, exit code 2, no traceback, and --out never created."""
    argv, needles = COMMANDS[case]
    values = bad_files | {"ckpt": str(byte_vocab_ckpt), "out": str(tmp_path / "out")}
    code, out, err = run_cli(monkeypatch, capsys, *[a.format(**values) for a in argv])
    assert_cli_error(code, out, err, *[n.format(**values) for n in needles])
    assert not (tmp_path / "out").exists()


# -- 18: internal errors ---------------------------------------------------------------------------


def written(out: Path) -> list[Path]:
    """Files a failed run left under ``out``, besides the groups it saved for ``--resume`` (.partial)."""
    return [p for p in out.rglob("*") if p.is_file() and ".partial" not in p.relative_to(out).parts]


def _fail_in_the_analysis(exception: BaseException):
    def fail(*args, **kwargs):
        raise exception
    return fail


def test_internal_error_is_one_line_exit_1(byte_vocab_ckpt, tmp_path, monkeypatch, capsys):
    from statelens.analysis import positionwise

    monkeypatch.setattr(positionwise, "position_losses", _fail_in_the_analysis(RuntimeError("boom")))
    code, out, err = run_cli(monkeypatch, capsys, "perplexity", "--ckpt", byte_vocab_ckpt, "--out", tmp_path / "out")
    assert code == 1 and "Traceback" not in err + out
    assert err.splitlines() == ["statelens: internal error: RuntimeError: boom (run with --debug for the traceback)"]
    assert not written(tmp_path / "out")


def test_internal_error_traceback_only_with_debug(byte_vocab_ckpt, tmp_path):
    """In a real process with --debug: Python's traceback down to the failure, exit code 1 (without it,
    the one line of test_internal_error_is_one_line_exit_1)."""
    inject = ("import statelens.analysis.positionwise as m\n"
              "def fail(*a, **k): raise RuntimeError('boom')\n"
              "m.position_losses = fail\n"
              "from statelens.cli.main import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", inject, "--debug", "perplexity", "--ckpt", str(byte_vocab_ckpt),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and done.stderr.startswith("Traceback") and "in fail" in done.stderr
    assert done.stderr.rstrip().endswith("RuntimeError: boom")
    assert "internal error" not in done.stderr
    assert not written(tmp_path / "out")


# -- the catalogue and the tests stay in sync --------------------------------------------------------

CATALOGUE = Path(__file__).resolve().parent.parent / "docs" / "bad-input.md"


def test_catalogue_names_only_tests_that_exist():
    """docs/bad-input.md: at least 30 bad inputs, each row with an exit code and a test; every test it
    names is a test function of that file (and its case, when named, a parameter of it); every case of
    test_command_bad_input is in it."""
    import ast

    text = CATALOGUE.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| ---", "| bad input", "| input"))]
    assert len(rows) >= 30
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[-2] in ("0", "1", "2") and "tests/" in cells[-1], row
    named = re.findall(r"`tests/(test_\w+\.py)::(\w+)(?:\[([^`]*)\])?`", text)
    assert len(named) >= len(rows)
    root = CATALOGUE.parent.parent / "tests"
    for file, function, case in named:
        source = (root / file).read_text(encoding="utf-8")
        functions = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
        assert function in functions, f"{file}::{function}"
        if case:  # pytest joins parameter ids with "-"
            assert case in source or all(part in source for part in case.split("-")), f"{file}::{function}[{case}]"
    for case in COMMANDS:
        assert f"test_command_bad_input[{case}]" in text, case
