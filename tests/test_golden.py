"""Behaviour held still: the recorded matrix of ``tests/golden/build.py`` (every analysis on every backend,
report, compare, the tasks, post-training) gives the recorded CSVs.

Each case runs in-process with one thread, as recorded, and every CSV must have the recorded columns,
rows and non-float values exactly, and floats within the determinism tolerance the README states
(``|a - b| <= 1e-6 |b| + 1e-8``), which another CPU's float32 rounding stays within; on the machine
that recorded them they are byte-identical (``python tests/golden/build.py --check``). A change meant to
change results rerecords them (``--record``) and says so in its commit.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import build as golden  # noqa: E402

CASES = golden.matrix()


def assert_same_table(got: Path, recorded: Path) -> None:
    """``got`` equals ``recorded``: columns, rows and non-float values exactly, floats within tolerance."""
    a, b = pd.read_csv(got), pd.read_csv(recorded)
    assert list(a.columns) == list(b.columns) and len(a) == len(b), (got, list(a.columns), len(a))
    for column in b.columns:
        if pd.api.types.is_float_dtype(b[column]) or pd.api.types.is_float_dtype(a[column]):
            np.testing.assert_allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=1e-6, atol=1e-8,
                                       equal_nan=True, err_msg=f"{got}: {column}")
        else:
            assert a[column].tolist() == b[column].tolist(), (got, column)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_the_recorded_ones(case, tmp_path, monkeypatch, capsys, one_thread):
    code, _, err = run_cli(monkeypatch, capsys, *CASES[case], "--out", tmp_path)
    assert code == 0, err
    recorded = golden.CSV / case
    names = golden.csvs(recorded)
    assert names and golden.csvs(tmp_path) == names
    for name in names:
        assert_same_table(tmp_path / name, recorded / name)


def test_the_comparison_catches_a_change(tmp_path):
    """The tolerance is the README's, not looser: a relative change of 1e-5 in one value fails."""
    recorded = golden.CSV / "perplexity-mamba2" / "positionwise.csv"
    table = pd.read_csv(recorded)
    table.loc[3, "loss"] *= 1 + 1e-5
    table.to_csv(tmp_path / "positionwise.csv", index=False)
    with pytest.raises(AssertionError):
        assert_same_table(tmp_path / "positionwise.csv", recorded)
    pd.read_csv(recorded).to_csv(tmp_path / "same.csv", index=False)
    assert_same_table(tmp_path / "same.csv", recorded)
