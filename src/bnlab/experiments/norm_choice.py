"""Claim: "layer normalization can sometimes be used as an alternative" to batch norm.

Why: BN normalizes with the statistics of the minibatch while training and with running
averages at prediction; layer, group and instance norm normalize each sample by itself,
the same way in both modes. So the question has two parts, both measured here on the
chapter's BN-LeNet with the norm layer swapped through the registry (``bnlab.training.norms``):
bnlab's BN, layer norm, group norm, instance norm (on the conv layers; its FC layers fall
back to layer norm, see ``bnlab.training.norms``) and none:

* accuracy at training batch sizes 2, 8, 32 and 128, since BN's batch statistics get
  noisy as the batch shrinks (and its running averages are averages of noisy estimates);
* train mode vs eval mode: every finished model is evaluated on the 10000 test images in
  eval mode (batches of 1000) and in train mode with batches of its training batch size
  (a copy of the model, under no_grad, so its buffers are untouched). The *mode gap* is
  train-mode minus eval-mode accuracy. It is exactly 0 for a norm without running
  statistics; for BN it measures how far the batch statistics of a batch that size are
  from the running averages.

Learning rate: 0.1 at batch 128 (the chapter's), scaled with the square root of the batch
size, ``lr = 0.1 * sqrt(batch / 128)`` (0.0125, 0.025, 0.05, 0.1), the same for every norm
at a given batch size. Square-root scaling keeps the variance of an SGD update about
constant across batch sizes (Hoffer et al., 2017); the linear rule would give batch 2 a
rate of 0.0016 and, in a fixed number of epochs, no more progress than batch 128, while a
constant 0.1 would make batch 2 noisy for reasons unrelated to the norm.

Two arms, because a fixed number of epochs is not a fixed amount of training across batch
sizes (3 epochs of 10000 images are 15000 steps at batch 2 and 237 at batch 128):

* **equal epochs** (equal samples): every batch size sees the grid's epochs x images. It
  compares *norms at one batch size* (same steps, same samples for each norm). Across
  batch sizes it is confounded with the step count: the small batches take many more steps.
* **equal steps**: every batch size takes the same number of SGD steps, those of batch
  ``EQUAL_STEPS_BATCH`` in the equal-epochs arm (1875 at the defaults), on at most the
  grid's images (``equal_steps_budget`` picks epochs and a class-balanced subset so the
  step counts are exactly equal). Across batch sizes it is confounded the other way: the
  large batches see more samples. A change across batch sizes that keeps its sign in both
  arms is neither a step-count nor a sample-count effect; the difference between two norms'
  changes (BN's minus LayerNorm's, say) cancels what the budget does to both.

The train/eval mode sweep (train mode at batch 2 is 5000 forward passes per model) is
measured on the equal-epochs arm only, once per finished run, and cached in its folder.

Verdicts (``findings``' rule, paired over seeds, equal-epochs arm, test accuracy): each
alternative norm against BN, at the largest batch size as non-inferiority within
:data:`MARGIN` ("an alternative") and at the smallest as superiority ("sometimes": where BN's
batch statistics are worst); BN's accuracy in train mode below its eval-mode accuracy at
the smallest batch, and each alternative's the same in both modes (within
:data:`MODE_INDEPENDENT`). The mode difference is read on synthetic models with known
answers in every report (``measure.calibrate_mode_difference``).

Default: 3 epochs on a class-balanced subset of 10000 training images, 3 seeds. ``--quick``
runs batch sizes :data:`QUICK_BATCH_SIZES` and sweeps the modes on fewer test images.
``--norms`` replaces the five norms with a list of one's own (plug-ins included, see
``bnlab.training.norms``); the comparisons with BN are made where ``bnlab`` is in it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import Row, finals, plot_intervals, select
from bnlab.experiments.arms import REPORTED, cell, judge_arms, same_arms
from bnlab.experiments.findings import Analysis, Verdict
from bnlab.experiments.measure import accuracy_in_mode, calibrate_mode_difference, fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant, norm_list
from bnlab.experiments.stats import UNBOUNDED, estimate, mean_ci
from bnlab.training import restore, runs
from bnlab.training.train import drops_last_batch, steps_per_epoch, training_images
from bnlab.util.plots import legend, log_axis, plt, reference_line, save_figure
from bnlab.util.tables import format_table

NORMS = {"bnlab": "BN", "layer": "LayerNorm", "group": "GroupNorm", "instance": "InstanceNorm",
         "none": "none"}
"""The default grid's norms and their names in the report; ``--norms`` gives another list
(names it does not know are shown as given)."""
BATCH_SIZES = (2, 8, 32, 128)
QUICK_BATCH_SIZES = (8, 32)
"""--quick's batch sizes: a smoke test whose every run takes at most two epochs (batch 2's
hundreds of steps and batch 128's many equal-steps epochs would not fit minutes)."""
QUICK_TEST_IMAGES = 1000  # --quick: test images of the train/eval mode sweep
MARGIN = 0.01
"""An alternative norm is "as accurate as" BN when its test accuracy is not below BN's by
more than 1 point (paired over seeds)."""
BASE_LR = 0.1
BASE_BATCH = 128
EVAL_BATCH = 1000
MODE_INDEPENDENT = 0.002  # |gap| below which a norm counts as mode-independent
EQUAL_STEPS_BATCH = 16
EPOCHS, STEPS = "equal epochs", "equal steps"
ARMS = (EPOCHS, STEPS)


