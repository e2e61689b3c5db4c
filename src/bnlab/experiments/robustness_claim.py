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

Verdicts (``findings``' rule, paired over seeds): Wang et al.'s "without BN, more robust"
on the pair that differs only in BN (BN-LeNet with and without BN at rate 1), as the
accuracy under each perturbation at a size fixed in advance (:data:`VERDICT_SIZES`); and
Galloway et al.'s "BN less robust to noise" at (about) matched clean accuracy. Every
report reads the three attacks on a linear classifier, where the accuracy under attack is
known in closed form (:func:`calibrate_attacks`). ``--quick`` measures on fewer test images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from scipy import stats as scipy_stats
from torch import nn

from bnlab.data.loader import Loader, stratified_subset
from bnlab.experiments.analysis import FAIL_ACCURACY, Row, by_label, failed, plot_intervals
from bnlab.experiments.arms import failures
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    not_measured,
)
from bnlab.experiments.measure import fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import ACCURACY, apart, format_mean_ci, mean_ci
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
QUICK_IMAGES = 1000
"""--quick: test images perturbed (and clean training images for the controls), PGD on one
batch of them."""
VERDICT_SIZES = {"noise": 0.2, "fgsm": 0.05, "pgd": 0.05}
"""The size of each perturbation at which the verdicts compare models, fixed in advance (the
middle of each range)."""
PAIR = ("BN (lr 1)", "no BN (lr 1)")  # the two models that differ only in BN

Seeds = dict[int, float]  # seed -> accuracy
Measured = dict[str, dict[str, dict[float, Seeds]]]  # label -> kind -> size -> per seed


