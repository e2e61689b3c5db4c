"""Reading results rows: the typed row, selections, failures, the best learning rate, curves
averaged over seeds, thresholds reached, and intervals drawn.

Why: every experiment asks the same small questions of its runs ("mean val acc per epoch",
"when did it first reach 0.85?", "did it train at all?", "which rate is best?"). Answering
them in one place keeps the definitions identical across reports. The interval math itself
(Student-t over seeds, bounds, "intervals apart") is in ``stats``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.experiments.stats import ACCURACY, bounded, interval, mean_ci
from bnlab.training import runs
from bnlab.training.train import steps_per_epoch, training_images
from bnlab.util.plots import epoch_axis
from bnlab.util.tables import counted

CHANCE = 0.1
FAIL_ACCURACY = 0.2
"""A run *fails* when it diverged (non-finite loss) or ends at chance level: final validation
accuracy at most 0.2 (chance on 10 balanced classes is 0.1)."""


@dataclass(frozen=True)
class Row:
    """One finished run of a grid: its variant's label and analysis tags, its seed, and what
    its run folder holds (the config as saved, per-epoch metrics, summary, and the periodic
    evaluations of ``eval_every``). ``results.jsonl`` has one per line (``to_json``)."""

    label: str
    tags: dict[str, Any]
    seed: int
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: str
    evals: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_run(cls, run_dir: str | Path, label: str = "",
                 tags: dict[str, Any] | None = None) -> Row:
        """The row of a finished run folder."""
        run = runs.load_run(run_dir)
        if run["summary"] is None:
            raise runs.RunFolderError(f"{run_dir} has not finished (no {runs.SUMMARY})")
        return cls(label=label, tags=dict(tags or {}), seed=run["config"]["seed"],
                   config=run["config"], metrics=run["metrics"], summary=run["summary"],
                   run_dir=str(run_dir), evals=run["evals"])

    @property
    def diverged(self) -> bool:
        return bool(self.summary["diverged"])

    @property
    def steps_per_epoch(self) -> int:
        """SGD steps of one of the run's epochs: its training images in batches of its size."""
        # A config from before the validation split has no val_size: it trained on all images.
        images = training_images(self.config["subset"], self.config.get("val_size", 0))
        return steps_per_epoch(images, self.config["batch_size"])

    @property
    def planned_steps(self) -> int:
        """SGD steps of the run's whole budget (``config["epochs"]`` epochs)."""
        return self.config["epochs"] * self.steps_per_epoch

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> Row:
        """A row of ``results.jsonl`` (its ``provenance`` is the analysis's, not the run's)."""
        return cls(**{k: v for k, v in values.items() if k != "provenance"})

    def to_json(self) -> dict[str, Any]:
        """The row for ``results.jsonl``: every field but ``evals`` (they stay in the run folder)."""
        return {"label": self.label, "tags": self.tags, "seed": self.seed, "config": self.config,
                "metrics": self.metrics, "summary": self.summary, "run_dir": self.run_dir}


