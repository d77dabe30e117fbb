"""The HTML report: one self-contained, escaped page whose numbers equal those computed from the CSVs."""
from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
import typer

from conftest import hf_mamba2
from statelens.cli import report as report_cli
from statelens.errors import BadInput
from statelens.reports.html import comparison, headline, load_results, next_step, verdicts

EVIL = "<script>alert(1)</script>\"'&"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&#39;&amp;"
SMALL = ["--train-len", "32", "--length", "128", "--num-seqs", "2", "--buckets", "8"]
FIGURES = ["perplexity", "remembrance", "state-norm", "state-std", "decay", "coverage", "logits-drift"]


def cli(*args) -> None:
    """Runs the two commands as `statelens` would (registered on a bare app: cli/main.py wires them)."""
    app = typer.Typer()
    app.command("report")(report_cli.report)
    app.command("compare")(report_cli.compare)
    app([str(a) for a in args], standalone_mode=False)


class Page(HTMLParser):
    """Every tag with its attributes, and the text of the page."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if "id" in a}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    hf_mamba2(root / "base", vocab=256, seed=0)  # vocab >= 256: text is tokenized as bytes
    hf_mamba2(root / "post", vocab=256, seed=1)
    text = root / "docs.txt"
    text.write_text(" ".join(f"word{i % 97} and some more text number {i}." for i in range(200)))
    return root / "base", root / "post", text


@pytest.fixture(scope="module")
def compared(ckpts, tmp_path_factory):
    """`statelens compare base post --label base --label EVIL` over text data: the page and its folder."""
    base, post, text = ckpts
    out = tmp_path_factory.mktemp("compare")
    cli("compare", base, post, "--label", "base", "--label", EVIL, "--data", text, *SMALL, "--out", out)
    return out, (out / "index.html").read_text(encoding="utf-8")


def folders(out: Path) -> tuple[Path, Path]:
    base, post = sorted(p for p in out.iterdir() if p.is_dir())
    return base, post


def expected_reach(pw: pd.DataFrame, train_len: int, tolerance: float = 0.1) -> int:
    """generalizes_to recomputed with pandas: a centred rolling window of 3 buckets pools loss x tokens,
    the first bucket from the training length on whose pooled loss is above the in-context loss plus
    ``tolerance`` (NaN counts as above) gives its start; none gives the last bucket's end."""
    inside = pw[pw.pos_end <= train_len]
    level = np.average(inside.loss, weights=inside.n_tokens)
    pooled = ((pw.loss * pw.n_tokens).rolling(3, center=True, min_periods=1).sum()
              / pw.n_tokens.rolling(3, center=True, min_periods=1).sum())
    pooled[(pw.loss * pw.n_tokens).rolling(3, center=True, min_periods=1).apply(
        lambda w: np.isnan(w).any(), raw=True).astype(bool)] = np.nan  # rolling sums skip NaN: we must not
    above = (pw.pos_start >= train_len) & ~(pooled <= level + tolerance)
    return int(pw.pos_start[above].iloc[0]) if above.any() else int(pw.pos_end.iloc[-1])


def expected_verdicts(folder: Path, train_len: int) -> dict:
    """The verdict numbers recomputed from the CSVs with pandas, independently of reports.html."""
    pw = pd.read_csv(folder / "perplexity" / "positionwise.csv")
    inside = pw[pw.pos_end <= train_len]
    in_context = np.average(inside.loss, weights=inside.n_tokens)
    generalizes = expected_reach(pw, train_len)
    heads = pd.read_csv(folder / "states" / "collapse.csv")
    rem = pd.read_csv(folder / "remembrance" / "remembrance.csv")
    T = int(rem["T"].iloc[0])
    half = rem.loc[(rem.t - T / 2).abs().idxmin()]
    oos = pd.read_csv(folder / "coverage" / "coverage_buckets.csv").oos_fraction.mean()
    return {"in_context": in_context, "generalizes": generalizes, "final": pw.loss.iloc[-1],
            "bucket": (int(pw.pos_start.iloc[-1]), int(pw.pos_end.iloc[-1])),
            "collapsed": int(heads.collapsed.sum()), "heads": len(heads), "half": half, "T": T, "oos": oos}


