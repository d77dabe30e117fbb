"""The HTML report: one self-contained file per run, for one checkpoint or two side by side.

Start with :func:`render`. The pieces, all pure except :func:`write_report`::

    results = load_results("runs/")          # the CSVs and run.json files the commands wrote
    v = verdicts(results, train_len=2048)     # the headline numbers of one checkpoint
    headline(v), next_step(v)                 # the card's first sentence, and the command a failure calls for
    lines = comparison(v_base, v_post)        # the differences of two checkpoints, in words
    html = render([base, post], ["base", "post"])
    write_report(html, "report/")             # report/index.html, written atomically

The page holds no external reference: figures are inline SVG (:mod:`statelens.reports.svg`, sanitized)
or, above 2 MB, PNG ``data:`` URIs; the CSS is inline, and a Content-Security-Policy meta tag forbids
everything else. Every other string shown goes through jinja2's autoescaping (the template is
``templates/report.html.j2``). The report only assembles DataFrames and the figures of
:mod:`statelens.reports.page_figures`; it computes nothing but the verdict numbers.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from statelens.analysis import table_owners, watched
from statelens.analysis.nonfinite import describe, find_nonfinite
from statelens.analysis.positionwise import TOLERANCE_NATS, generalizes_to, in_context_loss
from statelens.errors import BadInput, ParameterError
from statelens.outputs import atomic_write
from statelens.reports.page_figures import PANEL, monitor_figures, report_figures, task_figures
from statelens.tasks import tasks

#: Table name -> the command that writes it (its output folder under a ``--from`` directory): every
#: registered analysis' tables (statelens.analysis.table_owners).
TABLES = table_owners()
#: The long-context task tables (``statelens passkey|copying|babilong``): name -> the command's folder.
TASK_TABLES = table_owners(tasks)
#: Rows of a table shown in the page; the rest is in the CSV.
MAX_ROWS = 50
#: Collapsed heads named in a summary card.
TOP_HEADS = 5


@dataclass
class Results:
    """One checkpoint's outputs: tables by name (keys of :data:`TABLES`; missing ones absent) and the
    run manifests (run.json) by command."""

    folder: Path | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    manifests: dict[str, dict] = field(default_factory=dict)

    @property
    def checkpoint(self) -> dict:
        """The ``checkpoint`` entry of the first manifest that has one ({} if none)."""
        return next((m["checkpoint"] for m in self.manifests.values() if isinstance(m.get("checkpoint"), dict)), {})

    @property
    def train_len(self) -> int | None:
        return next((int(m["train_len"]) for m in self.manifests.values() if m.get("train_len")), None)


def load_results(folder: str | Path) -> Results:
    """Reads the outputs of one checkpoint from ``folder``: either the command folders (``folder/perplexity/
    positionwise.csv``, ...) or the files themselves (``folder/positionwise.csv``). Missing pieces are
    allowed; a folder holding none of the known CSVs raises :class:`BadInput`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"--from {folder}: not a directory")
    results = Results(folder=folder)
    for name, command in {**TABLES, **TASK_TABLES}.items():
        for path in (folder / command / f"{name}.csv", folder / f"{name}.csv"):
            if path.is_file():
                results.tables[name] = _read_csv(folder, path)
                break
    _load_monitor(folder, results)
    if not results.tables:
        raise BadInput(f"--from {folder}: holds none of {', '.join(f'{n}.csv' for n in {**TABLES, **TASK_TABLES})} "
                       "(directly or in a command's folder)")
    for path in [folder / "run.json", *sorted(folder.glob("*/run.json"))]:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a manifest is context, not data: an unreadable one is left out
        if isinstance(manifest, dict):
            results.manifests.setdefault(str(manifest.get("command", path.parent.name)), manifest)
    return results


def _load_monitor(folder: Path, results: Results) -> None:
    """``monitor.csv`` of ``statelens posttrain --monitor-every`` (in ``folder`` or its ``posttrain/``), as
    the table ``monitor``."""
    for path in (folder / "monitor.csv", folder / "posttrain" / "monitor.csv"):
        if path.is_file():
            results.tables["monitor"] = _read_csv(folder, path)
            return


