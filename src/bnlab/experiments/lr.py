"""Exercise 1: learning rates for LeNet with and without batch norm.

Why: the chapter claims BN tolerates larger learning rates. This grid trains the chapter's
plain LeNet and BN-LeNet (bnlab's BN) over a log grid of learning rates and reports the
largest rate that still trains for each: a run *fails* when it diverges or ends at chance
level (final validation accuracy <= 0.2, see ``analysis.FAIL_ACCURACY``); a rate *trains*
when no seed fails.

Verdicts (``findings``' rule, paired over seeds): "BN tolerates larger rates" on each
seed's largest stable rate (the last of its first run of training rates, so that a fluke
over the bar above failed rates does not count; calibrated on made-up seeds), in decades,
BN minus LeNet; and "BN is more accurate"
on final test accuracy with each model at its best rate. Every choice (which runs fail,
the best rate) is made on the validation split; the accuracies reported are the test set's.
``precise`` reads the best rates from here (``analysis.best_lr_per_model``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import (
    FAIL_ACCURACY,
    Row,
    best_lr,
    by_label,
    failed,
    finals,
    mean_curve,
    mean_final,
    plot_intervals,
    plot_mean_curves,
    select,
    training_lrs,
)
from bnlab.experiments.arms import cell, judge_arms
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    not_measured,
)
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
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

    # Final validation accuracy against learning rate (intervals held to [0, 1]): what the
    # failure rule and the best rate are read from.
    fig, ax = plt.subplots(figsize=(6, 4))
    for bn in (False, True):
        plot_intervals(ax, {lr: finals(group) for lr in LEARNING_RATES
                            if (group := select(rows, bn=bn, lr=lr))}, label=MODELS[bn][0])
    reference_line(ax, FAIL_ACCURACY, label="fails at or below")
    log_axis(ax, "x", label="learning rate")
    ax.set_ylabel("final validation accuracy")
    legend(ax)
    save_figure(fig, out / "final_acc_vs_lr.png")

    best = {bn: best_lr(rows, LEARNING_RATES, bn=bn) for bn in (False, True)}
    table_rows = []
    for lr in LEARNING_RATES:
        cells = [f"{lr:g}"]
        for bn in (False, True):
            group = select(rows, bn=bn, lr=lr)
            fails = sum(failed(r) for r in group)
            mark = " (best on validation)" if group and lr == best[bn] else ""
            cells += [cell(group) + mark, f"{fails}/{len(group)}"]
        table_rows.append(cells)
    table = format_table(["lr", "LeNet final test acc", "LeNet failed", "BN-LeNet final test acc",
                          "BN-LeNet failed"], table_rows)
    sections = ["## Accuracy by learning rate", "", table, "",
                f"A run **fails** when its loss becomes non-finite or its final validation "
                f"accuracy is at most {FAIL_ACCURACY} (chance is 0.1); a learning rate trains "
                "when no seed fails. The best rate of each model is the one with the highest "
                "mean final validation accuracy; the table reports test accuracy.", "",
                "![validation accuracy per epoch](val_acc_per_epoch.png)", "",
                "![final accuracy against learning rate](final_acc_vs_lr.png)"]
    return Analysis(sections, findings(rows), verdicts(rows), calibration())


def largest_stable_rate(trains_at: dict[float, bool]) -> float:
    """The largest rate of a seed's first run of training rates: up from the smallest rate it
    trains at, to the last before a rate where it fails (nan if it trains at none).

    A run that clears the failure bar above rates that all failed (BN-LeNet at lr 1000 with
    25% accuracy after failing at 100) is noise near the bar, not a rate that trains: the
    plain maximum counted it. Calibrated in :func:`calibration`."""
    largest = math.nan
    for rate in sorted(trains_at):
        if trains_at[rate]:
            largest = rate
        elif math.isfinite(largest):
            break
    return largest


def largest_training_rate(rows: list[Row], bn: bool) -> dict[int, float]:
    """Per seed, :func:`largest_stable_rate` of that seed's runs of the model (trains: did
    not fail, a choice on validation accuracy)."""
    group = select(rows, bn=bn)
    return {seed: largest_stable_rate({r.tags["lr"]: not failed(r) for r in group
                                       if r.seed == seed})
            for seed in sorted({r.seed for r in group})}


def calibration() -> list[Calibration]:
    """The largest stable rate, and the verdict's difference of it, on made-up seeds whose
    answer is known: a seed that trains from 0.1 to 30 with a fluke over the bar at 1000,
    one slow to start (fails at 0.01 and 0.03), and two models that both stop at 3, one of
    them slow to start (effect 0)."""
    fluke = {r: 0.1 <= r <= 30 or r == 1000 for r in LEARNING_RATES}
    slow = {r: 0.1 <= r <= 1 for r in LEARNING_RATES}
    early, late = ({r: low <= r <= 3 for r in LEARNING_RATES} for low in (0.01, 0.1))
    fluke_read, slow_read = largest_stable_rate(fluke), largest_stable_rate(slow)
    large = math.log10(fluke_read) - math.log10(slow_read)
    absent = math.log10(largest_stable_rate(early)) - math.log10(largest_stable_rate(late))
    seed, difference = ("largest stable rate of a seed",
                        "log10 largest stable rate, one model minus the other (decades)")
    return [
        Calibration(seed, "trains at 0.1-30, fails at 100 and 300, clears the bar at 1000",
                    "30", f"{fluke_read:g}", fluke_read == 30),
        Calibration(seed, "fails at 0.01 and 0.03 (too slow), trains at 0.1-1, fails above",
                    "1", f"{slow_read:g}", slow_read == 1),
        Calibration(difference, "the two seeds above", f"{math.log10(30):.3f}", f"{large:.3f}",
                    math.isclose(large, math.log10(30))),
        Calibration(difference, "both stop at 3; one trains from 0.01, the other from 0.1",
                    "0", f"{absent:g}", absent == 0),
    ]


def verdicts(rows: list[Row]) -> list[Verdict]:
    """Exercise 1's claims: BN tolerates larger rates; at each model's best rate, BN is more
    accurate."""
    source = "the chapter (exercise 1); Ioffe & Szegedy 2015"
    top = max(LEARNING_RATES)
    largest = {bn: largest_training_rate(rows, bn) for bn in (False, True)}
    claim, measure = ("BN tolerates larger learning rates",
                      "log10 of the largest stable rate of a seed (the last of its first run of "
                      "training rates), BN-LeNet minus LeNet (decades)")
    paper = "BN-Inception trained at 5x and 30x the baseline's rate"
    untrained = [MODELS[bn][0] for bn in (False, True)
                 if not any(map(math.isfinite, largest[bn].values()))]
    if untrained:
        tolerance = not_measured(claim, source, measure,
                                 f"{' and '.join(untrained)} trains at no rate of the grid",
                                 paper=paper)
    else:
        at_top = sum(v == top for v in largest[True].values())
        note = (f"grid 3x apart; BN-LeNet trains at the top of the grid ({top:g}) in {at_top}/"
                f"{len(largest[True])} seeds, so the effect is a lower bound" if at_top else
                "grid 3x apart: the effect is resolved to about 0.5 decade")
        decades = {bn: {s: math.log10(v) if math.isfinite(v) else math.nan
                        for s, v in largest[bn].items()} for bn in (False, True)}
        tolerance = judge_difference(claim, source, measure, decades[False], decades[True],
                                     failed=_never_trains(largest), paper=paper,
                                     note=note + "; LeNet pads its first convolution, BN-LeNet "
                                                 "does not (the chapter's models)")
    best = {bn: best_lr(rows, LEARNING_RATES, bn=bn) for bn in (False, True)}
    at_best = {bn: select(rows, bn=bn, lr=best[bn]) if best[bn] is not None else []
               for bn in (False, True)}
    accuracy = judge_arms("each at its best rate, BN-LeNet is more accurate than LeNet",
                          "the chapter (exercise 1)",
                          "final test accuracy, BN-LeNet minus LeNet, each at its best rate "
                          "on validation" + "".join(f"; {MODELS[bn][0]} lr {best[bn]:g}"
                                                    for bn in (False, True)
                                                    if best[bn] is not None),
                          (MODELS[False][0], at_best[False]), (MODELS[True][0], at_best[True]))
    return [tolerance, accuracy]


def _never_trains(largest: dict[bool, dict[int, float]]) -> str:
    return "; ".join(f"{MODELS[bn][0]}: {k}/{len(v)} seeds train at no rate"
                     for bn, v in largest.items() if (k := sum(not math.isfinite(x) for x in v.values())))


def findings(rows: list[Row]) -> list[str]:
    top = max(LEARNING_RATES)
    lines = []
    for bn in (False, True):
        ok = training_lrs(rows, bn=bn)
        if not ok:
            lines.append(f"- {MODELS[bn][0]}: no learning rate of the grid trains every seed.")
            continue
        bound = (f"at least **{top:g}** (the top of the grid: no failure found)" if ok[-1] == top
                 else f"**{ok[-1]:g}**")
        lines.append(f"- {MODELS[bn][0]}: the largest learning rate that trains every seed is "
                     f"{bound}; rates that train: {', '.join(f'{lr:g}' for lr in ok)}.")
    for bn in (False, True):
        lr = best_lr(rows, LEARNING_RATES, bn=bn)
        if lr is not None:
            group = select(rows, bn=bn, lr=lr)
            lines.append(f"- Best rate on validation, {MODELS[bn][0]}: **{lr:g}** (mean final "
                         f"validation accuracy {mean_final(group):.4f}; test accuracy "
                         f"{cell(group)}).")
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
    notes="Each model at every rate of a log grid (about 3x apart), batch 128, SGD without "
          "momentum. A rate trains when no seed fails (diverges, or ends at or below "
          f"{FAIL_ACCURACY} validation accuracy); each model's best rate is the one with the "
          "highest mean final validation accuracy, and its accuracy is reported on the test "
          "set. The default runs 5 epochs, the chapter 10 (`--full`).",
)
