"""Writing results: every file under a temporary name, then renamed; and the run manifest.

A reader never sees a half-written CSV under its final name, whatever moment the process dies at. A
temporary file left by a killed process is removed by the next write of the same file.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pandas as pd


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Calls ``write(tmp_path)``, then renames the temporary file onto ``target``."""
    target = Path(target)
    remove_stale_temporaries(target)
    tmp = temporary_name(target)
    try:
        write(str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def temporary_name(target: Path) -> Path:
    """Where ``target`` is written before its rename: ``.NAME.tmp-PID`` beside it."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def remove_stale_temporaries(target: Path) -> None:
    """Removes ``target``'s temporary files whose process has died (killed mid-write)."""
    prefix = f".{target.name}.tmp-"
    if not target.parent.is_dir():
        return
    for tmp in target.parent.iterdir():
        pid = tmp.name[len(prefix):] if tmp.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_table(df: pd.DataFrame, target: str | os.PathLike, *, parquet: bool = False) -> list[Path]:
    """Writes ``df`` as CSV (and parquet when asked), atomically."""
    target = Path(target)
    written = [atomic_write(target, lambda f: df.to_csv(f, index=False))]
    if parquet:
        written.append(atomic_write(target.with_suffix(".parquet"), lambda f: df.to_parquet(f, index=False)))
    return written


def write_json(data: dict, target: str | os.PathLike) -> Path:
    """Writes ``data`` as strict JSON, atomically: an inf or NaN float (a finding of a run whose values
    overflowed) becomes the string "inf", "-inf" or "nan", which JSON readers other than Python's accept."""
    text = json.dumps(_finite_json(data), indent=2, default=str, allow_nan=False) + "\n"
    return atomic_write(target, lambda f: Path(f).write_text(text))


def _finite_json(value):
    """``value`` with every non-finite float (also numpy's) replaced by its string, recursively."""
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):  # numpy float64 is a float too
        return str(float(value))
    return value


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("statelens", "torch", "numpy", "pandas", "scipy", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def command_line() -> str:
    return " ".join(["statelens", *sys.argv[1:]])
