"""Exercise 3: can batch norm replace dropout? How does behaviour change?

Why: both BN and dropout act differently in training and in prediction, and both are said
to regularize. This grid trains BN-LeNet with BN only, dropout only, both (in either
order) and neither, then measures the regularization (the train–validation gap) and the
train-mode vs eval-mode behaviour of the finished models on the same images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import (
    FAIL_ACCURACY,
    Row,
    by_label,
    finals,
    mean_curve,
    mean_final,
    plot_mean_curves,
    train_val_gap,
)
from bnlab.experiments.findings import Analysis
from bnlab.experiments.measure import accuracy_in_mode, fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import format_mean_ci, mean_ci
from bnlab.training import restore, runs
from bnlab.util.plots import legend, plt, save_figure
from bnlab.util.tables import format_table

MODE_EVAL_IMAGES = 10000  # training images used to compare train and eval mode


def variants(settings: ExpSettings) -> list[Variant]:
    p = settings.dropout
    base = {"model": "bn-lenet"}
    return [
        Variant("neither", {**base, "norm": "none"}, {"bn": False, "dropout": 0.0}),
        Variant("BN only", {**base, "norm": "bnlab"}, {"bn": True, "dropout": 0.0}),
        Variant(f"dropout {p:g} only", {**base, "norm": "none", "dropout": p},
                {"bn": False, "dropout": p}),
        Variant(f"BN, then dropout {p:g}", {**base, "norm": "bnlab", "dropout": p},
                {"bn": True, "dropout": p, "order": "after"}),
        Variant(f"dropout {p:g}, then BN", {**base, "norm": "bnlab", "dropout": p,
                                           "dropout_order": "before"},
                {"bn": True, "dropout": p, "order": "before"}),
    ]


def mode_accuracies(row: Row, dataset) -> dict[str, float]:
    """A finished run's accuracy on the first ``MODE_EVAL_IMAGES`` training images in eval
    mode and on the test set in eval and in train mode; cached in the run folder."""
    train_x = dataset.train_images[:MODE_EVAL_IMAGES]
    train_y = dataset.train_labels[:MODE_EVAL_IMAGES]
    test_x, test_y = dataset.test_images, dataset.test_labels
    key = {"version": 1, "batch_size": 1000, "seed": 0,
           "data": fingerprint(train_x, train_y, test_x, test_y)}

    def compute() -> dict[str, float]:
        model, _ = restore.load_trained_model(row.run_dir)
        return {"train_eval": accuracy_in_mode(model, train_x, train_y, False),
                "val_eval": accuracy_in_mode(model, test_x, test_y, False),
                "val_train": accuracy_in_mode(model, test_x, test_y, True)}

    return runs.cached(row.run_dir, "dropout_modes", key, compute)


def mode_table(groups: dict[str, list[Row]], dataset) -> tuple[str, dict[str, dict]]:
    """Per variant: accuracy on training and test images in eval mode and in train mode."""
    measured: dict[str, dict[str, list[float]]] = {}
    for label, group in groups.items():
        cells = measured.setdefault(label, {"train_eval": [], "val_eval": [], "val_train": []})
        for row in group:
            if row.diverged:
                continue
            for name, acc in mode_accuracies(row, dataset).items():
                cells[name].append(acc)
    rows = []
    for label, cells in measured.items():
        gaps = [a - b for a, b in zip(cells["train_eval"], cells["val_eval"])]
        drops = [a - b for a, b in zip(cells["val_train"], cells["val_eval"])]
        rows.append([label, format_mean_ci(cells["train_eval"]), format_mean_ci(cells["val_eval"]),
                     format_mean_ci(gaps), format_mean_ci(cells["val_train"]),
                     format_mean_ci(drops)])
    headers = ["variant", "train acc (eval mode)", "val acc (eval mode)", "gap",
               "val acc (train mode)", "train mode − eval mode"]
    return format_table(headers, rows), measured


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    groups = by_label(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    plot_mean_curves({label: mean_curve(g) for label, g in groups.items()}, axes[0],
                     "validation accuracy")
    plot_mean_curves({label: mean_curve(g, "train_acc") for label, g in groups.items()},
                     axes[1], "training accuracy (train mode)")
    legend(axes[0])
    save_figure(fig, out / "accuracy_per_epoch.png")

    table = format_table(["variant", "final val acc", "final train acc (train mode)",
                          "train − val gap"], [
        [label, format_mean_ci(finals(g)),
         format_mean_ci(finals(g, "final_train_acc")),
         format_mean_ci([train_val_gap(r) for r in g])] for label, g in groups.items()])
    sections = ["## Accuracy and regularization", "", table, "",
                "The training accuracy here is measured while training (train mode, averaged "
                "over the last epoch), as the chapter's plots show it.", ""]
    measured: dict[str, dict] = {}
    if dataset is not None:
        mode, measured = mode_table(groups, dataset)
        sections += ["## Train mode vs eval mode of the finished models", "", mode, "",
                     f"Same images in both modes: the first {MODE_EVAL_IMAGES} training images "
                     "and the full test set, batches of 1000, on a copy of each model (its BN "
                     "buffers are not touched). 'gap' = train − val accuracy, both in eval mode.",
                     ""]
    return Analysis(sections + findings(groups, measured) + [
        "", "![accuracy per epoch](accuracy_per_epoch.png)"])


def findings(groups: dict[str, list[Row]], measured: dict[str, dict]) -> list[str]:
    """Best accuracy, smallest generalization gap and the train-mode effect, from the numbers.

    The gap is taken in eval mode on the finished models when they were measured (dropout
    lowers train-mode accuracy, so a gap against training-time accuracy understates
    overfitting); otherwise from the training-time accuracy.
    """
    means = {label: mean_final(g) for label, g in groups.items()}
    if measured:
        gaps = {label: mean_ci([a - b for a, b in zip(c["train_eval"], c["val_eval"])])[0]
                for label, c in measured.items() if c["val_eval"]}
        gap_kind = "train − val gap (both in eval mode)"
    else:
        gaps = {label: mean_ci([train_val_gap(r) for r in g])[0] for label, g in groups.items()}
        gap_kind = "train − val gap (training-time train accuracy)"
    best = max(means, key=means.get)
    lines = [f"- Highest final validation accuracy: {best} ({means[best]:.4f}).",
             "- Final validation accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
             + "."]
    trained = {k: v for k, v in gaps.items() if means[k] > FAIL_ACCURACY}
    if trained:
        smallest = min(trained, key=lambda k: abs(trained[k]))
        lines.append(f"- Smallest {gap_kind} among the runs that trained: {smallest} "
                     f"({100 * trained[smallest]:+.2f} points); " + ", ".join(
                         f"{k} {100 * v:+.2f}" for k, v in trained.items()) + ".")
    failed_variants = [k for k, v in means.items() if v <= FAIL_ACCURACY]
    if failed_variants:
        lines.append(f"- Did not train (final accuracy at most {FAIL_ACCURACY}): "
                     + ", ".join(failed_variants) + ".")
    if measured:
        drops = {label: mean_ci([a - b for a, b in zip(c["val_train"], c["val_eval"])])[0]
                 for label, c in measured.items() if c["val_eval"]}
        lines.append("- Switching a finished model to train mode changes its validation "
                     "accuracy by: " + ", ".join(f"{k} {100 * v:+.2f} points"
                                                for k, v in drops.items()) + ".")
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
)