def by_label(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by variant label, in grid order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    return groups


def select(rows: list[Row], **tags: Any) -> list[Row]:
    """Rows whose tags match every given tag."""
    return [r for r in rows if all(r.tags.get(k) == v for k, v in tags.items())]


def failed(row: Row) -> bool:
    return row.diverged or (row.summary["final_val_acc"] or 0.0) <= FAIL_ACCURACY


def final(row: Row, key: str = "final_val_acc") -> float:
    """A summary number, with diverged runs counted at chance (so means stay honest)."""
    value = row.summary[key]
    return CHANCE if row.diverged or value is None else value


def finals(rows: list[Row], key: str = "final_val_acc") -> list[float]:
    """``final(row, key)`` of every row."""
    return [final(r, key) for r in rows]


def mean_final(rows: list[Row], key: str = "final_val_acc") -> float:
    """Mean over seeds of ``final(row, key)`` (nan without rows)."""
    return mean_ci(finals(rows, key))[0]


def trains(rows: list[Row]) -> bool:
    """True when there are rows and none of them failed."""
    return bool(rows) and not any(failed(r) for r in rows)


def training_lrs(rows: list[Row], **tags: Any) -> list[float]:
    """The learning rates (``lr`` tags) of the rows matching ``tags`` at which no seed
    failed (:func:`trains`), ascending."""
    group = select(rows, **tags)
    return [lr for lr in sorted({r.tags["lr"] for r in group}) if trains(select(group, lr=lr))]


def best_lr(rows: list[Row], lrs: Sequence[float], criterion: Callable[[list[Row]], float] = mean_final,
            **tags: Any) -> float | None:
    """Of the rates ``lrs`` that have rows matching ``tags``, the one whose rows score highest
    by ``criterion`` (default: mean final validation accuracy, a diverged seed counting at
    chance: a choice, so made on the validation split, never on the test set); ties go to
    the smaller rate; None when no rate has rows."""
    scores = {lr: criterion(group) for lr in lrs if (group := select(rows, **tags, lr=lr))}
    return max(sorted(scores), key=lambda lr: scores[lr], default=None)


def read_results(folder: str | Path) -> list[Row] | None:
    """The rows of a finished experiment's ``results.jsonl`` in ``folder``; None without one."""
    path = Path(folder) / "results.jsonl"
    if not path.exists():
        return None
    return [Row.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def chosen_on_validation(row: Row) -> bool:
    """Whether the run held out a validation split (``val_size`` > 0), so a choice made on
    its ``final_val_acc`` is not made on the test set."""
    return bool(row.config.get("val_size", 0))


def best_lr_per_model(folder: str | Path) -> dict[bool, float] | None:
    """Per model (the ``bn`` tag: BN-LeNet or LeNet), the best rate (:func:`best_lr`, over the
    rates that ran, on validation accuracy) of a finished ``lr`` experiment whose results are
    in ``folder``; None without one, or when a model has no rate. Runs without a validation
    split (trained before it existed, or with ``--val-size 0``) are left out: their
    "validation" accuracy is the test set's, and no choice is made on it."""
    rows = read_results(folder)
    if rows is None:
        return None
    rows = [r for r in rows if chosen_on_validation(r)]
    rates = sorted({r.tags["lr"] for r in rows if "lr" in r.tags})
    best = {bn: best_lr(rows, rates, bn=bn) for bn in (False, True)}
    return None if None in best.values() else best


Curve = tuple[list[int], list[float], list[float]]  # epochs, means, CI half-widths


def mean_curve(rows: list[Row], key: str = "val_acc") -> Curve:
    """Epochs, mean and 95% CI half-width (0 for one seed) of ``key`` over seeds, per epoch.

    A diverged run contributes chance accuracy (or nothing, for losses) after it diverged.
    """
    epochs = max((len(r.metrics) for r in rows), default=0)
    expected = max((r.summary["epochs"] for r in rows), default=epochs)
    xs, means, halves = [], [], []
    for e in range(max(epochs, expected)):
        values = []
        for r in rows:
            if e < len(r.metrics):
                values.append(r.metrics[e][key])
            elif r.diverged and key.endswith("acc"):
                values.append(CHANCE)
        if values:
            mean, half = mean_ci(values)
            xs.append(e + 1)
            means.append(mean)
            halves.append(half or 0.0)
    return xs, means, halves


def epochs_to_reach(row: Row, threshold: float, key: str = "val_acc") -> int | None:
    """The first epoch whose ``key`` is at least ``threshold`` (None if never)."""
    return next((m["epoch"] for m in row.metrics if m[key] >= threshold), None)


def describe_epochs_to_reach(rows: list[Row], threshold: float) -> str:
    """E.g. ``3.0 (3, 3, 3)`` or ``not reached by 2/3 seeds``."""
    reached = [epochs_to_reach(r, threshold) for r in rows]
    hits = [e for e in reached if e is not None]
    if len(hits) < len(reached):
        return f"not reached by {len(reached) - len(hits)}/{counted(len(reached), 'seed')}"
    return f"{statistics.fmean(hits):.1f} ({', '.join(map(str, hits))})"


def train_val_gap(row: Row) -> float:
    """Final training accuracy (train mode, mean over the last epoch) minus validation accuracy."""
    if row.diverged or not row.metrics:
        return math.nan
    last = row.metrics[-1]
    return last["train_acc"] - last["val_acc"]


# --------------------------------------------------------------------------- drawing intervals

def plot_intervals(ax, points: dict[float, Sequence[float]],
                   bounds: tuple[float, float] = ACCURACY, **kwargs: Any) -> None:
    """Mean and 95% interval (``stats.interval``, intersected with ``bounds``) of each x's
    values, as markers with whiskers on ``ax`` (the look is the next of ``plots.CYCLE``
    unless ``kwargs`` set it); ``kwargs`` go to ``ax.errorbar``."""
    xs = list(points)
    stats = [interval(points[x], bounds) for x in xs]
    means = [m for m, _, _ in stats]
    yerr = [[m - low for m, low, _ in stats], [high - m for m, _, high in stats]]
    ax.errorbar(xs, means, yerr=yerr, **kwargs)


def plot_mean_curves(curves: dict[str, Curve], ax, ylabel: str,
                     bounds: tuple[float, float] = ACCURACY, epochs: bool = True) -> None:
    """Mean curves with 95% CI bands on ``ax``, each band in its line's color; the bands are
    intersected with ``bounds`` (an accuracy's [0, 1] by default), and so is the y axis. With
    ``epochs``, x is an epoch axis (``plots.epoch_axis``); otherwise the caller labels it."""
    for label, (xs, means, halves) in curves.items():
        (line,) = ax.plot(xs, means, label=label)
        bands = [bounded(m, h, bounds) for m, h in zip(means, halves)]
        ax.fill_between(xs, [low for low, _ in bands], [high for _, high in bands], alpha=0.12,
                        color=line.get_color(), linewidth=0)
    if all(map(math.isfinite, bounds)):
        ax.set_ylim(*bounds)
    if epochs:
        epoch_axis(ax)
    ax.set_ylabel(ylabel)
