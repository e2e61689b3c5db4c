"""Paper: batch norm biases residual blocks towards the identity (De & Smith 2020), and what
trains deep ResNets without it (SkipInit, Fixup).

Why: the chapter credits batch norm with networks of over 100 layers, but those networks are
residual. De & Smith explain why BN lets them train deep with one number per residual block
l, the variance of what the branch adds over the variance the skip path carries: with BN the
branch adds about 1 per block, so the ratio is about 1/l and a deep block is close to the
identity; without normalization each block about doubles the variance (2^l) and the ratio
stays near 1. SkipInit (their remedy: the branch times a scalar that starts at 0) and Fixup
(Zhang et al. 2019) give the ratio 0 at initialization instead.

Part 1, at initialization, no training (cached in the experiment folder): per block, the
branch and skip variances (``bnlab.probes.residual.residual_variances``: per-channel variance
over batch and space, averaged over channels; a float64 copy in train mode) of CIFAR ResNets
of :data:`PROBE_DEPTHS` layers (up to ResNet-1202, 600 blocks) with BN and without, in both
block layouts (``bnlab.training.resnet``: post-activation ``relu(branch + skip)``, the lab's
default, and pre-activation ``branch + skip``), on :data:`PROBE_BATCH` class-balanced training
images, one network per seed. Beside the measurement, each layout's prediction
(:func:`predicted_skip`), from the same argument as De & Smith's:

* pre-activation, BN: a He-initialized conv of ``relu(BN(.))`` adds second moment 1 per
  block (De & Smith's 1); measured per channel, its squared channel mean 1/pi is not
  variance, so each branch adds c = 1 - 1/pi to the skip's variance, and the ratio of block
  l is c / (1 + (l - 1) c), which goes as 1/l;
* post-activation, BN: the skip path is ``relu(skip + N(0, 1))`` block after block, a
  random walk reflected at 0, whose variance grows as (1 - 2/pi) l; the branch is the BN's
  output, variance 1, so the ratio is about 1 / ((1 - 2/pi) l);
* without normalization (De & Smith): the variance doubles per block, ratio 1.

Both count the option-A shortcut of the two downsampling blocks, whose zero channels halve
the skip's mean channel variance there. SkipInit and Fixup read exactly 0.

Part 2, short training (post-activation blocks; SGD with momentum :data:`MOMENTUM`, no
weight decay, as He et al. and De & Smith train ResNets, at a constant rate): ResNet-20/56/110
with BN, without any norm, with SkipInit and with Fixup, at :data:`LEARNING_RATES` and
batch :data:`SMALL_BATCH` (the grid's epochs and images). Two things are told apart:

* a run *trains* as everywhere in bnlab (``analysis.failed``): finite loss and a final
  validation accuracy above 0.2;
* a run is *stable* (:func:`stable`): finite loss, and its last epoch's mean training loss
  below ln 10, the loss of a uniform guess over the 10 classes. In a budget of a hundred
  steps an unnormalized net can be stable and still near chance (it starts slowly on the
  lab's unstandardized [0, 1] pixels), so "the largest stable learning rate" is read with
  this rule, and "which train" with the other.

Then De & Smith's batch-size claim at ResNet-20: BN and SkipInit at :data:`BATCH_RATES` and
batches :data:`BATCHES` on :data:`BATCH_IMAGES` times the grid's images, the same epochs at
both batches (their protocol: a fixed epoch budget, so the large batch takes 8x fewer steps).
Every rate is chosen on the validation split; test accuracy at the chosen rate is what
verdicts and tables report.

The rates were sized beforehand (ResNet-20, batch 16, 128 steps, one seed): 0.03 took BN to
0.66 validation accuracy and SkipInit and Fixup to 0.25-0.29, 0.01 left SkipInit at 0.17, and
0.1 left both unnormalized nets at or below 0.17 after 64 steps; 0.3 is where BN's larger
stable rates, if any, show.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.data.loader import stratified_subset
from bnlab.experiments import analysis
from bnlab.experiments.analysis import FAIL_ACCURACY, Row, failed, final, finals, plot_intervals, select
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    judge_same,
    not_measured,
)
from bnlab.experiments.measure import fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import difference, format_mean_ci, mean_ci
from bnlab.probes.residual import BlockVariance, residual_variances
from bnlab.training import runs
from bnlab.training.resnet import STAGE_CHANNELS, blocks_per_stage, cifar_resnet
from bnlab.util.plots import legend, log_axis, note_empty, plt, reference_line, save_figure, style
from bnlab.util.tables import format_table

# --------------------------------------------------------------------------- the grid

ARMS = {"BN": {"norm": "bnlab"}, "none": {"norm": "none"},
        "SkipInit": {"norm": "none", "residual": "skipinit"},
        "Fixup": {"norm": "none", "residual": "fixup"}}
"""The four ways of training a residual network: batch norm, nothing, SkipInit, Fixup."""
DEPTHS = (20, 56, 110)
LEARNING_RATES = (0.03, 0.3)
SMALL_BATCH = 16
MOMENTUM = 0.9
BATCH_DEPTH = 20
BATCH_ARMS = ("BN", "SkipInit")
BATCHES = (SMALL_BATCH, 128)
BATCH_RATES = (0.03, 0.1, 0.3, 1.0, 3.0)
BATCH_IMAGES = 2
"""The batch-size part trains on 2x the grid's images (a --quick grid: the same), so that the
large batch still takes a few dozen steps (32 at the defaults)."""
VAL_SIZE = 1000
"""The validation split is at most this many images (``--val-size`` may make it smaller):
every run evaluates it and the 10000 test images once an epoch, which costs more than a short
run of ResNet-110 trains."""
QUICK_DEPTHS = (20,)
QUICK_RATES = (0.03,)


def depth_label(arm: str, depth: int, lr: float) -> str:
    return f"{arm} ResNet-{depth} lr={lr:g}"


def batch_label(arm: str, batch: int, lr: float) -> str:
    return f"{arm} ResNet-{BATCH_DEPTH} batch {batch} lr={lr:g}"


def variants(settings: ExpSettings) -> list[Variant]:
    depths, rates = (QUICK_DEPTHS, QUICK_RATES) if settings.quick else (DEPTHS, LEARNING_RATES)
    common = {"momentum": MOMENTUM, "val_size": min(settings.val_size, VAL_SIZE)}
    # the batch part's larger budget first: the runner checks the first run's subset fits
    images = settings.subset if settings.quick else BATCH_IMAGES * settings.subset
    batch = [Variant(batch_label(arm, b, lr),
                     {"model": f"resnet{BATCH_DEPTH}", **ARMS[arm], **common, "lr": lr,
                      "batch_size": b, "subset": images},
                     {"part": "batch", "arm": arm, "depth": BATCH_DEPTH, "batch": b, "lr": lr})
             for arm in BATCH_ARMS for b in BATCHES
             for lr in (QUICK_RATES if settings.quick else BATCH_RATES)]
    depth = [Variant(depth_label(arm, d, lr),
                     {"model": f"resnet{d}", **ARMS[arm], **common, "lr": lr,
                      "batch_size": SMALL_BATCH},
                     {"part": "depth", "arm": arm, "depth": d, "batch": SMALL_BATCH, "lr": lr})
             for arm in ARMS for d in depths for lr in rates]
    return batch + depth


# --------------------------------------------------------------------------- part 1: predictions

LAYOUTS = {"pre": "pre-activation", "post": "post-activation"}
PROBE_NORMS = {"bnlab": "BN", "none": "no norm"}
PROBE_DEPTHS = (20, 56, 110, 1202)
QUICK_PROBE_DEPTHS = (20, 56)
PROBE_BATCH = 8
OFF_DEPTH = 110  # SkipInit and Fixup, whose branches are off at initialization
INCREMENT = {"pre": 1 - 1 / math.pi, "post": 1 - 2 / math.pi}
"""What each block adds to the skip path's variance with BN at initialization (module
docstring): a conv of relu(BN(.)) (pre-activation), a reflected random walk's step (post)."""
BRANCH = {"pre": 1 - 1 / math.pi, "post": 1.0}
"""The branch's variance with BN: the conv's (pre-activation), the BN's own output (post)."""
DOUBLING = 2.0
"""De & Smith's growth of the skip variance per block without normalization."""
AGREEMENT_MARGIN = 0.2
"""A measured-to-predicted ratio agrees within 20% (the verdicts' equivalence margin)."""
GROWTH_MARGIN = 0.2
"""A growth factor per block agrees with 2 within 0.2 (10%)."""


