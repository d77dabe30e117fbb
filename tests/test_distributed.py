"""torchrun: two CPU processes (gloo) share the groups of an analysis and the batch of a post-training step,
and end with the numbers of a single process (CSV bytes for analyses; weights within float tolerance).

One torchrun launch runs every command in turn (statelens.cli.main in-process per rank), so the process
start-up is paid once. Per-process thread counts change float32 reductions, so the single-process
references run with one thread, as torchrun's workers do."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli
from pausing import PausedRun

ANALYSES = {
    "perplexity": ["--train-len", 32, "--length", 128, "--num-seqs", 3, "--buckets", 5],
    "coverage": ["--train-len", 32, "--length", 96, "--num-seqs", 3, "--stride", 8, "--buckets", 3,
                 "--regime", "state-passing", "--chain", 2],
}
OUTPUTS = {"perplexity": ["positionwise.csv"], "coverage": ["coverage.csv", "coverage_buckets.csv"]}
REPORT = ["--train-len", 32, "--length", 96, "--num-seqs", 3, "--stride", 8, "--buckets", 4]
POSTTRAIN = ["--steps", 3, "--seq-len", 16, "--batch", 2, "--warmup", 1, "--intervention", "state-passing"]
# Post-training runs under torchrun (output folder: arguments after POSTTRAIN): DDP; FSDP; FSDP saved after
# 2 steps and resumed to 3 (through the gathered optimizer state).
POSTTRAIN_RUNS = {"posttrain": [[]], "posttrain-fsdp": [["--fsdp"]],
                  "posttrain-fsdp-resumed": [["--fsdp", "--steps", 2], ["--fsdp", "--resume"]]}

# Rank 0 writes each post-training save a second late: a rank that left a command before rank 0's outputs
# were complete would resume the next one from a different step than rank 0 (a hang before main() waited).
SCRIPT = """
import importlib, json, sys, time
from statelens.cli.main import main

posttrain = importlib.import_module("statelens.train.posttrain")
save = posttrain._save
posttrain._save = lambda *args: (time.sleep(1.0), save(*args))

for args in json.load(open(sys.argv[1])):
    sys.argv = ["statelens", *args]
    try:
        main()
    except SystemExit as e:   # rank 0 ends each command with exit(0); other ranks once their groups are sent
        if e.code:
            raise
"""


@pytest.fixture(scope="module")
def torchrun(byte_vocab_ckpt, tmp_path_factory):
    """Runs every command under torchrun --nproc-per-node 2; returns the folder of their outputs."""
    folder = tmp_path_factory.mktemp("torchrun")
    commands = [[name, "--ckpt", str(byte_vocab_ckpt), *map(str, args), "--out", str(folder / name)]
                for name, args in ANALYSES.items()]
    commands.append(["report", "--ckpt", str(byte_vocab_ckpt), *map(str, REPORT), "--out", str(folder / "report")])
    commands += [["posttrain", "--ckpt", str(byte_vocab_ckpt), *map(str, POSTTRAIN + extra), "--out", str(folder / name)]
                 for name, runs in POSTTRAIN_RUNS.items() for extra in runs]
    (folder / "commands.json").write_text(json.dumps(commands))
    (folder / "run.py").write_text(SCRIPT)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(folder / "run.py"), str(folder / "commands.json")],
                          capture_output=True, text=True, env=env, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.parametrize("command", list(ANALYSES))
def test_torchrun_analysis_equals_single_process(torchrun, byte_vocab_ckpt, tmp_path, monkeypatch, capsys,
                                                 one_thread, command):
    out = tmp_path / command
    code, _, err = run_cli(monkeypatch, capsys, command, "--ckpt", byte_vocab_ckpt, *ANALYSES[command], "--out", out)
    assert code == 0, err
    for name in OUTPUTS[command]:
        assert (torchrun / command / name).read_bytes() == (out / name).read_bytes()
    # Rank 0 alone wrote, and the same files; no partials are left.
    assert sorted(p.name for p in (torchrun / command).iterdir()) == sorted(p.name for p in out.iterdir())


def test_torchrun_report_equals_single_process(torchrun, byte_vocab_ckpt, tmp_path, monkeypatch, capsys, one_thread):
    """The report runs its five analyses as the commands do, so their groups are shared too: every CSV
    equals a single process's, byte for byte, and rank 0 alone wrote the page."""
    out = tmp_path / "report"
    code, _, err = run_cli(monkeypatch, capsys, "report", "--ckpt", byte_vocab_ckpt, *REPORT, "--out", out)
    assert code == 0, err
    csvs = sorted(p.relative_to(out) for p in out.rglob("*.csv"))
    assert len(csvs) >= 7 and csvs == sorted(p.relative_to(torchrun / "report") for p in (torchrun / "report").rglob("*.csv"))
    for name in csvs:
        assert (torchrun / "report" / name).read_bytes() == (out / name).read_bytes(), name
    assert (torchrun / "report" / "index.html").is_file()


