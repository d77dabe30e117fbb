"""The recorded outputs that hold statelens' behaviour still while its code is restructured.

A fixed small matrix of commands (every analysis on every backend, report, compare, the three tasks,
post-training) runs on fixed checkpoints: the built-in demo pair (Mamba-2, mamba-ssm layout) and three
tiny ones kept in ``tests/golden/ckpts`` (Mamba-1 in mamba-ssm's layout, GLA in flash-linear-attention's,
Mamba-2 in transformers' layout for ``--backend hf``). Their CSVs are kept in ``tests/golden/csv``.

    python tests/golden/build.py --check    # run the matrix; every CSV byte-identical to the recorded one?
    python tests/golden/build.py --record   # (re)write the recorded CSVs, after a change meant to change them
    python tests/golden/build.py --ckpts    # (re)write the tiny checkpoints (then --record)

``--check`` is the refactoring gate on one machine (byte-identical); ``tests/test_golden.py`` runs the
same matrix in the suite and allows the float32 differences another CPU or thread count gives.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
CKPTS, CSV = HERE / "ckpts", HERE / "csv"
FIXTURES = HERE.parent / "fixtures"

ANALYSIS = {  # small, but long enough to go past the training length several times
    "perplexity": ["--length", 256, "--buckets", 8],
    "remembrance": ["--T", 128, "--points", 8],
    "states": ["--length", 256, "--stride", 32],
    "decay": ["--length", 128],
    "coverage": ["--length", 192, "--stride", 4, "--buckets", 4],
    "logits-drift": ["--length", 128, "--buckets", 4, "--points", 3],
}
COMMON = ["--train-len", 32, "--num-seqs", 2, "--chunk", 64]


def checkpoints() -> dict[str, tuple[Path, list]]:
    """Case name -> (checkpoint folder, extra options) for every backend."""
    from statelens import demo

    return {"mamba2": (demo.BASELINE, []), "mamba1": (CKPTS / "mamba1", []), "gla": (CKPTS / "gla", []),
            "hf-mamba2": (CKPTS / "hf-mamba2", ["--backend", "hf"])}


def matrix() -> dict[str, list]:
    """Case -> ``statelens`` arguments (without ``--out``)."""
    from statelens import demo

    cases = {}
    for backend, (ckpt, extra) in checkpoints().items():
        for command, options in ANALYSIS.items():
            if command == "decay" and backend.startswith("hf"):
                continue  # the hf adapter has no hook_decay
            cases[f"{command}-{backend}"] = [command, "--ckpt", ckpt, *COMMON, *options, *extra]
    base, post = demo.BASELINE, demo.POSTTRAINED
    cases["perplexity-mamba2-window"] = [*cases["perplexity-mamba2"], "--mitigation", "window:r=16"]
    cases["report"] = ["report", "--ckpt", base, *COMMON, "--length", 128]
    cases["compare"] = ["compare", base, post, *COMMON, "--length", 128]
    cases["passkey"] = ["passkey", "--ckpt", base, "--lengths", "200,300", "--depths", "0.1,0.9", "--samples", 2]
    cases["copying"] = ["copying", "--ckpt", base, "--lengths", "4,8", "--samples", 2]
    cases["babilong"] = ["babilong", "--ckpt", base, "--tasks", "qa1,qa3", "--lengths", 0, "--samples", 1,
                         "--data", FIXTURES / "babilong"]
    cases["posttrain"] = ["posttrain", "--ckpt", base, "--steps", 3, "--seq-len", 32, "--batch", 2, "--warmup", 1,
                          "--intervention", "state-passing"]
    return {name: [str(a) for a in args] for name, args in cases.items()}


def run(case: str, args: list[str], out: Path) -> None:
    """``statelens ARGS --out OUT`` in a process of its own (one thread, as recorded)."""
    done = subprocess.run([sys.executable, "-m", "statelens.cli.main", *args, "--out", str(out)],
                          capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{case}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")


def csvs(folder: Path) -> list[Path]:
    """The CSVs under ``folder``, relative to it, sorted."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*.csv"))


def write_checkpoints() -> None:
    """The three tiny checkpoints, from seeds (statelens' own constructors for mamba-ssm and fla layouts;
    transformers' for its own layout)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE.parent.parent / "examples"))
    sys.path.insert(0, str(HERE.parent))
    from conftest import hf_mamba2
    from tiny_checkpoint import tiny_model

    from statelens.models import GLAConfig, GLALM, save_checkpoint
    from statelens.models.checkpoint import mamba_ssm_checkpoint

    shutil.rmtree(CKPTS, ignore_errors=True)
    save_checkpoint(mamba_ssm_checkpoint(tiny_model("Mamba1", seed=0)), CKPTS / "mamba1")
    hf_mamba2(CKPTS / "hf-mamba2", vocab=256, seed=0)
    fla_config = {"model_type": "gla", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 256, "num_heads": 2,
                  "expand_k": 0.5, "expand_v": 1.0, "hidden_ratio": 2, "fuse_norm": False, "norm_eps": 1e-6,
                  "tie_word_embeddings": False, "hidden_act": "swish"}
    torch.manual_seed(0)
    model = GLALM(GLAConfig(**{k: v for k, v in fla_config.items() if k != "model_type"}))
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.2 if "norm" not in name else 0.1)
        if "norm" in name:
            p.data += 1
    names = {}
    for key, value in model.state_dict().items():  # fla's parameter names
        name = key.replace("blocks.", "layers.").replace("embedding.", "embeddings.").replace("norm_f.", "norm.")
        names[name if key.startswith("lm_head.") else "model." + name] = value.clone()
    (CKPTS / "gla").mkdir(parents=True)
    (CKPTS / "gla" / "config.json").write_text(json.dumps(fla_config, indent=2) + "\n")
    save_file(names, CKPTS / "gla" / "model.safetensors")
    for path in (CKPTS / "hf-mamba2").iterdir():  # keep only what loading needs
        if path.name not in ("config.json", "model.safetensors"):
            path.unlink()


def run_matrix(into: Path, only: list[str] | None = None) -> None:
    for case, args in matrix().items():
        if only is None or case in only:
            run(case, args, into / case)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true")
    action.add_argument("--record", action="store_true")
    action.add_argument("--ckpts", action="store_true")
    args = parser.parse_args()
    if args.ckpts:
        write_checkpoints()
        print(f"wrote {CKPTS}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_matrix(Path(tmp))
        if args.record:
            shutil.rmtree(CSV, ignore_errors=True)
            for name in csvs(Path(tmp)):
                (CSV / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(tmp) / name, CSV / name)
            print(f"recorded {len(csvs(CSV))} CSVs in {CSV}")
            return
        now, recorded = csvs(Path(tmp)), csvs(CSV)
        differ = [str(n) for n in recorded if n in now and not filecmp.cmp(Path(tmp) / n, CSV / n, shallow=False)]
        missing, extra = sorted(set(map(str, recorded)) - set(map(str, now))), sorted(set(map(str, now)) - set(map(str, recorded)))
        print(f"{len(recorded) - len(differ) - len(missing)} of {len(recorded)} CSVs byte-identical")
        for label, names in (("differ", differ), ("missing", missing), ("new", extra)):
            if names:
                print(f"{label}: {', '.join(names)}")
        raise SystemExit(1 if differ or missing or extra else 0)


if __name__ == "__main__":
    main()
