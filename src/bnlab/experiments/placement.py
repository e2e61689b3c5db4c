"""Exercise 2: do we need batch norm in every layer?

Why: BN-LeNet has four places for a norm layer. Training the same network with BN in all,
some or none of them shows which placements carry the benefit, in final accuracy and in
how fast a fixed accuracy is reached.

Verdicts (``findings``' rule, paired over seeds, final test accuracy): each partial
placement against BN in every layer, as an equivalence within :data:`SAME_MARGIN` ("we do
not need BN in every layer" for that placement when supported), and BN in every layer
against none. Speed (epochs to a validation accuracy) is a finding beside them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import (
    Row,
    by_label,
    describe_epochs_to_reach,
    mean_curve,
    plot_mean_curves,
)
from bnlab.experiments.arms import cell, judge_arms, reported, same_arms
from bnlab.experiments.findings import Analysis, Verdict
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import estimate
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
EVERY, NONE = "every layer", "no BN"
SAME_MARGIN = 0.01
"""A placement is "as accurate as" BN everywhere when their final test accuracies differ by
less than 1 point (paired over seeds)."""
SOURCE = "the chapter (exercise 2)"


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

    headers = ["placement", "final test acc",
               *[f"epochs to {t:.2f} (validation)" for t in THRESHOLDS]]
    table = format_table(headers, [
        [label, cell(g), *[describe_epochs_to_reach(g, t) for t in THRESHOLDS]]
        for label, g in groups.items()])
    return Analysis(["## Accuracy and convergence by placement", "", table, "",
                     "Final test accuracy: mean ± 95% CI over seeds. Epochs to a threshold of "
                     "validation accuracy: mean over seeds (each seed's epoch in parentheses).",
                     "", "![validation accuracy per epoch](val_acc_per_epoch.png)"],
                    findings(groups), verdicts(groups))


def verdicts(groups: dict[str, list[Row]]) -> list[Verdict]:
    """Each partial placement as accurate as BN everywhere (equivalence); BN everywhere
    more accurate than none."""
    every = (EVERY, groups.get(EVERY, []))
    out = [same_arms(f"BN in the {label.replace(' only', '')} alone is as accurate as BN in "
                     "every layer", SOURCE,
                     f"final test accuracy, {label} minus every layer (equivalence margin "
                     f"±{SAME_MARGIN})", every, (label, g), SAME_MARGIN,
                     note="BN-LeNet at the chapter's lr 0.1 for every placement")
           for label, g in groups.items() if label not in (EVERY, NONE)]
    out.append(judge_arms("BN in every layer is more accurate than no BN", SOURCE,
                          "final test accuracy, every layer minus no BN",
                          (NONE, groups.get(NONE, [])), every,
                          note="the same net and rate (0.1) without any norm layer"))
    return out


def findings(groups: dict[str, list[Row]]) -> list[str]:
    means = {label: estimate([reported(r) for r in g if not r.diverged]).mean
             for label, g in groups.items()}
    ranked = sorted(means, key=lambda k: (math.isnan(means[k]), -means[k]))  # nan (all diverged) last
    lines = ["- Ranking by mean final test accuracy: "
             + ", ".join(f"{label} ({means[label]:.4f})" for label in ranked) + "."]
    for t in THRESHOLDS:
        reached = [label for label, g in groups.items()
                   if not describe_epochs_to_reach(g, t).startswith("not reached")]
        lines.append(f"- Every seed reaches {t:.2f} validation accuracy with: "
                     + (", ".join(reached) if reached else "no placement") + ".")
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
    notes="BN-LeNet with bnlab's BN in the named layers only, at the chapter's lr 0.1 and "
          "batch 128 for every placement.",
)
