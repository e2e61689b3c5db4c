"""Figures: the lab's one figure style, its axis and label helpers, and the figures of a run.

Why: the chapter's evidence is visual (loss and accuracy against epoch), and a figure is only
evidence if a reader can tell its lines apart and read its axes. The rules live here once,
and every figure of bnlab is drawn with them:

- one qualitative palette, each line with its own colour, marker and line style, set as
  matplotlib's property cycle (:data:`CYCLE`), so lines drawn anywhere get them unasked;
- axes of whole epochs or steps tick at integers (:func:`epoch_axis`, :func:`count_axis`);
- log and symlog axes whose tick labels never overlap (:func:`log_axis`);
- a legend only while it is short; more lines are labelled at their ends (:func:`legend`);
- two quantities with different units get two panels (:func:`plot_curves`), and values
  around a reference (gamma around 1) are drawn as deviations from it, not as bars from 0
  (:func:`plot_norm_parameters`).

Every figure is made headless (Agg) and written atomically, so runs on servers and in CI
produce the same PNGs a person would look at. ``tests/util/figure_checks.py`` checks these
rules on every figure the suite makes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import cycler  # noqa: E402  (matplotlib's, no undeclared dependency)
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FixedLocator,
    Formatter,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
)

from bnlab.util.io import atomic_write  # noqa: E402

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
           "#882255")
"""Okabe and Ito's colour-blind-safe qualitative palette (its yellow, unreadable on white,
replaced by Tol's wine)."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINE_STYLES = ("-", "--", ":", "-.")
LOOKS = [{"color": PALETTE[i], "marker": MARKERS[(i + turn) % len(MARKERS)],
          "linestyle": LINE_STYLES[(i + 2 * turn) % len(LINE_STYLES)]}
         for turn in range(2) for i in range(len(PALETTE))]
"""16 looks, no two with the same marker and line style: each colour once with its own marker
and then with the next, the line styles turning beside them."""
CYCLE = cycler(**{key: [look[key] for look in LOOKS] for key in ("color", "marker", "linestyle")})
MAX_LEGEND_ENTRIES = 6
"""Past this many entries a legend crowds its axes: :func:`legend` labels the lines directly."""
REFERENCE_LINE = {"color": "0.45", "lw": 0.8, "ls": "--"}
"""Thresholds and reference values (chance, gamma = 1): grey and dashed, behind the data."""

STYLE = {
    "axes.prop_cycle": CYCLE,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 10,
    "lines.linewidth": 1.4,
    "lines.markersize": 5,
    "markers.fillstyle": "none",  # hollow: points that coincide stay visible
    "errorbar.capsize": 3,
    "figure.constrained_layout.use": True,  # titles, labels and legends get their room
}
matplotlib.rcParams.update(STYLE)


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def style(i: int) -> dict[str, Any]:
    """The ``i``-th look of :data:`CYCLE` (color, marker, linestyle), for lines that must keep
    one look across panels or share it with a band or a reference line."""
    return dict(LOOKS[i % len(LOOKS)])


# --------------------------------------------------------------------------- axes

def _axis(ax, which: str):
    return ax.xaxis if which == "x" else ax.yaxis


def count_axis(ax, label: str, which: str = "x") -> None:
    """An axis of whole things (epochs, steps, channels): integer ticks, ``label``, and at
    least one unit wide, so a single epoch is not drawn on an axis from 0.945 to 1.05.

    Call it after plotting: it reads the data's extent."""
    axis = _axis(ax, which)
    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axis.set_label_text(label)
    low, high = axis.get_data_interval()
    if math.isfinite(low) and math.isfinite(high) and high - low < 1:
        set_lim = ax.set_xlim if which == "x" else ax.set_ylim
        set_lim(low - 0.5, high + 0.5)


def epoch_axis(ax, which: str = "x") -> None:
    """An axis of epochs (:func:`count_axis` labelled ``epoch``)."""
    count_axis(ax, "epoch", which)


def plain_number(value: float, pos: int | None = None) -> str:
    """A tick label as a plain number: 2, 128, 0.01, 1e+04 (``%g``)."""
    return f"{value:g}"


