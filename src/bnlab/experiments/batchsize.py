"""Paper: normalization batch vs SGD batch (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 4-5).

Why: "the batch" of batch norm is two things, the batch SGD averages the gradient over and
the batch whose statistics normalize. Ghost batch norm (``norm="ghost:V"``) separates
them: the SGD batch stays 128 and each chunk of V samples is normalized alone. Wu &
Johnson name two gaps: the *generalization gap* (training accuracy minus test accuracy,
both with mini-batch statistics of the normalization batch) and the *train-test
inconsistency* (test accuracy with mini-batch statistics minus with population
statistics: the model trained on one and predicts with the other).

Part 1, SGD batch 128, lr 0.1: BN-LeNet with Ghost BN of V in :data:`GHOST_SIZES` (V = 128
is plain batch norm). Each finished model is evaluated three ways (``measure``, cached in
its run folder):

- *train, mini-batch*: train-mode accuracy on the run's training images, in batches of
  128 of a fixed shuffle, so each chunk of V is normalized with its own statistics;
- *test, mini-batch*: the same on the test set;
- *test, population*: eval mode with population statistics of the final weights
  (``bnlab.nn.precise.update_bn_stats`` over one pass of the training images);

beside the trainer's *test, EMA* (eval mode, running statistics of momentum 0.1). Only
whole batches of 128 count, so every chunk has exactly V samples. The remedy: the same
runs with the last :func:`frozen_epochs` epochs trained with batch norm frozen at the
population statistics (``TrainConfig.freeze_bn_epochs``; the paper: the last 2 of 10).
There the model trains with what it predicts with, so the three ways coincide; its
accuracy is the trainer's final test accuracy. The frozen layers keep their affine fixed
(``bnlab.nn.frozen``) and the rate stays 0.1 (the chapter's constant rate; the paper's
schedule has decayed by then).

Part 2, normalization batch b in :data:`SMALL_BATCHES`: batch norm, batch renormalization,
GroupNorm and LayerNorm trained with SGD batch b (so the normalization batch of the batch
norms is b), beside Part 1's Ghost BN of V = b at SGD batch 128. The rate follows the
linear scaling rule, ``0.1 * b / 128`` (Goyal et al. 2017), and every run trains the same
epochs, so each sees the same images with the same rate per image. SyncBN is not in this
grid: one process here; ``bnlab exp sync`` compares it with local BN and GroupNorm at
per-process batches 2-32. ``--norms`` replaces part 2's four norms with a list of one's own
(plug-ins included, see ``bnlab.training.norms``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from bnlab.data.loader import Loader, stratified_subset
from bnlab.experiments.analysis import Row, final, finals, plot_intervals, select
from bnlab.experiments.findings import Analysis, Verdict, judge_difference
from bnlab.experiments.measure import accuracy_in_mode, fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant, norm_list
from bnlab.experiments.stats import format_mean_ci, intervals_apart, mean_ci
from bnlab.nn.precise import update_bn_stats
from bnlab.training import restore, runs
from bnlab.training.norms import uses_batch_statistics
from bnlab.util.plots import legend, log_axis, plt, reference_line, save_figure
from bnlab.util.tables import counted, format_table

SGD_BATCH = 128
BASE_LR = 0.1
GHOST_SIZES = (2, 4, 8, 16, 32, 128)
SMALL_BATCHES = (2, 4, 8)
SMALL_NORMS = {"BN": "bnlab", "Batch Renorm": "renorm", "GroupNorm": "group", "LayerNorm": "layer"}
"""Part 2's norms by their names in the report; ``--norms`` gives another list (names not
here are shown as given)."""
FROZEN_FRACTION = 0.2
"""The remedy freezes batch norm for the last 20% of the epochs (2 of 10, as the paper)."""
EVAL_SEED = 0
"""Seed of the fixed shuffles the measurements batch their images in."""


def frozen_epochs(epochs: int) -> int:
    """Epochs of the remedy's frozen phase: 20% of ``epochs``, at least 1; 0 (no remedy
    runs) for a one-epoch grid, whose frozen phase would start from the initial weights."""
    return max(1, round(FROZEN_FRACTION * epochs)) if epochs >= 2 else 0


def small_batch_lr(batch: int) -> float:
    """The linear scaling rule: ``BASE_LR * batch / SGD_BATCH``."""
    return BASE_LR * batch / SGD_BATCH


def variants(settings: ExpSettings) -> list[Variant]:
    ghost = [Variant(f"ghost {v}", {"model": "bn-lenet", "norm": f"ghost:{v}", "lr": BASE_LR,
                                    "batch_size": SGD_BATCH},
                     {"part": "ghost", "v": v, "frozen": False}) for v in GHOST_SIZES]
    frozen = frozen_epochs(settings.epochs)
    remedy = [Variant(f"ghost {v}, frozen last {frozen}",
                      {"model": "bn-lenet", "norm": f"ghost:{v}", "lr": BASE_LR,
                       "batch_size": SGD_BATCH, "freeze_bn_epochs": frozen},
                      {"part": "ghost", "v": v, "frozen": True})
              for v in GHOST_SIZES] if frozen else []
    small = [Variant(f"{label} batch {b}", {"model": "bn-lenet", "norm": norm,
                                            "lr": small_batch_lr(b), "batch_size": b},
                     {"part": "small", "b": b, "norm": label})
             for b in SMALL_BATCHES for label, norm in small_norms(settings).items()]
    return ghost + remedy + small


def small_norms(settings: ExpSettings) -> dict[str, str]:
    """Part 2's norms (resolved ``settings.norms``) by their names in the report."""
    labels = {norm: label for label, norm in SMALL_NORMS.items()}
    return {labels.get(norm, norm): norm for norm in norm_list(settings)}