def stage_shapes(depth: int) -> list[tuple[int, int]]:
    """(input channels, output channels) of every residual block of the CIFAR ResNet of
    ``depth`` layers, in forward order."""
    n = blocks_per_stage(depth)
    shapes, channels = [], STAGE_CHANNELS[0]
    for out in STAGE_CHANNELS:
        shapes += [(channels, out)] + [(out, out)] * (n - 1)
        channels = out
    return shapes


def predicted_skip(depth: int, layout: str) -> list[float]:
    """Per block, the skip path's variance with BN at initialization (module docstring): it
    starts at the stem's (1 after a BN, pre-activation; one reflected step, post), a block
    that keeps the shape adds :data:`INCREMENT`, and a downsampling block's zero channels
    scale it by in/out channels first."""
    out = INCREMENT[layout] if layout == "post" else 1.0
    skips = []
    for c_in, c_out in stage_shapes(depth):
        skip = out * c_in / c_out
        skips.append(skip)
        out = skip + INCREMENT[layout]
    return skips


def predicted_ratio(depth: int, layout: str) -> list[float]:
    """Per block, the branch/skip ratio with BN at initialization: :data:`BRANCH` over
    :func:`predicted_skip`."""
    return [BRANCH[layout] / skip for skip in predicted_skip(depth, layout)]


def doubling_skip(depth: int, first: float) -> list[float]:
    """De & Smith's skip variance without normalization, from the first block's ``first``:
    each branch (He-initialized) outputs its input's variance, so a block that keeps the shape
    doubles it; a downsampling block's zero channels scale the skip by in/out channels
    before its branch adds the input's variance."""
    skips, out = [], first
    for c_in, c_out in stage_shapes(depth):
        skip = out * c_in / c_out
        skips.append(skip)
        out = skip + out
    return skips


# --------------------------------------------------------------------------- part 1: measures

def ratio_agreement(measured: Sequence[float], predicted: Sequence[float]) -> float:
    """The geometric mean over blocks of measured / predicted ratio (1: the prediction holds;
    4: the branches are 4 times the predicted share); blocks with a ratio that is not finite
    and positive are left out; nan when none is left."""
    logs = [math.log(m / p) for m, p in zip(measured, predicted, strict=True)
            if 0 < m < math.inf and 0 < p < math.inf]
    return math.exp(statistics.fmean(logs)) if logs else math.nan


def growth_per_block(skips: Sequence[float], keeps_shape: Sequence[bool]) -> float:
    """The geometric mean of skip[l] / skip[l - 1] over the blocks l > 1 that keep the shape
    (2: the variance doubles per block); nan without such a block."""
    logs = [math.log(skips[i] / skips[i - 1]) for i in range(1, len(skips))
            if keeps_shape[i] and 0 < skips[i - 1] < math.inf and 0 < skips[i] < math.inf]
    return math.exp(statistics.fmean(logs)) if logs else math.nan


def keeps_shape(depth: int) -> list[bool]:
    return [c_in == c_out for c_in, c_out in stage_shapes(depth)]


# --------------------------------------------------------------------------- part 1: measuring

