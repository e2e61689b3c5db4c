"""Exercise 1: learning rates for LeNet with and without batch norm.

Why: the chapter claims BN tolerates larger learning rates. This grid trains the chapter's
plain LeNet and BN-LeNet (bnlab's BN) over a log grid of learning rates and reports the
largest rate that still trains for each: a run *fails* when it diverges or ends at chance
level (final validation accuracy <= 0.2, see ``analysis.FAIL_ACCURACY``); a rate *trains*
when no seed fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import (
    FAIL_ACCURACY,
    Row,
    by_label,
    failed,
    final,
    finals,
    mean_curve,
    plot_intervals,
    plot_mean_curves,
    select,
    training_lrs,
)
from bnlab.experiments.findings import Analysis
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import format_mean_ci
from bnlab.util.plots import legend, log_axis, plt, reference_line, save_figure
from bnlab.util.tables import format_table

LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
MODELS = {False: ("LeNet", {"model": "lenet", "norm": "none"}),
          True: ("BN-LeNet", {"model": "bn-lenet", "norm": "bnlab"})}


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(f"{MODELS[bn][0]} lr={lr:g}", {**MODELS[bn][1], "lr": lr}, {"bn": bn, "lr": lr})
            for bn in (False, True) for lr in LEARNING_RATES]


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    groups = by_label(rows)
    # Validation accuracy per epoch, one line per learning rate, one panel per model.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, bn in zip(axes, (False, True)):
        curves = {f"lr={r[0].tags['lr']:g}": mean_curve(r) for r in groups.values()
                  if r[0].tags["bn"] == bn}
        plot_mean_curves(curves, ax, "validation accuracy")
        ax.set_title(MODELS[bn][0])
        legend(ax)
    save_figure(fig, out / "val_acc_per_epoch.png")

    # Final validation accuracy against learning rate (intervals held to [0, 1]).
    fig, ax = plt.subplots(figsize=(6, 4))
    for bn in (False, True):
        plot_intervals(ax, {lr: finals(group) for lr in LEARNING_RATES
                            if (group := select(rows, bn=bn, lr=lr))}, label=MODELS[bn][0])
    reference_line(ax, FAIL_ACCURACY, label="fails at or below")
    log_axis(ax, "x", label="learning rate")
    ax.set_ylabel("final validation accuracy")
    legend(ax)
    save_figure(fig, out / "final_acc_vs_lr.png")

    table_rows = []
    for lr in LEARNING_RATES:
        cells = [f"{lr:g}"]
        for bn in (False, True):
            group = select(rows, bn=bn, lr=lr)
            fails = sum(failed(r) for r in group)
            cells += [format_mean_ci(finals(group)), f"{fails}/{len(group)}"]
        table_rows.append(cells)
    table = format_table(["lr", "LeNet final val acc", "LeNet failed", "BN-LeNet final val acc",
                          "BN-LeNet failed"], table_rows)
    return Analysis(["## Accuracy by learning rate", "", table, "", *findings(rows), "",
            "![validation accuracy per epoch](val_acc_per_epoch.png)", "",
            "![final accuracy against learning rate](final_acc_vs_lr.png)"])


def findings(rows: list[Row]) -> list[str]:
    top = max(LEARNING_RATES)
    lines = [f"- A run **fails** when its loss becomes non-finite or its final validation "
             f"accuracy is at most {FAIL_ACCURACY} (chance is 0.1); a learning rate trains when "
             "no seed fails."]
    largest = {}
    for bn in (False, True):
        ok = training_lrs(rows, bn=bn)
        largest[bn] = max(ok, default=None)
        if not ok:
            lines.append(f"- {MODELS[bn][0]}: no learning rate of the grid trains.")
            continue
        bound = (f"at least **{top:g}** (the top of the grid: no failure found)" if ok[-1] == top
                 else f"**{ok[-1]:g}**")
        lines.append(f"- {MODELS[bn][0]}: the largest learning rate that still trains is {bound}; "
                     f"rates that train: {', '.join(f'{lr:g}' for lr in ok)}.")
    if largest[False] and largest[True]:
        ratio = largest[True] / largest[False]
        lines.append(f"- Batch norm tolerates a learning rate {'at least ' if largest[True] == top else ''}"
                     f"{ratio:g}x as large (resolved to the grid's spacing of about 3x).")
    for bn in (False, True):
        best = max((r for r in rows if r.tags["bn"] == bn), key=final, default=None)
        if best is not None:
            lines.append(f"- Best single run, {MODELS[bn][0]}: lr {best.tags['lr']:g}, final "
                         f"val acc {final(best):.4f}.")
    return lines


EXPERIMENT = Experiment(
    name="lr",
    title="Exercise 1: learning rates with and without batch norm",
    question="How large can the learning rate be before optimization fails, for LeNet with and "
             "without batch normalization, and how does validation accuracy rise per epoch?",
    variants=variants,
    analyze=analyze,
    default_epochs=5,
    default_subset=0,
    notes="(Default: 5 epochs instead of the chapter's 10, to fit 66 runs in 40 minutes; "
          "`--full` runs 10.)",
)