def small_labels(rows: list[Row]) -> list[str]:
    """The names of part 2's norms in ``rows``, in grid order."""
    return list(dict.fromkeys(r.tags["norm"] for r in select(rows, part="small")))


# --------------------------------------------------------------------------- measurement

def _shuffled(images: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels in a fixed shuffle, cut to whole batches of ``batch``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(EVAL_SEED))
    order = order[:len(order) // batch * batch]
    return images[order], labels[order]


def three_ways(model: torch.nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
               test_images: torch.Tensor, test_labels: torch.Tensor, batch: int) -> dict[str, float]:
    """Accuracy of ``model`` (left untouched) with mini-batch statistics on training and on
    test images (train mode, batches of ``batch``), and with population statistics of the
    training images on the test images (eval mode)."""
    result = {}
    for name, (images, labels) in {"train_minibatch": (train_images, train_labels),
                                   "test_minibatch": (test_images, test_labels)}.items():
        result[name] = accuracy_in_mode(model, *_shuffled(images, labels, batch), training=True,
                                        batch_size=batch)
    population = copy.deepcopy(model)
    loader = Loader(train_images, train_labels, batch, seed=EVAL_SEED)
    update_bn_stats(population, loader, len(loader), progress=False)
    result["test_population"] = accuracy_in_mode(population, test_images, test_labels,
                                                 training=False)
    return result


def measure(row: Row, dataset) -> dict[str, float]:
    """:func:`three_ways` of a finished run's model on its own training images (cached in its
    folder as ``batchsize-three-ways.json``)."""
    config = row.config
    images, labels = dataset.train_images, dataset.train_labels
    if config["subset"]:
        images, labels = stratified_subset(images, labels, config["subset"])
    key = {"version": 1, "seed": EVAL_SEED, "batch": config["batch_size"],
           "data": fingerprint(images, labels, dataset.test_images, dataset.test_labels)}
    return runs.cached(row.run_dir, "batchsize-three-ways", key, lambda: three_ways(
        restore.load_trained_model(row.run_dir)[0], images, labels, dataset.test_images,
        dataset.test_labels, config["batch_size"]))


# --------------------------------------------------------------------------- analysis

WAYS = {"train_minibatch": "train, mini-batch", "test_minibatch": "test, mini-batch",
        "test_population": "test, population"}


def measured_ways(rows: list[Row], dataset) -> dict[str, dict[str, float]]:
    """Per run folder: the three ways plus ``test_ema`` (the trainer's final test accuracy),
    for every run with batch norms that trained and is not a remedy run."""
    out = {}
    for r in rows:
        if r.diverged or r.tags.get("frozen") or not uses_batch_statistics(r.config["norm"]):
            continue
        out[r.run_dir] = {**measure(r, dataset), "test_ema": final(r)}
    return out


def _values(rows: list[Row], ways, key: str) -> list[float]:
    return [ways[r.run_dir][key] for r in rows if r.run_dir in ways]


def _gap(rows: list[Row], ways, a: str, b: str) -> list[float]:
    return [ways[r.run_dir][a] - ways[r.run_dir][b] for r in rows if r.run_dir in ways]


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to measure)"])
    ways = measured_ways(rows, dataset)
    plot(rows, ways, out / "batchsize.png")
    return Analysis(["## Normalization batch at SGD batch 128", "", ghost_table(rows, ways), "",
            "Generalization gap = train minus test accuracy, both with mini-batch statistics; "
            "train-test inconsistency = test accuracy with mini-batch minus with population "
            "statistics (> 0: the population statistics the model predicts with cost accuracy). "
            "Frozen: the remedy runs' final test accuracy, and its difference from the plain "
            "runs' test accuracy with population statistics. Mean ± 95% CI over seeds, points "
            "for the gaps.", "",
            "## Small normalization batches", "", small_table(rows), "",
            f"Final test accuracy in eval mode. BN, Batch Renorm, GroupNorm, LayerNorm: SGD "
            f"batch b at lr {BASE_LR:g}·b/{SGD_BATCH}; Ghost BN: SGD batch {SGD_BATCH} at lr "
            f"{BASE_LR:g}, normalization batch b (part 1's runs).", "",
            "## Findings", "", *findings(rows, ways), "",
            "## Beside the paper", "",
            "Wu & Johnson (ResNet-50 on ImageNet, SGD batch fixed, normalization batch varied) "
            "find the generalization gap growing with the normalization batch and the "
            "train-test inconsistency the main cost of small normalization batches, closed by "
            "training the last epochs with population statistics; here BN-LeNet on "
            "Fashion-MNIST with plain SGD at a constant rate.", "",
            "![batchsize](batchsize.png)"], verdicts=paper_verdicts(rows, ways))