def test_page_parses_and_holds_every_section(compared):
    out, html = compared
    page = Page(html)
    ids = page.ids()
    assert {"summary", "comparison", "manifests"} | {f"fig-{f}" for f in FIGURES} <= ids
    assert sum(t == "svg" for t, _ in page.tags) == len(FIGURES) and not any(t == "img" for t, _ in page.tags)
    # every figure comes with its tables, per checkpoint (state_stats under both state figures)
    shown = ["positionwise", "remembrance", "state_stats", "collapse", "state_stats", "decay", "coverage",
             "coverage_buckets", "logits_drift"]
    assert sum(t == "table" for t, _ in page.tags) == 2 * len(shown)
    csp = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and csp[0]["content"] == "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    text = "".join(page.text)
    for command in ("remembrance", "perplexity", "states", "decay", "coverage"):
        assert f"{command}/run.json" in text
        assert (folders(out)[0] / command / "run.json").is_file()
    # the truncation note appears exactly for the tables longer than 50 rows
    long_tables = sum(len(pd.read_csv(next(folder.glob(f"*/{name}.csv")))) > 50
                      for folder in folders(out) for name in shown)
    assert long_tables > 0 and html.count("showing the first 50 of") == long_tables


def test_nothing_points_outside_the_file(compared):
    _, html = compared
    page = Page(html)
    refs = [v for _, a in page.tags for k, v in a.items()
            if k in ("src", "href", "xlink:href", "srcset", "action", "poster")]
    assert refs and all(v.startswith(("data:", "#")) for v in refs), [v[:40] for v in refs]
    anchors = {v[1:] for v in refs if v.startswith("#")}
    assert anchors <= page.ids()
    assert not any(t in ("script", "link", "iframe", "object", "embed") for t, _ in page.tags)
    assert set(re.findall(r"url\(.", html)) == {"url(#"} and "@import" not in html  # clip paths, by id


def test_labels_are_escaped(compared):
    _, html = compared
    assert "<script>alert(1)" not in html
    assert EVIL_ESCAPED in html
    assert html.count(EVIL_ESCAPED) >= 3  # title, card, comparison heading
    assert not any(t == "script" for t, _ in Page(html).tags)


def test_verdicts_equal_the_csvs(compared):
    out, html = compared
    for folder in folders(out):
        e = expected_verdicts(folder, 32)
        v = verdicts(load_results(folder), 32)
        assert v["generalizes_to"] == e["generalizes"] and v["rollout_end"] == e["bucket"][1]
        assert headline(v).split(":")[0] in html
        assert f"loss at positions [{e['bucket'][0]}, {e['bucket'][1]}): {e['final']:.4g}" in html
        assert f"collapsed heads: {e['collapsed']} of {e['heads']}" in html
        assert f"EffRem at t = {int(e['half'].t)} (T/2, T = {e['T']}): {e['half'].effrem:.4g}" in html
        assert f"out-of-support fraction beyond the training length: {e['oos']:.4g}" in html
        # the numbers the perplexity run wrote into its own manifest agree too
        manifest = load_results(folder).manifests["perplexity"]
        assert manifest["results"]["generalizes_to"] == e["generalizes"]
        assert manifest["results"]["in_context_loss"] == pytest.approx(e["in_context"], rel=1e-9)
        assert manifest["checkpoint"]["arch"] == "mamba2" and f"{manifest['checkpoint']['parameters']:,}" in html


def test_comparison_states_the_changes(compared):
    out, html = compared
    a, b = (expected_verdicts(f, 32) for f in folders(out))
    pct = (b["final"] - a["final"]) / a["final"] * 100
    expected = [f"loss at positions [{a['bucket'][0]}, {a['bucket'][1]}): {a['final']:.4g} -> {b['final']:.4g} "
                f"({pct:+.0f}%)",
                f"collapsed heads: {a['collapsed']} -> {b['collapsed']}",
                f"EffRem at T/2: {a['half'].effrem:.4g} -> {b['half'].effrem:.4g}",
                f"out-of-support beyond training length: {a['oos']:.4g} -> {b['oos']:.4g}"]
    lines = comparison(*(verdicts(load_results(f), 32) for f in folders(out)))
    for line in expected:
        assert line in lines
        assert line.replace("->", "-&gt;") in html