def probe_images(dataset, size: int = PROBE_BATCH) -> torch.Tensor:
    """The first ``size`` class-balanced training images, as the trainer feeds them."""
    images, _ = stratified_subset(dataset.train_images, dataset.train_labels,
                                  min(size, len(dataset.train_labels)))
    return images.unsqueeze(1).float().div(255)  # (size, 1, 28, 28)


def probe_depths(settings: ExpSettings) -> tuple[int, ...]:
    return QUICK_PROBE_DEPTHS if settings.quick else PROBE_DEPTHS


Probe = dict[str, list[list[float]]]  # seed (as text) -> per block [branch, skip]


def init_probe(dataset, layout: str, norm: str, depth: int, seeds: list[int], out: Path,
               residual: str = "standard") -> Probe:
    """Per seed, [branch, skip] variance of every block of a fresh CIFAR ResNet (torch seeded
    with the seed), measured once per setting and images and kept in ``out``
    (``runs.cached``)."""
    x = probe_images(dataset)
    key = {"version": 1, "layout": layout, "norm": norm, "depth": depth, "residual": residual,
           "seeds": seeds, "data": fingerprint(x)}

    def compute() -> Probe:
        values = {}
        for seed in seeds:
            torch.manual_seed(seed)
            model = cifar_resnet(depth, norm, residual=residual, block=layout).train()
            values[str(seed)] = [[b.branch, b.skip] for b in residual_variances(model, x)]
        return values

    return runs.cached(out, f"residual-init-{layout}-{norm}-{residual}-{depth}", key, compute)


def blocks_of(probe: Probe) -> dict[int, list[BlockVariance]]:
    return {int(seed): [BlockVariance(i, "", branch, skip)
                        for i, (branch, skip) in enumerate(values, start=1)]
            for seed, values in probe.items()}


Probes = dict[tuple[str, str, int], dict[int, list[BlockVariance]]]  # (layout, norm, depth)


def measure_init(dataset, settings: ExpSettings, out: Path) -> Probes:
    seeds = list(range(settings.seeds))
    return {(layout, norm, depth): blocks_of(init_probe(dataset, layout, norm, depth, seeds, out))
            for layout in LAYOUTS for norm in PROBE_NORMS for depth in probe_depths(settings)}


def agreement_by_seed(probes: Probes, layout: str, depth: int) -> dict[int, float]:
    predicted = predicted_ratio(depth, layout)
    return {seed: ratio_agreement([b.ratio for b in blocks], predicted)
            for seed, blocks in probes.get((layout, "bnlab", depth), {}).items()}


def growth_by_seed(probes: Probes, layout: str, depth: int) -> dict[int, float]:
    shape = keeps_shape(depth)
    return {seed: growth_per_block([b.skip for b in blocks], shape)
            for seed, blocks in probes.get((layout, "none", depth), {}).items()}


def init_table(probes: Probes, off: dict[str, dict[int, list[BlockVariance]]]) -> str:
    rows = []
    for (layout, norm, depth), by_seed in probes.items():
        last = [blocks[-1] for blocks in by_seed.values()]
        if norm == "bnlab":
            predicted = f"{predicted_ratio(depth, layout)[-1]:.4g}"
            measure = format_mean_ci(list(agreement_by_seed(probes, layout, depth).values()), ".3f")
            kind = "measured / predicted ratio (geometric mean over blocks)"
        else:
            predicted = "1 (ratio), 2 per block (skip)"
            measure = format_mean_ci(list(growth_by_seed(probes, layout, depth).values()), ".3f")
            kind = "skip growth per block (blocks that keep the shape)"
        rows.append([LAYOUTS[layout], PROBE_NORMS[norm], depth, len(next(iter(by_seed.values()))),
                     format_mean_ci([b.ratio for b in last], ".4g"), predicted,
                     format_mean_ci([b.skip for b in last], ".4g"), f"{kind}: {measure}"])
    for residual, by_seed in off.items():
        blocks = [b for bs in by_seed.values() for b in bs]
        rows.append(["post-activation", f"{residual} (no norm)", OFF_DEPTH,
                     len(next(iter(by_seed.values()))),
                     f"{max(b.ratio for b in blocks):.4g} (largest over blocks)", "0",
                     format_mean_ci([bs[-1].skip for bs in by_seed.values()], ".4g"),
                     "branch variance 0 at every block: "
                     + ("yes" if all(b.branch == 0 for b in blocks) else "**no**")])
    return format_table(["layout", "norm", "depth", "blocks", "ratio at the last block",
                         "predicted there", "skip variance at the last block", "agreement"],
                        rows)