def ghost_table(rows: list[Row], ways) -> str:
    headers = ["V", *WAYS.values(), "test, EMA", "generalization gap", "train-test inconsistency",
               "frozen: test", "frozen − population"]
    table = []
    for v in GHOST_SIZES:
        plain = select(rows, part="ghost", v=v, frozen=False)
        remedy = select(rows, part="ghost", v=v, frozen=True)
        if not plain and not remedy:
            continue
        cells = [format_mean_ci(_values(plain, ways, k)) for k in (*WAYS, "test_ema")]
        cells += [format_mean_ci([100 * g for g in _gap(plain, ways, *pair)], ".2f")
                  for pair in (("train_minibatch", "test_minibatch"),
                               ("test_minibatch", "test_population"))]
        remedy_acc = finals(remedy)
        pop = _values(plain, ways, "test_population")
        diff = mean_ci(remedy_acc)[0] - mean_ci(pop)[0] if remedy_acc and pop else math.nan
        cells += [format_mean_ci(remedy_acc) if remedy else "-",
                  f"{100 * diff:+.2f}" if not math.isnan(diff) else "-"]
        table.append([str(v), *cells])
    return format_table(headers, table)


def small_table(rows: list[Row]) -> str:
    labels = small_labels(rows)
    headers = ["b", *labels, f"Ghost BN (SGD {SGD_BATCH})"]
    table = []
    for b in SMALL_BATCHES:
        cells = [format_mean_ci(finals(select(rows, part="small", b=b, norm=label)))
                 for label in labels]
        cells.append(format_mean_ci(finals(select(rows, part="ghost", v=b, frozen=False))))
        table.append([str(b), *cells])
    return format_table(headers, table)


