"""Claim: batch normalization "reliably speeds up training".

Why: "faster" needs a measure. This grid trains the chapter's plain LeNet and BN-LeNet
(bnlab's BN) over a small learning-rate sweep, evaluating on the validation split every
``eval_every`` SGD steps (finer than an epoch), and measures for each model *at its own
best learning rate* (highest mean final validation accuracy over seeds):

* the SGD steps, and the training seconds (evaluation time excluded), until validation
  accuracy first reaches 0.80 and 0.85, and the speed-up factor (baseline / BN);
* the comparison behind Ioffe & Szegedy's (2015) headline: the baseline's best accuracy (the
  maximum of its seed-mean validation curve) is the target; how many steps did BN need to
  reach it, against the baseline's steps, and at what learning-rate ratio. (They report
  BN reaching Inception's accuracy in 14x fewer steps, at 5x its learning rate.)

Definitions: a run's progress curve is its periodic evaluations plus its end-of-epoch
evaluations of the validation split, by global step; steps to a threshold is the first
evaluated step at or above it (so it is resolved to ``eval_every`` steps), "not reached"
when no evaluation reaches it. Seed-mean curves average the seeds at each evaluated step (a
diverged seed counts at chance after it diverged).

Learning rates: LeNet {0.3, 1, 3}, BN-LeNet {0.1, 0.3, 1, 3}, 3x apart. BN-LeNet's include
the chapter's 0.1; LeNet's start at 0.3 because a sigmoid LeNet without normalization at
0.1 is still at chance level after hundreds of steps (measured: 0.10 after 2 epochs on
10000 images) and would only cost time. Evaluation: every 50 steps for BN-LeNet and every
100 for LeNet, i.e. finer for the model expected to reach a threshold early, so that the
speed-up ratio is resolved to a similar relative precision; an evaluation of the 10000
validation images costs as much as 25-50 training steps, so this also keeps the grid's cost
down (the training seconds reported exclude evaluation either way).

Verdicts (``findings``' rule, paired over seeds): BN-LeNet needs fewer steps than LeNet to
reach each threshold, each at its best rate (a LeNet seed that never reaches it counts with
its run's whole budget, a lower bound that can only shrink the effect; a BN-LeNet seed that
never reaches it leaves the claim unmeasured); and Ioffe & Szegedy's 14x, per seed: LeNet's
best validation accuracy is the target, and the speed-up is LeNet's steps to it over
BN-LeNet's. Steps to a threshold are read on synthetic curves with a known crossing in
every report (:func:`calibrate_steps`). Speeds are measured on the validation split (the
periodic evaluations); accuracies reported in tables are the test set's.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bnlab.data.dataset import TRAIN_SIZE
from bnlab.experiments import analysis
from bnlab.experiments.analysis import CHANCE, FAIL_ACCURACY, Row, mean_final, select
from bnlab.experiments.arms import cell, does_not_train, failures
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    not_measured,
)
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.training.train import steps_per_epoch, training_images
from bnlab.util.plots import count_axis, legend, plt, reference_line, save_figure
from bnlab.util.tables import counted, format_table

LEARNING_RATES = {False: (0.3, 1.0, 3.0), True: (0.1, 0.3, 1.0, 3.0)}
MODELS = {False: ("LeNet", {"model": "lenet", "norm": "none"}),
          True: ("BN-LeNet", {"model": "bn-lenet", "norm": "bnlab"})}
THRESHOLDS = (0.80, 0.85)
EVAL_EVERY = {False: 100, True: 50}
BATCH_SIZE = 128
IOFFE_SZEGEDY = "Ioffe & Szegedy (2015): BN-x5 reached Inception's accuracy in 14x fewer steps " \
                "at 5x its learning rate"
IOFFE_SPEEDUP = 14.0

Point = tuple[int, float, float]  # (global step, training seconds so far, val acc)


def eval_interval(settings: ExpSettings, bn: bool) -> int:
    """``EVAL_EVERY[bn]``, or fewer steps when an epoch is short (2 evaluations an epoch)."""
    n = training_images(settings.subset, settings.val_size)
    return min(EVAL_EVERY[bn], max(1, steps_per_epoch(n, BATCH_SIZE) // 2))


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(f"{MODELS[bn][0]} lr={lr:g}",
                    {**MODELS[bn][1], "lr": lr, "eval_every": eval_interval(settings, bn)},
                    {"bn": bn, "lr": lr})
            for bn in (False, True) for lr in LEARNING_RATES[bn]]


# --------------------------------------------------------------------------- definitions

def progress(row: Row, n_images: int | None = None) -> list[Point]:
    """A run's (step, train seconds, val acc) at every periodic and end-of-epoch evaluation.

    ``n_images`` is the size of the dataset's training set (default 60000), of which the run
    held out its validation split and trained on the rest or on its subset.
    """
    config = row.config
    images = training_images(config["subset"], config.get("val_size", 0), n_images or TRAIN_SIZE)
    per_epoch = steps_per_epoch(images, config["batch_size"])
    points = {e["step"]: (e["step"], e["train_seconds"], e["val_acc"]) for e in row.evals}
    seconds = 0.0
    for m in row.metrics:
        seconds += m["train_seconds"]
        step = m["epoch"] * per_epoch
        points.setdefault(step, (step, seconds, m["val_acc"]))
    return [points[s] for s in sorted(points)]


def steps_to_reach(points: list[Point], threshold: float) -> tuple[int, float] | None:
    """(step, seconds) of the first evaluation at or above ``threshold``; None if none."""
    return next(((s, t) for s, t, acc in points if acc >= threshold), None)


def mean_progress(rows: list[Row], n_images: int | None = None) -> list[Point]:
    """Seed-mean (step, seconds, val acc) at every step evaluated in any seed; after a seed
    diverged it counts at chance (and its seconds are left out)."""
    curves = [(progress(r, n_images), r.diverged) for r in rows]
    steps = sorted({p[0] for points, _ in curves for p in points})
    out = []
    for step in steps:
        accs, secs = [], []
        for points, diverged in curves:
            at = {p[0]: p for p in points}
            if step in at:
                accs.append(at[step][2])
                secs.append(at[step][1])
            elif diverged and (not points or step > points[-1][0]):
                accs.append(CHANCE)
        if accs:
            out.append((step, statistics.fmean(secs) if secs else math.nan,
                        statistics.fmean(accs)))
    return out


def best_lr(rows: list[Row], bn: bool) -> float | None:
    """The rate with the highest mean final validation accuracy (``analysis.best_lr``; ties:
    the smaller rate)."""
    return analysis.best_lr(rows, LEARNING_RATES[bn], bn=bn)


def reach_stats(rows: list[Row], threshold: float,
                n_images: int | None = None) -> dict[str, Any]:
    """Per seed steps/seconds to ``threshold``; means over the seeds that reached it."""
    hits = [steps_to_reach(progress(r, n_images), threshold) for r in rows]
    reached = [h for h in hits if h is not None]
    return {"seeds": len(rows), "reached": len(reached),
            "steps": [h[0] for h in reached], "seconds": [h[1] for h in reached],
            "mean_steps": statistics.fmean(h[0] for h in reached) if reached else None,
            "mean_seconds": statistics.fmean(h[1] for h in reached) if reached else None}


def describe_reach(stats: dict[str, Any]) -> str:
    """E.g. ``350 steps, 6.1 s (300, 400)`` or ``not reached by 1/2 seeds``."""
    if stats["seeds"] == 0:
        return "-"
    if stats["reached"] < stats["seeds"]:
        return (f"not reached by {stats['seeds'] - stats['reached']}/"
                f"{counted(stats['seeds'], 'seed')}")
    return (f"{stats['mean_steps']:.0f} steps, {stats['mean_seconds']:.1f} s "
            f"({', '.join(map(str, stats['steps']))})")


def ioffe_comparison(rows: list[Row], n_images: int | None = None) -> dict[str, Any] | None:
    """The baseline's best seed-mean accuracy, the step it got there, and per BN rate the
    first step BN's seed-mean curve reached it (None when BN never did)."""
    base_lr = best_lr(rows, False)
    if base_lr is None:
        return None
    base = mean_progress(select(rows, bn=False, lr=base_lr), n_images)
    if not base:
        return None
    target_step, _, target = max(base, key=lambda p: (p[2], -p[0]))
    per_lr = {}
    for lr in LEARNING_RATES[True]:
        group = select(rows, bn=True, lr=lr)
        if group:
            hit = steps_to_reach(mean_progress(group, n_images), target)
            per_lr[lr] = None if hit is None else hit[0]
    return {"base_lr": base_lr, "target": target, "base_steps": target_step, "bn": per_lr}


