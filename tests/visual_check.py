"""What a reader of a figure would see wrong, measured on the drawn figure (imported by the tests).

- :func:`layout_problems`: every text inside the figure, no two tick labels of an axis overlapping
  (extents from matplotlib's ``get_window_extent`` after a draw);
- :func:`svg_text_problems`: no ``$`` or ``\\mathdefault`` left in the text an SVG shows (mathtext that
  was printed raw instead of rendered);
- :func:`svg_safety_problems`: no script, event attribute, foreign object or outside reference (an
  embedded PNG, ``data:image/png;base64,...``, is inside).

Each returns a list of sentences, empty when the figure is fine, so a failing test says what is wrong.
"""
from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import matplotlib as mpl
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

SVG = "{http://www.w3.org/2000/svg}"
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
#: Pixels a text may stick out of the figure, or two tick labels overlap, before it counts.
SLACK = 1.0


def _drawn_tick_labels(axis: Axis) -> list[Text]:
    """The tick labels the axis shows: visible, non-empty, at a tick inside the view interval."""
    lo, hi = sorted(axis.get_view_interval())
    labels = []
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        loc = tick.get_loc()
        if loc is None or not lo - 1e-9 * abs(hi - lo) <= loc <= hi + 1e-9 * abs(hi - lo):
            continue
        labels += [t for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text()]
    return labels


def _name(text: Text) -> str:
    return repr(text.get_text()[:50])


def layout_problems(fig: Figure) -> list[str]:
    """Texts outside the figure and overlapping tick labels, after drawing ``fig`` with Agg."""
    canvas = FigureCanvasAgg(fig)  # (re)attached: a Figure made without pyplot has a canvas that cannot draw
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    problems = []
    tick_labels = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in _drawn_tick_labels(axis)}
    all_ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                 for tick in axis.get_major_ticks() + axis.get_minor_ticks() for t in (tick.label1, tick.label2)}
    for text in fig.findobj(Text):
        if id(text) in all_ticks and id(text) not in tick_labels:
            continue  # a tick outside the view: not drawn
        if not text.get_visible() or not text.get_text().strip():
            continue
        e = text.get_window_extent(renderer)
        if e.x0 < box.x0 - SLACK or e.y0 < box.y0 - SLACK or e.x1 > box.x1 + SLACK or e.y1 > box.y1 + SLACK:
            problems.append(f"text {_name(text)} sticks out of the figure: {e.bounds} vs {box.bounds}")
    for ax in fig.axes:
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            extents = [(t, t.get_window_extent(renderer)) for t in _drawn_tick_labels(axis)]
            for i, (a, ea) in enumerate(extents):
                for b, eb in extents[i + 1:]:
                    w = min(ea.x1, eb.x1) - max(ea.x0, eb.x0)
                    h = min(ea.y1, eb.y1) - max(ea.y0, eb.y0)
                    if w > SLACK and h > SLACK:
                        problems.append(f"{which} tick labels {_name(a)} and {_name(b)} overlap "
                                        f"({ax.get_title()[:40]!r})")
    return problems


def render_svg(fig: Figure) -> str:
    """``fig`` as SVG with its text kept as text, as the report inlines it."""
    buffer = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "visual-check"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def svg_texts(svg: str) -> list[str]:
    """The text each ``<text>`` element of ``svg`` shows (its tspans joined); comments are not text."""
    texts = []
    for el in ET.fromstring(svg).iter(f"{SVG}text"):
        spans = [span.text or "" for span in el.iter(f"{SVG}tspan")]  # mathtext: one tspan per glyph
        texts.append("".join(spans) if spans else el.text or "")
    return texts


def svg_text_problems(svg: str) -> list[str]:
    """Raw mathtext in the shown text: a ``$`` or ``\\mathdefault`` that should have been rendered."""
    return [f"raw mathtext in the figure's text: {t[:60]!r}" for t in svg_texts(svg)
            if "$" in t or "\\mathdefault" in t]


def svg_safety_problems(svg: str) -> list[str]:
    """Scripts, event attributes, foreign objects and references outside the SVG."""
    root = ET.fromstring(svg) if isinstance(svg, str) else svg
    problems = []
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1].lower() if isinstance(el.tag, str) else ""
        if tag in ("script", "foreignobject", "iframe", "object", "embed"):
            problems.append(f"<{tag}> element")
        for key, value in el.attrib.items():
            name = key.rsplit("}", 1)[-1].lower()
            if name.startswith("on"):
                problems.append(f"event attribute {name} on <{tag}>")
            if name == "href" and not value.startswith(("#", "data:image/png;base64,")):
                problems.append(f"outside reference {value[:40]!r} on <{tag}>")
            if "url(" in value and not all(part.startswith("#") for part in value.split("url(")[1:]):
                problems.append(f"outside url() in {name} on <{tag}>")
    return problems
