"""Atomic outputs: a run killed with SIGKILL at any moment leaves no truncated file under a final name.

Real commands run in a subprocess that pauses at the rename which ends the write of a given output,
just before it (the whole file under its temporary name, the final name absent) or just after (the
final name complete), and is SIGKILLed there (``pausing.PausedRun``: the kill lands at that moment
whatever the machine's load). A final name appears only by that rename, so these two moments bound
every other: a kill earlier in the write leaves a shorter temporary file and no final name.
Afterwards every file under a final name must be complete -- a CSV with every row the run computes
(counted from the settings), JSON that parses, a PNG that ends with its IEND chunk, an SVG or HTML page
that ends with its closing tag, weights that load -- and any temporary file must be one that no reader
takes for an output (a dotted name ending in ``.tmp-<pid>``).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from pausing import interrupt

TEMP = re.compile(r"^\..+\.tmp-\d+$")  # statelens.outputs.atomic_write's temporary names


def statelens_command() -> list[str]:
    script = Path(sys.executable).with_name("statelens")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "statelens.cli.main"]


def kill_at(args: list, out: Path, name: str, when: str) -> bool:
    """Runs ``statelens ARGS`` and SIGKILLs it just ``before`` or ``after`` the rename that ends the write
    of its first file ``name`` under ``out``. True when it was killed there, False when it ended first."""
    return interrupt(args, f"{out}*/{name}", signal.SIGKILL, when=when).returncode == -signal.SIGKILL


def assert_complete(path: Path, rows: dict[str, int]) -> None:
    """``path`` (a final name) holds a whole file of its kind; CSVs hold ``rows[name]`` rows."""
    data = path.read_bytes()
    if path.suffix == ".csv":
        table = pd.read_csv(path)
        expected = rows[path.name] if rows.get(path.name) is not None else table.step.max()  # train_log: every step
        assert len(table) == expected, path
    elif path.suffix == ".npz":
        assert list(np.load(path)), path
    elif path.suffix == ".json":
        json.loads(data)
    elif path.suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"), path
    elif path.suffix == ".svg":
        assert data.rstrip().endswith(b"</svg>"), path
    elif path.suffix == ".html":
        assert data.rstrip().endswith(b"</html>"), path
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        assert load_file(path)
    elif path.suffix == ".pt":
        import torch

        assert torch.load(path, weights_only=True)["step"] >= 1


def assert_no_truncated_output(out: Path, rows: dict[str, int], finals: set[str]) -> list[str]:
    """Every file under ``out`` is a complete output (a name in ``finals``) or a temporary file that no
    reader matches; if run.json exists, every output it lists is there. Returns the final names found."""
    found = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if TEMP.match(path.name):
            assert not any(path.match(glob) for glob in ("*.csv", "*.json", "*.png", "*.svg", "*.html")), path
            continue
        if ".partial" in path.relative_to(out).parts:  # saved groups of an interrupted run (--resume)
            assert_complete(path, rows)
            continue
        assert path.name in finals, path
        assert_complete(path, rows)
        found.append(path.name)
    if (out / "run.json").is_file():  # run.json is written last: what it lists is complete
        assert set(json.loads((out / "run.json").read_text())["outputs"]) <= set(found)
    return found


def test_killed_perplexity_leaves_only_complete_files(byte_vocab_ckpt, tmp_path):
    length, buckets = 256, 8
    rows = {"positionwise.csv": buckets}  # one row per bucket of positions 1 .. length - 1
    finals = {"positionwise.csv", "perplexity.png", "perplexity.svg", "run.json"}
    # each output killed once, just before or just after its rename: every output is written by the same
    # atomic_write, so the two moments are covered across the files without doubling the processes
    kills = [("positionwise.csv", "before"), ("perplexity.png", "after"), ("perplexity.svg", "before"),
             ("run.json", "after")]

    def args(folder: str) -> list:
        return ["perplexity", "--ckpt", byte_vocab_ckpt, "--train-len", 64, "--length", length, "--num-seqs", 2,
                "--buckets", buckets, "--out", tmp_path / folder]

    def one(kill: tuple[str, str]) -> bool:
        name, when = kill
        return kill_at(args(f"{name}-{when}"), tmp_path / f"{name}-{when}", name, when)

    with ThreadPoolExecutor(4) as pool:  # side by side, each process with its own watcher thread
        killed = list(pool.map(one, kills))
    assert killed == [True] * len(kills)
    for name, when in kills:
        found = assert_no_truncated_output(tmp_path / f"{name}-{when}", rows, finals)
        assert (name in found) == (when == "after"), (name, when, found)

    # Rerun to completion: the temporary files the killed runs left (each "before" kill left its whole
    # file under a temporary name; one more is planted under the name a dead process would leave) are
    # gone; a live process's temporary file is not touched.
    folders = [f"{name}-{when}" for name, when in kills if when == "before"]
    left = [p for folder in folders for p in (tmp_path / folder).rglob("*") if TEMP.match(p.name)]
    assert len(left) == len(folders), left
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    folder = tmp_path / folders[0]
    (folder / f".positionwise.csv.tmp-{dead}").write_text("half a table")
    live = folder / f".positionwise.csv.tmp-{os.getpid()}"   # this test's process: alive
    live.write_text("not ours to remove")
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda f: subprocess.run([*statelens_command(), *map(str, args(f))], cwd=tmp_path,
                                                      capture_output=True).returncode, folders))
    assert done == [0] * len(folders)
    for f in folders:
        left = [p.name for p in (tmp_path / f).rglob("*") if TEMP.match(p.name) and p != live]
        assert not left, left
    assert live.exists()


def test_killed_report_leaves_no_partial_page(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    edges = np.unique(np.geomspace(1, 4096, 12).astype(int))
    pd.DataFrame({"pos_start": edges[:-1], "pos_end": edges[1:], "loss": np.linspace(2, 3, len(edges) - 1),
                  "ppl": np.exp(np.linspace(2, 3, len(edges) - 1)), "n_tokens": 10}).to_csv(
        results / "positionwise.csv", index=False)
    for when, page in (("before", []), ("after", ["index.html"])):
        out = tmp_path / when
        assert kill_at(["report", "--from", results, "--train-len", 512, "--out", out], out, "index.html", when)
        assert assert_no_truncated_output(out, {}, {"index.html"}) == page


def test_killed_posttrain_leaves_a_loadable_checkpoint(byte_vocab_ckpt, tmp_path):
    """Killed as the first resume.pt is written (before its rename): the checkpoint files of the same
    save are complete (written before it), and resume.pt is absent."""
    out = tmp_path / "post"
    args = ["posttrain", "--ckpt", byte_vocab_ckpt, "--intervention", "none", "--steps", 3, "--seq-len", 16,
            "--batch", 1, "--warmup", 1, "--save-every", 1, "--out", out]
    assert kill_at(args, out, "resume.pt", "before")
    finals = {"model.safetensors", "config.json", "generation_config.json", "statelens.json", "train_log.csv",
              "resume.pt", "run.json"}
    found = assert_no_truncated_output(out, {"train_log.csv": None}, finals)
    assert {"model.safetensors", "config.json", "statelens.json", "train_log.csv"} <= set(found)
    assert "resume.pt" not in found
    from statelens.models import load_checkpoint

    load_checkpoint(out)