# --------------------------------------------------------------------------- per seed

def steps_per_seed(rows: list[Row], threshold: float, n_images: int | None = None,
                   censor: bool = False) -> dict[int, float]:
    """``{seed: steps to threshold}``; a seed that never reaches it is nan, or with
    ``censor`` its run's last evaluated step (a lower bound of its steps)."""
    out = {}
    for row in rows:
        points = progress(row, n_images)
        hit = steps_to_reach(points, threshold)
        if hit is not None:
            out[row.seed] = float(hit[0])
        else:
            out[row.seed] = float(points[-1][0]) if censor and points else math.nan
    return out


def ioffe_per_seed(base: list[Row], bn: list[Row], n_images: int | None = None
                   ) -> dict[int, float]:
    """Per seed both models share: LeNet's steps to its own best validation accuracy over
    BN-LeNet's steps to that accuracy (nan where BN-LeNet never reaches it)."""
    bn_by_seed = {r.seed: r for r in bn}
    out = {}
    for row in base:
        points = progress(row, n_images)
        if row.seed not in bn_by_seed or not points:
            continue
        step, _, target = max(points, key=lambda p: (p[2], -p[0]))
        hit = steps_to_reach(progress(bn_by_seed[row.seed], n_images), target)
        out[row.seed] = step / hit[0] if hit is not None else math.nan
    return out


