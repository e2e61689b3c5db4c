"""Figures: training curves, comparisons of runs, and BN parameter views.

Why: the chapter's evidence is visual (loss and accuracy against epoch). Every figure is
made headless (Agg) and written atomically, so runs on servers and in CI produce the same
PNGs a person would look at.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bnlab.util.io import atomic_write  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "",
                diverged: dict[str, int] | None = None) -> Path:
    """Train loss, val loss and val accuracy against epoch, on one axis (as in the chapter)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [r["train_loss"] for r in history], "-", label="train loss")
    ax.plot(epochs, [r["val_loss"] for r in history], "--", label="val loss")
    ax.plot(epochs, [r["val_acc"] for r in history], "-.", label="val acc")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    if diverged:
        ax.text(0.5, 0.5, f"diverged at epoch {diverged['epoch']}, step {diverged['step']}",
                transform=ax.transAxes, ha="center", color="crimson")
    ax.legend()
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_comparison(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path,
                    title: str = "") -> Path:
    """Train loss, val loss and val accuracy of several runs side by side.

    Each run has its own color, line style and marker, so runs whose curves coincide (bnlab's
    and torch's BN) stay visible on top of each other.
    """
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("train_loss", "train loss"), ("val_loss", "val loss"), ("val_acc", "val accuracy")]
    styles = [("-", "o", 5), ("--", "x", 7), (":", "s", 4), ("-.", "^", 5)]
    for ax, (key, label) in zip(axes, panels):
        for (name, history), (line, marker, size) in zip(runs.items(), styles * len(runs)):
            ax.plot([r["epoch"] for r in history], [r[key] for r in history], linestyle=line,
                    marker=marker, markersize=size, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_norm_parameters(layers: dict[str, dict[str, Sequence[float]]], path: str | Path,
                         title: str = "") -> Path:
    """One row per norm layer: gamma, beta, running mean and running var per channel."""
    keys = ["gamma", "beta", "running_mean", "running_var"]
    fig, axes = plt.subplots(len(layers), len(keys), figsize=(13, 2.3 * len(layers)),
                             squeeze=False)
    for row, (name, values) in zip(axes, layers.items()):
        for ax, key in zip(row, keys):
            vals = values.get(key)
            if vals is None:
                ax.set_axis_off()
                continue
            ax.bar(range(len(vals)), vals, width=0.8)
            ax.axhline(1.0 if key in ("gamma", "running_var") else 0.0, color="gray", lw=0.8)
            ax.set_title(f"{name}: {key} ({len(vals)} ch)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