class NonOverlapping(Formatter):
    """Another formatter's labels, thinned to every k-th one for the smallest k at which no
    two overlap (a log axis of 25 decades, the batch sizes 1 to 65536).

    Extents are measured with the renderer at draw time, along the axis. Given the ``major``
    ticks' formatter (which matplotlib formats first in a draw), these are minor labels:
    shown only while fewer than two major labels are in view (a log axis spanning under a
    decade), and never over a major one."""

    def __init__(self, inner: Formatter, major: NonOverlapping | None = None,
                 gap_em: float = 0.5) -> None:
        self.inner = inner
        self.major = major
        self.gap_em = gap_em
        self.kept: list[tuple[float, float]] = []  # display extents of the labels kept in view
        self.sizes: dict[tuple, float] = {}  # a label's size along the axis, in pixels

    def set_axis(self, axis) -> None:
        super().set_axis(axis)
        self.inner.set_axis(axis)

    def __call__(self, x: float, pos: int | None = None) -> str:
        return self.inner(x, pos)

    def format_data_short(self, value: float) -> str:
        return self.inner.format_data_short(value)

    def format_ticks(self, values) -> list[str]:
        """The labels of every ``stride``-th tick in view, for the smallest stride whose labels
        keep apart (from each other and from the major labels); the others blank."""
        self.kept = []
        labels = list(self.inner.format_ticks(values))
        if self.major is not None and len(self.major.kept) >= 2:
            return [""] * len(values)
        extents = {i: e for i, (v, label) in enumerate(zip(values, labels))
                   if (e := self._extent(v, label)) is not None}  # the labels drawn, in view
        taken = self.major.kept if self.major is not None else []
        free = [i for i in sorted(extents) if all(_apart(extents[i], t) for t in taken)]
        keep: list[int] = []
        for stride in range(1, len(free) + 1):
            keep = free[::stride]
            if all(_apart(extents[a], extents[b]) for a, b in itertools.combinations(keep, 2)):
                break
        self.kept = [extents[i] for i in keep]
        return [label if i in keep or i not in extents else "" for i, label in enumerate(labels)]

    def _extent(self, value: float, label: str) -> tuple[float, float] | None:
        """The display interval ``label`` at ``value`` takes along the axis, padded by half the
        gap either side; None outside the view or before the axis has a figure."""
        axis = self.axis
        if axis is None or axis.figure is None or not label.strip():
            return None
        horizontal = axis.axis_name == "x"
        along = axis.get_transform()  # the scale; then the view, linearly, onto the axes
        low, high = sorted(along.transform(axis.get_view_interval()))
        where = along.transform([value])[0]
        if not (math.isfinite(where) and low - 1e-9 * (high - low) <= where
                <= high + 1e-9 * (high - low)):
            return None
        frame = axis.axes.get_window_extent()
        start, length = (frame.x0, frame.width) if horizontal else (frame.y0, frame.height)
        centre = start + (where - low) / (high - low) * length
        font = axis.get_major_ticks(1)[0].label1.get_fontproperties()
        key = (label, horizontal, font.get_size_in_points(), axis.figure.dpi)
        if key not in self.sizes:  # measuring a text is slow, and a draw asks several times
            text = Text(0, 0, label, fontproperties=font)
            text.set_figure(axis.figure)
            box = text.get_window_extent(axis.figure.canvas.get_renderer())
            self.sizes[key] = box.width if horizontal else box.height
        size = self.sizes[key]
        pad = self.gap_em * font.get_size_in_points() * axis.figure.dpi / 72 / 2
        return centre - size / 2 - pad, centre + size / 2 + pad