# --------------------------------------------------------------------------- report

def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    n_images = len(dataset.train_labels) if dataset is not None else None
    plot_best_curves(rows, out, n_images)
    headers = ["model", "lr", "final test acc", *[f"to {t:.2f} (validation)" for t in THRESHOLDS]]
    table_rows = []
    for bn in (False, True):
        best = best_lr(rows, bn)
        for lr in LEARNING_RATES[bn]:
            group = select(rows, bn=bn, lr=lr)
            if group:
                table_rows.append([MODELS[bn][0], f"{lr:g}" + (" (best)" if lr == best else ""),
                                   cell(group), *[describe_reach(reach_stats(group, t, n_images))
                                                  for t in THRESHOLDS]])
    sections = ["## Steps to a validation accuracy, by learning rate", "",
                format_table(headers, table_rows), "",
                "Steps (and training seconds, evaluation excluded) until validation accuracy "
                "first reaches the threshold: mean over seeds (each seed's step in parentheses), "
                "resolved to the evaluation interval. Best rate: the highest mean final "
                "validation accuracy.", "",
                "![validation accuracy against steps and seconds](convergence.png)"]
    return Analysis(sections, findings(rows, n_images), verdicts(rows, n_images),
                    calibrate_steps())


def verdicts(rows: list[Row], n_images: int | None = None) -> list[Verdict]:
    """"BN speeds up training" at each threshold, and Ioffe & Szegedy's 14x (see the module
    docstring)."""
    best = {bn: best_lr(rows, bn) for bn in (False, True)}
    groups = {bn: select(rows, bn=bn, lr=best[bn]) if best[bn] is not None else []
              for bn in (False, True)}
    sides = tuple((f"{MODELS[bn][0]} (lr {best[bn]:g})" if best[bn] is not None
                   else MODELS[bn][0], groups[bn]) for bn in (False, True))
    source = "the chapter; Ioffe & Szegedy 2015"
    note = ("LeNet pads its first convolution, BN-LeNet does not; each model at its best rate "
            "on validation; a LeNet seed that never reaches the threshold counts with its "
            "whole budget (a lower bound)")
    untrained = [name for name, g in sides if does_not_train(g)]
    out = []
    for threshold in THRESHOLDS:
        claim = f"BN reaches {threshold:.2f} validation accuracy in fewer SGD steps"
        measure = f"SGD steps to {threshold:.2f}, BN-LeNet minus LeNet"
        base = steps_per_seed(groups[False], threshold, n_images, censor=True)
        with_bn = steps_per_seed(groups[True], threshold, n_images)
        missed = sum(not math.isfinite(v) for v in with_bn.values())
        if untrained or missed or not with_bn:
            why = (f"{' and '.join(untrained)} does not train" if untrained else
                   f"BN-LeNet does not reach it in {missed}/{len(with_bn)} seeds" if missed else
                   "no BN-LeNet runs")
            out.append(not_measured(claim, source, measure, why, failed=failures(*sides)))
            continue
        out.append(judge_difference(claim, source, measure, base, with_bn, direction=-1,
                                    failed=failures(*sides), note=note,
                                    paper="BN reached Inception's accuracy in fewer steps at "
                                          "every rate tried"))
    claim = f"BN reaches the baseline's best accuracy in {IOFFE_SPEEDUP:g}x fewer steps"
    measure = "LeNet's steps to its best validation accuracy / BN-LeNet's steps to it"
    ratio = ioffe_per_seed(groups[False], groups[True], n_images)
    missed = sum(not math.isfinite(v) for v in ratio.values())
    if untrained or missed or not ratio:
        why = (f"{' and '.join(untrained)} does not train" if untrained else
               f"BN-LeNet does not reach LeNet's best accuracy in {missed}/{len(ratio)} seeds"
               if missed else "no seed has runs of both models")
        out.append(not_measured(claim, "Ioffe & Szegedy 2015", measure, why, paper=IOFFE_SZEGEDY,
                                failed=failures(*sides)))
    else:
        rate = best[True] / best[False]
        out.append(judge_difference(claim, "Ioffe & Szegedy 2015", measure,
                                    dict.fromkeys(ratio, IOFFE_SPEEDUP), ratio,
                                    failed=failures(*sides), paper=IOFFE_SZEGEDY,
                                    note=f"LeNet on Fashion-MNIST, not Inception on ImageNet; "
                                         f"BN-LeNet at {rate:g}x LeNet's rate (each its best); "
                                         "SGD without momentum"))
    return out


