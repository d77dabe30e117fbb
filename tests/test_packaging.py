"""Packaging: what ``pip install statelens`` really puts on a machine.

``cli/`` and ``reports/`` sit at the top of the repository but install as ``statelens.cli`` and
``statelens.reports`` (``[tool.setuptools.package-dir]`` in pyproject.toml). These tests build a wheel
from a clean copy of the checkout, install it into a throw-away virtual environment and look at what
landed there; the last test checks the editable install of the project venv maps the same names.

The throw-away venv gets the project venv's dependencies (torch, typer, ...) through one ``.pth``
line naming the project venv's site-packages. A path listed in a ``.pth`` file is only appended to
``sys.path``; the ``.pth`` files inside it (the editable finder among them) are not run, so the
installed wheel is the only ``statelens`` that venv can import.
"""

from __future__ import annotations

import importlib.metadata
import json
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VERSION = importlib.metadata.version("statelens")
DIST_INFO = f"statelens-{VERSION}.dist-info"
DEPS_PTH = "project_venv_dependencies.pth"

# Build outputs and caches of the checkout: copying them would let a stale file reach the wheel.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "runs")


def _require_build_backend() -> None:
    """Skips when this interpreter cannot build a wheel without build isolation: setuptools must be
    importable and provide ``bdist_wheel`` (built in from setuptools 70.1, else the ``wheel`` package)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip(f"setuptools is not installed in {sys.executable}: cannot build the wheel")
    has_bdist_wheel = importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
    if not has_bdist_wheel and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools in {sys.executable} has no bdist_wheel (needs setuptools>=70.1 or `wheel`)")


def _clean_env() -> dict[str, str]:
    """The environment minus every variable that could put the checkout or a user site on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=120)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    python: Path
    site_packages: Path
    site_listing: frozenset[str]  # site-packages entries right after the wheel went in
    dependency_dirs: tuple[str, ...]  # the project venv's site-packages, listed in DEPS_PTH
    workdir: Path  # a directory holding no source: the cwd of every command run in the venv
    build_log: str  # what building the wheel printed


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Builds the wheel from a copy of the checkout and installs it, alone, into a fresh venv."""
    _require_build_backend()
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES, symlinks=True)

    dist = root / "dist"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--disable-pip-version-check", "-w", dist, source], cwd=root)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("statelens-*.whl")

    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    put = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                "--disable-pip-version-check", wheel], cwd=root)
    assert put.returncode == 0, put.stdout + put.stderr

    site_packages = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              cwd=root).stdout.strip())
    listing = frozenset(p.name for p in site_packages.iterdir())

    ours = sysconfig.get_paths()
    dependency_dirs = tuple(dict.fromkeys([ours["purelib"], ours["platlib"]]))  # ordered, no repeats
    (site_packages / DEPS_PTH).write_text("".join(f"{d}\n" for d in dependency_dirs))

    workdir = root / "elsewhere"
    workdir.mkdir()
    return Installed(wheel, venv, python, site_packages, listing, dependency_dirs, workdir,
                     built.stdout + built.stderr)


def test_wheel_holds_only_the_statelens_package(installed: Installed) -> None:
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(installed.wheel).namelist()}
    assert tops == {"statelens", DIST_INFO}


def _requirements(wheel: Path) -> list[str]:
    """The wheel's ``Requires-Dist`` lines, outside any extra (what ``pip install statelens`` pulls)."""
    metadata = zipfile.ZipFile(wheel).read(f"{DIST_INFO}/METADATA").decode("utf-8")
    lines = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    return [line for line in lines if "extra ==" not in line]


def test_wheel_requires_a_torch_range_that_holds_the_tested_torch(installed: Installed) -> None:
    """An exact torch pin makes ``pip install statelens`` replace a user's (CUDA) torch: the metadata must
    give a range, and the torch the tests run on must be inside it."""
    from packaging.requirements import Requirement

    import torch

    (torch_requirement,) = [r for r in map(Requirement, _requirements(installed.wheel)) if r.name == "torch"]
    specifier = torch_requirement.specifier
    assert not [s for s in specifier if s.operator in ("==", "===", "~=")], f"torch pinned: {torch_requirement}"
    assert specifier.contains(torch.__version__.split("+")[0]), (str(specifier), torch.__version__)
    assert not specifier.contains("2.5.0"), "the floor is FSDP2's public fully_shard (torch 2.6)"


