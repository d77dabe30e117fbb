"""Tasks: prompts are deterministic and put the facts where asked; scoring is exact on oracle and
wrong answerers; greedy decoding after a chunked rollout equals recomputing from scratch; the CLI
writes what the library computes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from statelens.cli.analysis import command
from statelens.tasks import tasks
from typer.testing import CliRunner

from statelens.data.tokenizer import ByteTokenizer
from statelens.errors import BadInput, DataError
from statelens.models import load_checkpoint
from statelens.tasks import babilong as babilong_mod
from statelens.tasks import copying as copying_mod
from statelens.tasks import passkey as passkey_mod
from statelens.tasks.babilong import (
    babilong,
    babilong_samples,
    first_word,
    load_babilong,
    make_story,
)
from statelens.tasks.copying import copying, make_copy
from statelens.tasks.decode import greedy_continue
from statelens.tasks.passkey import capacity, make_passkey, passkey

FIXTURES = Path(__file__).parent / "fixtures" / "babilong"
TOK = ByteTokenizer(256)


def find(haystack: np.ndarray, needle: np.ndarray) -> list[int]:
    """Every start index of ``needle`` in ``haystack`` (both 1-D token arrays)."""
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if np.array_equal(haystack[i:i + n], needle)]


@pytest.fixture(scope="module")
def ckpt(byte_vocab_ckpt):
    return byte_vocab_ckpt


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(ckpt).model


# -- greedy decoding ------------------------------------------------------------------------------
def test_greedy_continue_equals_argmax_recomputed_from_scratch(model):
    prompt = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    got = greedy_continue(model, prompt, 6, chunk=8)
    sequence = prompt.clone()
    with torch.no_grad():
        for i in range(6):
            expected = model(sequence)[0][:, -1].argmax(-1)
            np.testing.assert_array_equal(got[:, i], expected.numpy())
            sequence = torch.cat([sequence, expected[:, None]], dim=1)
    assert got.shape == (2, 6) and got.dtype == np.int64


def test_long_passkey_streams_one_chunk_at_a_time(model, monkeypatch):
    fed = []
    original = model.hidden

    def recording(tokens, state):
        fed.append(tokens.shape[1])
        return original(tokens, state)

    monkeypatch.setattr(model, "hidden", recording)
    df = passkey(model, TOK, [4096], [0.5], samples=1, seed=0, chunk=512)
    assert max(fed) == 512 and sum(n for n in fed if n > 1) == 4096
    assert list(df.columns) == ["length", "depth", "accuracy", "n"] and df.n.tolist() == [1]
    assert 0.0 <= df.accuracy.iloc[0] <= 1.0


# -- passkey --------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("depth", [0.02, 0.1, 0.5, 0.9])
def test_passkey_prompt_states_the_key_once_at_the_depth(length, depth):
    prompt, key, position = make_passkey(TOK, length, depth, seed=3)
    assert len(prompt) == length and prompt.dtype == np.int64
    assert re.fullmatch(r"[1-9]\d{4}", key)
    sentence = TOK.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
    assert len(find(prompt, sentence)) == 1
    assert find(prompt, TOK.encode(" " + key))[0] == position
    assert abs(position - depth * length) <= 0.01 * length
    assert TOK.decode(prompt).endswith(" What is the pass key? The pass key is")
    assert TOK.decode(prompt).count(key) == 2  # both statements are in the one key sentence


def test_passkey_prompts_are_deterministic_for_a_seed():
    a, b, c = (make_passkey(TOK, 2048, 0.5, seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1] and a[1] != c[1]


@pytest.mark.parametrize("call, needle", [
    (lambda: make_passkey(TOK, 80, 0.5, 0), "--lengths"),
    (lambda: make_passkey(TOK, 1024, 1.5, 0), "--depths"),
    (lambda: passkey(None, TOK, [1024], [0.5, -0.1]), "--depths"),
])
def test_passkey_bad_input_names_the_option(call, needle):
    with pytest.raises(BadInput, match=needle):
        call()


def answerer(correct_rows):
    """A fake greedy_continue that answers each passkey prompt with its key when ``correct_rows(i)``."""
    def fake(model, prompts, n_new, *, chunk):
        out = []
        for i, prompt in enumerate(prompts):
            key = re.search(r"The pass key is (\d{5})", TOK.decode(prompt)).group(1)
            answer = key if correct_rows(i) else "00000"
            out.append(np.resize(TOK.encode(" " + answer), n_new))
        return np.stack(out)
    return fake


@pytest.mark.parametrize("rows, accuracy", [(lambda i: True, 1.0), (lambda i: False, 0.0),
                                            (lambda i: i % 2 == 0, 0.5)])
def test_passkey_scoring_is_exact(rows, accuracy, monkeypatch):
    monkeypatch.setattr(passkey_mod, "greedy_continue", answerer(rows))
    df = passkey(None, TOK, [512, 1024], [0.1, 0.9], samples=4, seed=1)
    assert df[["length", "depth"]].values.tolist() == [[512, 0.1], [512, 0.9], [1024, 0.1], [1024, 0.9]]
    assert df.accuracy.tolist() == [accuracy] * 4 and df.n.tolist() == [4] * 4


def test_capacity_is_the_largest_length_passing_on_average_over_depths():
    df = pd.DataFrame({"length": [1, 1, 2, 2, 4, 4, 8, 8], "depth": [0.1, 0.9] * 4,
                       "accuracy": [1.0, 1.0, 1.0, 0.8, 1.0, 0.8, 0.0, 1.0], "n": 4})
    assert capacity(df) == 4 and capacity(df, threshold=0.95) == 1 and capacity(df.assign(accuracy=0.0)) == 0


# -- copying --------------------------------------------------------------------------------------
def test_copy_prompts_are_deterministic_and_avoid_the_separator():
    prompt, target = make_copy(5, 200, seed=2)
    np.testing.assert_array_equal(prompt, make_copy(5, 200, seed=2)[0])
    assert not np.array_equal(target, make_copy(5, 200, seed=3)[1])
    assert prompt[-1] == 4 and 4 not in target and np.array_equal(prompt[:-1], target)


@pytest.mark.parametrize("copy, accuracy", [
    (lambda p, n: p[:, :n], 1.0),
    (lambda p, n: (p[:, :n] + 1) % 255, 0.0),
    (lambda p, n: np.concatenate([p[:, : n // 2], (p[:, n // 2: n] + 1) % 255], axis=1), 0.5),
])
def test_copying_scoring_is_exact(copy, accuracy, model, monkeypatch):
    monkeypatch.setattr(copying_mod, "greedy_continue", lambda m, p, n, *, chunk: copy(np.asarray(p), n))
    df = copying(model, [8, 64], samples=3, seed=0)
    assert list(df.columns) == ["n", "accuracy", "n_samples"]
    assert df.n.tolist() == [8, 64] and df.accuracy.tolist() == [accuracy] * 2 and df.n_samples.tolist() == [3, 3]


# -- BABILong ------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["qa1", "qa2"])
@pytest.mark.parametrize("length", [0, 1024, 4096])
def test_generated_stories_hold_each_supporting_fact_once(task, length):
    sample = make_story(TOK, task, length, seed=5)
    assert sample == make_story(TOK, task, length, seed=5)
    prompt = TOK.encode(sample.prompt())
    assert len(sample.facts) == (1 if task == "qa1" else 2)
    for fact in sample.facts:
        assert sample.prompt().count(fact.strip()) == 1 and len(find(prompt, TOK.encode(fact.strip()))) == 1
    assert sample.target in babilong_mod.PLACES and sample.facts[-1].endswith(f" the {sample.target}.")
    if task == "qa1":  # the supporting fact is the person's last move
        person = sample.question.removeprefix("Where is ").rstrip("?")
        mentions = [s for s in sample.context.split(".") if s.strip().startswith(person)]
        assert mentions[-1].strip() + "." == sample.facts[0].strip()
    if length:
        assert length - 30 <= len(prompt) <= length
    assert make_story(TOK, task, length, seed=6) != sample


def test_generator_refuses_tasks_it_does_not_make():
    with pytest.raises(BadInput, match="--tasks"):
        make_story(TOK, "qa3", 1024, 0)


@pytest.mark.parametrize("task, length, targets", [("qa1", 0, ["bathroom", "office"]),
                                                   ("qa2", 1024, ["garden", "kitchen", "bedroom"]),
                                                   ("qa3", 0, ["office"])])
def test_loader_reads_the_public_layouts(task, length, targets):
    samples = load_babilong(FIXTURES, task, length)
    assert [s.target for s in samples] == targets
    assert samples[0].question.startswith("Where") and samples[0].context


@pytest.mark.parametrize("content", [
    '[{"input": "a", "question": "b", "target": "c"}, {"input": "a", "target": "c"}]',
    '{"input": "a", "question": "b", "target": "c"}\n{"input": "a", "question": "b"}\n',
])
def test_loader_names_the_file_and_record_with_a_missing_field(content, tmp_path):
    (tmp_path / "qa1_1k.jsonl").write_text(content)
    with pytest.raises(DataError, match=r"qa1_1k\.jsonl: record 1 has no string field"):
        load_babilong(tmp_path, "qa1", 1024)


def test_loader_says_which_files_it_looked_for(tmp_path):
    with pytest.raises(DataError, match=r"qa5 at 2k .*qa5_2k\.json"):
        load_babilong(tmp_path, "qa5", 2048)


@pytest.mark.parametrize("right, accuracy", [(True, 1.0), (False, 0.0)])
@pytest.mark.parametrize("data", [None, FIXTURES])
def test_babilong_scoring_is_exact(right, accuracy, data, monkeypatch):
    lengths = [0] if data else [256, 1024]
    answers = {}
    for task in ("qa1", "qa2" if data is None else "qa3"):
        for length in lengths:
            for s in babilong_samples(TOK, task, length, 3, seed=4, data=data):
                answers[s.prompt()] = s.target if right else "nowhere"

    def fake(model, prompts, n_new, *, chunk):
        text = " " + answers[TOK.decode(prompts[0])].capitalize() + ". Mary"
        return TOK.encode(text)[None, :n_new]

    monkeypatch.setattr(babilong_mod, "greedy_continue", fake)
    names = ["qa1", "qa2" if data is None else "qa3"]
    df = babilong(None, TOK, names, lengths, samples=3, seed=4, data=data)
    assert list(df.columns) == ["task", "length", "accuracy", "n"]
    assert df.accuracy.tolist() == [accuracy] * len(df) and len(df) == 2 * len(lengths)
    assert df.n.tolist() == ([3] * 4 if data is None else [2, 1])


def test_first_word_ignores_case_and_punctuation():
    assert first_word("  Bathroom. Mary") == "bathroom" and first_word("") == ""


# -- CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    app = typer.Typer(pretty_exceptions_enable=False)
    for name in ("passkey", "copying", "babilong"):
        app.command(name)(command(tasks.get(name)))
    return app


def test_passkey_command_writes_the_library_result(app, ckpt, model, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["passkey", "--ckpt", str(ckpt), "--lengths", "200,300", "--depths", "0.1,0.9",
                                      "--samples", "2", "--chunk", "128", "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = passkey(model, TOK, [200, 300], [0.1, 0.9], samples=2, seed=0, chunk=128)
    pd.testing.assert_frame_equal(pd.read_csv(out / "passkey.csv"), expected, check_dtype=False)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["results"] == {"capacity": capacity(expected), "state_size": 2 * 8 * 8 * 8}
    assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG"


def test_copying_and_babilong_commands_write_the_library_result(app, ckpt, model, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["copying", "--ckpt", str(ckpt), "--lengths", "4,8", "--samples", "2",
                                 "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "c" / "copying.csv"),
                                  copying(model, [4, 8], samples=2, seed=0), check_dtype=False)
    result = runner.invoke(app, ["babilong", "--ckpt", str(ckpt), "--tasks", "qa1,qa3", "--lengths", "0", "--samples", "1",
                                 "--data", str(FIXTURES), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    expected = babilong(model, TOK, ["qa1", "qa3"], [0], samples=1, seed=0, data=FIXTURES)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b" / "babilong.csv"), expected, check_dtype=False)


@pytest.mark.parametrize("args, needle", [
    (["passkey", "--depths", "0.5,1.5"], "--depths"),
    (["passkey", "--depths", "0.5,half"], "--depths"),
    (["passkey", "--lengths", "1024,2k5"], "--lengths"),
    (["passkey", "--lengths", "64"], "--lengths"),
    (["copying", "--lengths", "0"], "--lengths"),
    (["babilong", "--tasks", "qa1", "--lengths", "1024", "--data", "BAD"], "record 1"),
])
def test_bad_input_raises_bad_input_and_writes_nothing(args, needle, app, ckpt, tmp_path):
    if "BAD" in args:
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "qa1_1k.json").write_text('[{"input": "a", "question": "b", "target": "c"}, {}]')
        args = [str(tmp_path / "bad") if a == "BAD" else a for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "--ckpt", str(ckpt), "--out", str(out)])
    assert isinstance(result.exception, BadInput) and needle in str(result.exception)
    assert len(str(result.exception).splitlines()) == 1 and not out.exists()