def findings(rows: list[Row], ways) -> list[str]:
    lines = []
    sizes = [v for v in GHOST_SIZES if _values(select(rows, part="ghost", v=v, frozen=False),
                                               ways, "test_population")]
    if sizes:
        small, large = sizes[0], sizes[-1]
        for name, pair in (("generalization gap", ("train_minibatch", "test_minibatch")),
                           ("train-test inconsistency", ("test_minibatch", "test_population"))):
            at = {v: _gap(select(rows, part="ghost", v=v, frozen=False), ways, *pair)
                  for v in (small, large)}
            change = 100 * (mean_ci(at[large])[0] - mean_ci(at[small])[0])
            lines.append(
                f"- The {name} is {format_mean_ci([100 * g for g in at[small]], '.2f')} points at "
                f"V = {small} and {format_mean_ci([100 * g for g in at[large]], '.2f')} at V = "
                f"{large}: {change:+.2f} points from the smaller to the larger normalization "
                f"batch ({_apart(at[small], at[large])}).")
        inconsistent = [v for v in sizes if mean_ci(_gap(select(rows, part="ghost", v=v,
                                                                frozen=False), ways,
                                                         "test_minibatch", "test_population"))[0] > 0]
        lines.append("- Mini-batch statistics beat population statistics on the test set "
                     + (f"at V = {', '.join(map(str, inconsistent))}" if inconsistent
                        else "at no V of the grid") + " (mean over seeds).")
    remedy = []
    for v in GHOST_SIZES:
        frozen = finals(select(rows, part="ghost", v=v, frozen=True))
        pop = _values(select(rows, part="ghost", v=v, frozen=False), ways, "test_population")
        if frozen and pop:
            remedy.append(f"V = {v}: {100 * (mean_ci(frozen)[0] - mean_ci(pop)[0]):+.2f}")
    if remedy:
        lines.append("- Frozen BN for the last epochs, test accuracy minus the plain runs' with "
                     "population statistics (points): " + "; ".join(remedy) + ".")
        jumps = [freeze_loss_jump(r) for r in select(rows, part="ghost", frozen=True)]
        jumps = [j for j in jumps if j is not None]
        if jumps:
            before, after = (mean_ci([j[i] for j in jumps])[0] for i in (0, 1))
            lines.append(f"- Training loss of the remedy runs, last epoch with batch statistics vs "
                         f"first frozen epoch: {before:.3f} vs {after:.3f} (mean over "
                         f"{counted(len(jumps), 'run')}, every V), at the same constant rate "
                         f"{BASE_LR:g}.")
    for b in SMALL_BATCHES:
        scores = {label: finals(select(rows, part="small", b=b, norm=label))
                  for label in small_labels(rows)}
        scores["Ghost BN"] = finals(select(rows, part="ghost", v=b, frozen=False))
        scores = {k: s for k, s in scores.items() if s}
        if not scores:
            continue
        best = max(scores, key=lambda k: mean_ci(scores[k])[0])
        rest = [k for k in scores if k != best and not intervals_apart(scores[best], scores[k])]
        others = ", ".join(f"{k} {mean_ci(scores[k])[0]:.4f}" for k in scores if k != best)
        lines.append(f"- Normalization batch {b}: best {best} ({format_mean_ci(scores[best])}; "
                     f"{others}); " + ("one seed: no intervals." if len(scores[best]) < 2 else
                                       f"not apart from {', '.join(rest)} at 95%." if rest else
                                       "apart from every other norm at 95%."))
    return lines


def freeze_loss_jump(row: Row) -> tuple[float, float] | None:
    """A remedy run's training loss in its last epoch with batch statistics and in its first
    frozen epoch (None if it has neither, e.g. it diverged first)."""
    first_frozen = row.config["epochs"] - row.config["freeze_bn_epochs"]  # index of that epoch
    if first_frozen < 1 or len(row.metrics) <= first_frozen:
        return None
    return row.metrics[first_frozen - 1]["train_loss"], row.metrics[first_frozen]["train_loss"]


def paper_verdicts(rows: list[Row], ways) -> list[Verdict]:
    """The paper's three claims against this grid, each at the smallest and largest
    normalization batch measured (points; ``findings.judge_difference``)."""
    sizes = [v for v in GHOST_SIZES if _values(select(rows, part="ghost", v=v, frozen=False),
                                               ways, "test_population")]
    if not sizes:
        return []
    small, large = sizes[0], sizes[-1]
    plain = {v: select(rows, part="ghost", v=v, frozen=False) for v in (small, large)}

    def gap(v: int, a: str, b: str) -> list[float]:
        return [100 * g for g in _gap(plain[v], ways, a, b)]

    frozen = [100 * a for a in finals(select(rows, part="ghost", v=small, frozen=True))]
    population = [100 * a for a in _values(plain[small], ways, "test_population")]
    source = "Wu & Johnson 2021"
    return [
        judge_difference("the generalization gap grows with the normalization batch", source,
                         f"train minus test accuracy (mini-batch statistics, points), V = "
                         f"{large} minus V = {small}",
                         gap(small, "train_minibatch", "test_minibatch"),
                         gap(large, "train_minibatch", "test_minibatch")),
        judge_difference("small normalization batches suffer train-test inconsistency", source,
                         f"test accuracy with mini-batch minus with population statistics "
                         f"(points), V = {small} minus V = {large}",
                         gap(large, "test_minibatch", "test_population"),
                         gap(small, "test_minibatch", "test_population")),
        judge_difference("Frozen BN for the last epochs recovers it", source,
                         f"V = {small}, test accuracy (%) after the frozen remedy minus with "
                         f"population statistics after plain training",
                         population, frozen),
    ]


