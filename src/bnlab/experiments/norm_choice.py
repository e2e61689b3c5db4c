"""Claim: "layer normalization can sometimes be used as an alternative" to batch norm.

Why: BN normalizes with the statistics of the minibatch while training and with running
averages at prediction; layer, group and instance norm normalize each sample by itself,
the same way in both modes. So the question has two parts, both measured here on the
chapter's BN-LeNet with the norm layer swapped through the registry (``bnlab.norms``):
bnlab's BN, layer norm, group norm, instance norm (on the conv layers; its FC layers fall
back to layer norm, see ``bnlab.norms``) and none:

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

Default: 3 epochs on a class-balanced subset of 10000 training images (batch 2 is 5000
steps an epoch), 3 seeds: 60 runs, about 15-20 minutes on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnlab import runs
from bnlab.experiments.analysis import Row, failed, finals, mean_final, plot_intervals, select
from bnlab.experiments.measure import accuracy_in_mode, fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import UNBOUNDED, format_mean_ci, mean_ci
from bnlab.tables import format_table

NORMS = {"bnlab": "BN", "layer": "LayerNorm", "group": "GroupNorm", "instance": "InstanceNorm",
         "none": "none"}
BATCH_SIZES = (2, 8, 32, 128)
BASE_LR = 0.1
BASE_BATCH = 128
EVAL_BATCH = 1000
MODE_INDEPENDENT = 0.002  # |gap| below which a norm counts as mode-independent


def lr_for(batch_size: int) -> float:
    """``BASE_LR * sqrt(batch_size / BASE_BATCH)``."""
    return BASE_LR * math.sqrt(batch_size / BASE_BATCH)


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(f"{name} bs={bs}", {"model": "bn-lenet", "norm": norm, "batch_size": bs,
                                        "lr": lr_for(bs)}, {"norm": norm, "batch_size": bs})
            for norm, name in NORMS.items() for bs in BATCH_SIZES]


# --------------------------------------------------------------------------- definitions

def mode_accuracies(row: Row, dataset) -> dict[str, float] | None:
    """Test accuracy of a finished run's model in eval mode and in train mode (batches of
    the training batch size); None for a diverged run. Cached in the run folder."""
    if row.diverged:
        return None
    images, labels = dataset.test_images, dataset.test_labels
    key = {"version": 1, "eval_batch": EVAL_BATCH, "data": fingerprint(images, labels)}

    def compute() -> dict[str, float]:
        from bnlab.train import drops_last_batch

        model, config = runs.load_trained_model(row.run_dir)
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

def analyze(rows: list[Row], out: Path, dataset: Any = None) -> list[str]:
    measured: dict[tuple[str, int], list[dict[str, float]]] = {}
    if dataset is not None:
        for row in rows:
            result = mode_accuracies(row, dataset)
            if result is not None:
                measured.setdefault((row.tags["norm"], row.tags["batch_size"]), []).append(result)
    gaps = mode_gaps(measured)
    plot(rows, measured, out / "norms_by_batch_size.png")

    headers = ["norm", *[f"bs {bs} (lr {lr_for(bs):.4g})" for bs in BATCH_SIZES]]
    acc_rows = [[name, *[_cell(select(rows, norm=norm, batch_size=bs)) for bs in BATCH_SIZES]]
                for norm, name in NORMS.items()]
    sections = ["## Final validation accuracy (eval mode) by batch size", "",
                format_table(headers, acc_rows), "",
                "Mean ± 95% CI over seeds; 'failed k/n' = seeds that diverged or ended at chance "
                "level.", ""]
    if measured:
        gap_rows = [[name, *[_gap_cell(measured.get((norm, bs), [])) for bs in BATCH_SIZES]]
                    for norm, name in NORMS.items()]
        sections += ["## Train mode vs eval mode", "",
                     format_table(["norm", *[f"bs {bs}" for bs in BATCH_SIZES]], gap_rows), "",
                     "Each cell: test accuracy in train mode (batches of the training batch size) "
                     "/ in eval mode, and the gap train − eval in points (mean over seeds).", ""]
    return sections + findings(rows, gaps) + [
        "", "![accuracy and mode gap by batch size](norms_by_batch_size.png)"]


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


def findings(rows: list[Row], gaps: dict[tuple[str, int], float]) -> list[str]:
    means = {(n, bs): mean_final(g)
             for n in NORMS for bs in BATCH_SIZES if (g := select(rows, norm=n, batch_size=bs))}
    lines = []
    for bs in BATCH_SIZES:
        at = {n: v for (n, b), v in means.items() if b == bs}
        if at:
            ranked = sorted(at, key=at.get, reverse=True)
            lines.append(f"- Batch {bs}: " + ", ".join(f"{NORMS[n]} {at[n]:.4f}" for n in ranked)
                         + f" (best: **{NORMS[ranked[0]]}**).")
    small, large = min(BATCH_SIZES), max(BATCH_SIZES)
    for norm, name in NORMS.items():
        if (norm, small) in means and (norm, large) in means:
            change = means[(norm, small)] - means[(norm, large)]
            lines.append(f"- {name}: batch {small} vs batch {large}: {100 * change:+.2f} points.")
    alternatives = [n for n in ("layer", "group", "instance")
                    if all((n, bs) in means and ("bnlab", bs) in means for bs in BATCH_SIZES)]
    for n in alternatives:
        better = [bs for bs in BATCH_SIZES if means[(n, bs)] >= means[("bnlab", bs)]]
        lines.append(f"- {NORMS[n]} is at least as accurate as BN at batch sizes: "
                     + (", ".join(map(str, better)) if better else "none of the grid") + ".")
    if gaps:
        for norm, name in NORMS.items():
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


def plot(rows: list[Row], measured: dict, path: Path) -> None:
    from bnlab.plots import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for norm, name in NORMS.items():
        plot_intervals(axes[0], {bs: finals(group) for bs in BATCH_SIZES
                                 if (group := select(rows, norm=norm, batch_size=bs))}, label=name)
        plot_intervals(axes[1], {bs: [100 * (v["train"] - v["eval"]) for v in values]
                                 for bs in BATCH_SIZES if (values := measured.get((norm, bs)))},
                       UNBOUNDED, label=name)
    axes[0].set_ylabel("final val acc (eval mode)")
    axes[1].set_ylabel("train mode − eval mode (points)")
    axes[1].axhline(0.0, color="gray", lw=0.8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
        ax.set_xlabel("training batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
    notes="Learning rate 0.1·sqrt(batch/128), the same for every norm at a batch size. Default: "
          "3 epochs on 10000 images (batch 2 is 5000 steps an epoch) to fit 60 runs in 40 "
          "minutes.",
)
