"""Exercise 3: can batch norm replace dropout? How does behaviour change?

Why: both BN and dropout act differently in training and in prediction, and both are said
to regularize. This grid trains BN-LeNet with BN only, dropout only, both (in either
order) and neither, then measures the regularization and the train-mode vs eval-mode
behaviour of the finished models on the same images:

* the *generalization gap*: eval-mode accuracy on the run's own training images (up to
  :data:`MODE_EVAL_IMAGES` of them) minus on the test set (``measure.generalization_gap``);
* the *mode difference*: test accuracy in train mode minus in eval mode
  (``measure.mode_difference``).

Both are read on synthetic models with known answers in every report (``measure``'s
calibrations). Verdicts (``findings``' rule, paired over seeds): BN alone is at least as
accurate as dropout alone (non-inferiority within :data:`MARGIN`), its gap is no larger than
dropout's (the same), and BN and dropout each narrow the gap of the net with neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import Row, by_label, failed, mean_curve, plot_mean_curves
from bnlab.experiments.arms import REPORTED, cell, judge_arms
from bnlab.experiments.findings import Analysis, Verdict
from bnlab.experiments.measure import (
    accuracy_in_mode,
    calibrate_generalization_gap,
    calibrate_mode_difference,
    fingerprint,
)
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import estimate
from bnlab.training import restore, runs
from bnlab.training.train import TrainConfig, build_loaders
from bnlab.util.config import config_from_dict
from bnlab.util.plots import legend, plt, save_figure
from bnlab.util.tables import format_table

MODE_EVAL_IMAGES = 10000  # of the run's own training images, for the generalization gap
QUICK_IMAGES = 1000  # --quick: training and test images measured
MARGIN = 0.01
"""BN "can replace" dropout when its test accuracy is not below dropout's by more than 1
point, and regularizes as well when its gap is not larger by more than 1 point."""
NEITHER, BN_ONLY = "neither", "BN only"
SOURCE = "the chapter (exercise 3)"


def variants(settings: ExpSettings) -> list[Variant]:
    p = settings.dropout
    base = {"model": "bn-lenet"}
    return [
        Variant(NEITHER, {**base, "norm": "none"}, {"bn": False, "dropout": 0.0}),
        Variant(BN_ONLY, {**base, "norm": "bnlab"}, {"bn": True, "dropout": 0.0}),
        Variant(f"dropout {p:g} only", {**base, "norm": "none", "dropout": p},
                {"bn": False, "dropout": p}),
        Variant(f"BN, then dropout {p:g}", {**base, "norm": "bnlab", "dropout": p},
                {"bn": True, "dropout": p, "order": "after"}),
        Variant(f"dropout {p:g}, then BN", {**base, "norm": "bnlab", "dropout": p,
                                           "dropout_order": "before"},
                {"bn": True, "dropout": p, "order": "before"}),
    ]


def mode_accuracies(row: Row, dataset, images: int = MODE_EVAL_IMAGES) -> dict[str, float]:
    """A finished run's eval-mode accuracy on (the first ``images`` of) its own training
    images, and on (the first ``images`` of) the test set in eval and in train mode; cached
    in the run folder."""
    config = config_from_dict(TrainConfig, row.config)
    trained = build_loaders(config, dataset, "cpu").train
    train_x, train_y = trained.images[:images], trained.labels[:images]
    test_x, test_y = dataset.test_images[:images], dataset.test_labels[:images]
    key = {"version": 2, "batch_size": 1000, "seed": 0,
           "data": fingerprint(train_x, train_y, test_x, test_y)}

    def compute() -> dict[str, float]:
        model, _ = restore.load_trained_model(row.run_dir)
        return {"train_eval": accuracy_in_mode(model, train_x, train_y, False),
                "test_eval": accuracy_in_mode(model, test_x, test_y, False),
                "test_train": accuracy_in_mode(model, test_x, test_y, True)}

    return runs.cached(row.run_dir, "dropout_modes", key, compute)


Measured = dict[str, dict[str, float]]  # run folder -> mode_accuracies


def measure_all(rows: list[Row], dataset, images: int) -> Measured:
    """:func:`mode_accuracies` of every run that did not diverge, by run folder."""
    return {r.run_dir: mode_accuracies(r, dataset, images) for r in rows if not r.diverged}


def _gap(measured: Measured):
    def value(row: Row) -> float | None:
        m = measured.get(row.run_dir)
        return None if m is None else m["train_eval"] - m["test_eval"]
    return value


def _mode(measured: Measured):
    def value(row: Row) -> float | None:
        m = measured.get(row.run_dir)
        return None if m is None else m["test_train"] - m["test_eval"]
    return value


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    groups = by_label(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    plot_mean_curves({label: mean_curve(g) for label, g in groups.items()}, axes[0],
                     "validation accuracy")
    plot_mean_curves({label: mean_curve(g, "train_acc") for label, g in groups.items()},
                     axes[1], "training accuracy (train mode)")
    legend(axes[0])
    save_figure(fig, out / "accuracy_per_epoch.png")

    images = QUICK_IMAGES if settings.quick else MODE_EVAL_IMAGES
    measured = measure_all(rows, dataset, images) if dataset is not None else {}
    gap, mode = _gap(measured), _mode(measured)
    table = format_table(["variant", "final test acc", "final train acc (train mode)",
                          "generalization gap (eval mode)", "test acc, train − eval mode"], [
        [label, cell(g), cell(g, lambda r: r.summary.get("final_train_acc")),
         cell(g, gap) if measured else "-", cell(g, mode) if measured else "-"]
        for label, g in groups.items()])
    sections = ["## Accuracy, regularization and the mode", "", table, "",
                "Final train accuracy is measured while training (train mode, averaged over "
                "the last epoch), as the chapter's plots show it. The generalization gap is "
                f"eval-mode accuracy on the first {images} of the run's own training images "
                f"minus on the first {min(images, 10000)} test images; the mode column is "
                "test accuracy in train mode minus in eval mode (batches of 1000, dropout "
                "masks seeded), both on a copy of each model (its BN buffers untouched). "
                "Mean ± 95% CI over seeds, n per cell; diverged runs are counted, not measured.",
                "", "![accuracy per epoch](accuracy_per_epoch.png)"]
    return Analysis(sections, findings(groups, gap, mode, bool(measured)),
                    verdicts(groups, gap, bool(measured)),
                    calibrate_generalization_gap() + calibrate_mode_difference())


def verdicts(groups: dict[str, list[Row]], gap, measured: bool) -> list[Verdict]:
    """Exercise 3's claims (see the module docstring)."""
    drop = next((label for label in groups if label.startswith("dropout") and label.endswith("only")),
                "dropout only")
    bn, dropout, neither = ((label, groups.get(label, [])) for label in (BN_ONLY, drop, NEITHER))
    out = [judge_arms("BN can replace dropout: BN alone is at least as accurate as dropout alone",
                      SOURCE, f"final test accuracy, {BN_ONLY} minus {drop} (non-inferiority "
                      f"margin {MARGIN})", dropout, bn, margin=-MARGIN,
                      note="the same net and rate (0.1); dropout in the two hidden FC blocks")]
    if not measured:
        return out
    gap_measure = "generalization gap (train minus test accuracy, eval mode)"
    return out + [
        judge_arms("BN regularizes as dropout does: its gap is no larger than dropout's", SOURCE,
                   f"{gap_measure}, {BN_ONLY} minus {drop} (non-inferiority margin {MARGIN})",
                   dropout, bn, gap, direction=-1, margin=-MARGIN),
        judge_arms("BN narrows the generalization gap", "the chapter",
                   f"{gap_measure}, {BN_ONLY} minus {NEITHER}", neither, bn, gap, direction=-1),
        judge_arms("dropout narrows the generalization gap", "Srivastava et al. 2014",
                   f"{gap_measure}, {drop} minus {NEITHER}", neither, dropout, gap, direction=-1,
                   note="the known effect: a check that the gap measure sees regularization"),
    ]