def test_report_from_reuses_outputs_and_recomputes_nothing(compared, tmp_path):
    out, html = compared
    base, post = folders(out)
    flat = tmp_path / "flat"  # the flat layout: the CSVs themselves in one folder
    flat.mkdir()
    for csv in post.glob("*/*.csv"):
        shutil.copy(csv, flat / csv.name)
    again = tmp_path / "again"
    cli("report", "--from", base, "--from", flat, "--label", "base", "--label", EVIL, "--train-len", "32",
        "--out", again)
    assert [p.name for p in again.iterdir()] == ["index.html"]  # nothing computed, nothing written
    second = (again / "index.html").read_text(encoding="utf-8")
    first_lines = [li for li in html.split("\n") if li.startswith("<li>")]
    assert first_lines == [li for li in second.split("\n") if li.startswith("<li>")]
    assert {f"fig-{f}" for f in FIGURES} <= Page(second).ids()


def test_report_computes_only_what_is_missing(ckpts, compared, tmp_path):
    base_ckpt, _, text = ckpts
    partial = tmp_path / "partial"
    shutil.copytree(folders(compared[0])[0] / "perplexity", partial / "perplexity")
    out = tmp_path / "one"
    cli("report", "--ckpt", base_ckpt, "--from", partial, "--label", "solo", "--data", text, *SMALL, "--out", out)
    made = out / "1-solo"
    assert not (made / "perplexity").exists()
    assert {p.name for p in made.iterdir()} == {"remembrance", "states", "decay", "coverage", "logits-drift"}
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "comparison" not in Page(html).ids()  # one checkpoint: no comparison
    assert "fig-perplexity" in Page(html).ids()   # the reused table is on the page, beside the computed ones
    # same checkpoint, data and settings: the recomputed collapse table equals the compare run's
    pd.testing.assert_frame_equal(pd.read_csv(made / "states" / "collapse.csv"),
                                  pd.read_csv(folders(compared[0])[0] / "states" / "collapse.csv"))


def test_bad_input_is_one_line(ckpts, tmp_path):
    base, post, _ = ckpts
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no tables here")
    cases = [(["report", "--ckpt", base, "--ckpt", post, "--label", "only-one"], "--label given 1 times"),
             (["report", "--from", empty], "holds none of"),
             (["report", "--from", tmp_path / "missing"], "not a directory"),
             (["compare", base, post, "--label", "x", "--label", "x"], "must differ")]
    for args, message in cases:
        with pytest.raises(BadInput) as info:
            cli(*args, "--out", tmp_path / "out")
        assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


# --- the browser test -------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")


