"""``statelens demo``: the built-in checkpoints, the findings it checks, and the command end to end."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from statelens import demo
from statelens.models import load_checkpoint
from statelens.record.rollout import rollout


@pytest.mark.parametrize("folder, intervention", [(demo.BASELINE, "none"), (demo.POSTTRAINED, "state-passing")])
def test_built_in_checkpoints_load_with_their_metadata(folder, intervention):
    meta = json.loads((folder / "statelens.json").read_text())
    assert meta["intervention"] == intervention and meta["train_len"] == 64
    model = load_checkpoint(folder).model
    assert model.arch == "mamba2" and model.config.vocab_size == 256
    held = np.load(demo.HELDOUT)
    assert held.dtype == np.uint8 and held.shape[0] >= 16 and held.shape[1] >= 32 * 64
    tokens = torch.as_tensor(held[:2, :300].astype(np.int64))
    with torch.no_grad():
        one_shot, _ = model(tokens, model.zero_state(2))
    chunked = torch.cat([model.unembed(c.hidden) for c in rollout(model, tokens, chunk=37)], dim=1)
    assert torch.allclose(chunked, one_shot, atol=1e-4)


def test_post_training_changed_the_weights_by_a_fraction():
    base = load_checkpoint(demo.BASELINE).model.state_dict()
    post = load_checkpoint(demo.POSTTRAINED).model.state_dict()
    change = sum((post[k] - base[k]).norm() ** 2 for k in base) ** 0.5
    total = sum(base[k].norm() ** 2 for k in base) ** 0.5
    assert 1e-4 < change / total < 0.5


def _tables(in_context: float, beyond: float, effrem: float, oos: float, drift: float = 0.2) -> dict[str, pd.DataFrame]:
    """Tables shaped as the commands write them, with known means (train_len 64, T = 2048)."""
    positionwise = pd.DataFrame({"pos_start": [1, 33, 64, 512, 1024], "pos_end": [33, 64, 512, 1024, 2048],
                                 "loss": [in_context + 0.5, in_context - 0.5, 9.0, beyond - 1, beyond + 0.5],
                                 "n_tokens": [32, 32, 447, 512, 1024]})
    remembrance = pd.DataFrame({"t": [0, 100, 256, 700, 1024, 1500], "T": 2048,
                                "effrem": [0.0, 9.0, effrem - 0.1, effrem + 0.1, effrem, 9.0]})
    buckets = pd.DataFrame({"oos_fraction": [oos - 0.01, oos + 0.01]})
    logits_drift = pd.DataFrame({"pos_start": [65, 300, 512, 1024], "tv": [9.0, 9.0, drift - 0.05, drift + 0.05]})
    return {"positionwise": positionwise, "remembrance": remembrance, "coverage_buckets": buckets,
            "logits_drift": logits_drift}


def test_findings_against_hand_computed_margins():
    # beyond 8T = 512: (512 (b - 1) + 1024 (b + 0.5)) / 1536 = b
    base, post = _tables(2.0, 2.5, 0.3, 0.4, 0.4), _tables(2.02, 2.0, 0.1, 0.1, 0.1)
    table = demo.findings(base, post, train_len=64).set_index("finding")
    values = table.value.to_dict()
    assert values["loss beyond 8T (nats): baseline / state-passing"] == pytest.approx(1.25)
    assert values["baseline loss beyond 8T minus its in-context loss (nats)"] == pytest.approx(0.5)
    assert values["in-context loss (nats): state-passing / baseline"] == pytest.approx(1.01)
    assert values["EffRem, t in [T/8, T/2]: baseline / state-passing"] == pytest.approx(3.0)
    assert values["out-of-support fraction beyond T: baseline / state-passing"] == pytest.approx(4.0)
    assert values["logits drift beyond 8T (TV): baseline / state-passing"] == pytest.approx(4.0)  # 9.0s before 8T
    assert table.holds.all()
    worse = demo.findings(base, _tables(2.2, 2.4, 0.2, 0.3, 0.2), train_len=64).set_index("finding").holds
    assert worse.sum() == 1  # only the baseline's own gap still holds


@pytest.mark.timeout(900)  # the session's one demo run is made in this test's set-up
def test_demo_command_writes_both_runs_the_report_and_findings_that_match_its_csvs(demo_run):
    """The demo as `make demo` runs it (about 90 s on 2 cores): its outputs, its findings recomputed
    from its CSVs, and every margin of issue 5 met by the built-in checkpoints."""
    out, stdout = demo_run
    for label in ("baseline", "state-passing"):
        for csv in ("perplexity/positionwise.csv", "remembrance/remembrance.csv", "states/state_stats.csv",
                    "decay/decay.csv", "coverage/coverage_buckets.csv", "logits-drift/logits_drift.csv"):
            assert (out / label / csv).is_file()
    page = (out / "index.html").read_text()
    assert "baseline" in page and "state-passing" in page
    assert "Findings checked" in page and "&gt;= 1.15" in page and "out-of-support fraction beyond T" in page
    # the two models get different verdicts: the baseline fails within the rollout, the post-trained does not
    reach = {k: json.loads((out / k / "perplexity/run.json").read_text())["results"]["generalizes_to"]
             for k in ("baseline", "state-passing")}
    assert reach["baseline"] < 2048 == reach["state-passing"]
    assert "Fails to length-generalize" in page and "to the end of the rollout (2048 tokens, 32x T)" in page
    # the findings recomputed from the written CSVs
    table = pd.read_csv(out / "findings.csv").set_index("finding")
    loss = {label: pd.read_csv(out / label / "perplexity/positionwise.csv") for label in ("baseline", "state-passing")}
    beyond = {k: np.average(v.loss[v.pos_start >= 512], weights=v.n_tokens[v.pos_start >= 512]) for k, v in loss.items()}
    assert table.value["loss beyond 8T (nats): baseline / state-passing"] == pytest.approx(
        beyond["baseline"] / beyond["state-passing"], rel=1e-9)
    cover = {k: pd.read_csv(out / k / "coverage/coverage_buckets.csv").oos_fraction.mean() for k in loss}
    assert table.value["out-of-support fraction beyond T: baseline / state-passing"] == pytest.approx(
        cover["baseline"] / cover["state-passing"], rel=1e-9)
    drift = {k: pd.read_csv(out / k / "logits-drift/logits_drift.csv") for k in loss}
    drift = {k: v.tv[v.pos_start >= 512].mean() for k, v in drift.items()}
    assert table.value["logits drift beyond 8T (TV): baseline / state-passing"] == pytest.approx(
        drift["baseline"] / drift["state-passing"], rel=1e-9)
    regimes = {k: json.loads((out / k / "coverage/run.json").read_text())["config"]["regime"] for k in loss}
    assert regimes == {"baseline": "zero", "state-passing": "state-passing"}
    for finding, row in table.iterrows():  # every finding printed with its value and verdict
        verdict = "holds" if row.holds else "does not hold"
        assert f"{finding}: {row.value:.3f} (required {row.required}) {verdict}" in stdout
    assert table.holds.all(), table[~table.holds].value.to_dict()