def findings(groups: dict[str, list[Row]], gap, mode, measured: bool) -> list[str]:
    """Best accuracy, the gaps and the train-mode effect, from the numbers (test accuracy)."""
    def mean(g: list[Row], value) -> float:
        return estimate([value(r) for r in g if not r.diverged]).mean

    accuracy = {label: mean(g, lambda r: r.summary.get(REPORTED)) for label, g in groups.items()}
    trained = {label: v for label, v in accuracy.items() if not all(map(failed, groups[label]))}
    lines = []
    if trained:
        best = max(trained, key=trained.get)
        lines.append(f"- Highest mean final test accuracy: {best} ({trained[best]:.4f}); "
                     + ", ".join(f"{k} {v:.4f}" for k, v in trained.items()) + ".")
    untrained = [label for label in groups if label not in trained]
    if untrained:
        lines.append("- Did not train (every seed failed): " + ", ".join(untrained) + ".")
    if measured and trained:
        lines.append("- Generalization gap (eval mode), mean over seeds: " + ", ".join(
            f"{k} {100 * mean(groups[k], gap):+.2f} points" for k in trained) + ".")
        lines.append("- Switching a finished model to train mode changes its test accuracy by: "
                     + ", ".join(f"{k} {100 * mean(groups[k], mode):+.2f} points"
                                 for k in trained) + ".")
    return lines


EXPERIMENT = Experiment(
    name="dropout",
    title="Exercise 3: dropout vs batch norm",
    question="Can batch normalization replace dropout? How do accuracy, regularization and the "
             "train/eval behaviour change with BN, dropout, both (in either order) or neither?",
    variants=variants,
    analyze=analyze,
    default_epochs=10,
    default_subset=0,
    notes="BN-LeNet at the chapter's lr 0.1 and batch 128 for every variant; dropout in the "
          "two hidden FC blocks, after the activation (or before the BN where named). The "
          "finished models are evaluated again in eval and in train mode (see the tables).",
)
