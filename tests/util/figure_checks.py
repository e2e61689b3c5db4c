"""The figure rules, checked on a drawn matplotlib Figure (the test side of ``bnlab.util.plots``).

Why: "a figure a reader can read" is checkable. After ``fig.canvas.draw()`` every text has
its bounding box and every axis its ticks, so these rules are read off the Figure itself,
not off the code that made it:

- every axes draws something, or a text saying why not;
- every axis that shows tick labels has a label;
- no two texts of a figure overlap (tick labels, axis labels, titles, legends, direct labels);
- an axis of whole things (labelled epoch, step, channel, layer) shows integer ticks, and at
  least one;
- a line of one point has a marker (without one it is invisible);
- no two lines of an axes look alike (colour, marker and line style), and more than
  :data:`MAX_COLOUR_ONLY` lines are told apart by marker or line style, not by colour alone;
- a legend has at most :data:`MAX_LEGEND_ENTRIES` entries (more lines are labelled directly).

``check_saved_figures`` patches ``save_figure`` wherever bnlab bound it, so every figure the
code under test saves is checked as it is saved (and then written as before).
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text

from bnlab.util import plots

MAX_COLOUR_ONLY = 4
MAX_LEGEND_ENTRIES = plots.MAX_LEGEND_ENTRIES
INTEGER_AXIS = re.compile(r"^((training |SGD )?step|epoch|channel|(weight )?layer)s?\b",
                          re.IGNORECASE)
"""An axis whose label starts so counts whole things (epochs, steps, channels, layers)."""
OVERLAP_PX = 1.0  # texts may touch; overlapping by more than a pixel each way is a clash


def figure_problems(fig: Figure) -> list[str]:
    """Every broken rule of ``fig``, one line each (empty: the figure passes)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems: list[str] = []
    for i, ax in enumerate(fig.axes):
        if not (ax.get_visible() and ax.axison):
            continue
        name = f"axes {i} ({ax.get_title() or ax.get_ylabel() or 'untitled'!r})"
        if not (data_lines(ax) or ax.collections or ax.patches or ax.images or ax.texts):
            problems.append(f"{name}: draws nothing and says not why")
        for axis in (ax.xaxis, ax.yaxis):
            problems += [f"{name}: {p}" for p in _axis_problems(axis)]
        problems += [f"{name}: {p}" for p in _line_problems(ax)]
        legend = ax.get_legend()
        if legend is not None and len(legend.get_texts()) > MAX_LEGEND_ENTRIES:
            problems.append(f"{name}: a legend of {len(legend.get_texts())} entries (at most "
                            f"{MAX_LEGEND_ENTRIES}; label the lines directly)")
    problems += _overlaps(_drawn_texts(fig), renderer)
    return problems


# --------------------------------------------------------------------------- axes and ticks

def drawn_ticks(axis: Axis) -> list:
    """The major and minor ticks ``axis`` draws: those inside its view interval."""
    low, high = sorted(axis.get_transform().transform(axis.get_view_interval()))
    tol = 1e-10 * max(1.0, abs(high - low))
    ticks = []
    for locs, get in ((axis.get_majorticklocs(), axis.get_major_ticks),
                      (axis.get_minorticklocs(), axis.get_minor_ticks)):
        for tick in get(len(locs)):
            where = axis.get_transform().transform([tick.get_loc()])[0]
            if low - tol <= where <= high + tol:
                ticks.append(tick)
    return ticks


def _tick_labels(axis: Axis) -> list[Text]:
    return [label for tick in drawn_ticks(axis) for label in (tick.label1, tick.label2)
            if label.get_visible() and label.get_text().strip()]


def _axis_problems(axis: Axis) -> list[str]:
    if not axis.get_visible():
        return []
    which = axis.axis_name
    problems = []
    if _tick_labels(axis) and not axis.get_label_text().strip():
        problems.append(f"{which} axis has no label")
    if INTEGER_AXIS.match(axis.get_label_text().strip()):
        locs = [t.get_loc() for t in drawn_ticks(axis)
                if t in axis.get_major_ticks(len(axis.get_majorticklocs()))
                and t.label1.get_visible() and t.label1.get_text().strip()]
        if not locs:
            problems.append(f"{which} axis {axis.get_label_text()!r} shows no tick")
        fractional = [loc for loc in locs if not math.isclose(loc, round(loc), abs_tol=1e-9)]
        if fractional:
            problems.append(f"{which} axis {axis.get_label_text()!r} has fractional ticks "
                            + ", ".join(f"{loc:g}" for loc in fractional))
    return problems


# --------------------------------------------------------------------------- lines

