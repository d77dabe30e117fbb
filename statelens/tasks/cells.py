"""The command-line forms of the tasks' grids: context lengths ("1024,4k") and key depths ("0.1,0.5")."""
from __future__ import annotations

from statelens.errors import BadInput


def parse_lengths(text: str, *, minimum: int = 1) -> list[int]:
    """"1024,4k" -> [1024, 4096]; BadInput naming --lengths otherwise."""
    lengths = []
    for item in (part.strip() for part in text.split(",")):
        scale = 1024 if item.lower().endswith("k") else 1
        digits = item[:-1] if scale > 1 else item
        if not digits.isdigit() or int(digits) * scale < minimum:
            raise BadInput(f"--lengths: {item!r} is not an integer >= {minimum} (e.g. --lengths 1024,2048,4096)")
        lengths.append(int(digits) * scale)
    return lengths


def parse_depths(text: str) -> list[float]:
    """"0.1,0.5" -> [0.1, 0.5]; BadInput naming --depths otherwise (the range is checked by the task)."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInput(f"--depths: {text!r} is not a comma-separated list of numbers (e.g. 0.1,0.5,0.9)") from None