def plot_init(probes: Probes, depth: int, path: Path) -> None:
    """Ratio and skip variance per block of ResNet-``depth`` at initialization, mean over
    seeds, beside each layout's predictions (2 x 2: ratio and skip, pre and post)."""
    fig, axes = plt.subplots(2, len(LAYOUTS), figsize=(12, 8), squeeze=False)
    for column, layout in enumerate(LAYOUTS):
        ratio_ax, skip_ax = axes[0][column], axes[1][column]
        for i, norm in enumerate(PROBE_NORMS):
            by_seed = probes.get((layout, norm, depth))
            if not by_seed:
                continue
            blocks = range(1, len(next(iter(by_seed.values()))) + 1)
            every = max(1, len(blocks) // 12)
            ratio = _mean_over_seeds(by_seed, "ratio")
            skip = _mean_over_seeds(by_seed, "skip")
            look = style(2 * i)
            ratio_ax.plot(blocks, ratio, markevery=every, label=f"{PROBE_NORMS[norm]}, measured",
                          **look)
            skip_ax.plot(blocks, skip, markevery=every, label=f"{PROBE_NORMS[norm]}, measured",
                         **look)
            predicted = style(2 * i + 1)
            if norm == "bnlab":
                ratio_ax.plot(blocks, predicted_ratio(depth, layout), markevery=every,
                              label="BN, predicted", **predicted)
                skip_ax.plot(blocks, predicted_skip(depth, layout), markevery=every,
                             label="BN, predicted", **predicted)
            else:
                skip_ax.plot(blocks, doubling_skip(depth, skip[0]), markevery=every,
                             label="no norm, 2 per block", **predicted)
        reference_line(ratio_ax, 1.0, label="ratio 1 (no norm, De & Smith)")
        for ax, quantity in ((ratio_ax, "branch / skip variance (ratio)"),
                             (skip_ax, "skip path variance (per channel)")):
            if not ax.lines:
                note_empty(ax, f"no probe of ResNet-{depth}")
                continue
            log_axis(ax, "x", label="residual block l (1 = input side)")
            log_axis(ax, "y", label=quantity)
            ax.set_title(f"{LAYOUTS[layout]}, ResNet-{depth} at initialization")
            legend(ax)
    save_figure(fig, path)


def _mean_over_seeds(by_seed: dict[int, list[BlockVariance]], field: str) -> list[float]:
    """Per block, the geometric mean over seeds (variances span hundreds of decades)."""
    columns = zip(*[[getattr(b, field) for b in blocks] for blocks in by_seed.values()])
    return [math.exp(statistics.fmean(math.log(v) for v in values))
            if all(0 < v < math.inf for v in values) else math.nan for values in columns]


def init_verdicts(probes: Probes, depth: int) -> list[Verdict]:
    ones = {seed: 1.0 for seed in agreement_by_seed(probes, "pre", depth)}
    growth = growth_by_seed(probes, "pre", depth)
    twos = dict.fromkeys(growth, DOUBLING)
    variance = ("our variance is per channel over batch and space, channel means removed, so a "
                "branch's ")
    return [
        judge_same("with BN, the branch/skip variance ratio of block l is about 1/l",
                   "De & Smith 2020",
                   f"measured / predicted ratio, geometric mean over the blocks of pre-activation "
                   f"ResNet-{depth} at initialization (1 = the prediction; margin "
                   f"±{AGREEMENT_MARGIN:g})",
                   ones, agreement_by_seed(probes, "pre", depth), AGREEMENT_MARGIN,
                   paper="skip variance about l, ratio about 1/l (pre-activation, identity skips)",
                   note=variance + "squared channel mean (1/pi) is left out: it adds 1 - 1/pi per "
                        "block, the ratio is (1 - 1/pi) / (1 + (l - 1)(1 - 1/pi)) -> 1/l; the two "
                        "option-A downsampling blocks halve the skip's mean channel variance",
                   evidence="init_ratio.png"),
        judge_same("without normalization the skip path's variance doubles per block (2^l)",
                   "De & Smith 2020",
                   f"growth factor of the skip variance per block (geometric mean over the blocks "
                   f"that keep the shape), pre-activation ResNet-{depth} without norm (margin "
                   f"±{GROWTH_MARGIN:g})",
                   twos, growth, GROWTH_MARGIN,
                   paper="variance 2^l, ratio about 1",
                   note=variance + "channel means (a ReLU of an uncentred input) do not count; He "
                                   "initialization preserves the second moment",
                   evidence="init_ratio.png"),
        judge_same("post-activation blocks with BN: the skip variance grows by 1 - 2/pi per block "
                   "(ratio about 1/((1 - 2/pi) l))", "this report (a reflected random walk)",
                   f"measured / predicted ratio, geometric mean over the blocks of post-activation "
                   f"ResNet-{depth} at initialization (margin ±{AGREEMENT_MARGIN:g})",
                   {seed: 1.0 for seed in agreement_by_seed(probes, "post", depth)},
                   agreement_by_seed(probes, "post", depth), AGREEMENT_MARGIN,
                   paper="De & Smith's argument, for the ReLU after the sum: relu(skip + N(0, 1)) "
                         "per block",
                   note="the prediction assumes each BN'd branch independent of the skip path",
                   evidence="init_ratio.png"),
    ]


def init_findings(probes: Probes, depth: int) -> list[str]:
    lines = []
    for layout in LAYOUTS:
        bn = probes.get((layout, "bnlab", depth))
        plain = probes.get((layout, "none", depth))
        if not bn or not plain:
            continue
        last_bn = mean_ci([blocks[-1].ratio for blocks in bn.values()])[0]
        skip = mean_ci([math.log10(blocks[-1].skip) for blocks in plain.values()])[0]
        growth = mean_ci(list(growth_by_seed(probes, layout, depth).values()))[0]
        lines.append(f"- {LAYOUTS[layout]} ResNet-{depth} at initialization: with BN the last "
                     f"block's branch carries {last_bn:.2g} of the skip path's variance "
                     f"(predicted {predicted_ratio(depth, layout)[-1]:.2g}); without a norm the "
                     f"skip variance reaches 10^{skip:.0f} at the last block, {growth:.2f}x per "
                     "block.")
    return lines


# --------------------------------------------------------------------------- part 2: measures

CHANCE_LOSS = math.log(10)
"""Cross-entropy of a uniform guess over 10 classes: a stable run's last epoch ends below it."""


def stable(row: Row) -> bool:
    """Whether a run's loss stayed finite and its last epoch's mean training loss is below
    :data:`CHANCE_LOSS` (module docstring: stable, not necessarily trained)."""
    return not row.diverged and bool(row.metrics) and row.metrics[-1]["train_loss"] < CHANCE_LOSS


def largest_stable_rate(rows: list[Row], seed: int | None = None, **tags: Any) -> float | None:
    """The largest learning rate (``lr`` tag) among ``rows`` matching ``tags`` at which every
    run (of ``seed``, when given) is :func:`stable`; None when no rate is."""
    group = [r for r in select(rows, **tags) if seed is None or r.seed == seed]
    rates = sorted({r.tags["lr"] for r in group})
    steady = [lr for lr in rates if all(stable(r) for r in group if r.tags["lr"] == lr)]
    return max(steady, default=None)


def chosen_rate(rows: list[Row], rates: Sequence[float], **tags: Any) -> float | None:
    """The rate with the best mean final validation accuracy (``analysis.best_lr``)."""
    return analysis.best_lr(rows, rates, **tags)


def at_chosen_rate(rows: list[Row], rates: Sequence[float], key: str = "final_test_acc",
                   **tags: Any) -> dict[int, float]:
    """Per seed, ``key`` (diverged: chance) at the rate chosen on validation; {} without runs."""
    lr = chosen_rate(rows, rates, **tags)
    if lr is None:
        return {}
    return {r.seed: final(r, key) for r in select(rows, **tags, lr=lr)}


def trains_at_chosen_rate(rows: list[Row], rates: Sequence[float], **tags: Any) -> bool:
    """Whether the runs at the chosen rate exist and none failed (``analysis.trains``)."""
    lr = chosen_rate(rows, rates, **tags)
    return lr is not None and analysis.trains(select(rows, **tags, lr=lr))


def log_stable_rates(rows: list[Row], **tags: Any) -> dict[int, float | None]:
    """Per seed, log10 of its largest stable rate (None where every rate failed)."""
    seeds = sorted({r.seed for r in select(rows, **tags)})
    return {seed: None if (lr := largest_stable_rate(rows, seed, **tags)) is None
            else math.log10(lr) for seed in seeds}


# --------------------------------------------------------------------------- part 2: report

def _rate(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _trains_at(rows: list[Row], rates: Sequence[float], **tags: Any) -> str:
    """The rates at which every seed trains (``analysis.training_lrs``), or "none"."""
    trained = analysis.training_lrs(rows, **tags)
    return ", ".join(f"{lr:g}" for lr in trained) if trained else "none"


def _cells(rows: list[Row], rates: Sequence[float], **tags: Any) -> list[str]:
    group = select(rows, **tags)
    lr = chosen_rate(rows, rates, **tags)
    at = select(rows, **tags, lr=lr)
    return [f"{lr:g}", format_mean_ci(finals(at)), format_mean_ci(finals(at, "final_test_acc")),
            _trains_at(rows, rates, **tags), _rate(largest_stable_rate(rows, **tags)),
            f"{sum(failed(r) for r in group)}/{len(group)}", f"{group[0].planned_steps}"]


CELL_HEADERS = ["chosen lr (val)", "val acc at it", "test acc at it", "trains at lr",
                "largest stable lr", "failed runs (all rates)", "steps"]


def depth_table(rows: list[Row], depths: Sequence[int], rates: Sequence[float]) -> str:
    return format_table(["arm", "depth", *CELL_HEADERS], [
        [arm, depth, *_cells(rows, rates, part="depth", arm=arm, depth=depth)]
        for arm in ARMS for depth in depths if select(rows, part="depth", arm=arm, depth=depth)])


def batch_table(rows: list[Row], rates: Sequence[float]) -> str:
    return format_table(["arm", "batch", *CELL_HEADERS], [
        [arm, batch, *_cells(rows, rates, part="batch", arm=arm, batch=batch)]
        for arm in BATCH_ARMS for batch in BATCHES
        if select(rows, part="batch", arm=arm, batch=batch)])


def _last_train_loss(row: Row) -> float:
    return math.nan if row.diverged or not row.metrics else row.metrics[-1]["train_loss"]


def plot_rates(rows: list[Row], path: Path, panels: list[tuple[str, dict[str, Any]]],
               series: Sequence[str], rates: Sequence[float]) -> None:
    """Against the rate, one column per ``panels`` (title, tags), one series per arm, mean
    and 95% interval over seeds: the final validation accuracy (a diverged seed at chance)
    and the last epoch's mean training loss (diverged seeds left out) beside ln 10."""
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 8), squeeze=False)
    for column, (title, tags) in enumerate(panels):
        accuracy_ax, loss_ax = axes[0][column], axes[1][column]
        for i, arm in enumerate(series):
            groups = {lr: g for lr in rates if (g := select(rows, **tags, arm=arm, lr=lr))}
            if groups:
                plot_intervals(accuracy_ax, {lr: finals(g) for lr, g in groups.items()},
                               label=arm, **style(i))
            losses = {lr: [_last_train_loss(r) for r in g] for lr, g in groups.items()
                      if any(math.isfinite(_last_train_loss(r)) for r in g)}
            if losses:
                plot_intervals(loss_ax, losses, bounds=(0.0, math.inf), label=arm, **style(i))
        used = [lr for lr in rates if select(rows, **tags, lr=lr)]
        for ax, ylabel, line, line_label in (
                (accuracy_ax, "final validation accuracy", FAIL_ACCURACY, "fails at or below"),
                (loss_ax, "last epoch's training loss (nats)", CHANCE_LOSS,
                 "ln 10: unstable at or above")):
            ax.set_title(title)
            if not ax.lines:
                note_empty(ax, "no runs" if not used else "every run diverged")
                continue
            reference_line(ax, line, label=line_label)
            log_axis(ax, "x", ticks=used, label=f"learning rate (SGD, momentum {MOMENTUM:g})")
            ax.set_ylabel(ylabel)
            legend(ax)
    save_figure(fig, path)