def data_lines(ax: Axes) -> list[Line2D]:
    """The lines of ``ax`` that draw data: not reference lines (axhline/axvline), not an
    errorbar's caps, not empty or hidden."""
    caps = {id(cap) for c in ax.containers if isinstance(c, ErrorbarContainer) for cap in c[1]}
    return [line for line in ax.lines
            if line.get_visible() and id(line) not in caps
            and line.get_transform() == ax.transData and len(line.get_xdata()) > 0]


def _style(line: Line2D) -> tuple:
    marker = line.get_marker()
    marker = None if marker in (None, "None", "none", "", " ") else str(marker)
    ls = line.get_linestyle()
    ls = None if ls in ("None", "none", "", " ") else ls
    return marker, ls


def _name(line: Line2D, ax: Axes) -> str:
    """A line's label, or its errorbar series' (the container holds that one)."""
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer) and c[0] is line:
            return c.get_label()
    return line.get_label()


def _line_problems(ax: Axes) -> list[str]:
    lines = data_lines(ax)
    problems = [f"line {_name(line, ax)!r} is one point without a marker (invisible)"
                for line in lines if len(line.get_xdata()) == 1 and _style(line)[0] is None]
    looks: dict[tuple, list[str]] = {}
    for line in lines:
        key = (tuple(round(c, 3) for c in to_rgba(line.get_color())), *_style(line))
        looks.setdefault(key, []).append(_name(line, ax))
    for names in looks.values():
        if len(names) > 1:
            problems.append(f"{len(names)} lines look alike (colour, marker, style): "
                            + ", ".join(names))
    if len(lines) > MAX_COLOUR_ONLY:
        styles: dict[tuple, list[str]] = {}
        for line in lines:
            styles.setdefault(_style(line), []).append(_name(line, ax))
        shared = [names for names in styles.values() if len(names) > 1]
        if shared:
            problems.append(f"{len(lines)} lines, told apart by colour alone: "
                            + "; ".join(", ".join(n) for n in shared))
    return problems


# --------------------------------------------------------------------------- overlapping texts

def _drawn_texts(fig: Figure) -> list[tuple[str, Text]]:
    """Every text the figure draws, named for the report."""
    texts: list[tuple[str, Text]] = [("figure text", t) for t in fig.texts]  # suptitle too
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        # titles, texts and annotations
        texts += [(f"axes {i} text", t) for t in ax.get_children() if isinstance(t, Text)]
        legend = ax.get_legend()
        if legend is not None:
            texts += [(f"axes {i} legend", t) for t in legend.get_texts()]
        if not ax.axison:
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if not axis.get_visible():
                continue
            texts += [(f"axes {i} {axis.axis_name} tick", t) for t in _tick_labels(axis)]
            texts += [(f"axes {i} {axis.axis_name} label", axis.label),
                      (f"axes {i} {axis.axis_name} offset", axis.get_offset_text())]
    return [(name, t) for name, t in texts if t.get_visible() and t.get_text().strip()]


def _overlaps(texts: list[tuple[str, Text]], renderer) -> list[str]:
    # Text's own extent: an annotation's would include its leader line
    boxes = [(name, t.get_text(), Text.get_window_extent(t, renderer)) for name, t in texts]
    problems = []
    for (n1, s1, b1), (n2, s2, b2) in itertools.combinations(boxes, 2):
        width = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
        height = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
        if width > OVERLAP_PX and height > OVERLAP_PX:
            problems.append(f"{n1} {s1!r} overlaps {n2} {s2!r}")
    return problems


# --------------------------------------------------------------------------- every saved figure

@dataclass
class SavedFigures:
    """What ``check_saved_figures`` saw: per figure (``folder/file.png``), its problems, and
    the (closed) Figure itself, to look into."""

    problems: dict[str, list[str]] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)

    @property
    def failing(self) -> dict[str, list[str]]:
        return {name: p for name, p in self.problems.items() if p}


def check_saved_figures(monkeypatch) -> SavedFigures:
    """Check every figure saved through ``bnlab.util.plots.save_figure`` from now on (in this
    test), as it is saved: the name is patched in every loaded bnlab module that bound it."""
    original = plots.save_figure
    seen = SavedFigures()

    def checking(fig, path):
        path = Path(path)
        name = f"{path.parent.name}/{path.name}"
        seen.problems[name] = figure_problems(fig)
        seen.figures[name] = fig
        return original(fig, path)

    for module in list(sys.modules.values()):
        if (module is not None and module.__name__.startswith("bnlab")
                and getattr(module, "save_figure", None) is original):
            monkeypatch.setattr(module, "save_figure", checking)
    return seen