def screenshot(page: Path, png: Path, profile: Path) -> list[str]:
    """Renders ``page`` in headless Chromium into ``png``; returns the console errors it logged about it."""
    log = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,2000",
         "--enable-logging=stderr", "--v=0", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=60).stderr
    # The page holds no script, so any console message about it is a problem (a CSP violation is logged
    # as "Refused to ..." or "... violates the following Content Security Policy ...").
    return [line for line in log.splitlines()
            if ("CONSOLE" in line and page.name in line) or "Uncaught" in line or "Refused to" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_page_renders_in_a_browser_without_errors(compared, tmp_path):
    import matplotlib.image

    out, _ = compared
    png = tmp_path / "page.png"
    errors = screenshot(out / "index.html", png, tmp_path / "profile")
    assert errors == []
    pixels = matplotlib.image.imread(png)[..., :3]
    colours = np.unique((pixels.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert pixels.shape[:2] == (2000, 1200) and len(colours) > 50

    # the check can fail: a page breaking the same policy logs errors
    bad = tmp_path / "bad.html"
    bad.write_text((out / "index.html").read_text(encoding="utf-8").replace(
        "</body>", "<script>document.title = 1</script><img src='https://example.invalid/x.png'></body>"))
    assert len(screenshot(bad, tmp_path / "bad.png", tmp_path / "profile2")) >= 2


# --- the long-context tasks (synthetic CSVs: no model run) -----------------------------------------


def task_folder(folder: Path, seed: int, *, flat: bool) -> Path:
    """Writes passkey/copying/babilong CSVs (and a passkey run.json) as the task commands lay them out,
    in their command folders or (``flat``) directly in ``folder``."""
    import json

    rng = np.random.default_rng(seed)
    lengths, depths = [256, 512, 1024, 2048], [0.0, 0.5, 1.0]
    passkey = pd.DataFrame([{"length": L, "depth": d, "accuracy": float(np.clip(1.2 - L / 2048 + rng.normal(0, .1), 0, 1)),
                             "n": 10} for L in lengths for d in depths])
    copying = pd.DataFrame({"n": [16, 32, 64, 128], "accuracy": rng.uniform(0, 1, 4), "n_samples": 8})
    babilong = pd.DataFrame([{"task": t, "length": L, "accuracy": rng.uniform(0, 1), "n": 20}
                             for t in ("qa1", "qa2") for L in (1024, 2048, 4096)])
    for name, df in (("passkey", passkey), ("copying", copying), ("babilong", babilong)):
        where = folder if flat else folder / name
        where.mkdir(parents=True, exist_ok=True)
        df.to_csv(where / f"{name}.csv", index=False)
    (folder if flat else folder / "passkey").joinpath("run.json").write_text(json.dumps(
        {"command": "passkey", "checkpoint": {"arch": "mamba2", "state_size": 999},
         "results": {"capacity": 0, "state_size": 4096 + seed}}))
    return folder


def test_task_results_make_a_section_card_lines_and_comparison(tmp_path):
    from statelens.reports.html import render
    from statelens.tasks.passkey import capacity

    base, post = task_folder(tmp_path / "base", 0, flat=False), task_folder(tmp_path / "post", 1, flat=True)
    results = [load_results(base), load_results(post)]
    html = render(results, ["base", "post"], [1024, 1024])
    page = Page(html)
    assert {"tasks", "task-passkey", "task-copying", "task-babilong"} <= page.ids()
    assert "Long-context tasks" in "".join(page.text)
    assert sum(t == "svg" for t, _ in page.tags) == 3 and sum(t == "table" for t, _ in page.tags) == 6
    frames = {}
    for folder, seed, flat in ((base, 0, False), (post, 1, True)):
        read = {name: pd.read_csv(folder / (f"{name}.csv" if flat else f"{name}/{name}.csv"))
                for name in ("passkey", "copying", "babilong")}
        frames[seed] = read
        assert f"passkey capacity: {capacity(read['passkey'])} tokens (state size {4096 + seed} numbers)" in html
    a, b = frames[0], frames[1]
    n = max(set(a["copying"].n) & set(b["copying"].n))
    acc = [f["copying"].set_index("n").accuracy[n] for f in (a, b)]
    qa1 = [f["babilong"].query("task == 'qa1' and length == 4096").accuracy.iloc[0] for f in (a, b)]
    expected = [f"passkey capacity: {capacity(a['passkey'])} -> {capacity(b['passkey'])}",
                f"copying accuracy at n={n}: {acc[0]:.4g} -> {acc[1]:.4g}",
                f"BABILong qa1 at 4096: {qa1[0]:.4g} -> {qa1[1]:.4g}"]
    lines = comparison(*(verdicts(r, 1024) for r in results))
    for line in expected:
        assert line in lines and line.replace("->", "-&gt;") in html
    # one checkpoint: the section still shows, with no comparison
    solo = Page(render(results[:1], ["base"], [1024]))
    assert "task-passkey" in solo.ids() and "comparison" not in solo.ids()


def test_no_task_results_no_tasks_section(compared):
    _, html = compared
    assert not {"tasks", "task-passkey"} & Page(html).ids()
    assert "Long-context tasks" not in html and "passkey capacity" not in html


def test_different_vocabularies_are_compared_where_comparable():
    """Losses over different vocabularies are per token of different tokenizations: shown, not compared."""
    from statelens.reports.html import Results, comparison, notes, render, verdicts

    def results(vocab: int, loss: float, oos: float) -> Results:
        return Results(
            tables={"positionwise": pd.DataFrame({"pos_start": [1, 64], "pos_end": [64, 256], "loss": [loss, loss + 1],
                                                  "ppl": np.exp([loss, loss + 1]), "n_tokens": [63, 192]}),
                    "coverage_buckets": pd.DataFrame({"pos_start": [65], "pos_end": [257], "oos_fraction": [oos],
                                                      "loss": [loss], "loss_increase": [0.0]})},
            manifests={"perplexity": {"checkpoint": {"vocab_size": vocab, "arch": "mamba2"}, "train_len": 64}})

    a, b = results(64, 3.0, 0.5), results(256, 2.0, 0.1)
    va, vb = verdicts(a, 64), verdicts(b, 64)
    lines = comparison(va, vb)
    assert not any(line.startswith(("loss at", "in-context loss")) for line in lines)
    assert "out-of-support beyond training length: 0.5 -> 0.1" in lines
    same = comparison(va, verdicts(results(64, 2.0, 0.1), 64))
    assert any(line.startswith("loss at positions [64, 256): 4 -> 3 (-25%)") for line in same), same
    said = notes([a, b], [va, vb], ["a", "b"])
    assert any("vocabularies differ (64 vs 256 ids)" in n for n in said)
    assert any(n.startswith("a: no remembrance.csv") for n in said)  # what is absent is named
    page = render([a, b], ["a", "b"], [64, 64])
    assert "vocabularies differ (64 vs 256 ids)" in page


# --- hostile strings: labels, paths, manifest and table values ---------------------------------------

HOSTILE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "'; background:url(https://evil.example/x)",
           "</textarea><iframe src=//evil.example>", "$\\frac{1}{$ <b>", "javascript:alert(1)",
           "</pre><a href=\"http://evil.example\">x</a>"]
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "nav", "a", "section", "div",
                "dl", "dt", "dd", "ul", "li", "img", "details", "summary", "table", "thead", "tbody", "tr", "th", "td",
                "p", "pre", "code",
                # the figures' inline SVG
                "svg", "defs", "g", "path", "text", "tspan", "clippath", "use", "image", "rect", "circle"}


def hostile_folder(src: Path, dest: Path) -> Path:
    """A copy of one checkpoint's command folders with hostile strings in every run.json field a page
    shows (checkpoint path and architecture, data, config) and in a table's text column."""
    shutil.copytree(src, dest)
    for i, manifest_path in enumerate(sorted(dest.glob("*/run.json"))):
        import json

        manifest = json.loads(manifest_path.read_text())
        manifest["checkpoint"] |= {"path": HOSTILE[i % len(HOSTILE)], "arch": HOSTILE[1]}
        manifest["data"] = HOSTILE[3]
        manifest["config"]["data"] = HOSTILE[6]
        manifest_path.write_text(json.dumps(manifest))
    collapse = pd.read_csv(dest / "states" / "collapse.csv")
    collapse["statistic"] = HOSTILE[4]
    collapse.to_csv(dest / "states" / "collapse.csv", index=False)
    return dest


def test_hostile_labels_paths_and_values_stay_text(compared, tmp_path):
    """Every hostile string shows as text (the parsed page's text holds it verbatim), none becomes
    markup (only the template's own tags, no event-handler attribute, nothing loaded from outside),
    and the Content-Security-Policy is there. The second checkpoint's label is its folder's name."""
    base = hostile_folder(folders(compared[0])[0], tmp_path / "base")
    named = hostile_folder(folders(compared[0])[1], tmp_path / HOSTILE[1].replace("/", "_"))
    labels = [HOSTILE[0] + HOSTILE[2]]
    out = tmp_path / "out"
    cli("report", "--from", base, "--from", named, "--label", labels[0], "--label", HOSTILE[4] + HOSTILE[3],
        "--train-len", "32", "--out", out)
    cli("report", "--from", named, "--train-len", "32", "--out", tmp_path / "default-label")
    for page_path in (out / "index.html", tmp_path / "default-label" / "index.html"):
        html = page_path.read_text(encoding="utf-8")
        page = Page(html)
        assert {t for t, _ in page.tags} <= ALLOWED_TAGS, {t for t, _ in page.tags} - ALLOWED_TAGS
        assert not [k for _, a in page.tags for k in a if k.startswith("on")]
        refs = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href", "xlink:href")]
        assert refs and all(v.startswith(("data:image/png;base64,", "#")) for v in refs)
        assert sum(t == "svg" for t, _ in page.tags) == len(FIGURES)
        assert "http:" not in "".join(refs) and "//" not in "".join(v for v in refs if v.startswith("#"))
        csp = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
        assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
        text = "".join(page.text)
        for raw in ("<script", "<img src=x", "<iframe", "</textarea>", "<b>", "<a href=\"http"):
            assert raw not in html
        style = html[html.index("<style>"):html.index("</style>")]
        assert "url(" not in style and "evil" not in style
    html = (out / "index.html").read_text(encoding="utf-8")
    text = "".join(Page(html).text)
    for shown in (labels[0], HOSTILE[4] + HOSTILE[3], HOSTILE[1]):  # labels as given and as a folder name
        assert shown in text
    assert HOSTILE[1] in "".join(Page((tmp_path / "default-label" / "index.html").read_text()).text)
    assert f"{HOSTILE[4]} x" in text        # the hostile statistic of collapse.csv, in the card's top heads


# --- the headline verdict (hand-made tables) --------------------------------------------------------


def positionwise_table(losses: list[float]) -> pd.DataFrame:
    """Buckets [1, 2), [2, 4), ..., [1024, 2048) (one per loss) with 16 sequences each."""
    edges = [1] + [2 ** k for k in range(1, len(losses) + 1)]
    starts, ends = np.array(edges[:-1]), np.array(edges[1:])
    return pd.DataFrame({"pos_start": starts, "pos_end": ends, "loss": losses, "ppl": np.exp(losses),
                         "n_tokens": 16 * (ends - starts)})


def test_generalizes_to_is_measured_from_the_training_length_on():
    from statelens.analysis.positionwise import generalizes_to

    # T = 64: buckets ending by 64 are the first 6 ([1, 2) .. [32, 64)); the in-context level is their
    # token-weighted mean. The first buckets sit far above it, as in any model: that decides nothing.
    flat = [6.0, 4.0, 3.0, 2.2, 2.0, 2.0, 2.05, 2.0, 2.04, 2.0, 2.0]
    level = np.average(flat[:6], weights=[1, 2, 4, 8, 16, 32])
    assert level + 0.1 > 2.05  # every pooled loss past T stays within the tolerance
    assert generalizes_to(positionwise_table(flat), 64) == 2048 == expected_reach(positionwise_table(flat), 64)
    # a rise of the loss from [256, 512) on. The level is 139.6 / 63 = 2.216 (the early buckets weigh in);
    # the pooled window of [128, 256), (2.05 x 64 + 2.0 x 128 + 2.5 x 256) / 448 = 2.293, stays within
    # level + 0.1 = 2.316, that of [256, 512) is 2.43: the reach is 256
    rising = flat[:8] + [2.5, 2.5, 2.5]
    assert generalizes_to(positionwise_table(rising), 64) == 256 == expected_reach(positionwise_table(rising), 64)
    # one noisy small bucket past T is pooled away: +0.25 over 64 of 448 tokens adds 0.036
    spike = flat[:6] + [2.25] + flat[7:]
    assert generalizes_to(positionwise_table(spike), 64) == 2048
    # a non-finite loss is a failure, never "within"
    broken = flat[:9] + [np.nan, 2.0]
    assert generalizes_to(positionwise_table(broken), 64) == 256 == expected_reach(positionwise_table(broken), 64)
    assert generalizes_to(positionwise_table(flat), 1) is None  # no bucket ends by T: no level to compare with


def test_headline_says_whether_it_generalizes_with_numbers_and_what_next():
    from statelens.reports.html import Results

    def card(losses):
        results = Results(tables={"positionwise": positionwise_table(losses),
                                  "collapse": pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                                                            "collapsed": [True, False, True, True],
                                                            "statistic": "norm", "ratio": 3.0})},
                          manifests={"perplexity": {"checkpoint": {"path": "ckpts/base"}, "train_len": 64}})
        v = verdicts(results, 64)
        return v, headline(v), next_step(v)

    flat = [6.0, 4.0, 3.0, 2.2, 2.0, 2.0, 2.05, 2.0, 2.04, 2.0, 2.0]
    v, line, step = card(flat)
    assert line == ("Length-generalizes to the end of the rollout (2048 tokens, 32x T): loss within 0.1 nats of its "
                    "in-context level; 3 of 4 heads collapse.")
    assert step is None
    v, line, step = card(flat[:8] + [2.5, 2.5, 2.5])
    level = np.average(flat[:6], weights=[1, 2, 4, 8, 16, 32])
    after = 2.5  # the mean loss from 256 on
    assert v["excess_beyond"] == pytest.approx(after - level)
    assert line == (f"Fails to length-generalize: loss rises {after - level:.2f} nats above its in-context level "
                    f"({level:.2f}) from ~256 tokens (4x T) on; 3 of 4 heads collapse.")
    assert step.startswith("statelens posttrain --ckpt ckpts/base --intervention state-passing")
    assert "statelens compare ckpts/base POST" in step


