"""docs/architecture.md, the newcomers' map, names only files and folders that exist."""
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
    assert missing("the scan in `statelens/models/ssd.py`, Mamba-3 in `statelens/models/mamba3.py`") == \
        (2, ["statelens/models/mamba3.py"])