def _apart(a: list[float], b: list[float]) -> str:
    if min(len(a), len(b)) < 2:
        return "one seed: no intervals"
    return "95% intervals apart" if intervals_apart(a, b) else "the 95% intervals overlap"


def plot(rows: list[Row], ways, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for key, label in (*WAYS.items(), ("test_ema", "test, EMA")):
        points = {v: _values(select(rows, part="ghost", v=v, frozen=False), ways, key)
                  for v in GHOST_SIZES}
        plot_intervals(axes[0], {v: p for v, p in points.items() if p}, label=label)
    frozen = {v: finals(select(rows, part="ghost", v=v, frozen=True)) for v in GHOST_SIZES}
    if any(frozen.values()):
        plot_intervals(axes[0], {v: p for v, p in frozen.items() if p}, label="frozen remedy: test")
    axes[0].set_ylabel("accuracy")
    axes[0].set_title(f"Ghost BN at SGD batch {SGD_BATCH}")
    for name, pair in (("generalization gap", ("train_minibatch", "test_minibatch")),
                       ("train-test inconsistency", ("test_minibatch", "test_population"))):
        points = {v: _gap(select(rows, part="ghost", v=v, frozen=False), ways, *pair)
                  for v in GHOST_SIZES}
        plot_intervals(axes[1], {v: p for v, p in points.items() if p},
                       bounds=(-math.inf, math.inf), label=name)
    reference_line(axes[1], 0.0)
    axes[1].set_ylabel("accuracy difference (fraction)")
    axes[1].set_title("the paper's two gaps")
    for label in small_labels(rows):
        points = {b: finals(select(rows, part="small", b=b, norm=label)) for b in SMALL_BATCHES}
        plot_intervals(axes[2], {b: p for b, p in points.items() if p}, label=f"{label} (SGD b)")
    ghost = {b: finals(select(rows, part="ghost", v=b, frozen=False)) for b in SMALL_BATCHES}
    plot_intervals(axes[2], {b: p for b, p in ghost.items() if p},
                   label=f"Ghost BN (SGD {SGD_BATCH})")
    axes[2].set_ylabel("test accuracy (eval mode)")
    axes[2].set_title("small normalization batches")
    for ax, sizes in zip(axes, (GHOST_SIZES, GHOST_SIZES, SMALL_BATCHES)):
        log_axis(ax, "x", base=2, ticks=sizes, label="normalization batch (examples)")
        legend(ax)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="batchsize",
    title="Paper: normalization batch vs SGD batch",
    question="With the SGD batch fixed, how do the normalization batch's generalization gap and "
             "train-test inconsistency change, does training the last epochs with frozen "
             "population statistics help, and which norm does best at normalization batch 2-8?",
    variants=variants,
    analyze=analyze,
    default_epochs=10,
    default_subset=4000,
    norms=tuple(SMALL_NORMS.values()),
    notes=f"Ghost BN V in {list(GHOST_SIZES)} at SGD batch {SGD_BATCH}, lr {BASE_LR:g}, with and "
          "without the frozen remedy (last 20% of the epochs); BN, Batch Renorm, GroupNorm, "
          f"LayerNorm at SGD batch {list(SMALL_BATCHES)} with linearly scaled rates. Default: 10 "
          "epochs (the paper's remedy: the last 2 of 10) on 4000 images, 3 seeds, sized to fit "
          "40 minutes on 2 cores with --jobs 2: the small-batch runs (2000 steps an epoch at "
          "batch 2) take most of it.",
)
