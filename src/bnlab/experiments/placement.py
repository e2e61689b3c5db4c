"""Exercise 2: do we need batch norm in every layer?

Why: BN-LeNet has four places for a norm layer. Training the same network with BN in all,
some or none of them shows which placements carry the benefit, in final accuracy and in
how fast a fixed accuracy is reached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import (
    Row,
    by_label,
    describe_epochs_to_reach,
    finals,
    mean_curve,
    mean_final,
    plot_mean_curves,
)
from bnlab.experiments.findings import Analysis
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import format_mean_ci, intervals_apart
from bnlab.util.plots import legend, plt, save_figure
from bnlab.util.tables import format_table

PLACEMENTS = {
    "every layer": "all",
    "conv layers only": "conv",
    "FC layers only": "fc",
    "first layer only": "conv1",
    "last hidden layer only": "fc2",
    "no BN": "none",
}
THRESHOLDS = (0.80, 0.85)


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(label, {"model": "bn-lenet", "norm": "bnlab", "norm_slots": slots},
                    {"slots": slots}) for label, slots in PLACEMENTS.items()]


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    groups = by_label(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_mean_curves({label: mean_curve(g) for label, g in groups.items()}, ax,
                     "validation accuracy")
    ax.set_title("BN placement in LeNet (mean, 95% CI over seeds)")
    legend(ax)
    save_figure(fig, out / "val_acc_per_epoch.png")

    headers = ["placement", "final val acc", *[f"epochs to {t:.2f}" for t in THRESHOLDS]]
    table = format_table(headers, [
        [label, format_mean_ci(finals(g)),
         *[describe_epochs_to_reach(g, t) for t in THRESHOLDS]]
        for label, g in groups.items()])
    return Analysis(["## Accuracy and convergence by placement", "", table, "",
            "Epochs to a threshold: mean over seeds (each seed's epoch in parentheses).", "",
            *findings(groups), "", "![validation accuracy per epoch](val_acc_per_epoch.png)"])


def findings(groups: dict[str, list[Row]]) -> list[str]:
    means = {label: mean_final(g) for label, g in groups.items()}
    ranked = sorted(means, key=means.get, reverse=True)
    lines = ["- Ranking by mean final validation accuracy: "
             + ", ".join(f"{label} ({means[label]:.4f})" for label in ranked) + "."]
    reference, baseline = "every layer", "no BN"
    if reference in groups and baseline in groups:
        for label in ranked:
            if label in (reference, baseline):
                continue
            gain = means[label] - means[baseline]
            if intervals_apart(finals(groups[label]), finals(groups[reference])):
                versus = (f"{100 * (means[label] - means[reference]):+.2f} points from BN "
                          "everywhere, intervals apart.")
            elif min(len(groups[label]), len(groups[reference])) < 2:
                versus = "a single seed has no interval (no difference from BN everywhere resolved)."
            else:
                versus = "its interval overlaps BN-everywhere's (no difference resolved)."
            lines.append(f"- {label}: {100 * gain:+.2f} points against no BN; {versus}")
    return lines


EXPERIMENT = Experiment(
    name="placement",
    title="Exercise 2: batch norm in every layer, some, or none",
    question="Does LeNet need batch norm after every layer? Which placements matter for "
             "accuracy and for convergence speed?",
    variants=variants,
    analyze=analyze,
    default_epochs=10,
    default_subset=0,
)
