"""The structure issue 20 set down, held by tests: docs/architecture.md names only files that exist; the
library raises builtin exceptions only for its own invariants; no import points up a layer."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PATH = re.compile(r"`((?:cli|reports|statelens|tests|docs)/[\w./-]*|pyproject\.toml)`")


def missing(text: str) -> tuple[int, list[str]]:
    """How many backticked repository paths ``text`` names, and those that do not exist."""
    names = PATH.findall(text)
    return len(names), [n for n in names if not (ROOT / n).exists()]


def test_every_path_the_map_names_exists():
    count, absent = missing((ROOT / "docs" / "architecture.md").read_text())
    assert count >= 30 and not absent, absent


def test_a_path_that_is_not_there_is_caught():
    assert missing("the scan in `statelens/models/ssd.py`, Mamba-4 in `statelens/models/mamba4.py`") == \
        (2, ["statelens/models/mamba4.py"])


# -- the error policy (issue 20 item 3): the library raises StatelensError for what a user can cause -----

#: The builtin exceptions the library may raise: invariants of its own, which a user cannot cause (a bug
#: when they fire, so the CLI says "internal error", exit 1). (file, the exception, words of the message)
INTERNAL = {("statelens/registry.py", "ValueError", "is registered twice"),
            ("statelens/models/kernels.py", "ValueError", "unknown kernel"),
            ("statelens/runs.py", "RuntimeError", "--mitigation was never applied"),
            ("statelens/analysis/coverage.py", "RuntimeError", "coverage refused its own"),
            ("statelens/analysis/states.py", "RuntimeError", "collapse refused its"),
            ("statelens/train/posttrain.py", "TypeError", "give a config or settings, not both")}
BUILTIN_RAISE = re.compile(r"raise (ValueError|TypeError|RuntimeError|KeyError|IndexError|AssertionError)\((f?\"[^\"]*)")


def builtin_raises(top: Path = ROOT, folders=("statelens", "cli", "reports")) -> set[tuple[str, str, str]]:
    """Every ``raise <builtin exception>("...")`` under ``top``'s ``folders``: (file, exception, the
    message's start)."""
    found = set()
    for folder in folders:
        for path in sorted((top / folder).rglob("*.py")):
            for kind, message in BUILTIN_RAISE.findall(path.read_text()):
                found.add((str(path.relative_to(top)), kind, message.lstrip("f").strip('"')))
    return found


def test_the_library_raises_builtin_exceptions_only_for_its_own_invariants():
    raised = builtin_raises()
    unexpected = [r for r in raised if not any(r[:2] == i[:2] and i[2] in r[2] for i in INTERNAL)]
    assert not unexpected, unexpected
    assert len(raised) == len(INTERNAL)  # each allowed one is still there (else drop it from the list)


def test_a_bare_value_error_is_caught(tmp_path):
    (tmp_path / "statelens").mkdir()
    (tmp_path / "statelens" / "x.py").write_text('def f(n):\n    raise ValueError(f"n must be >= 1, got {n}")\n')
    assert builtin_raises(tmp_path) == {("statelens/x.py", "ValueError", "n must be >= 1, got {n}")}


# -- the three layers (DESIGN.md): no import points up ----------------------------------------------------

#: Each layer's folder, and the packages above it that it must not import.
ABOVE = {"statelens": ("statelens.cli", "statelens.reports"), "reports": ("statelens.cli",)}


def imports_pointing_up(top: Path = ROOT) -> list[str]:
    """``file: module`` for every import (top-level or inside a function) of a layer above the file's own."""
    found = []
    for folder, above in ABOVE.items():
        for path in sorted((top / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                names += [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
                found += [f"{path.relative_to(top)}: {n}" for n in names if n.startswith(above)]
    return found


def test_no_import_points_up():
    assert imports_pointing_up() == []


def test_an_import_pointing_up_is_caught(tmp_path):
    (tmp_path / "statelens").mkdir()
    (tmp_path / "statelens" / "x.py").write_text("def f():\n    from statelens.reports.figures import save\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "y.py").write_text("from statelens import cli\n")
    assert imports_pointing_up(tmp_path) == ["statelens/x.py: statelens.reports.figures",
                                             "statelens/x.py: statelens.reports.figures.save",
                                             "reports/y.py: statelens.cli"]
