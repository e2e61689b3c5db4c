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

Default: 3 epochs on a class-balanced subset of 10000 training images, 3 seeds: 60 runs in
the equal-epochs arm and 60 in the equal-steps arm; see the notes for the time it takes.
``--norms`` replaces the five norms with a list of one's own (plug-ins included, see
``bnlab.training.norms``); the comparisons with BN are made where ``bnlab`` is in it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnlab.experiments.analysis import Row, failed, finals, mean_final, plot_intervals, select
from bnlab.experiments.findings import Analysis
from bnlab.experiments.measure import accuracy_in_mode, fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant, norm_list
from bnlab.experiments.stats import UNBOUNDED, format_mean_ci, mean_ci
from bnlab.training import restore, runs
from bnlab.training.train import drops_last_batch, steps_per_epoch, training_images
from bnlab.util.plots import legend, log_axis, plt, reference_line, save_figure
from bnlab.util.tables import format_table

NORMS = {"bnlab": "BN", "layer": "LayerNorm", "group": "GroupNorm", "instance": "InstanceNorm",
         "none": "none"}
"""The default grid's norms and their names in the report; ``--norms`` gives another list
(names it does not know are shown as given)."""
BATCH_SIZES = (2, 8, 32, 128)
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


def variants(settings: ExpSettings) -> list[Variant]:
    target = equal_steps_target(settings)
    images = training_images(settings.subset, settings.val_size)
    out = []
    for arm in ARMS:
        for norm in norm_list(settings):
            name = norm_label(norm)
            for bs in BATCH_SIZES:
                params = {"model": "bn-lenet", "norm": norm, "batch_size": bs, "lr": lr_for(bs)}
                label = f"{name} bs={bs}"
                if arm == STEPS:
                    epochs, subset = equal_steps_budget(target, bs, images)
                    params |= {"epochs": epochs, "subset": subset}
                    label += f" steps={target}"
                out.append(Variant(label, params, {"norm": norm, "batch_size": bs, "arm": arm}))
    return out


# --------------------------------------------------------------------------- definitions

def mode_accuracies(row: Row, dataset) -> dict[str, float] | None:
    """Test accuracy of a finished run's model in eval mode and in train mode (batches of
    the training batch size); None for a diverged run. Cached in the run folder."""
    if row.diverged:
        return None
    images, labels = dataset.test_images, dataset.test_labels
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

def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    measured: dict[tuple[str, int], list[dict[str, float]]] = {}
    if dataset is not None:
        for row in select(rows, arm=EPOCHS):
            result = mode_accuracies(row, dataset)
            if result is not None:
                measured.setdefault((row.tags["norm"], row.tags["batch_size"]), []).append(result)
    gaps = mode_gaps(measured)
    names = norms_of(rows)
    plot(rows, measured, out / "norms_by_batch_size.png")

    sections = []
    for arm in ARMS:
        arm_rows = select(rows, arm=arm)
        if not arm_rows:
            continue
        budget = {bs: _budget(select(arm_rows, batch_size=bs)) for bs in BATCH_SIZES}
        headers = ["norm", *[f"bs {bs} (lr {lr_for(bs):.4g}; {budget[bs]})" for bs in BATCH_SIZES]]
        acc_rows = [[name, *[_cell(select(arm_rows, norm=norm, batch_size=bs))
                             for bs in BATCH_SIZES]] for norm, name in names.items()]
        sections += [f"## Final validation accuracy (eval mode) by batch size: {arm}", "",
                     format_table(headers, acc_rows), "",
                     "Mean ± 95% CI over seeds; 'failed k/n' = seeds that diverged or ended at "
                     "chance level. " + ARM_READING[arm], ""]
    if measured:
        gap_rows = [[name, *[_gap_cell(measured.get((norm, bs), [])) for bs in BATCH_SIZES]]
                    for norm, name in names.items()]
        sections += ["## Train mode vs eval mode (equal epochs)", "",
                     format_table(["norm", *[f"bs {bs}" for bs in BATCH_SIZES]], gap_rows), "",
                     "Each cell: test accuracy in train mode (batches of the training batch size) "
                     "/ in eval mode, and the gap train − eval in points (mean over seeds).", ""]
    return Analysis(sections + findings(rows, gaps) + [
        "", "![accuracy and mode gap by batch size](norms_by_batch_size.png)"])


ARM_READING = {
    EPOCHS: "Every batch size sees the same samples, so the small batches take more steps: "
            "read this table down a column (norms at one batch size), not along a row.",
    STEPS: "Every batch size takes the same SGD steps, so the large batches see more "
           "samples: read along a row with that in mind, and beside the equal-epochs table.",
}