def test_building_declares_its_data_without_setuptools_warnings(installed: Installed) -> None:
    """The data folders (demo/baseline, ...) are declared as package data, so setuptools does not warn
    that they look like packages missing from ``packages`` (what a fresh ``make demo`` printed)."""
    assert "absent from the `packages` configuration" not in installed.build_log
    assert "Package would be ignored" not in installed.build_log
    shipped = set(zipfile.ZipFile(installed.wheel).namelist())
    data = [p.relative_to(REPO).as_posix() for p in (REPO / "statelens" / "demo").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
    assert data and all(name in shipped for name in data), sorted(set(data) - shipped)


def test_install_adds_one_top_level_package(installed: Installed) -> None:
    """No ``cli``, ``reports``, ``tests``, ``benchmarks`` or ``examples`` lands in site-packages."""
    assert installed.site_listing == {"statelens", DIST_INFO}
    top_level = (installed.site_packages / DIST_INFO / "top_level.txt").read_text().split()
    assert top_level == ["statelens"]


def test_wheel_ships_every_source_module(installed: Installed) -> None:
    """Each ``.py`` under ``statelens/``, ``cli/`` and ``reports/`` reaches the wheel under its installed
    name: a new subpackage missing from ``[tool.setuptools] packages`` fails here."""
    installed_name = {"statelens": "statelens", "cli": "statelens/cli", "reports": "statelens/reports"}
    expected = {f"{installed_name[folder]}/{path.relative_to(REPO / folder).as_posix()}"
                for folder in installed_name
                for path in (REPO / folder).rglob("*.py") if "__pycache__" not in path.parts}
    shipped = {name for name in zipfile.ZipFile(installed.wheel).namelist() if name.endswith(".py")}
    assert shipped == expected


def test_installed_modules_come_from_the_throwaway_venv(installed: Installed) -> None:
    probe = ("import json, sys, statelens, statelens.cli, statelens.reports, importlib.util as u; "
             "print(json.dumps({'files': [statelens.__file__, statelens.cli.__file__, "
             "statelens.reports.__file__], 'path': sys.path, "
             "'stray': [n for n in ('cli', 'reports') if u.find_spec(n) is not None]}))")
    result = _run([installed.python, "-c", probe], cwd=installed.workdir)
    assert result.returncode == 0, result.stderr

    seen = json.loads(result.stdout)
    site = installed.site_packages.resolve()
    files = [Path(f).resolve() for f in seen["files"]]
    assert files == [site / "statelens" / "__init__.py", site / "statelens" / "cli" / "__init__.py",
                     site / "statelens" / "reports" / "__init__.py"]
    # '' on sys.path stands for the working directory, hence the join before resolving.
    in_checkout = [p for p in seen["path"] if p not in installed.dependency_dirs
                   and (installed.workdir / p).resolve().is_relative_to(REPO)]
    assert in_checkout == []
    assert seen["stray"] == []


def test_console_script_runs_from_the_throwaway_venv(installed: Installed) -> None:
    script = installed.venv / "bin" / "statelens"
    assert script.is_file()
    result = _run([script, "--help"], cwd=installed.workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check" in result.stdout


def test_editable_install_maps_top_level_folders_into_statelens(tmp_path: Path) -> None:
    """The project venv (editable install) resolves ``statelens.cli`` to the repository's ``cli/``, and
    offers no top-level ``cli`` or ``reports`` once the checkout is not the working directory."""
    probe = ("import json, statelens, statelens.cli, statelens.reports, importlib.util as u; "
             "print(json.dumps([statelens.__file__, statelens.cli.__file__, statelens.reports.__file__, "
             "[n for n in ('cli', 'reports') if u.find_spec(n) is not None]]))")
    result = _run([sys.executable, "-c", probe], cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    package, cli, reports, stray = json.loads(result.stdout)
    assert Path(package).resolve().parent == REPO / "statelens"
    assert Path(cli).resolve().parent == REPO / "cli"
    assert Path(reports).resolve().parent == REPO / "reports"
    assert stray == []
