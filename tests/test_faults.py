"""Numerical faults are findings, not crashes: NaN weights, states that overflow, zero-length documents.

Every analysis command completes on them (exit 0, every output written) and says where values first
went non-finite, in its summary and in run.json; each location is held to one found another way, by
running the model directly (one-shot for the loss, a prefix or token by token for the state).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hf_mamba2
from test_states import OVERFLOW, edited_mamba2

from statelens.analysis.nonfinite import (
    describe,
    first_nonfinite,
    first_nonfinite_position,
)
from statelens.models import load_checkpoint

TRAIN_LEN, LENGTH, STRIDE, N = 32, 64, 4, 2
BROKEN = (1, 5)  # (layer, head) whose x row of in_proj holds a NaN in the NaN checkpoint
ANALYSES = ("remembrance", "perplexity", "states", "decay", "coverage")


def cli(*args) -> tuple[int, str, str]:
    """``statelens ARGS`` in-process through ``main()`` (module-scoped fixtures cannot use capsys)."""
    from statelens.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", ["statelens", *map(str, args)])
        mp.setenv("COLUMNS", "200")  # one summary line per line
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def run_all(ckpt: Path, tokens: Path, out: Path) -> dict[str, tuple[int, str, str]]:
    """Every analysis command on ``ckpt`` with small settings; outputs under ``out/<command>``."""
    runs = {}
    for command in ANALYSES:
        size = ["--T", LENGTH, "--points", 6] if command == "remembrance" else ["--length", LENGTH]
        extra = {"states": ["--stride", STRIDE], "coverage": ["--stride", STRIDE, "--buckets", 3],
                 "perplexity": ["--buckets", 6], "decay": ["--buckets", 6]}.get(command, [])
        runs[command] = cli(command, "--ckpt", ckpt, "--data", tokens, "--train-len", TRAIN_LEN, "--num-seqs", N,
                            *size, *extra, "--out", out / command)
    return runs


def results(out: Path, command: str) -> dict:
    return json.loads((out / command / "run.json").read_text())["results"]


def first_bad_head(state) -> tuple[int, int] | None:
    """The first (layer, head) of a Mamba-2 State whose SSM state holds inf/NaN in some sequence."""
    for layer, s in enumerate(state.ssm):                                   # s [b, heads, headdim, d_state]
        bad = ~torch.isfinite(s.flatten(2)).all(-1).all(0)                    # [heads]
        if bad.any():
            return layer, int(bad.nonzero()[0])
    return None


def first_bad_loss_position(model, tokens: np.ndarray) -> int | None:
    """One-shot: the first position p whose prediction (logits after p tokens) is non-finite."""
    with torch.no_grad():
        logits, _ = model(torch.as_tensor(tokens))
    bad = ~torch.isfinite(logits).all(-1).all(0)                              # [L]
    return int(bad.nonzero()[0]) + 1 if bad.any() else None


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, np.random.default_rng(3).integers(0, 64, (N, LENGTH)))
    return path


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory, tokens):
    """A tiny Mamba-2 with one NaN in layer 1's in_proj, in the x row of head 5's first channel: that
    head's state is NaN from the first token, and through the gated norm so is every logit; dt (so
    the decay) does not read that row and stays finite. All five analyses run on it."""
    root = tmp_path_factory.mktemp("nan")
    hf = hf_mamba2(root / "ckpt")
    d_inner, headdim = 2 * hf.config.hidden_size, hf.config.head_dim
    with torch.no_grad():
        hf.backbone.layers[BROKEN[0]].mixer.in_proj.weight[d_inner + BROKEN[1] * headdim, 0] = float("nan")
    hf.save_pretrained(root / "ckpt")
    return root / "ckpt", root / "out", run_all(root / "ckpt", tokens, root / "out")


def test_nan_weights_every_analysis_completes(nan_run):
    _, out, runs = nan_run
    for command, (code, stdout, err) in runs.items():
        assert code == 0, (command, err)
        manifest = json.loads((out / command / "run.json").read_text())
        for name in manifest["outputs"]:
            assert (out / command / name).stat().st_size > 0
        assert "Traceback" not in err


def test_nan_weights_states_say_where(nan_run, tokens):
    ckpt, out, runs = nan_run
    model = load_checkpoint(ckpt).model
    with torch.no_grad():  # the state after the first recorded position's tokens, computed directly
        _, state = model(torch.as_tensor(np.load(tokens)[:, :STRIDE]))
    layer, head = first_bad_head(state)
    expected = {"position": STRIDE, "layer": layer, "head": head, "column": "norm"}
    assert (layer, head) == BROKEN
    assert results(out, "states")["nonfinite"] == {"state_stats": expected}
    assert describe("state_stats", expected) in runs["states"][1]
    assert "state_stats.csv: first non-finite at position 4, layer 1, head 5 (norm)" in runs["states"][1]
    stats = pd.read_csv(out / "states" / "state_stats.csv")
    broken = (stats.layer == layer) & (stats["head"] == head)
    assert not stats.finite[broken].any() and stats.finite[~broken].all()
    assert results(out, "coverage")["first_nonfinite_state"] == {k: expected[k] for k in ("position", "layer", "head")}
    coverage = pd.read_csv(out / "coverage" / "coverage.csv")
    broken = (coverage.layer == layer) & (coverage["head"] == head)
    # no finite reference state for that head: nothing to test against; every other head is scored
    assert coverage.oos_fraction[broken].isna().all() and coverage.oos_fraction[~broken].notna().all()
    assert (coverage.n_reference[broken] == 0).all()


def test_nan_weights_loss_and_remembrance_say_where(nan_run, tokens):
    ckpt, out, runs = nan_run
    position = first_bad_loss_position(load_checkpoint(ckpt).model, np.load(tokens))
    assert position == 1
    found = results(out, "perplexity")
    assert found["first_nonfinite_loss_position"] == position
    assert found["nonfinite"] == {"positionwise": {"pos_start": 1, "pos_end": 2, "column": "loss"}}
    assert f"the loss is first non-finite at position {position}" in runs["perplexity"][1]
    # every next-token distribution is NaN, so EffRem is NaN from t = 0 on (the first row)
    assert results(out, "remembrance")["nonfinite"] == {"remembrance": {"t": 0, "column": "effrem"}}
    assert pd.read_csv(out / "remembrance" / "remembrance.csv").effrem.isna().all()
    assert json.loads((out / "remembrance" / "run.json").read_text())["results"]["effrem_at_half_T"]["effrem"] == "nan"


def test_nan_weights_leave_the_decay_finite(nan_run):
    _, out, _ = nan_run
    decay = pd.read_csv(out / "decay" / "decay.csv")
    assert np.isfinite(decay[["mean_alpha", "retention"]].to_numpy()).all()
    assert "nonfinite" not in results(out, "decay")


def test_report_of_a_faulty_checkpoint_names_the_faults(nan_run, tmp_path):
    _, out, _ = nan_run
    code, _, err = cli("report", "--from", out, "--label", "nan", "--train-len", TRAIN_LEN, "--out", tmp_path)
    assert code == 0, err
    html = (tmp_path / "index.html").read_text(encoding="utf-8")
    for line in ("state_stats.csv: first non-finite at position 4, layer 1, head 5 (norm)",
                 "positionwise.csv: first non-finite at positions [1, 2) (loss)",
                 "remembrance.csv: first non-finite at t 0 (effrem)"):
        assert f"<li>{line}</li>" in html
    assert "decay.csv: first non-finite" not in html


@pytest.fixture(scope="module")
def overflow_run(tmp_path_factory, tokens):
    """The overflowing checkpoint of test_states (head OVERFLOW integrates inputs scaled by 1e38), and
    `statelens report --ckpt` on it: it runs all five analyses, writing each as its command does."""
    root = tmp_path_factory.mktemp("overflow")
    model = edited_mamba2(root / "ckpt", overflow=True)
    run = cli("report", "--ckpt", root / "ckpt", "--label", "overflow", "--data", tokens, "--train-len", TRAIN_LEN,
              "--num-seqs", N, "--length", LENGTH, "--stride", STRIDE, "--buckets", 4, "--out", root / "report")
    return model, root / "report", run


def test_an_overflowing_state_is_reported_where_it_overflows(overflow_run, tokens):
    model, report, (code, _, err) = overflow_run
    assert code == 0, err
    sequences = torch.as_tensor(np.load(tokens))
    state, first = model.zero_state(N), None
    with torch.no_grad():  # token by token: the first position whose state is non-finite
        for t in range(LENGTH):
            _, state = model(sequences[:, t:t + 1], state)
            if (bad := first_bad_head(state)) is not None:
                first = t + 1, *bad
                break
    assert first is not None and first[1:] == OVERFLOW
    recorded = -(-first[0] // STRIDE) * STRIDE  # the first recorded position at or after it
    where = {"position": recorded, "layer": OVERFLOW[0], "head": OVERFLOW[1]}
    folder = report / "1-overflow"
    assert results(folder, "states")["nonfinite"]["state_stats"] == where | {"column": "norm"}
    assert results(folder, "coverage")["first_nonfinite_state"] == where
    loss_at = first_bad_loss_position(model, sequences.numpy())
    bucket = results(folder, "perplexity")["nonfinite"]["positionwise"]
    assert bucket["pos_start"] <= loss_at < bucket["pos_end"]
    html = (report / "index.html").read_text(encoding="utf-8")
    assert f"<li>{describe('state_stats', where | {'column': 'norm'})}</li>" in html


def test_first_nonfinite_on_tables_with_a_known_answer():
    table = pd.DataFrame({"position": [1, 2, 2, 3], "layer": [0, 0, 1, 0], "head": [0, 0, 0, 0],
                          "norm": [1.0, 2.0, 2.0, np.nan], "std": [1.0, 1.0, np.inf, 1.0]})
    assert first_nonfinite(table, ("position", "layer", "head"), ("norm", "std")) == \
        {"position": 2, "layer": 1, "head": 0, "column": "std"}
    assert first_nonfinite(table.iloc[:2], ("position",), ("norm", "std")) is None
    assert first_nonfinite_position(np.array([0.0, 1.0, 2.0, np.inf, np.nan])) == 3
    assert first_nonfinite_position(np.array([np.nan, 1.0])) is None  # entry 0 is unused


# -- zero-length documents -------------------------------------------------------------------------

TEXTS = ["the first document, long enough to matter. " * 6, "a second one. " * 20, "and a third, " * 25]


def test_zero_length_documents_change_nothing(byte_vocab_ckpt, tmp_path):
    """Empty documents in a .jsonl and empty files in a directory are skipped: the sequences drawn equal
    those drawn from the same data without them, and the command's CSV equals the library's answer on
    the data without them."""
    from statelens.analysis.positionwise import positionwise
    from statelens.data import load_tokenizer, load_tokens

    plain, empties = tmp_path / "plain.jsonl", tmp_path / "with-empty.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    empties.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", TEXTS[0], "", TEXTS[1], TEXTS[2], ""]))
    folder, flat = tmp_path / "folder", tmp_path / "flat"
    folder.mkdir(), flat.mkdir()
    for i, text in enumerate(["", TEXTS[0], TEXTS[1], "", TEXTS[2]]):
        (folder / f"{i}.txt").write_text(text)
        if text:
            (flat / f"{i}.txt").write_text(text)
    tokenizer = load_tokenizer(byte_vocab_ckpt, 256)
    for n, length in ((2, 48), (3, 200), (6, 60)):  # long documents first; then windows of the stream
        for with_empty, without in ((empties, plain), (folder, flat)):
            np.testing.assert_array_equal(load_tokens(with_empty, tokenizer).sequences(n, length, seed=0),
                                          load_tokens(without, tokenizer).sequences(n, length, seed=0))
    out = tmp_path / "out"
    code, _, err = cli("perplexity", "--ckpt", byte_vocab_ckpt, "--data", empties, "--train-len", 16, "--length", 48,
                       "--num-seqs", 2, "--buckets", 4, "--out", out)
    assert code == 0, err
    expected = positionwise(load_checkpoint(byte_vocab_ckpt).model,
                            load_tokens(plain, tokenizer).sequences(2, 48, seed=0), buckets=4)
    pd.testing.assert_frame_equal(pd.read_csv(out / "positionwise.csv"), expected, check_dtype=False, rtol=1e-6)


def test_only_empty_documents_are_bad_input(byte_vocab_ckpt, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": ""}) + "\n")
    code, _, err = cli("perplexity", "--ckpt", byte_vocab_ckpt, "--data", empty, "--train-len", 16,
                       "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(empty) in err, err
    assert not (tmp_path / "out").exists()