def training_findings(rows: list[Row], depths: Sequence[int], rates: Sequence[float],
                      batch_rates: Sequence[float]) -> list[str]:
    lines = []
    for arm in ARMS:
        if not select(rows, part="depth", arm=arm):
            continue
        trained = [d for d in depths if analysis.training_lrs(rows, part="depth", arm=arm, depth=d)]
        steady = {d: largest_stable_rate(rows, part="depth", arm=arm, depth=d) for d in depths}
        lines.append(f"- {arm}: every seed trains at some rate of {list(rates)} at depth "
                     + (", ".join(map(str, trained)) if trained else f"none of {list(depths)}")
                     + "; largest stable rate per depth: "
                     + ", ".join(f"ResNet-{d} {_rate(lr)}" for d, lr in steady.items()) + ".")
    for batch in BATCHES:
        parts = [f"{arm} {_rate(largest_stable_rate(rows, part='batch', arm=arm, batch=batch))}"
                 for arm in BATCH_ARMS if select(rows, part="batch", arm=arm, batch=batch)]
        if parts:
            lines.append(f"- ResNet-{BATCH_DEPTH}, batch {batch}: largest stable rate "
                         + ", ".join(parts) + f" (of {list(batch_rates)}).")
    return lines


def _trains_or_why(rows: list[Row], rates: Sequence[float], **tags: Any) -> str | None:
    """None when the arm's runs at its chosen rate train; else why the comparison is not made."""
    if not select(rows, **tags):
        return "no runs of it in this grid"
    if not trains_at_chosen_rate(rows, rates, **tags):
        lr = chosen_rate(rows, rates, **tags)
        return (f"it does not train (at its best rate {lr:g} some seed ends at or below "
                f"{FAIL_ACCURACY} validation accuracy or diverges)")
    return None