def findings(rows: list[Row], n_images: int | None = None) -> list[str]:
    lines = []
    best = {bn: best_lr(rows, bn) for bn in (False, True)}
    for bn in (False, True):
        if best[bn] is not None:
            group = select(rows, bn=bn, lr=best[bn])
            lines.append(f"- Best learning rate on validation, {MODELS[bn][0]}: **{best[bn]:g}** "
                         f"(mean final validation accuracy {mean_final(group):.4f}).")
    if best[False] is None or best[True] is None:
        return lines
    base_group, bn_group = select(rows, bn=False, lr=best[False]), select(rows, bn=True, lr=best[True])
    for threshold in THRESHOLDS:
        b, n = reach_stats(base_group, threshold, n_images), reach_stats(bn_group, threshold, n_images)
        b_all, n_all = b["reached"] == b["seeds"], n["reached"] == n["seeds"]
        head = f"- To {threshold:.2f} at each model's best rate: "
        if b_all and n_all:
            lines.append(head + f"LeNet {b['mean_steps']:.0f} steps ({b['mean_seconds']:.1f} s), "
                         f"BN-LeNet {n['mean_steps']:.0f} steps ({n['mean_seconds']:.1f} s): "
                         f"{b['mean_steps'] / n['mean_steps']:.1f}x fewer steps, "
                         f"{b['mean_seconds'] / n['mean_seconds']:.1f}x less training time with BN.")
        elif n_all:
            total = max((p[0] for r in base_group for p in progress(r, n_images)), default=0)
            lines.append(head + f"BN-LeNet {n['mean_steps']:.0f} steps ({n['mean_seconds']:.1f} s); "
                         f"LeNet did not reach it in {b['seeds'] - b['reached']}/{b['seeds']} "
                         f"seeds within {total} steps (speed-up > {total / n['mean_steps']:.1f}x).")
        elif b_all:
            lines.append(head + f"LeNet {b['mean_steps']:.0f} steps; BN-LeNet did not reach it in "
                         f"{n['seeds'] - n['reached']}/{n['seeds']} seeds.")
        else:
            lines.append(head + "neither model reached it in every seed.")
    comparison = ioffe_comparison(rows, n_images)
    if comparison is None:
        return lines
    target, base_steps = comparison["target"], comparison["base_steps"]
    if target <= FAIL_ACCURACY:
        return lines + [f"- Ioffe & Szegedy-style comparison: not made, LeNet's best seed-mean "
                        f"accuracy is {target:.4f}, at chance level (a failed baseline)."]
    lines.append(f"- Ioffe & Szegedy-style, on seed-mean curves: LeNet's best seed-mean accuracy "
                 f"is {target:.4f}, first reached at step {base_steps} (lr "
                 f"{comparison['base_lr']:g}).")
    parts = []
    for lr, steps in comparison["bn"].items():
        ratio = f"{lr / comparison['base_lr']:g}x the rate"
        parts.append(f"lr {lr:g} ({ratio}): " + (
            "never" if steps is None else f"step {steps}, {base_steps / steps:.1f}x fewer steps"))
    lines.append("- BN-LeNet reaches that accuracy at " + "; ".join(parts) + ".")
    return lines


# --------------------------------------------------------------------------- calibration

CALIBRATION_TAU = (100.0, 400.0)  # steps: the time constants of two synthetic learners
CALIBRATION_EVERY = 10


