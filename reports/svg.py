"""A figure as an SVG element for the report page: text kept as text (searchable, crisp when zoomed),
a ``<title>`` on every data line and point (hovering shows its values, with no script), sanitized.

:func:`inline_svg` is the one entry point. Matplotlib's SVG backend writes the figure (``svg.fonttype =
'none'``, set in an ``rc_context``); the post-processing uses :mod:`xml.etree.ElementTree`:

1. hover targets: each line named by :data:`statelens.reports.figures.HOVER_NAME` gets a title, and
   each of its points inside its Axes a transparent circle with a title: the name, then the x and y
   values under their axis labels. The circles go last, over everything, so a band drawn later cannot
   catch the pointer;
2. ids are prefixed with the figure's, so two figures in one page never share one;
3. sanitizing: no ``<script>``, ``<foreignObject>``, ``<metadata>``, no ``on*`` attribute, no reference
   outside the SVG (``href`` only to ``#id`` or an embedded PNG, ``url()`` only to ``#id``).
"""
from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from statelens.reports.figures import HOVER_NAME

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
#: Above this many characters a figure is embedded as a PNG instead (the page says so).
MAX_CHARS = 2_000_000
#: Radius (points) of a point's hover target.
TARGET_RADIUS = 3.0
_FORBIDDEN = {"script", "foreignObject", "metadata", "iframe", "object", "embed", "a"}
_URL = re.compile(r"url\(\s*['\"]?([^)'\"]*)")


def _tag(el: ET.Element) -> str:
    return el.tag.rsplit("}", 1)[-1] if isinstance(el.tag, str) else ""


def _hover_lines(fig: Figure) -> list[Line2D]:
    return [line for ax in fig.axes for line in ax.get_lines()
            if getattr(line, HOVER_NAME, None) and len(line.get_xdata())]


def _value(v: float) -> str:
    """A hover value: 4 significant digits, but whole units from 1000 on (position 16384, not 1.638e+04)."""
    return f"{v:.0f}" if 1e3 <= abs(v) < 1e12 else f"{v:.4g}"


def _point_targets(fig: Figure, lines: list[Line2D], height: float) -> ET.Element:
    """A group of transparent circles, one per point of ``lines`` inside its Axes, each with a title.
    Coordinates: the SVG's (points, y down), from the lines' display transforms at the figure's dpi."""
    group = ET.Element(f"{{{SVG_NS}}}g", {"fill": "#000", "fill-opacity": "0", "class": "hover"})
    scale = 72.0 / fig.dpi  # the SVG backend draws at 72 dpi
    for line in lines:
        ax = line.axes
        xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        display = line.get_transform().transform(np.column_stack([xs, ys]))
        inside = ax.bbox.contains if line.get_clip_on() else (lambda *_: True)
        name = getattr(line, HOVER_NAME)
        xlabel, ylabel = ax.get_xlabel() or "x", ax.get_ylabel() or "y"
        for (x, y), (dx, dy) in zip(zip(xs, ys), display):
            if not (np.isfinite(dx) and np.isfinite(dy) and inside(dx, dy)):
                continue
            circle = ET.SubElement(group, f"{{{SVG_NS}}}circle", {
                "cx": f"{dx * scale:.2f}", "cy": f"{height - dy * scale:.2f}", "r": f"{TARGET_RADIUS:g}"})
            ET.SubElement(circle, f"{{{SVG_NS}}}title").text = f"{name}\n{xlabel}: {_value(x)}\n{ylabel}: {_value(y)}"
    return group


def _sanitize(root: ET.Element) -> None:
    """Removes what could run or reach outside the SVG (see the module docstring), in place."""
    for parent in list(root.iter()):
        for child in list(parent):
            if _tag(child) in _FORBIDDEN or not isinstance(child.tag, str):
                parent.remove(child)
    for el in root.iter():
        for key in list(el.attrib):
            name, value = key.rsplit("}", 1)[-1], el.attrib[key]
            if name.lower().startswith("on"):
                del el.attrib[key]
            elif name == "href" and not value.startswith(("#", "data:image/png;base64,")):
                del el.attrib[key]
            elif any(not target.startswith("#") for target in _URL.findall(value)):
                del el.attrib[key]


def _prefix_ids(root: ET.Element, prefix: str) -> None:
    """Every ``id`` becomes ``{prefix}-{id}`` (spaces, invalid in an id, become "_"), and so does every
    reference to it (``href="#id"``, ``url(#id)``)."""
    def fix(name: str) -> str:
        return f"{prefix}-{name}".replace(" ", "_")

    for el in root.iter():
        for key, value in list(el.attrib.items()):
            if key == "id":
                el.attrib[key] = fix(value)
            elif key.endswith("href") and value.startswith("#"):
                el.attrib[key] = "#" + fix(value[1:])
            elif "url(#" in value:
                el.attrib[key] = re.sub(r"url\(#([^)]*)\)", lambda m: f"url(#{fix(m.group(1))})", value)


def inline_svg(fig: Figure, prefix: str, title: str) -> str | None:
    """``fig`` as an ``<svg>`` element to place in an HTML page (no XML declaration or doctype), scaled
    by its container (``width``/``height`` removed, the ``viewBox`` kept); None when it would exceed
    :data:`MAX_CHARS`. ``prefix`` makes its ids unique in the page; ``title`` is its accessible name."""
    lines = _hover_lines(fig)
    gids = [line.get_gid() for line in lines]
    for i, line in enumerate(lines):  # a unique id for a while, to find each line's group in the SVG
        line.set_gid(f"hover-line-{i}")
    buffer = io.StringIO()
    try:
        with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": prefix}):
            fig.savefig(buffer, format="svg", metadata={"Date": None})
    finally:
        for line, gid in zip(lines, gids):
            line.set_gid(gid)
    ET.register_namespace("", SVG_NS)
    ET.register_namespace("xlink", XLINK_NS)
    root = ET.fromstring(buffer.getvalue())
    groups = {g.attrib["id"]: g for g in root.iter(f"{{{SVG_NS}}}g") if "id" in g.attrib}
    for i, (line, gid) in enumerate(zip(lines, gids)):  # the whole line's name, on its own group
        group = groups.get(f"hover-line-{i}")
        if group is not None:
            group.attrib["id"] = f"{gid or 'line'}-{i}"
            name = ET.Element(f"{{{SVG_NS}}}title")
            name.text = getattr(line, HOVER_NAME)
            group.insert(0, name)
    height = float(root.attrib["viewBox"].split()[3])
    root.append(_point_targets(fig, lines, height))
    _sanitize(root)
    _prefix_ids(root, prefix)
    for key in ("width", "height"):
        root.attrib.pop(key, None)
    root.set("role", "img")
    root.set("aria-label", title)
    text = ET.tostring(root, encoding="unicode")
    return text if len(text) <= MAX_CHARS else None