@pytest.mark.parametrize("name", list(POSTTRAIN_RUNS))
def test_torchrun_posttrain_matches_single_process(torchrun, byte_vocab_ckpt, tmp_path, monkeypatch, capsys,
                                                   one_thread, name):
    """DDP and FSDP (sharded, its saves gathered to rank 0; also resumed from one) end where one
    process does."""
    import pandas as pd

    from statelens.models import load_checkpoint

    out = tmp_path / name
    for extra in POSTTRAIN_RUNS[name]:
        single_process = [a for a in extra if a != "--fsdp"]
        code, _, err = run_cli(monkeypatch, capsys, "posttrain", "--ckpt", byte_vocab_ckpt, *POSTTRAIN, *single_process,
                               "--out", out)
        assert code == 0, err
    single, shared = (load_checkpoint(p).model.state_dict() for p in (out, torchrun / name))
    start = load_checkpoint(byte_vocab_ckpt).model.state_dict()
    assert max((single[k] - shared[k]).abs().max().item() for k in single) < 1e-5
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-4     # it did train
    logs = [pd.read_csv(p / "train_log.csv") for p in (out, torchrun / name)]
    pd.testing.assert_frame_equal(logs[0], logs[1], check_exact=False, rtol=1e-5)


def test_an_interrupted_rank_releases_the_rank_waiting_in_the_gather(byte_vocab_ckpt, tmp_path, monkeypatch, capsys,
                                                                      one_thread):
    """Two ranks started as torchrun would (env RANK/WORLD_SIZE/MASTER_*). Rank 1's one group is done and
    it waits in the gather when rank 0 alone gets SIGINT: both leave at once with 130 (no hang), and
    --resume completes to the single-process CSV."""
    import signal

    out = tmp_path / "ppl"
    args = ["perplexity", "--ckpt", byte_vocab_ckpt, "--train-len", 32, "--length", 512, "--num-seqs", 3,
            "--buckets", 4, "--out", out]
    port = free_port()

    def launch(resume: bool) -> list[subprocess.Popen]:
        return launch_ranks([[*args, *(["--resume"] if resume else [])]] * 2, port)

    # Rank 0 pauses once its first group is saved (it has a second one to do) and gets SIGINT there; rank 1
    # runs its one group and waits in the gather.
    rank0 = PausedRun(args, f"{out}/.partial/group-00000.npz", env=rank_env(0, 2, port))
    rank1 = launch_rank(args, 1, 2, port)
    try:
        assert rank0.paused() is not None, "rank 0 ended before its first group was saved"
        stopped = rank0.finish(signal.SIGINT, timeout=60)    # a hang fails here
        code1 = rank1.wait(timeout=60)
    finally:
        rank1.kill() if rank1.poll() is None else None
    assert [stopped.returncode, code1] == [130, 130], [stopped.stderr[-3000:], rank1.stderr.read()[-3000:]]
    assert not (out / "positionwise.csv").exists()

    port = free_port()
    ranks = launch(resume=True)
    assert [rank.wait(timeout=120) for rank in ranks] == [0, 0]
    single = tmp_path / "single"
    code, _, err = run_cli(monkeypatch, capsys, *args[:-1], single)
    assert code == 0, err
    assert (out / "positionwise.csv").read_bytes() == (single / "positionwise.csv").read_bytes()


def test_posttrain_resume_needs_the_same_save_on_every_rank(byte_vocab_ckpt, tmp_path, monkeypatch, capsys):
    """--out on a folder the ranks do not share (rank 0 sees a save at step 2, rank 1 none): every rank
    stops with the one-line error, exit 2, instead of training from different steps (a hang)."""
    args = ["posttrain", "--ckpt", byte_vocab_ckpt, *POSTTRAIN]
    saved = tmp_path / "saved"
    code, _, err = run_cli(monkeypatch, capsys, *args, "--steps", 2, "--out", saved)
    assert code == 0, err
    before = (saved / "resume.pt").read_bytes()
    ranks = launch_ranks([[*args, "--resume", "--out", folder] for folder in (saved, tmp_path / "empty")], free_port())
    try:
        codes = [rank.wait(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill() if rank.poll() is None else None
    errors = [rank.stderr.read().strip().splitlines() for rank in ranks]
    assert codes == [2, 2], errors
    for lines in errors:
        assert lines[-1].startswith("statelens: error: --resume: the torchrun ranks see different saves"), lines
    assert (saved / "resume.pt").read_bytes() == before


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank ``rank`` of ``world`` (one thread each)."""
    return os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def launch_rank(args: list, rank: int, world: int, port: int) -> subprocess.Popen:
    """``statelens ARGS`` as rank ``rank`` of ``world``, started as torchrun would (RANK, WORLD_SIZE, MASTER_*)."""
    return subprocess.Popen([sys.executable, "-m", "statelens.cli.main", *map(str, args)],
                            env=rank_env(rank, world, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def launch_ranks(args_per_rank: list[list], port: int) -> list[subprocess.Popen]:
    """One ``statelens`` process per rank."""
    return [launch_rank(args, r, len(args_per_rank), port) for r, args in enumerate(args_per_rank)]