def synthetic_row(tau: float, every: int = CALIBRATION_EVERY, steps: int = 2000,
                  per_epoch: int = 500, seed: int = 0) -> Row:
    """A run whose validation accuracy follows ``0.9 - 0.8 exp(-step / tau)``, evaluated every
    ``every`` steps and at each epoch's end (``per_epoch`` steps of batch 128), one second
    per step."""
    def acc(step: int) -> float:
        return 0.9 - 0.8 * math.exp(-step / tau)

    evals = [{"step": s, "train_seconds": float(s), "val_acc": acc(s)}
             for s in range(every, steps + 1, every)]
    metrics = [{"epoch": e, "val_acc": acc(e * per_epoch), "train_seconds": float(per_epoch)}
               for e in range(1, steps // per_epoch + 1)]
    return Row("synthetic", {}, seed, {"subset": per_epoch * 128, "val_size": 0, "batch_size": 128},
               metrics, {"diverged": False}, "", evals)


def crossing(tau: float, threshold: float) -> float:
    """The exact step at which ``0.9 - 0.8 exp(-step / tau)`` reaches ``threshold``."""
    return tau * math.log(0.8 / (0.9 - threshold))


def calibrate_steps(threshold: float = THRESHOLDS[0]) -> list[Calibration]:
    """Steps to a threshold and the speed-up on synthetic curves with a known crossing: it
    must read the crossing within one evaluation interval, a 4x slower learner as about
    4x, and the same learner twice as 1x."""
    fast, slow = CALIBRATION_TAU
    out = []
    read = {}
    for tau in (fast, slow):
        (step,) = steps_per_seed([synthetic_row(tau)], threshold).values()
        read[tau] = step
        exact = crossing(tau, threshold)
        out.append(Calibration("steps to a threshold", f"curve 0.9 - 0.8 exp(-t/{tau:g}), "
                               f"evaluated every {CALIBRATION_EVERY} steps, to {threshold:.2f}",
                               f"{exact:.1f} (+ up to {CALIBRATION_EVERY})", f"{step:.0f}",
                               0 <= step - exact < CALIBRATION_EVERY))
    ratio = read[slow] / read[fast]
    out.append(Calibration("speed-up (steps ratio)", f"learners with time constants {slow:g} and "
                           f"{fast:g}", f"{slow / fast:.2f}", f"{ratio:.3f}",
                           abs(ratio - slow / fast) <= slow / fast * CALIBRATION_EVERY / read[fast]))
    same = ioffe_per_seed([synthetic_row(fast)], [synthetic_row(fast)])
    out.append(Calibration("speed-up to the baseline's best accuracy", "the same learner twice",
                           "1.00", f"{same[0]:.3f}", same[0] == 1.0))
    return out


def plot_best_curves(rows: list[Row], out: Path, n_images: int | None) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for bn in (False, True):
        lr = best_lr(rows, bn)
        if lr is None:
            continue
        curve = mean_progress(select(rows, bn=bn, lr=lr), n_images)
        name = f"{MODELS[bn][0]} (lr {lr:g})"
        axes[0].plot([p[0] for p in curve], [p[2] for p in curve], label=name)
        axes[1].plot([p[1] for p in curve], [p[2] for p in curve], label=name)
    named = "thresholds " + ", ".join(f"{t:.2f}" for t in THRESHOLDS)
    for ax in axes:
        for i, t in enumerate(THRESHOLDS):
            reference_line(ax, t, label=named if i == 0 else None)  # one legend entry for all
        legend(ax)
    count_axis(axes[0], "SGD step")
    axes[1].set_xlabel("training time (s, evaluation excluded)")
    axes[0].set_ylabel("validation accuracy (seed mean)")
    fig.suptitle("Each model at its best learning rate")
    save_figure(fig, out / "convergence.png")


EXPERIMENT = Experiment(
    name="convergence",
    title="Claim: batch norm speeds up training",
    question="At each model's best learning rate, how many SGD steps and seconds do LeNet and "
             "BN-LeNet need to reach fixed validation accuracies, and how does the saving compare "
             "with Ioffe & Szegedy's 14x?",
    variants=variants,
    analyze=analyze,
    default_epochs=5,
    default_subset=0,
    notes=f"Learning rates: LeNet {list(LEARNING_RATES[False])}, BN-LeNet "
          f"{list(LEARNING_RATES[True])}; each model's best rate is chosen on validation "
          f"accuracy. The validation split is evaluated every {EVAL_EVERY[False]} steps for "
          f"LeNet and {EVAL_EVERY[True]} for BN-LeNet (every half epoch at most, for small "
          "subsets); speeds are read from those evaluations.",
)