def _read_csv(folder: Path, path: Path) -> pd.DataFrame:
    """``path`` read; one that is not a CSV is BadInput naming it."""
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise BadInput(f"--from {folder}: {path.name} is not a readable CSV ({e})") from None


# --- verdicts ---------------------------------------------------------------------------------------


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def verdicts(results: Results, train_len: int) -> dict:
    """The headline numbers of one checkpoint; a key is None when its table is missing.

    Keys: arch, parameters, state_size, train_len, checkpoint_path; in_context_loss, generalizes_to
    (tokens, :func:`statelens.analysis.positionwise.generalizes_to`), rollout_end (the last bucket's
    end), excess_beyond (mean loss from generalizes_to on minus the in-context loss, nats; None when
    it generalizes to the end), final_bucket ``(pos_start, pos_end)`` and final_loss (the last
    position bucket); collapsed_heads, heads, top_heads (up to 5 dicts layer, head, statistic, ratio);
    effrem_half ``{"t", "T", "effrem"}`` (the t nearest T // 2); oos_beyond (mean of
    coverage_buckets.oos_fraction: the buckets all lie past the training length); passkey_capacity
    (:func:`statelens.tasks.passkey.capacity`) and passkey_state_size (the passkey manifest's, else the
    checkpoint's); copying ``{n: accuracy}`` and babilong ``{task: {length: accuracy}}`` (means over rows);
    nonfinite ``{table: its first row with inf/NaN}`` (:func:`statelens.analysis.nonfinite.find_nonfinite`).
    """
    ckpt = results.checkpoint
    out = {"arch": ckpt.get("arch"), "parameters": ckpt.get("parameters"), "state_size": ckpt.get("state_size"),
           "vocab_size": ckpt.get("vocab_size"),
           "checkpoint_path": ckpt.get("path"), "train_len": train_len, "in_context_loss": None,
           "generalizes_to": None, "rollout_end": None, "excess_beyond": None, "final_bucket": None,
           "final_loss": None, "collapsed_heads": None, "heads": None, "top_heads": [], "effrem_half": None,
           "oos_beyond": None, "passkey_capacity": None, "passkey_state_size": None, "copying": None,
           "babilong": None, "nonfinite": find_nonfinite(results.tables, watched())}
    pk = results.tables.get("passkey")
    if pk is not None and len(pk):
        from statelens.tasks.passkey import capacity

        out["passkey_capacity"] = capacity(pk)
        found = results.manifests.get("passkey", {}).get("results") or {}
        size = found.get("state_size") if isinstance(found, dict) else None
        out["passkey_state_size"] = size if size is not None else ckpt.get("state_size")
    cp = results.tables.get("copying")
    if cp is not None and len(cp):
        out["copying"] = {int(n): float(a) for n, a in cp.groupby("n")["accuracy"].mean().items()}
    bl = results.tables.get("babilong")
    if bl is not None and len(bl):
        out["babilong"] = {str(task): {int(length): float(a) for length, a in rows.groupby("length")["accuracy"].mean().items()}
                           for task, rows in bl.groupby("task")}
    pw = results.tables.get("positionwise")
    if pw is not None and len(pw):
        pw = pw.sort_values("pos_start")
        loss = in_context_loss(pw, train_len)
        out["in_context_loss"] = _finite(loss)
        out["generalizes_to"] = reach = generalizes_to(pw, train_len)
        last = pw.iloc[-1]
        out["rollout_end"] = int(last.pos_end)
        if reach is not None and reach < out["rollout_end"]:
            after = pw[pw.pos_start >= reach]
            out["excess_beyond"] = _finite(np.average(after.loss, weights=after.n_tokens) - loss)
        out["final_bucket"] = (int(last.pos_start), int(last.pos_end))
        out["final_loss"] = _finite(last.loss)
    heads = results.tables.get("collapse")
    if heads is not None:
        flagged = heads[heads.collapsed.astype(str).str.lower() == "true"]
        out["collapsed_heads"], out["heads"] = len(flagged), len(heads)
        out["top_heads"] = [{"layer": int(r.layer), "head": int(r.head), "statistic": str(r.statistic),
                             "ratio": float(r.ratio)} for r in flagged.head(TOP_HEADS).itertuples()]
    rem = results.tables.get("remembrance")
    if rem is not None and len(rem):
        T = int(rem["T"].max())
        rows = rem[rem["T"] == T]
        half = rows.iloc[int((rows.t - T // 2).abs().to_numpy().argmin())]
        out["effrem_half"] = {"t": int(half.t), "T": T, "effrem": float(half.effrem)}
    buckets = results.tables.get("coverage_buckets")
    if buckets is not None and len(buckets):
        out["oos_beyond"] = _finite(buckets.oos_fraction.mean())
    return out


def _num(x: float | None) -> str:
    """A number as the report prints it: 4 significant digits."""
    return "n/a" if x is None else f"{x:.4g}"


def _tokens(n: int) -> str:
    """A token count as a researcher writes it: 790, 2048, 16.4k, 131k, 1.5M."""
    for size, suffix in ((1_000_000, "M"), (1000, "k")):
        if n >= 10 * size or (size > 1000 and n >= size):
            return f"{n / size:.3g}" + suffix
    return str(n)


def _times(n: int, train_len: int) -> str:
    """``n`` in training lengths: "12x T", "1.5x T"."""
    ratio = n / train_len
    return f"{ratio:.0f}x T" if ratio >= 10 else f"{ratio:.1f}".removesuffix(".0") + "x T"


def headline(v: dict) -> str | None:
    """The card's first sentence: whether the checkpoint length-generalizes, with the numbers behind
    it (the position and the loss rise, collapsed heads, EffRem at T/2); None without positionwise.csv."""
    reach, end = v["generalizes_to"], v["rollout_end"]
    if reach is None:
        return None
    if reach < end:
        rise = "" if v["excess_beyond"] is None else f"loss rises {v['excess_beyond']:.2f} nats above"
        sentence = (f"Fails to length-generalize: {rise or 'loss rises past'} its in-context level "
                    f"({v['in_context_loss']:.2f}) from ~{_tokens(reach)} tokens ({_times(reach, v['train_len'])}) on")
    else:
        sentence = (f"Length-generalizes to the end of the rollout ({_tokens(end)} tokens, "
                    f"{_times(end, v['train_len'])}): loss within {TOLERANCE_NATS} nats of its in-context level")
    if v["collapsed_heads"] is not None:
        sentence += f"; {v['collapsed_heads']} of {v['heads']} heads collapse{'s' if v['collapsed_heads'] == 1 else ''}"
    if v["effrem_half"] is not None:
        sentence += f"; EffRem(T/2) {v['effrem_half']['effrem']:.2g}"
    return sentence + "."


def next_step(v: dict) -> str | None:
    """The command that would address a length-generalization failure (None when there is none)."""
    reach, end = v["generalizes_to"], v["rollout_end"]
    if reach is None or reach >= end:
        return None
    ckpt = v.get("checkpoint_path") or "CKPT"
    return (f"statelens posttrain --ckpt {ckpt} --intervention state-passing --data DATA --out POST "
            f"(about 500 steps from carried states), then statelens compare {ckpt} POST")


def verdict_lines(v: dict) -> list[str]:
    """The verdicts of one checkpoint as sentences."""
    lines = []
    if v["final_loss"] is not None:
        start, end = v["final_bucket"]
        lines.append(f"loss at positions [{start}, {end}): {_num(v['final_loss'])}")
    if v["collapsed_heads"] is not None:
        top = ", ".join(f"L{h['layer']}H{h['head']} ({h['statistic']} x {_num(h['ratio'])})" for h in v["top_heads"])
        lines.append(f"collapsed heads: {v['collapsed_heads']} of {v['heads']}" + (f"; top: {top}" if top else ""))
    if v["effrem_half"] is not None:
        e = v["effrem_half"]
        lines.append(f"EffRem at t = {e['t']} (T/2, T = {e['T']}): {_num(e['effrem'])}")
    if v["oos_beyond"] is not None:
        lines.append(f"out-of-support fraction beyond the training length: {_num(v['oos_beyond'])}")
    lines += [describe(name, found) for name, found in (v.get("nonfinite") or {}).items()]
    if v.get("passkey_capacity") is not None:
        size = v["passkey_state_size"]
        lines.append(f"passkey capacity: {v['passkey_capacity']} tokens (state size "
                     f"{'n/a' if size is None else size} numbers)")
    return lines


def _change(a: float | None, b: float | None) -> str:
    text = f"{_num(a)} -> {_num(b)}"
    if a is not None and b is not None and a != 0:
        text += f" ({(b - a) / abs(a) * 100:+.0f}%)"
    return text


def comparison(a: dict, b: dict) -> list[str]:
    """The differences between two checkpoints' :func:`verdicts`, in words with numbers, e.g.
    ``"loss at positions [8192, 16384): 3.91 -> 2.12 (-46%)"``. Only what both have is compared."""
    lines = []
    if not losses_comparable(a, b):  # per token of different tokenizations: not comparable
        a, b = ({**v, "final_loss": None, "in_context_loss": None} for v in (a, b))
    if a["final_loss"] is not None and b["final_loss"] is not None:
        where = (f"positions [{a['final_bucket'][0]}, {a['final_bucket'][1]})" if a["final_bucket"] == b["final_bucket"]
                 else f"the last bucket ([{a['final_bucket'][0]}, {a['final_bucket'][1]}) vs "
                      f"[{b['final_bucket'][0]}, {b['final_bucket'][1]}))")
        lines.append(f"loss at {where}: {_change(a['final_loss'], b['final_loss'])}")
    if a["in_context_loss"] is not None and b["in_context_loss"] is not None:
        lines.append(f"in-context loss: {_change(a['in_context_loss'], b['in_context_loss'])}")
    if a["generalizes_to"] is not None and b["generalizes_to"] is not None:
        lines.append(f"length-generalizes to: {_tokens(a['generalizes_to'])} -> {_tokens(b['generalizes_to'])} "
                     "tokens" + (" (the end of the rollout)" if b["generalizes_to"] == b["rollout_end"] else ""))
    if a["collapsed_heads"] is not None and b["collapsed_heads"] is not None:
        lines.append(f"collapsed heads: {a['collapsed_heads']} -> {b['collapsed_heads']}")
    if a["effrem_half"] is not None and b["effrem_half"] is not None:
        lines.append(f"EffRem at T/2: {_num(a['effrem_half']['effrem'])} -> {_num(b['effrem_half']['effrem'])}")
    if a["oos_beyond"] is not None and b["oos_beyond"] is not None:
        lines.append(f"out-of-support beyond training length: {_num(a['oos_beyond'])} -> {_num(b['oos_beyond'])}")
    if a.get("passkey_capacity") is not None and b.get("passkey_capacity") is not None:
        lines.append(f"passkey capacity: {a['passkey_capacity']} -> {b['passkey_capacity']}")
    if a.get("copying") and b.get("copying"):
        common = set(a["copying"]) & set(b["copying"])
        if common:
            n = max(common)
            lines.append(f"copying accuracy at n={n}: {_num(a['copying'][n])} -> {_num(b['copying'][n])}")
    if a.get("babilong") and b.get("babilong"):
        for task in sorted(set(a["babilong"]) & set(b["babilong"])):
            common = set(a["babilong"][task]) & set(b["babilong"][task])
            if common:
                length = max(common)
                lines.append(f"BABILong {task} at {length}: {_num(a['babilong'][task][length])} -> "
                             f"{_num(b['babilong'][task][length])}")
    return lines


def losses_comparable(a: dict, b: dict) -> bool:
    """Losses are per token: two checkpoints' losses compare only over the same vocabulary."""
    return a.get("vocab_size") is None or b.get("vocab_size") is None or a["vocab_size"] == b["vocab_size"]


def notes(results_list: list[Results], verdict_list: list[dict], labels: list[str]) -> list[str]:
    """What the page does not show or compare, and why: missing analyses, different vocabularies."""
    out = []
    for r, lab in zip(results_list, labels):
        absent = [f"{name}.csv" for name in TABLES if name not in r.tables]
        if absent:
            where = f" in {r.folder}" if r.folder else ""
            out.append(f"{lab}: no {', '.join(absent)}{where}; those sections show what the other results hold")
    if len(verdict_list) == 2 and not losses_comparable(*verdict_list):
        a, b = verdict_list
        out.append(f"the vocabularies differ ({a['vocab_size']} vs {b['vocab_size']} ids): losses and perplexities are "
                   "per token of different tokenizations, so they are shown but not compared; EffRem, state "
                   "statistics, collapse, decay and coverage are compared")
    return out


# --- figures ----------------------------------------------------------------------------------------


def _png(fig) -> str:
    """A figure as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _embedded(shown: list[dict]) -> list[dict]:
    """The page's figure entries: each Figure of :mod:`statelens.reports.page_figures` as inline SVG
    (:func:`statelens.reports.svg.inline_svg`, marked safe for jinja2: it is sanitized and its text
    escaped by the XML writer), or as a PNG when the SVG would be too large (``svg`` None); its width
    class (``narrow``: one panel, ``wide``: two, so the page shows every figure at one scale) and its
    tables formatted."""
    from markupsafe import Markup

    from statelens.reports.svg import inline_svg

    entries = []
    for f in shown:
        svg = inline_svg(f["figure"], f"fig-{f['id']}", f["title"])
        entries.append({"id": f["id"], "title": f["title"], "svg": Markup(svg) if svg else None,
                        "image": None if svg else _png(f["figure"]),
                        "width": "wide" if f["figure"].get_figwidth() > 1.5 * PANEL[0] else "narrow",
                        "tables": [(name, _table(df)) for name, df in f["tables"]]})
    return entries


def _table(df: pd.DataFrame) -> dict:
    """``{"columns", "rows", "total"}``: the first :data:`MAX_ROWS` rows, numbers formatted."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return f"{v:.6g}"
        return str(v)

    head = df.head(MAX_ROWS)
    return {"columns": [str(c) for c in df.columns], "rows": [[cell(v) for v in row] for row in head.itertuples(index=False)],
            "total": len(df)}


# --- the page ---------------------------------------------------------------------------------------


def render(results_list: list[Results], labels: list[str], train_lens: list[int] | None = None,
           findings: pd.DataFrame | None = None) -> str:
    """The report page for one or two (or more) checkpoints. ``train_lens`` default: each checkpoint's
    manifests, else 2048. With two, the comparison section states the second against the first.
    ``findings`` (e.g. :func:`statelens.demo.findings`): claims checked with their margins, shown as a
    table after the comparison."""
    from jinja2 import Environment

    if len(results_list) != len(labels):
        raise ParameterError("labels", f"{len(results_list)} results but {len(labels)} labels")
    if len(set(labels)) != len(labels):
        raise ParameterError("labels", f"labels must differ: {labels}")
    from statelens.reports.figures import checkpoint_colors

    train_lens = train_lens or [r.train_len or 2048 for r in results_list]
    colors = checkpoint_colors(labels)
    cards = []
    for r, lab, tl in zip(results_list, labels, train_lens):
        v = verdicts(r, tl)
        rgb = ", ".join(str(round(255 * c)) for c in colors[lab])
        cards.append({"label": lab, "v": v, "headline": headline(v), "next_step": next_step(v),
                      "lines": verdict_lines(v), "color": f"rgb({rgb})",
                      "manifests": [(cmd, json.dumps(m, indent=2, default=str)) for cmd, m in r.manifests.items()]})
    compared = comparison(cards[0]["v"], cards[1]["v"]) if len(cards) == 2 else []
    caveats = notes(results_list, [c["v"] for c in cards], labels)
    figures = _embedded(report_figures(results_list, labels, train_lens) + monitor_figures(results_list, labels))
    tasks = _embedded(task_figures(results_list, labels, train_lens))
    template = (resources.files("statelens.reports") / "templates" / "report.html.j2").read_text(encoding="utf-8")
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        labels=labels, cards=cards, comparison=compared, notes=caveats, figures=figures, tasks=tasks,
        findings=_table(findings) if findings is not None else None, max_rows=MAX_ROWS)


def write_report(html: str, out_dir: str | Path) -> Path:
    """Writes ``out_dir/index.html`` atomically (creating the folder); returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_dir / "index.html", lambda f: Path(f).write_text(html, encoding="utf-8"))
