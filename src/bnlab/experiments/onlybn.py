"""Paper: training only batch norm (Frankle, Schwab & Morcos, ICLR 2021).

Why: batch norm's gamma and beta are a small fraction of a network's parameters, and are
usually seen as a detail of the normalization. Frankle et al. freeze every other weight at
its random initialization and train only gamma and beta: deep ResNets still reach 82% on
CIFAR-10, far more than training as many randomly chosen other parameters, the deeper the
network the more, and batch norm does it partly by switching features off (gamma near 0, so
the ReLU after it sees a constant).

The grid: CIFAR ResNets (``bnlab.training.resnet``, post-activation, option-A shortcuts) of
:data:`DEPTHS` layers, each trained three ways (``TrainConfig.train_only``,
``bnlab.training.trainable``): ``bn`` (only every batch norm's gamma and beta), ``random``
(as many entries drawn at random, seeded, from the other parameters) and ``all``. Every arm
starts from the same weights per seed (the choice of entries draws from a generator of its
own) and trains with the same SGD (rate :data:`LR`, momentum :data:`MOMENTUM`, batch
:data:`BATCH`, no weight decay, a constant rate), so the arms differ only in what may move:
no choice is made, on validation or test. Measured: validation and test accuracy (the test
set's in verdicts and tables), and per batch-norm layer of every finished model the fraction
of gamma with ``|gamma| <`` :data:`THRESHOLD` (:func:`fraction_near_zero`), which with the
ReLU after it leaves a channel at its shift beta: a feature switched off. The paper's
threshold could not be read from the sources at hand (their abstract and introduction), so
the report gives the fraction at :data:`THRESHOLDS` and judges the claim at 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import FAIL_ACCURACY, Row, failed, finals, plot_intervals, select
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    judge_same,
    not_measured,
)
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import format_mean_ci, mean_ci
from bnlab.training import restore, runs
from bnlab.training.resnet import cifar_resnet
from bnlab.training.trainable import batch_norm_parameters, trainable_count, trainable_masks
from bnlab.util.plots import (
    count_axis,
    legend,
    log_axis,
    note_empty,
    plt,
    reference_line,
    save_figure,
    style,
)
from bnlab.util.tables import format_table

DEPTHS = (20, 32, 56, 110)
QUICK_DEPTHS = (20, 32)
ARMS = {"bn": "γ/β only", "random": "as many random others", "all": "everything"}
LR = 0.05
MOMENTUM = 0.9
BATCH = 64
"""Frankle et al.'s rate 0.1 at batch 128, scaled linearly to batch 64 (Goyal et al. 2017): a
short budget of images takes twice the steps."""
VAL_SIZE = 2000
"""The validation split is at most this many images (``--val-size`` may make it smaller)."""
THRESHOLD = 0.05
THRESHOLDS = (0.01, 0.05, 0.1)
PAPER_FRACTION = 1 / 3
FRACTION_MARGIN = 0.1
""""About a third": within 0.1 of 1/3 (the judged equivalence margin)."""


def label(arm: str, depth: int) -> str:
    return f"ResNet-{depth}, train {ARMS[arm]}"


def depths_of(settings: ExpSettings) -> tuple[int, ...]:
    return QUICK_DEPTHS if settings.quick else DEPTHS


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(label(arm, depth),
                    {"model": f"resnet{depth}", "norm": "bnlab", "train_only": arm, "lr": LR,
                     "momentum": MOMENTUM, "batch_size": BATCH,
                     "val_size": min(settings.val_size, VAL_SIZE)},
                    {"arm": arm, "depth": depth})
            for depth in depths_of(settings) for arm in ARMS]


# --------------------------------------------------------------------------- gamma near zero

Gammas = dict[str, list[float]]  # batch-norm layer name (forward order) -> gamma per channel


def fraction_near_zero(values: Sequence[float], threshold: float = THRESHOLD) -> float:
    """The fraction of ``values`` with ``|value| < threshold`` (nan for none)."""
    return sum(abs(v) < threshold for v in values) / len(values) if values else math.nan


def layer_fractions(gammas: Gammas, threshold: float = THRESHOLD) -> list[float]:
    """:func:`fraction_near_zero` of every layer, in forward order."""
    return [fraction_near_zero(values, threshold) for values in gammas.values()]


def pooled_fraction(gammas: Gammas, threshold: float = THRESHOLD) -> float:
    """The fraction over every channel of the network (each channel counts once, so a wide
    layer counts more than a narrow one)."""
    return fraction_near_zero([v for values in gammas.values() for v in values], threshold)


def read_gammas(row: Row) -> Gammas:
    """Every batch norm's gamma of a finished run's model, in forward order, kept in its folder
    (``runs.cached``; stored as [name, gammas] pairs, since JSON objects are written sorted)."""
    def compute() -> list[list]:
        model, _ = restore.load_trained_model(row.run_dir)
        names = {n for n in batch_norm_parameters(model) if n.endswith(".weight")}
        return [[n.removesuffix(".weight"), p.detach().tolist()]
                for n, p in model.named_parameters() if n in names]

    return dict(runs.cached(row.run_dir, "onlybn-gammas", {"version": 2}, compute))


def measured_gammas(rows: list[Row]) -> dict[str, Gammas]:
    """Per run folder, the gammas of every run that did not diverge."""
    return {r.run_dir: read_gammas(r) for r in rows if not r.diverged}


def fractions_by_seed(rows: list[Row], gammas: dict[str, Gammas], threshold: float = THRESHOLD,
                      **tags: Any) -> dict[int, float]:
    return {r.seed: pooled_fraction(gammas[r.run_dir], threshold)
            for r in select(rows, **tags) if r.run_dir in gammas}


def parameter_counts(depth: int) -> tuple[int, int]:
    """(gamma and beta entries, all parameter entries) of the BN ResNet of ``depth`` layers."""
    model = cifar_resnet(depth, "bnlab")
    return (trainable_count(trainable_masks(model, "bn")),
            sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- report

def accuracy_table(rows: list[Row], depths: Sequence[int]) -> str:
    table = []
    for depth in depths:
        bn, total = parameter_counts(depth)
        for arm in ARMS:
            group = select(rows, arm=arm, depth=depth)
            if not group:
                continue
            trained = total if arm == "all" else bn
            table.append([depth, ARMS[arm], f"{trained:,} of {total:,}",
                          format_mean_ci(finals(group)), format_mean_ci(finals(group, "final_test_acc")),
                          f"{sum(failed(r) for r in group)}/{len(group)}"])
    return format_table(["depth", "trains", "entries trained", "final val acc", "final test acc",
                         "failed"], table)


def gamma_table(rows: list[Row], gammas: dict[str, Gammas], depths: Sequence[int]) -> str:
    table = []
    for depth in depths:
        for arm in ARMS:
            if not select(rows, arm=arm, depth=depth):
                continue
            table.append([depth, ARMS[arm], *[
                format_mean_ci(list(fractions_by_seed(rows, gammas, t, arm=arm,
                                                      depth=depth).values()), ".3f")
                for t in THRESHOLDS]])
    return format_table(["depth", "trains", *[f"abs(γ) < {t:g}" for t in THRESHOLDS]], table)


def plot_accuracy(rows: list[Row], depths: Sequence[int], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, arm in enumerate(ARMS):
        points = {d: finals(g, "final_test_acc") for d in depths if (g := select(rows, arm=arm, depth=d))}
        if points:
            plot_intervals(ax, points, label=f"train {ARMS[arm]}", **style(i))
    if not ax.lines:
        note_empty(ax, "no runs")
    else:
        reference_line(ax, FAIL_ACCURACY, label="fails at or below")
        log_axis(ax, "x", ticks=list(depths), label="depth (weight layers)")
        ax.set_ylabel("final test accuracy")
        legend(ax)
    save_figure(fig, path)


def plot_gammas(rows: list[Row], gammas: dict[str, Gammas], depths: Sequence[int], path: Path) -> None:
    """Per depth, the distribution of every gamma (seeds pooled) after training γ/β only and
    after training everything, with the threshold either side of 0."""
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 4), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        drawn = False
        for i, arm in enumerate(("bn", "all")):
            values = [v for r in select(rows, arm=arm, depth=depth) if r.run_dir in gammas
                      for layer in gammas[r.run_dir].values() for v in layer]
            if values:
                ax.hist(values, bins=60, histtype="step", weights=[1 / len(values)] * len(values),
                        color=style(i)["color"], linestyle=style(i)["linestyle"],
                        label=f"train {ARMS[arm]}")
                drawn = True
        ax.set_title(f"ResNet-{depth}")
        if not drawn:
            note_empty(ax, "no finished runs")
            continue
        for sign in (-1, 1):
            ax.axvline(sign * THRESHOLD, **{"color": "0.45", "lw": 0.8, "ls": "--"},
                       label=f"|γ| = {THRESHOLD:g}" if sign > 0 else None)
        ax.set_xlabel("γ after training (initialized at 1)")
        ax.set_ylabel("share of the net's γ per bin")
        legend(ax)
    save_figure(fig, path)


def plot_layer_fractions(rows: list[Row], gammas: dict[str, Gammas], depth: int, path: Path) -> None:
    """The deepest net: per batch-norm layer, the fraction of |gamma| < THRESHOLD, mean over
    seeds, after training γ/β only and after training everything."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, arm in enumerate(("bn", "all")):
        per_seed = [layer_fractions(gammas[r.run_dir]) for r in select(rows, arm=arm, depth=depth)
                    if r.run_dir in gammas]
        if per_seed:
            means = [mean_ci(list(values))[0] for values in zip(*per_seed)]
            ax.plot(range(1, len(means) + 1), means, label=f"train {ARMS[arm]}",
                    markevery=max(1, len(means) // 20), **style(i))
    if not ax.lines:
        note_empty(ax, f"no finished run of ResNet-{depth}")
    else:
        count_axis(ax, "layer (batch norms in forward order, 1 = the stem's)")
        ax.set_ylabel(f"fraction of |γ| < {THRESHOLD:g}")
        ax.set_title(f"ResNet-{depth}: features switched off per layer")
        legend(ax)
    save_figure(fig, path)


def _accuracies(rows: list[Row], **tags: Any) -> dict[int, float]:
    return {r.seed: a for r, a in zip(select(rows, **tags), finals(select(rows, **tags),
                                                                    "final_test_acc"))}


def _why_not(rows: list[Row], *sides: dict[str, Any]) -> str | None:
    """Why a comparison between ``sides`` (tags) is not made: a side without runs, or one that
    does not train (a seed fails); None when both train."""
    for tags in sides:
        group = select(rows, **tags)
        name = label(tags["arm"], tags["depth"])
        if not group:
            return f"no runs of {name}"
        if any(failed(r) for r in group):
            return (f"{name} does not train ({sum(failed(r) for r in group)}/{len(group)} runs "
                    f"diverge or end at or below {FAIL_ACCURACY} validation accuracy)")
    return None


def verdicts(rows: list[Row], gammas: dict[str, Gammas], depths: Sequence[int]) -> list[Verdict]:
    source = "Frankle et al. 2021"
    shallow, deep = min(depths), max(depths)
    out = []
    claim = "training only γ/β trains a deep ResNet, every other weight random"
    measure = (f"final test accuracy of γ/β-only training minus the failure line {FAIL_ACCURACY}, "
               f"ResNet-{deep}")
    accuracy = _accuracies(rows, arm="bn", depth=deep)
    group = select(rows, arm="bn", depth=deep)
    out.append(judge_difference(
        claim, source, measure, {s: FAIL_ACCURACY for s in accuracy}, accuracy,
        paper="'sufficiently deep ResNets reach 82% (CIFAR-10)'",
        note=f"{group[0].planned_steps} SGD steps, not a full training; Fashion-MNIST",
        failed=f"{sum(failed(r) for r in group)}/{len(group)} failed")
        if group else not_measured(claim, source, measure, f"no runs of ResNet-{deep}"))
    claim = "training only γ/β beats training as many randomly chosen other parameters"
    measure = f"final test accuracy, γ/β only − random, ResNet-{deep}"
    sides = ({"arm": "random", "depth": deep}, {"arm": "bn", "depth": deep})
    why = _why_not(rows, *sides)
    out.append(not_measured(claim, source, measure, why) if why else judge_difference(
        claim, source, measure, _accuracies(rows, **sides[0]), _accuracies(rows, **sides[1]),
        paper="'far higher than when training an equivalent number of randomly chosen "
              "parameters elsewhere'",
        note=f"{select(rows, **sides[1])[0].planned_steps} SGD steps, not a full training; "
             "Fashion-MNIST, not CIFAR-10"))
    claim = "deeper networks gain more from γ/β-only training"
    measure = f"final test accuracy of γ/β-only training, ResNet-{deep} − ResNet-{shallow}"
    sides = ({"arm": "bn", "depth": shallow}, {"arm": "bn", "depth": deep})
    why = _why_not(rows, *sides) if deep != shallow else "one depth in this grid"
    out.append(not_measured(claim, source, measure, why) if why else judge_difference(
        claim, source, measure, _accuracies(rows, **sides[0]), _accuracies(rows, **sides[1]),
        paper="'sufficiently deep ResNets reach 82% (CIFAR-10)'; accuracy grows with depth",
        note="seeds paired by number (different nets); the deeper net also has more γ/β"))
    claim = "γ/β-only training switches off more features than training everything"
    measure = f"fraction of abs(γ) < {THRESHOLD:g}, γ/β only − everything, ResNet-{deep}"
    sides = ({"arm": "all", "depth": deep}, {"arm": "bn", "depth": deep})
    why = _why_not(rows, *sides)
    out.append(not_measured(claim, source, measure, why) if why else judge_difference(
        claim, source, measure, fractions_by_seed(rows, gammas, **sides[0]),
        fractions_by_seed(rows, gammas, **sides[1]),
        paper="'learning to disable around a third of the random features'",
        note=f"threshold {THRESHOLD:g} is ours (the paper's not confirmed); no weight decay here"))
    claim = "γ/β-only training switches off about a third of the features"
    measure = (f"fraction of abs(γ) < {THRESHOLD:g} after γ/β-only training, ResNet-{deep}, vs 1/3 "
               f"(margin ±{FRACTION_MARGIN:g})")
    sides = ({"arm": "bn", "depth": deep},)
    why = _why_not(rows, *sides)
    measured = fractions_by_seed(rows, gammas, **sides[0])
    out.append(not_measured(claim, source, measure, why) if why else judge_same(
        claim, source, measure, {s: PAPER_FRACTION for s in measured}, measured,
        FRACTION_MARGIN, paper="'around a third'",
        note="a short training: γ starts at 1 and moves by the rate times its gradient per step"))
    return out


def findings(rows: list[Row], gammas: dict[str, Gammas], depths: Sequence[int]) -> list[str]:
    lines = []
    for depth in depths:
        means = {arm: mean_ci(finals(select(rows, arm=arm, depth=depth), "final_test_acc"))[0]
                 for arm in ARMS if select(rows, arm=arm, depth=depth)}
        if len(means) == len(ARMS):
            lines.append(f"- ResNet-{depth}: test accuracy training γ/β only {means['bn']:.4f}, "
                         f"as many random others {means['random']:.4f}, everything "
                         f"{means['all']:.4f}; γ/β only closes "
                         f"{_share(means['bn'], means['random'], means['all'])} of the gap from "
                         "random to everything.")
    for arm in ("bn", "all"):
        fractions = {d: mean_ci(list(fractions_by_seed(rows, gammas, arm=arm, depth=d).values()))[0]
                     for d in depths}
        if any(math.isfinite(f) for f in fractions.values()):
            lines.append(f"- Fraction of abs(γ) < {THRESHOLD:g} after training {ARMS[arm]}: "
                         + ", ".join(f"ResNet-{d} {f:.3f}" for d, f in fractions.items()) + ".")
    return lines


def _share(bn: float, random: float, everything: float) -> str:
    if not all(map(math.isfinite, (bn, random, everything))) or everything == random:
        return "an undefined share"
    return f"{(bn - random) / (everything - random):.0%}"


def calibration() -> list[Calibration]:
    """The fraction near zero on synthetic gammas with a known count (strictly below the
    threshold; values at it do not count), pooled over layers of different widths."""
    out = []
    for near in (0, 300, 600):
        values = [0.0] * (near // 3) + [-0.04] * (near // 3) + [0.049] * (near - 2 * (near // 3)) \
            + [1.0, THRESHOLD, -THRESHOLD, 0.5] * ((1000 - near) // 4)
        read = fraction_near_zero(values)
        out.append(Calibration("fraction of abs(γ) < 0.05", f"{near} of 1000 values in (-0.05, 0.05), "
                               "the rest 1, ±0.05 (not below) and 0.5", f"{near / 1000:.3f}",
                               f"{read:.3f}", math.isclose(read, near / 1000)))
    gammas = {"narrow": [0.0] * 5 + [1.0] * 5, "wide": [1.0] * 90}
    read = pooled_fraction(gammas)
    out.append(Calibration("fraction of abs(γ) < 0.05, pooled over layers",
                           "a layer of 10 with 5 at 0 and a layer of 90 at 1",
                           "0.050 (per channel, not per layer: 0.25)", f"{read:.3f}",
                           math.isclose(read, 0.05) and layer_fractions(gammas) == [0.5, 0.0]))
    return out


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    depths = depths_of(settings)
    if not rows:
        return Analysis(["(no finished runs)"], calibration=calibration())
    gammas = measured_gammas(rows)
    plot_accuracy(rows, depths, out / "accuracy_vs_depth.png")
    plot_gammas(rows, gammas, depths, out / "gamma_distribution.png")
    plot_layer_fractions(rows, gammas, max(depths), out / "gamma_per_layer.png")
    sections = [
        "## Accuracy by depth and by what trains", "", accuracy_table(rows, depths), "",
        f"Every arm from the same initial weights per seed, SGD at rate {LR:g} with momentum "
        f"{MOMENTUM:g}, batch {BATCH}, no weight decay; entries trained: γ and β of every batch "
        "norm (γ/β only), as many random other entries (random), or all. Mean ± 95% CI over "
        "seeds (a diverged run at chance).", "",
        "![test accuracy against depth](accuracy_vs_depth.png)", "",
        "## γ near zero: features switched off", "", gamma_table(rows, gammas, depths), "",
        "Per finished run, the fraction of all its batch norms' channels whose γ lies within the "
        "threshold of 0 (with the ReLU after it, such a channel outputs about relu(β), whatever "
        f"its input); verdicts use abs(γ) < {THRESHOLD:g}. The random arm trains no γ (they stay "
        "at 1): it is the control.", "",
        "![distribution of gamma after training](gamma_distribution.png)", "",
        f"![fraction of gamma near zero per layer, ResNet-{max(depths)}](gamma_per_layer.png)"]
    return Analysis(sections, findings(rows, gammas, depths), verdicts(rows, gammas, depths),
                    calibration())


EXPERIMENT = Experiment(
    name="onlybn",
    title="Paper: training only batch norm's γ and β",
    question="With every other weight frozen at its random initialization, how far does training "
             "only batch norm's γ and β take ResNets of increasing depth, compared with training "
             "as many random other parameters and with training everything, and how many "
             "features does it switch off (γ near 0)?",
    variants=variants,
    analyze=analyze,
    default_epochs=1,
    default_subset=10000,
    notes=f"CIFAR ResNets (post-activation, option-A shortcuts), each trained three ways from the "
          f"same initial weights: only batch norm's γ/β, as many randomly chosen other entries, "
          f"everything; SGD at rate {LR:g}, momentum {MOMENTUM:g}, batch {BATCH}, no weight "
          f"decay, constant rate; no choice is made on any split. γ near zero: abs(γ) < "
          f"{THRESHOLD:g}. The validation split is at most {VAL_SIZE} images (evaluating "
          "ResNet-110 costs about what a short run trains).",
)
