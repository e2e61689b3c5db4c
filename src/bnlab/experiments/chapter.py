"""The chapter's own training over several seeds: LeNet, BN-LeNet (bnlab), BN-LeNet (torch).

Why: the demo trains each model once (seed 0). Whether bnlab's BN-LeNet reaches the
chapter's accuracy, and matches torch's BN, is a claim about a distribution, so this grid
repeats the chapter's settings (10 epochs, lr 0.1, batch 128, all 60000 images) over seeds,
with the chapter's protocol: no validation split, the test set is the "validation" set
(nothing is chosen here, so nothing is chosen on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import Row, by_label, final, mean_final
from bnlab.experiments.findings import Analysis
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import mean_ci
from bnlab.util.tables import format_table

RUNS = {
    "LeNet (no BN)": {"model": "lenet", "norm": "none", "val_size": 0},
    "BN-LeNet, bnlab BN": {"model": "bn-lenet", "norm": "bnlab", "val_size": 0},
    "BN-LeNet, torch BN": {"model": "bn-lenet", "norm": "torch", "val_size": 0},
}
TARGET = 0.855  # the bar for BN-LeNet's mean accuracy over seeds


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(label, params, {"norm": params["norm"]}) for label, params in RUNS.items()]


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    groups = by_label(rows)
    table = format_table(
        ["run", "final val acc per seed", "mean", "best val acc (mean)", "s/epoch (mean)"],
        [[label,
          ", ".join(f"{final(r):.4f}" for r in g),
          f"{mean_final(g):.4f}",
          f"{mean_final(g, 'best_val_acc'):.4f}",
          f"{mean_ci([r.summary['median_seconds_per_epoch'] or 0 for r in g])[0]:.2f}"]
         for label, g in groups.items()])
    lines = ["## Per seed", "", table, ""]
    for label, g in groups.items():
        if label.startswith("BN-LeNet"):
            mean = mean_final(g)
            verdict = "meets" if mean >= TARGET else "misses"
            lines.append(f"- {label}: mean final validation accuracy {mean:.4f} {verdict} the "
                         f"{TARGET} bar.")
    return Analysis(lines)


EXPERIMENT = Experiment(
    name="chapter",
    title="The chapter's training over seeds",
    question="What validation accuracy do LeNet and BN-LeNet (bnlab's and torch's BN) reach "
             "with the chapter's settings, seed to seed?",
    variants=variants,
    analyze=analyze,
    default_epochs=10,
    default_subset=0,
)
