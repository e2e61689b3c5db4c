"""Claim: "for more robust models, consider removing batch normalization (Wang et al., 2022)".

Why: robustness is a property of a trained model at prediction time, so this experiment
trains the chapter's BN-LeNet with bnlab's BN and the same network with no norm layer,
then measures the test accuracy of every finished model (eval mode, ``bnlab.probes.robustness``)
under input perturbations of growing size:

* Gaussian noise, sigma in {0, 0.05, 0.1, 0.2, 0.3, 0.5} (pixels in [0, 1], clamped),
  on all 10000 test images, the same noise draws for every model;
* FGSM, epsilon in {0, 0.01, 0.02, 0.05, 0.1, 0.2} (L-infinity), on all test images;
* PGD, 10 steps with a random start, epsilon in {0, 0.01, 0.02, 0.05, 0.1}, on the first
  2000 test images (two batches of 1000; it costs 10 gradients per image).

Models: the chapter's BN-LeNet at the chapter's rate 0.1; the same network without BN at
rate 1.0, because at 0.1 a sigmoid LeNet without normalization is still at chance level
after several epochs and a model that has not learned cannot be compared for robustness;
and BN-LeNet at rate 1.0 too, so that one pair differs *only* in BN. Because the clean
accuracies differ, the report gives both the accuracy under attack and the accuracy
relative to the model's own clean accuracy (accuracy at size s / accuracy at size 0).

Controls for the Gaussian-noise result (Galloway et al. 2019 find BN models *less* robust
to noise; see the report): accuracy relative to clean accuracy; a BN model trained for a
tenth of the epochs, to compare at (about) matched clean accuracy; and every BN model
evaluated four ways: with its running averages (eval mode), with population statistics of
clean training images re-estimated for its final weights, with each noisy batch's own
statistics, and after re-estimating its statistics on the noisy test images (adaptive BN;
``bnlab.probes.robustness.noise_accuracy_by_statistics``), cached in the run folder.

Default: 10 epochs on all 60000 training images (the chapter's), 3 seeds: 12 runs; see the
notes for the time it takes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnlab.data.loader import Loader, stratified_subset
from bnlab.experiments.analysis import FAIL_ACCURACY, Row, by_label, failed, plot_intervals
from bnlab.experiments.findings import Analysis
from bnlab.experiments.measure import fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import ACCURACY, format_mean_ci, intervals_apart, mean_ci
from bnlab.probes.robustness import (
    PGD_STEP_FACTOR,
    STATISTICS,
    fgsm_accuracy,
    noise_accuracy,
    noise_accuracy_by_statistics,
    pgd_accuracy,
)
from bnlab.training import restore, runs
from bnlab.util.plots import legend, note_empty, plt, save_figure
from bnlab.util.tables import counted, format_table

MODELS = {
    "BN (lr 0.1)": ({"model": "bn-lenet", "norm": "bnlab", "lr": 0.1}, True),
    "BN (lr 0.1, short)": ({"model": "bn-lenet", "norm": "bnlab", "lr": 0.1}, True),
    "BN (lr 1)": ({"model": "bn-lenet", "norm": "bnlab", "lr": 1.0}, True),
    "no BN (lr 1)": ({"model": "bn-lenet", "norm": "none", "lr": 1.0}, False),
}
BASELINE = "no BN (lr 1)"
SHORT = "BN (lr 0.1, short)"
SHORT_FRACTION = 10
"""The matched-clean-accuracy control: BN-LeNet trained for 1/SHORT_FRACTION of the epochs
(at least 1), so that its clean accuracy comes down towards the no-BN model's."""
SIZES = {
    "noise": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    "fgsm": (0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
    "pgd": (0.0, 0.01, 0.02, 0.05, 0.1),
}
KIND_NAMES = {"noise": "Gaussian noise (sigma)", "fgsm": "FGSM (epsilon)",
              "pgd": "PGD-10 (epsilon)"}
PGD_STEPS = 10
PGD_BATCHES = 2
EVAL_BATCH = 1000

Measured = dict[str, dict[str, dict[float, list[float]]]]  # label -> kind -> size -> per seed


def variants(settings: ExpSettings) -> list[Variant]:
    short = {"epochs": max(1, settings.epochs // SHORT_FRACTION)}
    return [Variant(label, {**params, **(short if label == SHORT else {})},
                    {"bn": bn, "lr": params["lr"]}) for label, (params, bn) in MODELS.items()]


def perturbation_curves(model, dataset, seed: int = 0) -> dict[str, list[tuple[float, float]]]:
    """Accuracy of ``model`` under each perturbation kind at each size (see the docstring)."""
    batches = Loader(dataset.test_images, dataset.test_labels, EVAL_BATCH, shuffle=False)
    return {"noise": noise_accuracy(model, batches, SIZES["noise"], seed=seed),
            "fgsm": fgsm_accuracy(model, batches, SIZES["fgsm"]),
            "pgd": pgd_accuracy(model, batches, SIZES["pgd"], steps=PGD_STEPS, seed=seed,
                                max_batches=PGD_BATCHES)}


def measurement_key(dataset) -> dict[str, Any]:
    """What the curves of a run depend on besides its model: a change recomputes them."""
    return {"version": 1, "sizes": SIZES, "pgd_steps": PGD_STEPS, "pgd_batches": PGD_BATCHES,
            "pgd_step_factor": PGD_STEP_FACTOR, "eval_batch": EVAL_BATCH, "seed": 0,
            "data": fingerprint(dataset.test_images, dataset.test_labels)}


def run_curves(row: Row, dataset, key: dict[str, Any]) -> dict[str, list[list[float]]]:
    """``perturbation_curves`` of a finished run's model, cached in its folder under ``key``."""
    return runs.cached(row.run_dir, "robustness", key, lambda: perturbation_curves(
        restore.load_trained_model(row.run_dir)[0], dataset))


def measure(rows: list[Row], dataset) -> Measured:
    """Per variant, kind and size: the accuracy of each seed that trained (a failed run,
    diverged or at chance level, has no robustness to measure). Each run's curves are
    computed once and cached in its folder (``runs.cached``, key ``measurement_key``)."""
    measured: Measured = {}
    trained = [row for row in rows if not failed(row)]
    key = measurement_key(dataset) if trained else {}
    for row in trained:
        cells = measured.setdefault(row.label, {})
        for kind, curve in run_curves(row, dataset, key).items():
            for size, acc in curve:
                cells.setdefault(kind, {}).setdefault(size, []).append(acc)
    return measured


CLEAN_IMAGES = 10000
"""Clean training images (class-balanced) the ``precise`` statistics are re-estimated on."""


def clean_images(dataset):
    return stratified_subset(dataset.train_images, dataset.train_labels,
                             min(CLEAN_IMAGES, len(dataset.train_labels)))


def statistics_key(dataset) -> dict[str, Any]:
    return {"version": 2, "sigmas": SIZES["noise"], "eval_batch": EVAL_BATCH, "seed": 0,
            "data": fingerprint(dataset.test_images, dataset.test_labels),
            "clean": fingerprint(*clean_images(dataset))}


Controls = dict[str, dict[str, dict[float, list[float]]]]  # label -> statistics -> sigma -> seeds


def measure_statistics(rows: list[Row], dataset) -> Controls:
    """Per BN variant, statistics (``bnlab.probes.robustness.STATISTICS``) and sigma: the noisy
    test accuracy of each seed that trained; cached per run (``robustness_statistics``)."""
    batches = Loader(dataset.test_images, dataset.test_labels, EVAL_BATCH, shuffle=False)
    clean = Loader(*clean_images(dataset), EVAL_BATCH, shuffle=False)
    measured: Controls = {}
    trained = [row for row in rows if not failed(row) and row.tags["bn"]]
    key = statistics_key(dataset) if trained else {}
    for row in trained:
        curve = runs.cached(row.run_dir, "robustness_statistics", key,
                            lambda row=row: noise_accuracy_by_statistics(
                                restore.load_trained_model(row.run_dir)[0], batches, SIZES["noise"], clean))
        for sigma, accuracies in curve:
            for statistics in STATISTICS:  # in this order (the cache's JSON sorts the keys)
                measured.setdefault(row.label, {}).setdefault(statistics, {}).setdefault(
                    sigma, []).append(accuracies[statistics])
    return measured


def relative(per_size: dict[float, list[float]]) -> dict[float, list[float]]:
    """Accuracy at each size over the same seed's accuracy at size 0 (the clean one)."""
    clean = per_size.get(0.0, [])
    return {size: [a / c if c > 0 else math.nan for a, c in zip(values, clean)]
            for size, values in per_size.items()}


def compare(measured: Measured, kind: str, label: str,
            baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Per nonzero size: mean accuracy and relative accuracy of ``label`` and ``baseline``."""
    if label not in measured or baseline not in measured:
        return []
    mine, theirs = measured[label].get(kind, {}), measured[baseline].get(kind, {})
    rel_mine, rel_theirs = relative(mine), relative(theirs)
    out = []
    for size in SIZES[kind]:
        if size == 0 or size not in mine or size not in theirs:
            continue
        out.append({"size": size, "acc": mean_ci(mine[size])[0], "base_acc": mean_ci(theirs[size])[0],
                    "rel": mean_ci(rel_mine[size])[0], "base_rel": mean_ci(rel_theirs[size])[0],
                    "apart": intervals_apart(mine[size], theirs[size]),
                    "rel_apart": intervals_apart(rel_mine[size], rel_theirs[size])})
    return out


# --------------------------------------------------------------------------- report

def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to perturb)"])
    measured = measure(rows, dataset)
    plot(measured, out / "robustness.png")
    sections = []
    for kind in SIZES:
        headers = ["model", *[f"{s:g}" for s in SIZES[kind]]]
        table_rows = []
        for label in by_label(rows):
            per_size = measured.get(label, {}).get(kind, {})
            rel = relative(per_size)
            table_rows.append([label, *[
                "-" if s not in per_size else format_mean_ci(per_size[s]) + (
                    "" if s == 0 else f" ({100 * mean_ci(rel[s])[0]:.0f}%)")
                for s in SIZES[kind]]])
        sections += [f"## {KIND_NAMES[kind]}", "", format_table(headers, table_rows), ""]
    sections += [
        "Test accuracy (mean ± 95% CI over seeds) in eval mode; in parentheses, relative to the "
        "model's clean accuracy. Noise and FGSM on all 10000 test images; PGD "
        f"({PGD_STEPS} steps, step 2.5·eps/steps, random start) on the first "
        f"{PGD_BATCHES * EVAL_BATCH}. Runs that failed (diverged, or final validation accuracy "
        f"at most {FAIL_ACCURACY}) are not measured.", "", *skipped(rows), *findings(measured), "",
        "![accuracy under perturbations](robustness.png)", ""]
    return Analysis(sections + control_sections(measured, measure_statistics(rows, dataset)))


STATISTICS_NAMES = {"running": "the running averages of training (eval mode)",
                    "precise": f"population statistics of {CLEAN_IMAGES} clean training images, "
                               "re-estimated for the final weights",
                    "batch": "the noisy batch's own statistics",
                    "adapted": "statistics re-estimated on the noisy test set (adaptive BN)"}


def control_sections(measured: Measured, controls: Controls) -> list[str]:
    sigmas = SIZES["noise"]
    table_rows = []
    for label, by_stats in controls.items():
        for statistics, per_size in by_stats.items():
            rel = relative(per_size)
            table_rows.append([label, statistics, *[
                format_mean_ci(per_size[s]) + ("" if s == 0 else f" ({100 * mean_ci(rel[s])[0]:.0f}%)")
                for s in sigmas]])
    base = measured.get(BASELINE, {}).get("noise", {})
    if base:
        rel = relative(base)
        table_rows.append([BASELINE, "(no BN)", *[
            format_mean_ci(base[s]) + ("" if s == 0 else f" ({100 * mean_ci(rel[s])[0]:.0f}%)")
            for s in sigmas]])
    return ["## Controls for Gaussian noise", "",
            format_table(["model", "BN statistics", *[f"{s:g}" for s in sigmas]], table_rows), "",
            "Test accuracy under Gaussian noise (all 10000 test images, batches of "
            f"{EVAL_BATCH}, the same draws everywhere) with BN's statistics taken from: "
            + "; ".join(f"**{k}** = {v}" for k, v in STATISTICS_NAMES.items())
            + f". In parentheses, relative to the same evaluation's clean accuracy. {SHORT} is "
            f"trained for 1/{SHORT_FRACTION} of the epochs: the control at matched clean "
            "accuracy.", "", *control_findings(measured, controls)]


def resolved_by_size(mine: dict[float, list[float]], theirs: dict[float, list[float]]
                     ) -> dict[str, list[float]]:
    """The nonzero sizes where ``mine`` is above ``theirs`` with the 95% intervals apart
    ("more"), below and apart ("less"), or where the intervals overlap ("open")."""
    out: dict[str, list[float]] = {"more": [], "less": [], "open": []}
    for size in sorted(set(mine) & set(theirs)):
        if size == 0:
            continue
        if not intervals_apart(mine[size], theirs[size]):
            out["open"].append(size)
        else:
            above = mean_ci(mine[size])[0] > mean_ci(theirs[size])[0]
            out["more" if above else "less"].append(size)
    return out


def control_findings(measured: Measured, controls: Controls) -> list[str]:
    """Under each control, at every sigma, whether a BN model is more or less robust than the
    no-BN model with the seeds' 95% intervals apart, or not resolved; then which controls
    change the raw result and whether any gives Galloway et al.'s direction (BN less robust)."""
    base = measured.get(BASELINE, {}).get("noise", {})
    sigma = max(SIZES["noise"])
    if not base or sigma not in base:
        return [f"- No controls: {BASELINE} has no seed that trained."]
    lines: list[str] = []
    outcome: dict[str, dict[str, list[float]]] = {}

    def verdict(name: str, mine: dict[float, list[float]], theirs: dict[float, list[float]],
                what: str) -> None:
        resolved = outcome[name] = resolved_by_size(mine, theirs)
        ours, base_mean = mean_ci(mine[sigma])[0], mean_ci(theirs[sigma])[0]
        lines.append(f"- {name}: BN more robust at sigma {_sizes(resolved['more'])}, less robust "
                     f"at {_sizes(resolved['less'])} (95% intervals apart), not resolved at "
                     f"{_sizes(resolved['open'])}; at sigma {sigma:g} {what} {ours:.4f} vs "
                     f"{BASELINE} {base_mean:.4f} ({100 * (ours - base_mean):+.2f} points).")

    for label in (lab for lab in controls if lab != SHORT):
        by_stats = controls[label]
        verdict(f"{label}, running statistics (raw)", by_stats["running"], base, "accuracy")
        verdict(f"{label}, running statistics relative to clean accuracy",
                relative(by_stats["running"]), relative(base), "fraction of clean accuracy")
        for statistics in ("precise", "batch", "adapted"):
            verdict(f"{label}, {statistics} statistics", by_stats[statistics], base, "accuracy")
    if SHORT in controls:
        short = controls[SHORT]["running"]
        gap = mean_ci(short[0.0])[0] - mean_ci(base[0.0])[0]
        lines.append(f"- Matched clean accuracy: {SHORT} {mean_ci(short[0.0])[0]:.4f} vs {BASELINE} "
                     f"{mean_ci(base[0.0])[0]:.4f} clean ({100 * gap:+.2f} points; "
                     + ("matched within 1 point" if abs(gap) <= 0.01 else "**not matched** within "
                        "1 point, so this control is only approximate") + ").")
        verdict(f"{SHORT} (matched clean accuracy), raw", short, base, "accuracy")
    less = [name for name, r in outcome.items() if r["less"]]
    more = [name for name, r in outcome.items() if r["more"] and not r["less"]]
    unresolved = [name for name, r in outcome.items() if not r["more"] and not r["less"]]
    lines.append("- Galloway et al. (2019)'s direction, BN *less* robust to noise with the "
                 "intervals apart: " + (f"under {'; '.join(less)}." if less else
                                        "under no evaluation here; none of the controls "
                                        "reproduces it."))
    lines.append("- BN more robust at some sigma (intervals apart) and less at none: "
                 + ("; ".join(more) if more else "none") + ". Not resolved at any sigma: "
                 + ("; ".join(unresolved) if unresolved else "none") + ".")
    return lines


def skipped(rows: list[Row]) -> list[str]:
    """A line per variant with failed seeds."""
    return [f"- {label}: {sum(map(failed, g))}/{counted(len(g), 'seed')} failed and are not "
            "measured."
            for label, g in by_label(rows).items() if any(map(failed, g))]


def findings(measured: Measured) -> list[str]:
    lines = []
    for label in measured:
        clean = measured[label].get("noise", {}).get(0.0)
        if clean:
            lines.append(f"- Clean test accuracy, {label}: {mean_ci(clean)[0]:.4f}.")
    if BASELINE not in measured:
        return lines + [f"- No comparison: {BASELINE} has no seed that trained."]
    for label in measured:
        if label == BASELINE:
            continue
        for kind in SIZES:
            rows = compare(measured, kind, label)
            if not rows:
                continue
            higher = [r["size"] for r in rows if r["acc"] > r["base_acc"]]
            lower = [r["size"] for r in rows if r["acc"] < r["base_acc"]]
            rel_higher = [r["size"] for r in rows if r["rel"] > r["base_rel"]]
            rel_lower = [r["size"] for r in rows if r["rel"] < r["base_rel"]]
            apart = [r["size"] for r in rows if r["apart"]]
            worst = rows[-1]
            lines.append(
                f"- {KIND_NAMES[kind]}, {label} vs {BASELINE}: more accurate at sizes "
                f"{_sizes(higher)}, less accurate at {_sizes(lower)} (intervals apart at "
                f"{_sizes(apart)}); relative to clean accuracy, retains more at "
                f"{_sizes(rel_higher)} and less at {_sizes(rel_lower)}. At {worst['size']:g}: "
                f"{worst['acc']:.4f} vs {worst['base_acc']:.4f} "
                f"({100 * worst['rel']:.0f}% vs {100 * worst['base_rel']:.0f}% of clean).")
    return lines


def _sizes(sizes: list[float]) -> str:
    return "{" + ", ".join(f"{s:g}" for s in sizes) + "}" if sizes else "none"


def plot(measured: Measured, path: Path) -> None:
    fig, axes = plt.subplots(2, len(SIZES), figsize=(15, 8), squeeze=False)
    for col, kind in enumerate(SIZES):
        for label, cells in measured.items():
            per_size = cells.get(kind, {})
            relative_bounds = (0.0, math.inf)  # a fraction of clean accuracy: >= 0, may pass 1
            for row, (values, bounds) in enumerate(((per_size, ACCURACY),
                                                    (relative(per_size), relative_bounds))):
                plot_intervals(axes[row][col], {x: values[x] for x in sorted(values)}, bounds,
                               label=label)
        axes[0][col].set_title(KIND_NAMES[kind])
        axes[0][col].set_ylabel("test accuracy")
        axes[1][col].set_ylabel("accuracy / clean accuracy (ratio)")
        for ax in axes[:, col]:
            size = KIND_NAMES[kind].split("(")[1].rstrip(")")
            ax.set_xlabel(f"{size} (on pixels in [0, 1])")
            if not ax.lines:
                note_empty(ax, f"no model above {FAIL_ACCURACY} accuracy: nothing measured")
            legend(ax)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="robustness",
    title="Claim: models without batch norm are more robust",
    question="How does test accuracy fall under Gaussian noise, FGSM and PGD of growing size for "
             "LeNet trained with and without batch norm?",
    variants=variants,
    analyze=analyze,
    default_epochs=10,
    default_subset=0,
    notes="Models: BN-LeNet (BN) at lr 0.1 and 1, and the same network without norm layers at "
          "lr 1 (at 0.1 it does not leave chance level in a few epochs), and BN-LeNet at lr 0.1 "
          "for a tenth of the epochs (the matched-clean-accuracy control); batch 128, no "
          "momentum. Default grid: 9 runs of 10 epochs and 3 of 1 on 60000 images, sized "
          "to fit 40 minutes on 2 cores with the attacks and the controls (per BN model one pass "
          "over 10000 clean images and, per sigma, 4 evaluations and a statistics pass of the "
          "test set; serial in the analysis, cached per run).",
)