def lr_for(batch_size: int) -> float:
    """``BASE_LR * sqrt(batch_size / BASE_BATCH)``."""
    return BASE_LR * math.sqrt(batch_size / BASE_BATCH)


def equal_steps_target(settings: ExpSettings) -> int:
    """The equal-steps arm's step count: batch ``EQUAL_STEPS_BATCH``'s steps in the
    equal-epochs arm of (resolved) ``settings``."""
    images = training_images(settings.subset, settings.val_size)
    return settings.epochs * steps_per_epoch(images, EQUAL_STEPS_BATCH)


def equal_steps_budget(steps: int, batch_size: int, max_images: int) -> tuple[int, int]:
    """(epochs, images) with ``epochs * steps_per_epoch(images, batch_size) == steps`` and
    ``images <= max_images``, with the fewest epochs: an epoch of whole batches
    (``images = (steps / epochs) * batch_size``) over as many images as allowed."""
    for epochs in range(max(1, math.ceil(steps * batch_size / max_images)), steps + 1):
        if steps % epochs == 0 and (steps // epochs) * batch_size <= max_images:
            return epochs, (steps // epochs) * batch_size
    raise ValueError(f"no budget of {steps} steps at batch {batch_size} fits {max_images} images")


def norm_label(norm: str) -> str:
    """How the report names ``norm``: :data:`NORMS`'s name, or the norm's own."""
    return NORMS.get(norm, norm)


def norms_of(rows: list[Row]) -> dict[str, str]:
    """The norms of ``rows`` in grid order, with their names in the report."""
    return {norm: norm_label(norm) for norm in dict.fromkeys(r.tags["norm"] for r in rows)}


def batch_sizes(settings: ExpSettings) -> tuple[int, ...]:
    """The grid's training batch sizes: :data:`BATCH_SIZES`, or :data:`QUICK_BATCH_SIZES`."""
    return QUICK_BATCH_SIZES if settings.quick else BATCH_SIZES


def sizes_of(rows: list[Row]) -> list[int]:
    """The batch sizes the grid ran, ascending."""
    return sorted({r.tags["batch_size"] for r in rows})


def variants(settings: ExpSettings) -> list[Variant]:
    target = equal_steps_target(settings)
    images = training_images(settings.subset, settings.val_size)
    out = []
    for arm in ARMS:
        for norm in norm_list(settings):
            name = norm_label(norm)
            for bs in batch_sizes(settings):
                params = {"model": "bn-lenet", "norm": norm, "batch_size": bs, "lr": lr_for(bs)}
                label = f"{name} bs={bs}"
                if arm == STEPS:
                    epochs, subset = equal_steps_budget(target, bs, images)
                    params |= {"epochs": epochs, "subset": subset}
                    label += f" steps={target}"
                out.append(Variant(label, params, {"norm": norm, "batch_size": bs, "arm": arm}))
    return out


# --------------------------------------------------------------------------- definitions

def mode_accuracies(row: Row, dataset, test_images: int | None = None) -> dict[str, float] | None:
    """Test accuracy (on the first ``test_images``, default all) of a finished run's model
    in eval mode and in train mode (batches of the training batch size); None for a diverged
    run. Cached in the run folder."""
    if row.diverged:
        return None
    images, labels = dataset.test_images[:test_images], dataset.test_labels[:test_images]
    key = {"version": 1, "eval_batch": EVAL_BATCH, "data": fingerprint(images, labels)}

    def compute() -> dict[str, float]:
        model, config = restore.load_trained_model(row.run_dir)
        x, y = images, labels
        if drops_last_batch(len(y), config.batch_size):
            x, y = x[:-1], y[:-1]
        return {"eval": accuracy_in_mode(model, x, y, False, batch_size=EVAL_BATCH),
                "train": accuracy_in_mode(model, x, y, True, batch_size=config.batch_size)}

    return runs.cached(row.run_dir, "norm_modes", key, compute)


def mode_gaps(measured: dict[tuple[str, int], list[dict[str, float]]]) -> dict[tuple[str, int], float]:
    """Mean train-mode minus eval-mode accuracy per (norm, batch size)."""
    return {key: mean_ci([m["train"] - m["eval"] for m in values])[0]
            for key, values in measured.items() if values}


def mode_independent(gaps: dict[tuple[str, int], float], norm: str,
                     tolerance: float = MODE_INDEPENDENT) -> bool | None:
    """Whether every measured batch size of ``norm`` has |gap| <= tolerance (None: no data)."""
    values = [g for (n, _), g in gaps.items() if n == norm and not math.isnan(g)]
    return None if not values else all(abs(g) <= tolerance for g in values)


# --------------------------------------------------------------------------- report

Measured = dict[str, dict[str, float]]  # run folder -> mode_accuracies


def _eval_mode(measured: Measured):
    def value(row: Row) -> float | None:
        m = measured.get(row.run_dir)
        return None if m is None else m["eval"]
    return value


def _train_mode(measured: Measured):
    def value(row: Row) -> float | None:
        m = measured.get(row.run_dir)
        return None if m is None else m["train"]
    return value


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    test_images = QUICK_TEST_IMAGES if settings.quick else None
    measured: Measured = {}
    by_cell: dict[tuple[str, int], list[dict[str, float]]] = {}
    if dataset is not None:
        for row in select(rows, arm=EPOCHS):
            result = mode_accuracies(row, dataset, test_images)
            if result is not None:
                measured[row.run_dir] = result
                by_cell.setdefault((row.tags["norm"], row.tags["batch_size"]), []).append(result)
    gaps = mode_gaps(by_cell)
    names = norms_of(rows)
    sizes = sizes_of(rows)
    plot(rows, by_cell, out / "norms_by_batch_size.png")

    sections = []
    for arm in ARMS:
        arm_rows = select(rows, arm=arm)
        if not arm_rows:
            continue
        budget = {bs: _budget(select(arm_rows, batch_size=bs)) for bs in sizes}
        headers = ["norm", *[f"bs {bs} (lr {lr_for(bs):.4g}; {budget[bs]})" for bs in sizes]]
        acc_rows = [[name, *[cell(select(arm_rows, norm=norm, batch_size=bs)) for bs in sizes]]
                    for norm, name in names.items()]
        sections += [f"## Final test accuracy (eval mode) by batch size: {arm}", "",
                     format_table(headers, acc_rows), "",
                     "Mean ± 95% CI over seeds, n per cell; diverged runs are counted, not "
                     "averaged. " + ARM_READING[arm], ""]
    if by_cell:
        n_test = len(dataset.test_labels[:test_images])
        gap_rows = [[name, *[_gap_cell(by_cell.get((norm, bs), [])) for bs in sizes]]
                    for norm, name in names.items()]
        sections += ["## Train mode vs eval mode (equal epochs)", "",
                     format_table(["norm", *[f"bs {bs}" for bs in sizes]], gap_rows), "",
                     f"Each cell: accuracy on {n_test} test images in train mode (batches of the "
                     "training batch size) / in eval mode, and the difference train − eval in "
                     "points (mean over seeds, n seeds).", ""]
    sections += [COMPARISONS, "", "![accuracy and mode gap by batch size](norms_by_batch_size.png)"]
    return Analysis(sections, findings(rows, gaps), verdicts(rows, measured),
                    calibrate_mode_difference())


COMPARISONS = ("Which comparison each table supports: at one batch size (equal epochs: same steps "
               "and samples for every norm) it compares norms; a change across batch sizes is "
               "read in both arms, and only where it keeps its sign in both is it more than a "
               "step-count (equal epochs) or sample-count (equal steps) effect.")

ARM_READING = {
    EPOCHS: "Every batch size sees the same samples, so the small batches take more steps: "
            "read this table down a column (norms at one batch size), not along a row.",
    STEPS: "Every batch size takes the same SGD steps, so the large batches see more "
           "samples: read along a row with that in mind, and beside the equal-epochs table.",
}


def verdicts(rows: list[Row], measured: Measured) -> list[Verdict]:
    """The claim "layer norm (and friends) can sometimes replace BN", and the mode (see the
    module docstring); made where ``bnlab`` is among the norms."""
    names = norms_of(rows)
    sizes = sizes_of(select(rows, arm=EPOCHS))
    if "bnlab" not in names or not sizes:
        return []
    small, large = sizes[0], sizes[-1]
    source = "the chapter"

    def side(norm: str, bs: int) -> tuple[str, list[Row]]:
        return f"{names[norm]} bs {bs}", select(rows, arm=EPOCHS, norm=norm, batch_size=bs)

    alternatives = [n for n in names if n not in ("bnlab", "none")]
    out = []
    for norm in alternatives:
        name = names[norm]
        out += [
            judge_arms(f"{name} is as accurate as BN at batch {large}", source,
                       f"final test accuracy, {name} minus BN, batch {large} (non-inferiority "
                       f"margin {MARGIN})", side("bnlab", large), side(norm, large),
                       margin=-MARGIN, paper="layer normalization can sometimes be used as an "
                       "alternative to batch normalization",
                       note=f"BN-LeNet with the norm swapped, lr {lr_for(large):.4g}, equal epochs"),
            judge_arms(f"{name} is more accurate than BN at batch {small}", source,
                       f"final test accuracy, {name} minus BN, batch {small}",
                       side("bnlab", small), side(norm, small),
                       paper="BN's batch statistics are noisy in small batches",
                       note=f"lr {lr_for(small):.4g} (square-root scaling), equal epochs: the "
                            "small batch takes many more steps"),
        ]
    if not measured:
        return out
    eval_mode, train_mode = _eval_mode(measured), _train_mode(measured)
    bn = side("bnlab", small)
    out.append(judge_arms(f"BN is less accurate in train mode than in eval mode at batch {small}",
                          source, f"test accuracy, train mode (batches of {small}) minus eval "
                          "mode, BN", bn, bn, eval_mode, direction=-1, value_b=train_mode,
                          paper="BN normalizes with batch statistics in training and with "
                                "running averages in prediction",
                          note="the same images in both modes, a copy of each model"))
    for norm in alternatives:
        alt = side(norm, small)
        out.append(same_arms(f"{names[norm]}'s accuracy is the same in train and eval mode "
                             f"(batch {small})", source,
                             f"test accuracy, train mode minus eval mode, {names[norm]} "
                             f"(equivalence margin ±{MODE_INDEPENDENT})", alt, alt,
                             MODE_INDEPENDENT, eval_mode, train_mode,
                             paper="layer normalization computes the same statistics in both "
                                   "modes"))
    return out


def _budget(group: list[Row]) -> str:
    if not group:
        return "-"
    row = group[0]
    return (f"{row.planned_steps} steps, {row.config['epochs']} ep x "
            f"{row.config['subset'] or 'all'} img")


def _gap_cell(values: list[dict[str, float]]) -> str:
    if not values:
        return "-"
    train = mean_ci([v["train"] for v in values])[0]
    ev = mean_ci([v["eval"] for v in values])[0]
    return f"{train:.4f} / {ev:.4f} ({100 * (train - ev):+.2f}; n={len(values)})"


def _means(rows: list[Row], arm: str) -> dict[tuple[str, int], float]:
    """Mean final test accuracy over the runs that did not diverge, per (norm, batch size)."""
    return {(n, bs): estimate([r.summary.get(REPORTED) for r in g if not r.diverged]).mean
            for n in norms_of(rows) for bs in sizes_of(rows)
            if (g := select(rows, arm=arm, norm=n, batch_size=bs))}


def findings(rows: list[Row], gaps: dict[tuple[str, int], float]) -> list[str]:
    means = _means(rows, EPOCHS)
    lines = []
    for bs in sizes_of(rows):
        at = {n: v for (n, b), v in means.items() if b == bs and not math.isnan(v)}
        if at:
            ranked = sorted(at, key=at.get, reverse=True)
            lines.append(f"- Batch {bs} (norms compared, equal epochs, test accuracy): "
                         + ", ".join(f"{norm_label(n)} {at[n]:.4f}" for n in ranked)
                         + f" (best: **{norm_label(ranked[0])}**).")
    lines += batch_size_changes(rows)
    if gaps:
        for norm in dict.fromkeys([*norms_of(rows), *(n for n, _ in gaps)]):
            name = norm_label(norm)
            verdict = mode_independent(gaps, norm)
            if verdict is None:
                continue
            worst = max((g for (n, _), g in gaps.items() if n == norm), key=abs)
            lines.append(f"- {name}: largest |train mode − eval mode| accuracy gap "
                         f"{100 * abs(worst):.2f} points ("
                         + ("mode-independent" if verdict else "depends on the mode") + "); "
                         + ", ".join(f"bs {bs}: {100 * g:+.2f}"
                                     for (n, bs), g in sorted(gaps.items()) if n == norm) + ".")
    return lines


def batch_size_changes(rows: list[Row]) -> list[str]:
    """Per norm: accuracy at the smallest minus the largest batch in each arm, whether the
    sign survives the change of budget, and BN's change minus each other norm's."""
    sizes = sizes_of(rows)
    if not sizes:
        return []
    small, large = sizes[0], sizes[-1]
    norms = norms_of(rows)
    change = {arm: {n: m[(n, small)] - m[(n, large)] for n in norms
                    if (n, small) in (m := _means(rows, arm)) and (n, large) in m}
              for arm in ARMS}
    lines = []
    for norm, name in norms.items():
        cells = {arm: change[arm][norm] for arm in ARMS if norm in change[arm]}
        if not cells:
            continue
        text = f"- {name}: batch {small} vs batch {large}: " + ", ".join(
            f"{100 * v:+.2f} points ({arm})" for arm, v in cells.items())
        if len(cells) == 2:
            a, b = cells.values()
            text += ("; same sign in both arms: a batch-size effect, not only a budget effect"
                     if a * b > 0 else
                     "; the sign flips with the budget: a budget effect (steps in one arm, "
                     "samples in the other), not one of the batch size" if a * b < 0 else
                     "; no change in one arm: not a batch-size effect that both budgets show")
        lines.append(text + ".")
    for arm in ARMS:
        if "bnlab" not in change[arm]:
            continue
        others = [n for n in norms if n != "bnlab" and n in change[arm]]
        if others:
            lines.append(f"- BN's change from batch {large} to {small} minus each other norm's "
                         f"({arm}; the budget's effect common to both cancels): " + ", ".join(
                             f"vs {norm_label(n)} {100 * (change[arm]['bnlab'] - change[arm][n]):+.2f}"
                             for n in others) + " points.")
    return lines


def plot(rows: list[Row], measured: dict, path: Path) -> None:
    sizes = sizes_of(rows) or list(BATCH_SIZES)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for norm, name in norms_of(rows).items():
        for ax, arm in zip(axes, ARMS):
            plot_intervals(ax, {bs: finals(group) for bs in sizes
                                if (group := select(rows, arm=arm, norm=norm, batch_size=bs))},
                           label=name)
        plot_intervals(axes[2], {bs: [100 * (v["train"] - v["eval"]) for v in values]
                                 for bs in sizes if (values := measured.get((norm, bs)))},
                       UNBOUNDED, label=name)
    for ax, arm in zip(axes, ARMS):
        ax.set_ylabel("final validation accuracy (eval mode)")
        ax.set_title(arm)
    axes[2].set_ylabel("train mode − eval mode (percentage points)")
    axes[2].set_title(EPOCHS)
    reference_line(axes[2], 0.0)
    for ax in axes:
        log_axis(ax, "x", base=2, ticks=sizes, label="training batch size")
        legend(ax)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="norms",
    title="Claim: layer norm (and friends) as an alternative to batch norm",
    question="How do BN, LayerNorm, GroupNorm, InstanceNorm and no norm in the chapter's LeNet "
             "compare at training batch sizes 2 to 128, and how much does each depend on train "
             "vs eval mode?",
    variants=variants,
    analyze=analyze,
    default_epochs=3,
    default_subset=10000,
    norms=tuple(NORMS),
    notes="Learning rate 0.1·sqrt(batch/128), the same for every norm at a batch size. Two "
          "arms: equal epochs (every batch size sees the grid's epochs and images, so small "
          f"batches take more steps) and equal steps (every batch size takes batch "
          f"{EQUAL_STEPS_BATCH}'s steps of the equal-epochs arm). The finished models of the "
          "equal-epochs arm are evaluated on test images in eval mode and in train mode "
          "(batches of their training batch size); the sweeps are cached per run.",
)