# --- the visual check: every figure as a reader sees it, on the compare run's outputs ----------------


def figure_problems(fig) -> list[str]:
    """Everything :mod:`visual_check` finds wrong with ``fig``, drawn and as SVG."""
    from visual_check import layout_problems, render_svg, svg_safety_problems, svg_text_problems

    svg = render_svg(fig)
    return layout_problems(fig) + svg_text_problems(svg) + svg_safety_problems(svg)


def standalone_figures(folder: Path, train_len: int, label: str, scratch: Path) -> dict:
    """Every figure function of statelens.reports.figures on one checkpoint's CSVs, as the commands call
    them. The scatter's points and the task tables (written under ``scratch``) are synthetic: the compare
    run writes neither."""
    from statelens.reports import figures as F

    def table(command, name):
        return pd.read_csv(folder / command / f"{name}.csv")

    stats = table("states", "state_stats")
    rng = np.random.default_rng(0)
    positions = np.repeat(np.arange(4, 129, 4), 8)
    points = pd.DataFrame({"pc1": rng.normal(size=positions.size), "pc2": rng.normal(size=positions.size),
                           "position": positions, "set": np.where(positions <= train_len, "reference", "query")})
    tasks = task_folder(scratch / folder.name, 0, flat=True)
    return {
        "perplexity": F.perplexity_figure(table("perplexity", "positionwise"), train_len, label=label),
        "remembrance": F.remembrance_figure(table("remembrance", "remembrance"), label=label),
        "state_norm": F.state_norm_figure(stats, table("states", "collapse"), train_len, label=label),
        "state_std": F.state_std_figure(stats, train_len, label=label),
        "decay": F.decay_figure(table("decay", "decay"), train_len, label=label),
        "coverage": F.coverage_figure(table("coverage", "coverage"), train_len, label=label),
        "coverage_scatter": F.coverage_scatter_figure(points, label=label),
        "passkey": F.passkey_figure(pd.read_csv(tasks / "passkey.csv"), train_len, label=label),
        "accuracy": F.accuracy_figure(pd.read_csv(tasks / "babilong.csv"), "length", label=label),
    }