def training_verdicts(rows: list[Row], depths: Sequence[int], rates: Sequence[float],
                      batch_rates: Sequence[float]) -> list[Verdict]:
    deep = max(depths)
    verdicts = []
    for arm, source, paper in (
            ("SkipInit", "De & Smith 2020", "SkipInit trains 1000-layer ResNets without "
                                             "normalization"),
            ("Fixup", "Zhang et al. 2019", "Fixup trains 10000-layer ResNets without "
                                           "normalization")):
        tags = {"part": "depth", "arm": arm, "depth": deep}
        claim = f"{arm} trains a deep ResNet without normalization"
        measure = (f"test accuracy at the rate chosen on validation minus the failure line "
                   f"{FAIL_ACCURACY}, ResNet-{deep}, batch {SMALL_BATCH}")
        group = select(rows, **tags)
        if not group:
            verdicts.append(not_measured(claim, source, measure, "no runs of it in this grid"))
            continue
        accuracy = at_chosen_rate(rows, rates, **tags)
        verdicts.append(judge_difference(
            claim, source, measure, {s: FAIL_ACCURACY for s in accuracy}, accuracy, paper=paper,
            note=f"{group[0].planned_steps} SGD steps, not a full training",
            failed=f"{sum(failed(r) for r in group)}/{len(group)} runs over all rates failed"))
    tags = {"part": "depth", "arm": "none", "depth": deep}
    claim = "without normalization, SkipInit or Fixup a deep ResNet does not train"
    measure = (f"test accuracy at the best rate (chosen on validation) minus the failure line, "
               f"ResNet-{deep} without norm")
    accuracy = at_chosen_rate(rows, rates, **tags)
    verdicts.append(judge_difference(
        claim, "De & Smith 2020", measure, {s: FAIL_ACCURACY for s in accuracy}, accuracy,
        direction=-1, paper="BN increases the largest trainable depth dramatically",
        note=f"rates {list(rates)}; a diverged run counts at chance (0.1)")
        if accuracy else not_measured(claim, "De & Smith 2020", measure, "no runs of it"))
    verdicts += batch_verdicts(rows, batch_rates)
    return verdicts


def batch_verdicts(rows: list[Row], rates: Sequence[float]) -> list[Verdict]:
    small, large = BATCHES
    source = "De & Smith 2020"
    accuracy = {(arm, b): at_chosen_rate(rows, rates, part="batch", arm=arm, batch=b)
                for arm in BATCH_ARMS for b in BATCHES}
    why = {(arm, b): _trains_or_why(rows, rates, part="batch", arm=arm, batch=b)
           for arm in BATCH_ARMS for b in BATCHES}
    verdicts = []
    claim = "at small batch BN's benefit over SkipInit is minimal (same accuracy)"
    measure = (f"test accuracy at each one's rate chosen on validation, BN - SkipInit, ResNet-"
               f"{BATCH_DEPTH}, batch {small} (margin ±0.02)")
    reason = why[("BN", small)] or why[("SkipInit", small)]
    steps = {b: select(rows, part="batch", batch=b)[0].planned_steps
             for b in BATCHES if select(rows, part="batch", batch=b)}
    budget = ", ".join(f"{n} steps at batch {b}" for b, n in steps.items())
    verdicts.append(not_measured(claim, source, measure, reason) if reason else judge_same(
        claim, source, measure, accuracy[("SkipInit", small)], accuracy[("BN", small)], 0.02,
        paper="'minimal benefits when the batch size is small'",
        note=f"a short fixed-epoch budget ({budget}); SGD, momentum {MOMENTUM}, constant rate"))
    claim = "at large batch BN trains at larger learning rates than SkipInit"
    measure = (f"log10 of each seed's largest stable rate, BN - SkipInit, ResNet-{BATCH_DEPTH}, "
               f"batch {large} (rates {list(rates)})")
    bn_rates = log_stable_rates(rows, part="batch", arm="BN", batch=large)
    skip_rates = log_stable_rates(rows, part="batch", arm="SkipInit", batch=large)
    none_stable = sum(v is None for v in (*bn_rates.values(), *skip_rates.values()))
    verdicts.append(judge_difference(
        claim, source, measure, skip_rates, bn_rates,
        paper="BN 'can be trained with larger learning rates'; this pays only at large batch",
        note="a rate is stable for a seed when its loss stays finite and its last epoch's mean "
             "training loss is below ln 10; the sweep's rates are about 3x apart (0.5 decade)",
        failed=f"{none_stable} seed-arms without a stable rate") if bn_rates and skip_rates
        else not_measured(claim, source, measure, "no runs at the large batch"))
    claim = "BN's advantage over SkipInit grows with the batch size"
    measure = (f"(BN - SkipInit test accuracy at each one's chosen rate) at batch {large} minus "
               f"at batch {small}, ResNet-{BATCH_DEPTH}")
    reason = next((f"{arm} at batch {b}: {why[(arm, b)]}" for arm in BATCH_ARMS for b in BATCHES
                   if why[(arm, b)]), None)
    if reason:
        verdicts.append(not_measured(claim, source, measure, reason))
    else:
        gap = {b: {s: accuracy[("BN", b)][s] - accuracy[("SkipInit", b)][s]
                   for s in set(accuracy[("BN", b)]) & set(accuracy[("SkipInit", b)])}
               for b in BATCHES}
        verdicts.append(judge_difference(
            claim, source, measure, gap[small], gap[large],
            paper="larger rates are 'only beneficial in specific compute regimes': large batch",
            note="the same epochs at both batches (8x fewer steps at the large one)"))
    return verdicts