def _budget(group: list[Row]) -> str:
    if not group:
        return "-"
    row = group[0]
    return (f"{row.planned_steps} steps, {row.config['epochs']} ep x "
            f"{row.config['subset'] or 'all'} img")


def _cell(group: list[Row]) -> str:
    if not group:
        return "-"
    fails = sum(failed(r) for r in group)
    text = format_mean_ci(finals(group))
    return text + (f" (failed {fails}/{len(group)})" if fails else "")


def _gap_cell(values: list[dict[str, float]]) -> str:
    if not values:
        return "-"
    train = mean_ci([v["train"] for v in values])[0]
    ev = mean_ci([v["eval"] for v in values])[0]
    return f"{train:.4f} / {ev:.4f} ({100 * (train - ev):+.2f})"


def _means(rows: list[Row], arm: str) -> dict[tuple[str, int], float]:
    return {(n, bs): mean_final(g) for n in norms_of(rows) for bs in BATCH_SIZES
            if (g := select(rows, arm=arm, norm=n, batch_size=bs))}


def findings(rows: list[Row], gaps: dict[tuple[str, int], float]) -> list[str]:
    means = _means(rows, EPOCHS)
    lines = ["Which comparison each finding supports: rankings at one batch size (equal epochs: "
             "same steps and samples for every norm) compare norms; a change across batch "
             "sizes is read in both arms, and only where it keeps its sign in both is it more "
             "than a step-count (equal epochs) or sample-count (equal steps) effect.", ""]
    for bs in BATCH_SIZES:
        at = {n: v for (n, b), v in means.items() if b == bs}
        if at:
            ranked = sorted(at, key=at.get, reverse=True)
            lines.append(f"- Batch {bs} (norms compared, equal epochs): "
                         + ", ".join(f"{norm_label(n)} {at[n]:.4f}" for n in ranked)
                         + f" (best: **{norm_label(ranked[0])}**).")
    lines += batch_size_changes(rows)
    alternatives = [n for n in norms_of(rows) if n not in ("bnlab", "none")
                    and all((n, bs) in means and ("bnlab", bs) in means for bs in BATCH_SIZES)]
    for n in alternatives:
        better = [bs for bs in BATCH_SIZES if means[(n, bs)] >= means[("bnlab", bs)]]
        lines.append(f"- {norm_label(n)} is at least as accurate as BN (equal epochs) at batch sizes: "
                     + (", ".join(map(str, better)) if better else "none of the grid") + ".")
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
                         + ", ".join(f"bs {bs}: {100 * gaps[(norm, bs)]:+.2f}"
                                     for bs in BATCH_SIZES if (norm, bs) in gaps) + ".")
    return lines


def batch_size_changes(rows: list[Row]) -> list[str]:
    """Per norm: accuracy at the smallest minus the largest batch in each arm, whether the
    sign survives the change of budget, and BN's change minus each other norm's."""
    small, large = min(BATCH_SIZES), max(BATCH_SIZES)
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
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for norm, name in norms_of(rows).items():
        for ax, arm in zip(axes, ARMS):
            plot_intervals(ax, {bs: finals(group) for bs in BATCH_SIZES
                                if (group := select(rows, arm=arm, norm=norm, batch_size=bs))},
                           label=name)
        plot_intervals(axes[2], {bs: [100 * (v["train"] - v["eval"]) for v in values]
                                 for bs in BATCH_SIZES if (values := measured.get((norm, bs)))},
                       UNBOUNDED, label=name)
    for ax, arm in zip(axes, ARMS):
        ax.set_ylabel("final validation accuracy (eval mode)")
        ax.set_title(arm)
    axes[2].set_ylabel("train mode − eval mode (percentage points)")
    axes[2].set_title(EPOCHS)
    reference_line(axes[2], 0.0)
    for ax in axes:
        log_axis(ax, "x", base=2, ticks=BATCH_SIZES, label="training batch size")
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
          "arms: equal epochs (3 epochs on 10000 images: 15000 steps at batch 2, 237 at batch "
          "128) and equal steps (batch 16's 1875 at every batch size). Default grid: 120 "
          "distinct runs, sized to fit 40 minutes on 2 cores with the first analysis (the "
          "equal-steps arm costs more: its batch-128 runs take 25 epochs); the analysis's "
          "train-mode sweeps are cached, so a re-analysis trains and sweeps nothing.",
)