def _apart(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two display intervals do not overlap."""
    return a[1] <= b[0] or b[1] <= a[0]


def log_axis(ax, which: str = "x", base: float = 10, linthresh: float | None = None,
             label: str | None = None, ticks: Sequence[float] | None = None) -> None:
    """A log axis, or with ``linthresh`` a symlog one (linear in [0, linthresh]), labelled
    with plain numbers that never overlap (:class:`NonOverlapping`). ``ticks``: exactly
    these major ticks (e.g. the batch sizes of a grid). Call it after plotting.

    A symlog axis here is for counts from 0 (steps): it ticks at integers from 0 up."""
    axis = _axis(ax, which)
    if linthresh is None:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    else:
        (ax.set_xscale if which == "x" else ax.set_yscale)("symlog", base=base,
                                                             linthresh=linthresh)
    if ticks is not None:
        axis.set_major_locator(FixedLocator(list(ticks)))
        axis.set_minor_formatter(NullFormatter())
    elif linthresh is not None:
        axis.set_major_locator(_SymlogCounts(base, linthresh))
        axis.set_minor_formatter(NullFormatter())
    else:
        axis.set_major_locator(LogLocator(base))
    major = NonOverlapping(FuncFormatter(plain_number))
    axis.set_major_formatter(major)
    if ticks is None and linthresh is None:
        axis.set_minor_formatter(NonOverlapping(FuncFormatter(_minor_label), major))
    if label is not None:
        axis.set_label_text(label)


def _minor_label(value: float, pos: int | None = None) -> str:
    """A minor log tick's label: its leading digit times its power (2, 30, 0.05)."""
    return plain_number(float(f"{value:.1g}"))


class _SymlogCounts(MaxNLocator):
    """Ticks of a symlog axis of counts: 0, a few integers up to ``linthresh``, and the powers
    of ``base`` above it."""

    def __init__(self, base: float, linthresh: float) -> None:
        super().__init__(nbins=3, integer=True, min_n_ticks=1)
        self.base = base
        self.linthresh = linthresh

    def tick_values(self, vmin: float, vmax: float) -> list[float]:
        low, high = sorted((vmin, vmax))
        linear = [t for t in super().tick_values(0, min(high, self.linthresh))
                  if 0 <= t <= min(high, self.linthresh)]
        powers, p = [], self.base ** math.ceil(math.log(self.linthresh * 1.0001, self.base))
        while p <= high:
            powers.append(p)
            p *= self.base
        return [t for t in sorted(set(linear + powers)) if low <= t <= high]


def note_empty(ax, why: str) -> None:
    """Say in an axes that has nothing to draw why it is empty (a blank panel reads as a bug)."""
    ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", wrap=True,
            color="0.3")


def reference_line(ax, y: float, label: str | None = None) -> None:
    """A horizontal reference (a threshold, chance, a parameter's initial value)."""
    ax.axhline(y, label=label, zorder=1, **REFERENCE_LINE)


# --------------------------------------------------------------------------- labels

def legend(ax, **kwargs: Any) -> None:
    """A legend while it has at most :data:`MAX_LEGEND_ENTRIES` entries; past that, each line
    labelled at its end (:func:`label_lines`). Call it last: direct labels read the limits."""
    _, labels = ax.get_legend_handles_labels()
    if not labels:
        return
    if len(labels) <= MAX_LEGEND_ENTRIES:
        ax.legend(**kwargs)
    else:
        label_lines(ax)


def label_lines(ax) -> None:
    """Label every labelled line (or errorbar series) of ``ax`` at its last point, in its
    colour, just right of the axes; labels that would collide are spread apart vertically
    and joined to their points by thin leaders."""
    handles, labels = ax.get_legend_handles_labels()
    ends = []
    for handle, label in zip(handles, labels):
        line = handle[0] if isinstance(handle, tuple) else handle  # an errorbar's data line
        points = [(x, y) for x, y in zip(line.get_xdata(), line.get_ydata())
                  if math.isfinite(x) and math.isfinite(y)]
        if points:
            ends.append((label, line.get_color(), points[-1]))
    if not ends:
        return
    ax.autoscale_view()  # settle the limits before reading positions against them
    ax.figure.draw_without_rendering()  # the layout, for the axes' height in pixels
    to_axes = ax.transData + ax.transAxes.inverted()
    heights = [to_axes.transform([end])[0][1] for _, _, end in ends]
    font = matplotlib.rcParams["legend.fontsize"]
    gap = 1.35 * font * ax.figure.dpi / 72 / max(ax.get_window_extent().height, 1.0)
    placed = _spread(heights, gap)
    for (label, color, end), y in zip(ends, placed):
        ax.annotate(label, xy=end, xycoords="data", xytext=(1.03, y), textcoords="axes fraction",
                    va="center", ha="left", color=color, fontsize=font, annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.7,
                                "shrinkA": 1, "shrinkB": 3})


def _spread(heights: Sequence[float], gap: float) -> list[float]:
    """Heights (axes fractions) pushed ``gap`` apart, keeping their order: up from the lowest,
    then down from 1 if they went past it; centred on the axes if they cannot fit in it."""
    order = sorted(range(len(heights)), key=lambda i: heights[i])
    ys = [min(max(heights[i], 0.0), 1.0) for i in order]
    for k in range(1, len(ys)):  # push up
        ys[k] = max(ys[k], ys[k - 1] + gap)
    overflow = ys[-1] - 1.0
    if overflow > 0:  # then down from the top, no lower than 0 unless they cannot fit
        ys[-1] = 1.0
        for k in range(len(ys) - 2, -1, -1):
            ys[k] = min(ys[k], ys[k + 1] - gap)
        if ys[0] < 0:
            ys = [y - ys[0] / 2 for y in ys]  # centred on the axes when they cannot fit
    placed = [0.0] * len(ys)
    for k, i in enumerate(order):
        placed[i] = ys[k]
    return placed