# --------------------------------------------------------------------------- calibration

class _Block(nn.Module):
    """``branch(x) + x``: a synthetic residual block with an identity shortcut."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch, self.shortcut = branch, nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


class _Noise(nn.Module):
    """Fresh normal noise of the input's shape, independent of it, of standard deviation 1
    (``relative=False``) or the input's (a branch that preserves the variance)."""

    def __init__(self, relative: bool) -> None:
        super().__init__()
        self.relative = relative

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x)
        return noise * x.std() if self.relative else noise


def _chain(relative: bool, blocks: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict((f"block{i}", _Block(_Noise(relative)))
                                     for i in range(1, blocks + 1)))


def _synthetic_read(relative: bool, blocks: int) -> list[BlockVariance]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(4096, 4, dtype=torch.float64)  # (N, C), unit variance
        return residual_variances(_chain(relative, blocks), x)


def init_calibration() -> list[Calibration]:
    """The two init measures on synthetic chains of blocks ``x + noise`` whose answer is known:
    unit noise (BN's case: the skip variance at block l is l, the ratio 1/l) and noise as large
    as the input (the unnormalized case: the variance doubles, the ratio stays 1)."""
    calibrations = []
    for blocks in (10, 40):
        one_over_l = [1 / ell for ell in range(1, blocks + 1)]
        unit = _synthetic_read(False, blocks)
        read = ratio_agreement([b.ratio for b in unit], one_over_l)
        calibrations.append(Calibration(
            "measured / predicted ratio", f"{blocks} blocks x + N(0, 1), predicted 1/l",
            "1 (the prediction holds)", f"{read:.3f}", abs(read - 1) < 0.05))
        doubling = _synthetic_read(True, blocks)
        read = ratio_agreement([b.ratio for b in doubling], one_over_l)
        expected = math.exp(statistics.fmean(math.log(ell) for ell in range(1, blocks + 1)))
        calibrations.append(Calibration(
            "measured / predicted ratio",
            f"{blocks} blocks x + N(0, var x) (ratio 1), predicted 1/l",
            f"{expected:.2f} (geometric mean of l: grows with the blocks)", f"{read:.2f}",
            abs(read / expected - 1) < 0.1))
        read = growth_per_block([b.skip for b in doubling], [True] * blocks)
        calibrations.append(Calibration(
            "skip growth per block", f"{blocks} blocks x + N(0, var x)", "2 (doubling)",
            f"{read:.3f}", abs(read - 2) < 0.1))
        read = growth_per_block([b.skip for b in unit], [True] * blocks)
        expected = blocks ** (1 / (blocks - 1))
        calibrations.append(Calibration(
            "skip growth per block", f"{blocks} blocks x + N(0, 1) (linear growth)",
            f"{expected:.3f} (l^(1/(l-1)): towards 1, no doubling)", f"{read:.3f}",
            abs(read - expected) < 0.05))
    return calibrations


def _synthetic_rows(limits: dict[str, float], val: dict[float, float],
                    test: dict[float, float]) -> list[Row]:
    """Two seeds per arm and rate: above the arm's limit a run ends at the loss of a uniform
    guess (unstable) or diverges, at or below it the given val and test accuracies."""
    rows = []
    for arm, limit in limits.items():
        for lr in BATCH_RATES:
            for seed in (0, 1):
                ok, diverged = lr <= limit, lr > 3 * limit
                loss = 1.0 if ok else CHANCE_LOSS
                rows.append(Row(f"{arm} {lr:g}", {"part": "batch", "arm": arm, "lr": lr}, seed,
                                {}, [] if diverged else [{"train_loss": loss}], {
                    "diverged": diverged, "final_val_acc": val[lr] if ok else 0.1,
                    "final_test_acc": test[lr] if ok else 0.1}, ""))
    return rows


def training_calibration() -> list[Calibration]:
    """The largest stable rate and the rate chosen on validation, on synthetic rows."""
    val = {0.03: 0.6, 0.1: 0.7, 0.3: 0.8, 1.0: 0.75, 3.0: 0.5}
    test = {0.03: 0.6, 0.1: 0.9, 0.3: 0.7, 1.0: 0.75, 3.0: 0.5}  # best on test: 0.1
    calibrations = []
    for bn, skip in ((3.0, 0.3), (0.3, 0.3), (1.0, 0.03)):
        rows = _synthetic_rows({"BN": bn, "SkipInit": skip}, val, test)
        d = difference(log_stable_rates(rows, arm="SkipInit"), log_stable_rates(rows, arm="BN"))
        expected = math.log10(bn / skip)
        calibrations.append(Calibration(
            "log10 largest stable rate, BN - SkipInit",
            f"BN stable up to {bn:g}, SkipInit up to {skip:g} (above: loss ln 10, or diverged)",
            f"{expected:+.2f}", f"{d.effect:+.2f}", math.isclose(d.effect, expected)))
    slow = _synthetic_rows({"SkipInit": 0.3}, {lr: 0.15 for lr in val}, test)
    slow = [replace(r, metrics=[{"train_loss": 2.2}]) if r.metrics and r.tags["lr"] <= 0.3 else r
            for r in slow]
    read = largest_stable_rate(slow, arm="SkipInit")
    calibrations.append(Calibration(
        "largest stable rate", "stable up to 0.3 but near chance (val 0.15, loss 2.2 < ln 10)",
        "0.3 (stable, if not trained)", _rate(read), read == 0.3))
    rows = _synthetic_rows({"BN": 3.0}, val, test)
    read = mean_ci(list(at_chosen_rate(rows, BATCH_RATES, arm="BN").values()))[0]
    calibrations.append(Calibration(
        "test accuracy at the rate chosen on validation",
        "best validation at 0.3 (test 0.7), best test at 0.1 (0.9)",
        "0.7 (chosen on validation, not test)", f"{read:.2f}", math.isclose(read, 0.7)))
    return calibrations