def variants(settings: ExpSettings) -> list[Variant]:
    short = {"epochs": max(1, settings.epochs // SHORT_FRACTION)}
    return [Variant(label, {**params, **(short if label == SHORT else {})},
                    {"bn": bn, "lr": params["lr"]}) for label, (params, bn) in MODELS.items()]


def test_images(dataset, images: int | None = None):
    """(images, labels) of the test set, or its first ``images`` (--quick)."""
    return dataset.test_images[:images], dataset.test_labels[:images]


def perturbation_curves(model, dataset, seed: int = 0, images: int | None = None
                        ) -> dict[str, list[tuple[float, float]]]:
    """Accuracy of ``model`` under each perturbation kind at each size (see the docstring),
    on the test set or its first ``images``."""
    x, y = test_images(dataset, images)
    batches = Loader(x, y, min(EVAL_BATCH, len(y)), shuffle=False)
    return {"noise": noise_accuracy(model, batches, SIZES["noise"], seed=seed),
            "fgsm": fgsm_accuracy(model, batches, SIZES["fgsm"]),
            "pgd": pgd_accuracy(model, batches, SIZES["pgd"], steps=PGD_STEPS, seed=seed,
                                max_batches=PGD_BATCHES)}


def measurement_key(dataset, images: int | None = None) -> dict[str, Any]:
    """What the curves of a run depend on besides its model: a change recomputes them."""
    return {"version": 1, "sizes": SIZES, "pgd_steps": PGD_STEPS, "pgd_batches": PGD_BATCHES,
            "pgd_step_factor": PGD_STEP_FACTOR, "eval_batch": EVAL_BATCH, "seed": 0,
            "data": fingerprint(*test_images(dataset, images))}


def run_curves(row: Row, dataset, key: dict[str, Any], images: int | None = None
               ) -> dict[str, list[list[float]]]:
    """``perturbation_curves`` of a finished run's model, cached in its folder under ``key``."""
    return runs.cached(row.run_dir, "robustness", key, lambda: perturbation_curves(
        restore.load_trained_model(row.run_dir)[0], dataset, images=images))


def measure(rows: list[Row], dataset, images: int | None = None) -> Measured:
    """Per variant, kind and size: the accuracy of each seed that trained (a failed run,
    diverged or at chance level, has no robustness to measure), by seed. Each run's curves
    are computed once and cached in its folder (``runs.cached``, key ``measurement_key``)."""
    measured: Measured = {}
    trained = [row for row in rows if not failed(row)]
    key = measurement_key(dataset, images) if trained else {}
    for row in trained:
        cells = measured.setdefault(row.label, {})
        for kind, curve in run_curves(row, dataset, key, images).items():
            for size, acc in curve:
                cells.setdefault(kind, {}).setdefault(size, {})[row.seed] = acc
    return measured


CLEAN_IMAGES = 10000
"""Clean training images (class-balanced) the ``precise`` statistics are re-estimated on."""


def clean_images(dataset, images: int = CLEAN_IMAGES):
    return stratified_subset(dataset.train_images, dataset.train_labels,
                             min(images, len(dataset.train_labels)))


def statistics_key(dataset, images: int | None = None) -> dict[str, Any]:
    return {"version": 2, "sigmas": SIZES["noise"], "eval_batch": EVAL_BATCH, "seed": 0,
            "data": fingerprint(*test_images(dataset, images)),
            "clean": fingerprint(*clean_images(dataset, images or CLEAN_IMAGES))}


Controls = dict[str, dict[str, dict[float, Seeds]]]  # label -> statistics -> sigma -> per seed


def measure_statistics(rows: list[Row], dataset, images: int | None = None) -> Controls:
    """Per BN variant, statistics (``bnlab.probes.robustness.STATISTICS``) and sigma: the noisy
    test accuracy of each seed that trained, by seed; cached per run
    (``robustness_statistics``)."""
    x, y = test_images(dataset, images)
    batches = Loader(x, y, min(EVAL_BATCH, len(y)), shuffle=False)
    clean = Loader(*clean_images(dataset, images or CLEAN_IMAGES), EVAL_BATCH, shuffle=False)
    measured: Controls = {}
    trained = [row for row in rows if not failed(row) and row.tags["bn"]]
    key = statistics_key(dataset, images) if trained else {}
    for row in trained:
        curve = runs.cached(row.run_dir, "robustness_statistics", key,
                            lambda row=row: noise_accuracy_by_statistics(
                                restore.load_trained_model(row.run_dir)[0], batches, SIZES["noise"], clean))
        for sigma, accuracies in curve:
            for statistics in STATISTICS:  # in this order (the cache's JSON sorts the keys)
                measured.setdefault(row.label, {}).setdefault(statistics, {}).setdefault(
                    sigma, {})[row.seed] = accuracies[statistics]
    return measured


def _values(seeds: Seeds) -> list[float]:
    return list(seeds.values())


def relative(per_size: dict[float, Seeds]) -> dict[float, Seeds]:
    """Accuracy at each size over the same seed's accuracy at size 0 (the clean one)."""
    clean = per_size.get(0.0, {})
    return {size: {s: a / clean[s] if clean.get(s, 0) > 0 else math.nan
                   for s, a in values.items()}
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
        out.append({"size": size, "acc": mean_ci(_values(mine[size]))[0],
                    "base_acc": mean_ci(_values(theirs[size]))[0],
                    "rel": mean_ci(_values(rel_mine[size]))[0],
                    "base_rel": mean_ci(_values(rel_theirs[size]))[0],
                    "apart": apart(theirs[size], mine[size]),
                    "rel_apart": apart(rel_theirs[size], rel_mine[size])})
    return out


# --------------------------------------------------------------------------- report

def _cell(per_size: dict[float, Seeds], size: float) -> str:
    """``acc ± ci (n=k) (rel%)`` of one size, relative to the same seeds' clean accuracy."""
    if size not in per_size:
        return "-"
    text = format_mean_ci(_values(per_size[size]))
    return text if size == 0 else text + f" ({100 * mean_ci(_values(relative(per_size)[size]))[0]:.0f}%)"


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    calibration = calibrate_attacks()
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to perturb)"],
                        calibration=calibration)
    images = QUICK_IMAGES if settings.quick else None
    measured = measure(rows, dataset, images)
    plot(measured, out / "robustness.png")
    sections = []
    for kind in SIZES:
        headers = ["model", *[f"{s:g}" for s in SIZES[kind]]]
        table_rows = [[label, *[_cell(measured.get(label, {}).get(kind, {}), s)
                                for s in SIZES[kind]]] for label in by_label(rows)]
        sections += [f"## {KIND_NAMES[kind]}", "", format_table(headers, table_rows), ""]
    n_test = min(images or len(dataset.test_labels), len(dataset.test_labels))
    sections += [
        "Test accuracy (mean ± 95% CI over seeds, n per cell) in eval mode; in parentheses, "
        f"relative to the model's clean accuracy. Noise and FGSM on {n_test} test images; PGD "
        f"({PGD_STEPS} steps, step 2.5·eps/steps, random start) on the first "
        f"{min(n_test, PGD_BATCHES * EVAL_BATCH)}. Runs that failed (diverged, or final "
        f"validation accuracy at most {FAIL_ACCURACY}) are not measured.", "", *skipped(rows), "",
        "![accuracy under perturbations](robustness.png)", ""]
    controls = measure_statistics(rows, dataset, images)
    return Analysis(sections + control_sections(measured, controls, n_test),
                    findings(measured) + control_findings(measured, controls),
                    verdicts(rows, measured), calibration)


def _side(rows: list[Row], label: str) -> tuple[str, list[Row]]:
    return label, [r for r in rows if r.label == label]


def verdicts(rows: list[Row], measured: Measured) -> list[Verdict]:
    """Wang et al.'s claim on the pair that differs only in BN, per perturbation at its
    :data:`VERDICT_SIZES` size; Galloway et al.'s at matched clean accuracy (see the module
    docstring)."""
    with_bn, without = PAIR
    out = []
    for kind, size in VERDICT_SIZES.items():
        out.append(_judge(f"without BN, a model is more accurate under {KIND_NAMES[kind].split(' (')[0]}",
                          "Wang et al. 2022", f"test accuracy under {KIND_NAMES[kind]} = {size:g}, "
                          f"{without} minus {with_bn}", rows, measured, kind, size, with_bn, without,
                          1, paper="NoFrost: nets without BN are more robust after adversarial "
                                   "training",
                          note="no adversarial training here: plain SGD, LeNet on Fashion-MNIST; "
                               "the same net and rate with and without BN"))
    size = VERDICT_SIZES["noise"]
    out.append(_judge("at matched clean accuracy, BN is less robust to Gaussian noise",
                      "Galloway et al. 2019", f"test accuracy under Gaussian noise sigma = "
                      f"{size:g}, {SHORT} minus {BASELINE}", rows, measured, "noise", size,
                      BASELINE, SHORT, -1,
                      paper="BN nets less robust to noise than nets without at similar accuracy",
                      note=f"{SHORT} trains 1/{SHORT_FRACTION} of the epochs to bring its clean "
                           "accuracy towards the no-BN model's; see the controls for how close"))
    return out


def _judge(claim: str, source: str, measure_text: str, rows: list[Row], measured: Measured,
           kind: str, size: float, a: str, b: str, direction: int, **details: str) -> Verdict:
    """``b`` minus ``a`` under ``kind`` at ``size``, paired over the seeds both measured."""
    sides = (_side(rows, a), _side(rows, b))
    values = [measured.get(label, {}).get(kind, {}).get(size) for label in (a, b)]
    missing = [label for label, v in zip((a, b), values) if not v]
    if missing:
        note = details.pop("note", "")
        return not_measured(claim, source, measure_text,
                            f"{' and '.join(missing)}: no seed trained (or no run): nothing "
                            f"measured. {note}".rstrip(". ") + ".", failed=failures(*sides),
                            **details)
    return judge_difference(claim, source, measure_text, values[0], values[1], direction,
                            failed=failures(*sides), **details)


STATISTICS_NAMES = {"running": "the running averages of training (eval mode)",
                    "precise": f"population statistics of {CLEAN_IMAGES} clean training images, "
                               "re-estimated for the final weights",
                    "batch": "the noisy batch's own statistics",
                    "adapted": "statistics re-estimated on the noisy test set (adaptive BN)"}


def control_sections(measured: Measured, controls: Controls, n_test: int) -> list[str]:
    sigmas = SIZES["noise"]
    table_rows = [[label, statistics, *[_cell(per_size, s) for s in sigmas]]
                  for label, by_stats in controls.items()
                  for statistics, per_size in by_stats.items()]
    base = measured.get(BASELINE, {}).get("noise", {})
    if base:
        table_rows.append([BASELINE, "(no BN)", *[_cell(base, s) for s in sigmas]])
    return ["## Controls for Gaussian noise", "",
            format_table(["model", "BN statistics", *[f"{s:g}" for s in sigmas]], table_rows), "",
            f"Test accuracy under Gaussian noise ({n_test} test images, batches of "
            f"{EVAL_BATCH}, the same draws everywhere) with BN's statistics taken from: "
            + "; ".join(f"**{k}** = {v}" for k, v in STATISTICS_NAMES.items())
            + f". In parentheses, relative to the same evaluation's clean accuracy. {SHORT} is "
            f"trained for 1/{SHORT_FRACTION} of the epochs: the control at matched clean "
            "accuracy."]


def resolved_by_size(mine: dict[float, Seeds], theirs: dict[float, Seeds]
                     ) -> dict[str, list[float]]:
    """The nonzero sizes where ``mine`` is above ``theirs`` with the 95% interval of the
    paired difference above 0 ("more"), below 0 ("less"), or straddling it ("open")."""
    out: dict[str, list[float]] = {"more": [], "less": [], "open": []}
    for size in sorted(set(mine) & set(theirs)):
        if size == 0:
            continue
        if not apart(theirs[size], mine[size]):
            out["open"].append(size)
        else:
            above = mean_ci(_values(mine[size]))[0] > mean_ci(_values(theirs[size]))[0]
            out["more" if above else "less"].append(size)
    return out


def control_findings(measured: Measured, controls: Controls) -> list[str]:
    """Under each control, at every sigma, whether a BN model is more or less robust than the
    no-BN model (the paired 95% interval of the difference excludes 0), or not resolved; then which controls
    change the raw result and whether any gives Galloway et al.'s direction (BN less robust)."""
    base = measured.get(BASELINE, {}).get("noise", {})
    sigma = max(SIZES["noise"])
    if not base or sigma not in base:
        return [f"- No controls: {BASELINE} has no seed that trained."]
    lines: list[str] = []
    outcome: dict[str, dict[str, list[float]]] = {}

    def verdict(name: str, mine: dict[float, Seeds], theirs: dict[float, Seeds],
                what: str) -> None:
        resolved = outcome[name] = resolved_by_size(mine, theirs)
        ours, base_mean = mean_ci(_values(mine[sigma]))[0], mean_ci(_values(theirs[sigma]))[0]
        lines.append(f"- {name}: BN more robust at sigma {_sizes(resolved['more'])}, less robust "
                     f"at {_sizes(resolved['less'])} (paired 95% interval), not resolved at "
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
        clean_short, clean_base = mean_ci(_values(short[0.0]))[0], mean_ci(_values(base[0.0]))[0]
        gap = clean_short - clean_base
        lines.append(f"- Matched clean accuracy: {SHORT} {clean_short:.4f} vs {BASELINE} "
                     f"{clean_base:.4f} clean ({100 * gap:+.2f} points; "
                     + ("matched within 1 point" if abs(gap) <= 0.01 else "**not matched** within "
                        "1 point, so this control is only approximate") + ").")
        verdict(f"{SHORT} (matched clean accuracy), raw", short, base, "accuracy")
    less = [name for name, r in outcome.items() if r["less"]]
    more = [name for name, r in outcome.items() if r["more"] and not r["less"]]
    unresolved = [name for name, r in outcome.items() if not r["more"] and not r["less"]]
    lines.append("- Galloway et al. (2019)'s direction, BN *less* robust to noise with the "
                 "interval resolved: " + (f"under {'; '.join(less)}." if less else
                                        "under no evaluation here; none of the controls "
                                        "reproduces it."))
    lines.append("- BN more robust at some sigma (interval resolved) and less at none: "
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
            lines.append(f"- Clean test accuracy, {label}: {mean_ci(_values(clean))[0]:.4f}.")
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
                f"{_sizes(higher)}, less accurate at {_sizes(lower)} (paired interval resolved at "
                f"{_sizes(apart)}); relative to clean accuracy, retains more at "
                f"{_sizes(rel_higher)} and less at {_sizes(rel_lower)}. At {worst['size']:g}: "
                f"{worst['acc']:.4f} vs {worst['base_acc']:.4f} "
                f"({100 * worst['rel']:.0f}% vs {100 * worst['base_rel']:.0f}% of clean).")
    return lines


# --------------------------------------------------------------------------- calibration

def linear_case(n: int = 1000, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A two-class linear classifier ``w_k·(x - 0.5)`` of (B, 1, 28, 28) images, and ``n``
    images in [0.4, 0.6] labelled with its own prediction (clean accuracy 1), far enough from
    the pixel bounds that no perturbation here is clamped: a model whose accuracy under each
    attack is known in closed form (:func:`linear_expected`)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 784, generator=generator) / 28)
        model[1].bias.copy_(-0.5 * model[1].weight.sum(dim=1))
    x = 0.4 + 0.2 * torch.rand(n, 1, 28, 28, generator=generator)  # (n, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # (n,)
    return model.eval(), x, y


def linear_expected(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str,
                    size: float) -> float:
    """The accuracy of the two-class linear ``model`` on ``x`` (away from the pixel bounds)
    under ``kind`` at ``size``. With ``d = w_y - w_other`` and margin ``m = d·x + b_y -
    b_other > 0``: FGSM moves every pixel by ``size`` against ``d``'s sign, so ``m`` falls by
    exactly ``size·||d||_1``, and PGD's optimum in the L-infinity ball is that same corner
    (accuracy: the fraction with ``m > size·||d||_1``); Gaussian noise shifts ``m`` by
    ``N(0, (size·||d||_2)^2)`` (expected accuracy: the mean of ``Phi(m / (size·||d||_2))``)."""
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    d = weight[y] - weight[1 - y]  # (n, 784)
    m = (d * x.flatten(1)).sum(dim=1) + bias[y] - bias[1 - y]  # (n,)
    if size == 0:
        return (m > 0).float().mean().item()
    if kind == "noise":
        return float(scipy_stats.norm.cdf((m / (size * d.norm(dim=1))).numpy()).mean())
    return (m > size * d.abs().sum(dim=1)).float().mean().item()


CALIBRATION_SIZES = {"noise": (0.0, 0.02, 0.05), "fgsm": (0.0, 0.001, 0.003), "pgd": (0.0, 0.003)}


def calibrate_attacks() -> list[Calibration]:
    """Noise, FGSM and PGD accuracy (``bnlab.probes.robustness``) of :func:`linear_case`
    against :func:`linear_expected`: at size 0 no drop, and a drop that grows with the size.
    FGSM and PGD are exact (up to half an image); noise, a sample of the draws, within 4
    standard errors."""
    model, x, y = linear_case()
    batches = [(x[i:i + 500], y[i:i + 500]) for i in range(0, len(y), 500)]  # two batches
    curves = {"noise": noise_accuracy(model, batches, CALIBRATION_SIZES["noise"]),
              "fgsm": fgsm_accuracy(model, batches, CALIBRATION_SIZES["fgsm"]),
              "pgd": pgd_accuracy(model, batches, CALIBRATION_SIZES["pgd"], steps=PGD_STEPS)}
    out = []
    for kind, curve in curves.items():
        for size, read in curve:
            expected = linear_expected(model, x, y, kind, size)
            tolerance = (4 * math.sqrt(expected * (1 - expected) / len(y))
                         if kind == "noise" and size > 0 else 0.0) + 0.5 / len(y)
            out.append(Calibration(f"accuracy under {KIND_NAMES[kind]}",
                                   f"two-class linear model, {len(y)} images, size {size:g}",
                                   f"{expected:.4f}", f"{read:.4f}",
                                   abs(read - expected) <= tolerance))
    return out


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
                plot_intervals(axes[row][col], {x: _values(values[x]) for x in sorted(values)},
                               bounds, label=label)
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
          "momentum. Every run that trained is then attacked in eval mode (Gaussian noise, "
          "FGSM, PGD), and every BN model is evaluated under noise with four sources of its "
          "normalization statistics (the controls); measurements are cached per run.",
)