# --------------------------------------------------------------------------- a run's figures

LOSS_LABEL = "cross-entropy loss (nats)"
ACCURACY_LABEL = "accuracy"


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "",
                diverged: dict[str, int] | None = None) -> Path:
    """Loss (train, val) and accuracy (train, val) against epoch: two panels, two units."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    epochs = [row["epoch"] for row in history]
    for ax, (key, name) in ((loss_ax, ("loss", "loss")), (acc_ax, ("acc", "accuracy"))):
        for split, look in (("train", style(0)), ("val", style(1))):
            ax.plot(epochs, [r[f"{split}_{key}"] for r in history], label=f"{split} {name}",
                    **look)
        epoch_axis(ax)
        legend(ax)
    loss_ax.set_ylabel(LOSS_LABEL)
    acc_ax.set_ylabel(ACCURACY_LABEL)
    stopped = (f"diverged at epoch {diverged['epoch']}, step {diverged['step']}" if diverged
               else "")
    if not history:  # diverged in its first epoch
        for ax in (loss_ax, acc_ax):
            note_empty(ax, f"no epoch finished ({stopped})" if stopped else "no epoch finished")
    elif stopped:
        loss_ax.set_title(stopped, color="crimson")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_comparison(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path,
                    title: str = "") -> Path:
    """Train loss, val loss and val accuracy of several runs side by side.

    Each run keeps one look (colour, marker, line style) across the panels, so runs whose
    curves coincide (bnlab's and torch's BN) stay visible on top of each other."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("train_loss", f"training {LOSS_LABEL}"), ("val_loss", f"validation {LOSS_LABEL}"),
              ("val_acc", f"validation {ACCURACY_LABEL}")]
    for ax, (key, ylabel) in zip(axes, panels):
        for i, (name, history) in enumerate(runs.items()):
            ax.plot([r["epoch"] for r in history], [r[key] for r in history], label=name,
                    **style(i))
        epoch_axis(ax)
        ax.set_ylabel(ylabel)
    legend(axes[-1])
    fig.suptitle(title)
    return save_figure(fig, path)


NORM_PANELS = {"gamma": ("γ (scale)", 1.0), "beta": ("β (shift)", 0.0),
               "running_mean": ("running mean", 0.0), "running_var": ("running variance", 1.0)}
"""Per norm statistic: its axis label and the value it starts from (its reference)."""
MAX_STEMS = 32  # channels drawn as stems from the reference; more are drawn as points


def plot_norm_parameters(layers: dict[str, dict[str, Sequence[float] | None]],
                         path: str | Path, title: str = "") -> Path:
    """One row per norm layer (named as given: "conv1", "3", ...): gamma, beta, running mean
    and running variance per channel, as points against the value each starts from (1 or 0,
    a dashed line; on stems from it for up to :data:`MAX_STEMS` channels), so a gamma of 1.02
    shows its deviation instead of a bar of height 1."""
    fig, axes = plt.subplots(len(layers), len(NORM_PANELS), figsize=(13, 2.4 * len(layers)),
                             squeeze=False)
    for row, (name, values) in zip(axes, layers.items()):
        for ax, (key, (ylabel, start)) in zip(row, NORM_PANELS.items()):
            vals = values.get(key)
            if vals is None:
                ax.set_axis_off()
                continue
            channels = range(len(vals))
            if len(vals) <= MAX_STEMS:
                markers, stems, _ = ax.stem(channels, vals, bottom=start, basefmt=" ")
                plt.setp(markers, markersize=3, color=PALETTE[0])
                plt.setp(stems, linewidth=0.8, color=PALETTE[0])
            else:  # stems would fill the panel: points alone
                ax.plot(channels, vals, "o", markersize=2.5, color=PALETTE[0], linestyle="none")
            reference_line(ax, start)
            count_axis(ax, "channel")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name} ({len(vals)} channels)")
    fig.suptitle(title)
    return save_figure(fig, path)