# --------------------------------------------------------------------------- analysis

def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    depths = QUICK_DEPTHS if settings.quick else DEPTHS
    rates = QUICK_RATES if settings.quick else LEARNING_RATES
    batch_rates = QUICK_RATES if settings.quick else BATCH_RATES
    sections, findings, verdicts = [], [], []
    if dataset is not None:
        probes = measure_init(dataset, settings, out)
        seeds = list(range(settings.seeds))
        off = {residual: blocks_of(init_probe(dataset, "post", "none", OFF_DEPTH, seeds, out,
                                              residual))
               for residual in ("skipinit", "fixup")}
        deepest = max(probe_depths(settings))
        plot_init(probes, deepest, out / "init_ratio.png")
        sections += [
            "## At initialization: branch and skip variance per block", "",
            init_table(probes, off), "",
            f"CIFAR ResNets of {list(probe_depths(settings))} layers. "
            f"Per residual block, at initialization in train mode on {PROBE_BATCH} "
            "class-balanced training images, one network per seed (mean ± 95% CI over seeds; "
            "bnlab.probes.residual, float64): the variance of the branch's output and of the "
            "skip path's, per channel over batch and space and averaged over channels. "
            "Predicted with BN: pre-activation, each block adds 1 - 1/pi = 0.682 to the skip "
            "variance (from the stem BN's 1), the branch 0.682; post-activation, the skip path "
            "is a reflected random walk, adding 1 - 2/pi = 0.363 per block, the branch (a BN "
            "output) 1; a downsampling block's zero channels scale the skip by in/out channels "
            "(module docstring). Without a norm De & Smith predict doubling per block (ratio "
            "1). SkipInit and Fixup (post-activation, no norm) are read at ResNet-"
            f"{OFF_DEPTH}.", "",
            "![branch/skip ratio and skip variance per block](init_ratio.png)", ""]
        findings += init_findings(probes, deepest)
        verdicts += init_verdicts(probes, deepest)
    if rows:
        plot_rates(rows, out / "depth_lr.png",
                   [(f"ResNet-{d}, batch {SMALL_BATCH}", {"part": "depth", "depth": d})
                    for d in depths], list(ARMS), rates)
        plot_rates(rows, out / "batch_lr.png",
                   [(f"ResNet-{BATCH_DEPTH}, batch {b}", {"part": "batch", "batch": b})
                    for b in BATCHES], BATCH_ARMS, batch_rates)
        sections += [
            "## Short training: which arms train at which depth", "",
            depth_table(rows, depths, rates), "",
            f"Batch {SMALL_BATCH}, learning rates {list(rates)} (SGD, momentum {MOMENTUM}, "
            "constant). Chosen lr: the best mean final validation accuracy (a diverged seed "
            "counts at chance); val and test accuracy at it, mean ± 95% CI over seeds; trains "
            "at lr: the rates at which no seed fails (diverges or ends at or below "
            f"{FAIL_ACCURACY} validation accuracy); largest stable lr: the largest rate at which "
            "every seed's loss stays finite and its last epoch's mean training loss is below ln "
            "10 = 2.303, a uniform guess (stable, if not yet trained); steps: SGD steps per run.",
            "",
            "![validation accuracy against the rate per depth](depth_lr.png)", "",
            f"## Short training: BN and SkipInit at batch {BATCHES[0]} and {BATCHES[1]}", "",
            batch_table(rows, batch_rates), "",
            f"ResNet-{BATCH_DEPTH}, the same epochs and images at both batches (so the large "
            f"batch takes {BATCHES[1] // BATCHES[0]}x fewer steps), rates {list(batch_rates)}.",
            "", "![validation accuracy against the rate per batch](batch_lr.png)"]
        findings += training_findings(rows, depths, rates, batch_rates)
        verdicts += training_verdicts(rows, depths, rates, batch_rates)
    return Analysis(sections, findings, verdicts, init_calibration() + training_calibration())


EXPERIMENT = Experiment(
    name="residual",
    title="Paper: batch norm biases residual blocks towards the identity; SkipInit and Fixup",
    question="At initialization, does BN shrink each residual block's branch relative to its skip "
             "path as 1/l, and does the variance double per block without it? In short "
             "training, which of BN, no norm, SkipInit and Fixup train ResNet-20/56/110, at which "
             "learning rates, and does BN allow larger rates than SkipInit only at large batch?",
    variants=variants,
    analyze=analyze,
    default_epochs=1,
    default_subset=2048,
    notes=f"Part 1: CIFAR ResNets at initialization (no training), pre- and post-activation "
          f"blocks, BN and no norm, one network per seed, {PROBE_BATCH} images. Part 2: "
          f"post-activation ResNets, SGD with momentum {MOMENTUM}, no weight decay, a constant "
          "rate, chosen on the validation split; the batch-size part (BN and SkipInit at "
          f"ResNet-{BATCH_DEPTH}) trains on {BATCH_IMAGES}x the grid's images (a --quick grid: "
          "the same), the same epochs at every batch. The validation split is at most "
          f"{VAL_SIZE} images: evaluating it and the test set costs more than a short run of "
          "ResNet-110 trains.",
)