def test_every_figure_function_reads_right_on_real_outputs(compared, tmp_path):
    """Texts inside the figure, no two tick labels overlapping, no raw mathtext in the SVG's text, no
    script or outside reference: for each figure function on both checkpoints' CSVs."""
    out, _ = compared
    for folder, label in zip(folders(out), ("base", EVIL)):
        figures = standalone_figures(folder, 32, label, tmp_path)
        assert len(figures) == 9
        for name, fig in figures.items():
            assert figure_problems(fig) == [], name


def test_the_reports_figures_read_right(compared, tmp_path):
    """The same checks on the figures as the page lays them out: both checkpoints overlaid, the state
    norm heatmaps side by side over the shared collapsed-heads panel, and the task figures."""
    from statelens.reports.page_figures import report_figures, task_figures

    out, _ = compared
    results = [load_results(f) for f in folders(out)]
    shown = report_figures(results, ["base", EVIL], [32, 32])
    assert [f["id"] for f in shown] == FIGURES
    tasks = [load_results(task_folder(tmp_path / name, seed, flat=False)) for seed, name in enumerate("ab")]
    shown += task_figures(tasks, ["base", EVIL], [1024, 1024])
    for f in shown:
        assert figure_problems(f["figure"]) == [], f["id"]


def test_the_visual_check_can_fail():
    """Each check finds the defect it is for, on figures made to have it."""
    from matplotlib.figure import Figure

    from visual_check import layout_problems, render_svg, svg_safety_problems, svg_text_problems

    fig = Figure(figsize=(3, 2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title("a title far too long for a figure three inches wide, so it is cut on both sides")
    ax.set_xticks(range(6), [f"label number {i}" for i in range(6)])
    problems = layout_problems(fig)
    assert any("sticks out" in p and "a title far" in p for p in problems)
    assert any("x tick labels" in p and "overlap" in p for p in problems)
    with mpl.rc_context({"text.parse_math": False}):  # as the report drew its figures before
        raw = Figure()
        raw.add_subplot().set_xscale("log")
        raw.axes[0].set_xlim(1, 1000)
        assert any("\\mathdefault" in p for p in svg_text_problems(render_svg(raw)))
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
           '<script>alert(1)</script><g onmouseover="x()"><image xlink:href="https://evil.example/x.png"/>'
           '<path clip-path="url(https://evil.example/#p)"/></g></svg>')
    assert len(svg_safety_problems(svg)) == 4


# --- the inline SVG: searchable text, hover values, sanitized ---------------------------------------


def section_svg(html: str, section: str):
    """The parsed ``<svg>`` of the page's ``section`` (the SVG is well-formed XML inside the HTML)."""
    import xml.etree.ElementTree as ET

    start = html.index(f'<section id="{section}"')
    begin = html.index("<svg", start)
    return ET.fromstring(html[begin:html.index("</svg>", begin) + len("</svg>")])


def test_figures_are_inline_svg_with_text_and_a_hover_title_per_point(compared):
    from visual_check import SVG, svg_safety_problems

    out, html = compared
    svg = section_svg(html, "fig-perplexity")
    texts = ["".join(t.itertext()) for t in svg.iter(f"{SVG}text")]
    assert "Position-wise perplexity" in texts and "training length (32 tokens)" in texts  # text, not paths
    pw = pd.read_csv(folders(out)[0] / "perplexity" / "positionwise.csv")
    pw = pw[pw.n_tokens > 0]
    assert pw.pos_end.max() < 1000  # below 1000 a hover value has 4 significant digits
    expected = [f"base: perplexity\nposition in the context, bucket midpoint (tokens): {(s + e) / 2:.4g}\n"
                f"perplexity (exp of mean cross-entropy): {p:.4g}" for s, e, p in zip(pw.pos_start, pw.pos_end, pw.ppl)]
    circles = {c.find(f"{SVG}title").text: (float(c.get("cx")), float(c.get("cy"))) for c in svg.iter(f"{SVG}circle")}
    assert set(expected) <= set(circles)
    # each circle sits on its point: the line's own path (drawn by matplotlib) passes through every one
    (group,) = [g for g in svg.iter(f"{SVG}g") if (g.find(f"{SVG}title") is not None
                                                    and g.find(f"{SVG}title").text == "base: perplexity")]
    numbers = [float(v) for v in re.findall(r"-?\d+\.?\d*", group.find(f"{SVG}path").get("d"))]
    vertices = np.array(numbers).reshape(-1, 2)
    centres = np.array([circles[t] for t in expected])
    assert len(vertices) == len(centres)
    np.testing.assert_allclose(vertices, centres, atol=0.01)
    for section in [f"fig-{f}" for f in FIGURES]:
        assert svg_safety_problems(section_svg(html, section)) == [], section


def test_svg_is_sanitized_and_a_large_one_falls_back_to_png(compared, monkeypatch):
    import xml.etree.ElementTree as ET

    from matplotlib.figure import Figure

    from statelens.reports import svg as S
    from visual_check import render_svg, svg_safety_problems

    fig = Figure()
    ax = fig.add_subplot()
    (line,) = ax.plot([1, 2], [3, 4], gid="onload")
    line.set_url("javascript:alert(1)")  # matplotlib wraps the line in <a xlink:href="javascript:...">
    ax.set_title(EVIL)
    assert svg_safety_problems(render_svg(fig))  # what matplotlib writes has an outside reference
    inline = S.inline_svg(fig, "x", "a title")
    assert svg_safety_problems(inline) == []
    assert EVIL in ["".join(t.itertext()) for t in ET.fromstring(inline).iter("{http://www.w3.org/2000/svg}text")]
    assert "<script" not in inline and "javascript:" not in inline

    from statelens.reports.html import render

    monkeypatch.setattr(S, "MAX_CHARS", 30_000)  # every figure but the smallest is "too large"
    page = render([load_results(f) for f in folders(compared[0])], ["base", "post"], [32, 32])
    svgs, pngs = page.count("<svg"), page.count('src="data:image/png;base64,')
    assert svgs + pngs == len(FIGURES) and pngs >= 4
    assert page.count("shown as a PNG: as SVG this figure would exceed 2 MB") == pngs
