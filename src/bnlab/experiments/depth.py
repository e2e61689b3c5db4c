"""Claim: "batch normalization has enabled practitioners to train networks exceeding 100 layers".

Why: the chapter states it without showing it. This grid trains *plain* MLPs (no residual
connections, ``bnlab.training.deep.deep_mlp``, width 64) of depth 5, 10, 20, 50 and 110 weight layers,
with sigmoid, tanh and ReLU, with bnlab's BN after every hidden linear layer and without
any norm, and measures two things:

* where each family stops training. A run *fails* as everywhere in bnlab
  (``analysis.failed``: non-finite loss, or final validation accuracy <= 0.2). A depth
  *trains* for an (activation, norm) pair when at least one learning rate of the sweep has
  no failing seed; the report gives the largest depth that trains and the first that does
  not. A small learning-rate sweep is part of the grid because the best rate moves with
  depth and with BN (a plain BN net gets *larger* gradients in its first layers as it gets
  deeper, so large rates can fail where small ones train); judging each depth at one
  fixed rate would measure the rate, not the depth.
* the mechanism: the norm of dL/dW of every weight layer, in depth order
  (``bnlab.probes.gradients.layer_gradient_norms``, train mode, one fixed class-balanced batch
  of 256 training images), for seed 0 of every (activation, norm, depth) at
  initialization and after training (the run at that family's best rate), with the ratio
  first layer / last layer as the headline number (vanishing: << 1; exploding: >> 1).
* theory beside it: Yang et al. (2019, "A Mean Field Theory of Batch Normalization")
  predict that a plain BN net *explodes* gradients at initialization, by a fixed factor
  per layer. The factor is fitted from every seed's profile at initialization (a
  least-squares line through ln ||dL/dW|| against the layer index, hidden layers only)
  and set beside the mean-field prediction sqrt(E[phi'(z)^2] / Var[phi(z)]), z ~ N(0, 1)
  (``bnlab.probes.gradients.mean_field_growth``; ReLU: sqrt(pi/(pi-1))). The prediction holds
  for infinite width and batch; a sweep of width and batch at depth 50, BN nets at
  initialization only (no training), shows how far width 64 and batch 256 are from it.

Learning rates {0.01, 0.1, 1}: measured beforehand, a sigmoid MLP without BN trains at
depth 5 only with 1.0 (0.68 after 5 epochs; chance at 0.1), a deep sigmoid MLP with BN
only with 0.01 (0.66 at depth 110 after 3 epochs; chance at 0.1), ReLU without BN is best
at 0.01-0.1, and 0.001 rescued no configuration that failed at 0.01. Depth 5 is added to
the issue's 10-110 so that the family that fails at 10 has a depth where it trains.

Verdicts (``findings``' rule over seeds, test accuracy at each family's best rate on
validation): per activation, the BN net of the grid's deepest depth trains (its accuracy
above the failure bar ``analysis.FAIL_ACCURACY``) and the same net without BN does not;
and at initialization, BN nets' gradients grow towards the input (a fitted factor above 1)
by the mean-field factor (within :data:`GROWTH_MARGIN`). The fitted factor is read on a
synthetic chain with a known per-layer growth in every report (:func:`calibrate_growth`).

Defaults: 5 epochs on a class-balanced subset of 10000 training images, SGD without
momentum as in the chapter, 3 seeds. ``--quick`` runs the shallowest and deepest depths
at two rates, and a smaller finite-size sweep.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.data.loader import stratified_subset
from bnlab.experiments import analysis
from bnlab.experiments.analysis import FAIL_ACCURACY, Row, finals, plot_intervals, select, trains
from bnlab.experiments.arms import cell, judge_bar
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
from bnlab.experiments.stats import format_mean_ci, mean_ci
from bnlab.probes.gradients import growth_per_layer, layer_gradient_norms, mean_field_growth
from bnlab.training import restore, runs
from bnlab.training.deep import ACTIVATIONS as MODULES
from bnlab.training.deep import deep_mlp
from bnlab.training.train import TrainConfig, model_for
from bnlab.util.config import config_from_dict
from bnlab.util.plots import (
    PALETTE,
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

DEPTHS = (5, 10, 20, 50, 110)
ACTIVATIONS = ("sigmoid", "tanh", "relu")
NORMS = {"none": "no BN", "bnlab": "BN"}
LEARNING_RATES = (0.01, 0.1, 1.0)
WIDTH = 64
GRADIENT_BATCH = 256
PLOTTED_DEPTHS = (50, 110)
SWEEP_DEPTH = 50
SWEEP_WIDTHS = (16, 64, 256)  # at batch GRADIENT_BATCH
SWEEP_BATCHES = (16, 64, 256, 1024)  # at width WIDTH
QUICK_DEPTHS = (DEPTHS[0], DEPTHS[-1])
QUICK_LEARNING_RATES = (0.01, 1.0)
QUICK_SWEEP = ((16, 64), (16, 256))  # --quick: widths, batches
GROWTH_MARGIN = 0.05
"""A measured growth factor "matches" the mean-field one when it lies within 5% of it
(the theory is a limit of infinite width and batch; width 64 is not)."""


def label(activation: str, norm: str, depth: int, lr: float) -> str:
    return f"{activation} {NORMS[norm]} depth={depth} lr={lr:g}"


def grid(settings: ExpSettings) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(depths, learning rates) of the grid: all of them, or with ``--quick`` the shallowest
    and deepest depths at two rates (a smoke test within minutes)."""
    if settings.quick:
        return QUICK_DEPTHS, QUICK_LEARNING_RATES
    return DEPTHS, LEARNING_RATES


def variants(settings: ExpSettings) -> list[Variant]:
    depths, rates = grid(settings)
    return [Variant(label(act, norm, depth, lr),
                    {"model": "deep-mlp", "norm": norm, "depth": depth, "width": WIDTH,
                     "activation": act, "lr": lr},
                    {"activation": act, "norm": norm, "depth": depth, "lr": lr})
            for act in ACTIVATIONS for norm in NORMS for depth in depths for lr in rates]


# --------------------------------------------------------------------------- definitions

def best_lr(rows: list[Row], activation: str, norm: str, depth: int) -> float | None:
    """The rate with the highest mean final validation accuracy (``analysis.best_lr``: diverged
    seeds count at chance; ties go to the smaller rate); None when the grid has no run of
    that family."""
    return analysis.best_lr(rows, LEARNING_RATES, activation=activation, norm=norm, depth=depth)


def trains_at(rows: list[Row], activation: str, norm: str, depth: int) -> bool | None:
    """True when some rate has runs and none of its seeds failed; None without runs."""
    groups = [g for lr in LEARNING_RATES
              if (g := select(rows, activation=activation, norm=norm, depth=depth, lr=lr))]
    if not groups:
        return None
    return any(trains(g) for g in groups)


def deepest_training(rows: list[Row], activation: str, norm: str) -> int | None:
    """The largest depth of the grid that trains (None if none does)."""
    return max((d for d in DEPTHS if trains_at(rows, activation, norm, d)), default=None)


def first_failing(rows: list[Row], activation: str, norm: str) -> int | None:
    """The smallest depth of the grid that does not train (None if every depth trains)."""
    return min((d for d in DEPTHS if trains_at(rows, activation, norm, d) is False), default=None)


def first_last_ratio(norms: list[float]) -> float:
    """||dL/dW|| of the first weight layer over that of the last (nan if undefined)."""
    if len(norms) < 2 or not all(math.isfinite(v) for v in (norms[0], norms[-1])) \
            or norms[-1] == 0:
        return math.nan
    return norms[0] / norms[-1]


# --------------------------------------------------------------------------- gradients

def gradient_profiles(rows: list[Row], dataset) -> dict[tuple, dict[str, Any]]:
    """Per (activation, norm, depth): per-layer gradient norms of seed 0 at initialization
    and after training at the family's best rate, with the run's step count, and
    ``init_by_seed``: the profile at initialization of every seed of that rate."""
    images, labels = gradient_batch(dataset, GRADIENT_BATCH)
    key = {"version": 1, "batch": GRADIENT_BATCH, "data": fingerprint(images, labels)}
    profiles: dict[tuple, dict[str, Any]] = {}
    for act in ACTIVATIONS:
        for norm in NORMS:
            for depth in DEPTHS:
                lr = best_lr(rows, act, norm, depth)
                if lr is None:
                    continue
                group = sorted(select(rows, activation=act, norm=norm, depth=depth, lr=lr),
                               key=lambda r: r.seed)
                measured = [runs.cached(r.run_dir, "gradient_profile", key,
                                        partial(gradient_profile, r, images, labels))
                            for r in group]
                profiles[(act, norm, depth)] = {"lr": lr, "seed": group[0].seed, **measured[0],
                                                "row": group[0],
                                                "init_by_seed": [m["init"] for m in measured],
                                                "seeds": [r.seed for r in group]}
    return profiles


def gradient_batch(dataset, size: int):
    """The first ``size`` class-balanced training images (uint8) and labels (fewer when the
    training set is smaller)."""
    return stratified_subset(dataset.train_images, dataset.train_labels,
                             min(size, len(dataset.train_labels)))


def gradient_profile(row: Row, images, labels) -> dict[str, list[float] | None]:
    """||dL/dW|| per weight layer, in depth order, of the run's model at initialization and
    after training (None when the run diverged), on one batch in train mode."""
    x = images.unsqueeze(1).float().div(255)  # (256, 1, 28, 28)
    config = config_from_dict(TrainConfig, row.config)
    torch.manual_seed(config.seed)
    init = [v for _, v in layer_gradient_norms(model_for(config, "cpu").train(), x, labels)]
    trained = None
    if not row.diverged:
        model, _ = restore.load_trained_model(row.run_dir)
        trained = [v for _, v in layer_gradient_norms(model.train(), x, labels)]
    return {"init": init, "trained": trained}


def _fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2e}"


def plot_profiles(profiles: dict[tuple, dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(2, len(ACTIVATIONS), figsize=(12, 8), squeeze=False)
    colors = dict(zip(NORMS, PALETTE))
    styles = dict(zip(PLOTTED_DEPTHS, (("--", "^"), ("-", "o"))))
    for row_axes, when in zip(axes, ("init", "trained")):
        for ax, act in zip(row_axes, ACTIVATIONS):
            for (a, norm, depth), p in profiles.items():
                values = p[when]
                if a != act or depth not in styles or values is None:
                    continue
                ys = [v if v > 0 and math.isfinite(v) else math.nan for v in values]
                line, marker = styles[depth]
                ax.plot(range(1, len(ys) + 1), ys, linestyle=line, marker=marker, markevery=5,
                        color=colors[norm], label=f"{NORMS[norm]}, depth {depth}")
            log_axis(ax, "y", label="||dL/dW|| (gradient norm)")
            count_axis(ax, "weight layer (1 = input side)")
            title = "at initialization" if when == "init" else "after training (best lr)"
            ax.set_title(f"{act}: {title}")
            if not ax.lines:
                note_empty(ax, "no run of depth " + " or ".join(map(str, PLOTTED_DEPTHS)))
            legend(ax)
    fig.suptitle(f"Per-layer gradient norms, plain MLP width {WIDTH}, batch of "
                 f"{GRADIENT_BATCH} training images, seed 0")
    save_figure(fig, path)


def plot_accuracy_vs_depth(rows: list[Row], path: Path) -> None:
    depths = depths_of(rows) or list(DEPTHS)
    fig, axes = plt.subplots(1, len(ACTIVATIONS), figsize=(12, 4), sharey=True, squeeze=False)
    for ax, act in zip(axes[0], ACTIVATIONS):
        for norm, name in NORMS.items():
            at_best = {depth: finals(select(rows, activation=act, norm=norm, depth=depth, lr=lr))
                       for depth in depths if (lr := best_lr(rows, act, norm, depth)) is not None}
            plot_intervals(ax, at_best, label=name)
        reference_line(ax, FAIL_ACCURACY, label="fails at or below")
        log_axis(ax, "x", ticks=depths, label="depth (weight layers)")
        ax.set_ylabel("final validation accuracy at the best lr")
        ax.set_title(act)
        legend(ax)
    save_figure(fig, path)


# --------------------------------------------------------------------------- growth vs theory

def predicted_growth(activation: str) -> float:
    """Mean-field growth factor of the gradient *norm* per BN layer towards the input:
    ``sqrt(bnlab.probes.gradients.mean_field_growth(phi))`` (ReLU: sqrt(pi / (pi - 1)) = 1.211)."""
    return math.sqrt(mean_field_growth(MODULES[activation]()))


def fitted_growth(norms: list[float]) -> float:
    """The fitted per-layer growth factor (``gradients.growth_per_layer``) of a profile's
    hidden layers: the first weight layer (it sees the image, not a BN'd activation) and the
    head (no BN after it) are left out; nan for a net with fewer than 2 hidden layers."""
    return growth_per_layer(norms[1:-1])


def measured_growth(profiles: dict[tuple, dict[str, Any]]) -> dict[tuple, list[float]]:
    """Per (activation, norm, depth): the fitted growth factor at initialization, per seed."""
    return {key: [fitted_growth(p) for p in profile["init_by_seed"]]
            for key, profile in profiles.items()}


def growth_by_seed(profiles: dict[tuple, dict[str, Any]], key: tuple) -> dict[int, float]:
    """``{seed: fitted growth at initialization}`` of one (activation, norm, depth)."""
    profile = profiles.get(key)
    if profile is None:
        return {}
    return {seed: fitted_growth(p) for seed, p in zip(profile["seeds"], profile["init_by_seed"])}


class _GradientGain(torch.autograd.Function):
    """The identity forward; the backward multiplies the gradient by ``gain``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gain: float) -> torch.Tensor:
        ctx.gain = gain
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.gain, None


class GainChain(nn.Module):
    """``layers`` orthogonal linear maps of width ``width``, each followed by a gradient gain
    ``gain``: activations keep their norm forward, and ``||dL/dW||`` grows by exactly ``gain``
    per layer towards the input (orthogonal maps keep both the activations' and the
    gradients' norms). A synthetic chain with a known growth factor."""

    def __init__(self, layers: int, width: int, gain: float, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))
        with torch.no_grad():
            for layer in self.layers:
                q, _ = torch.linalg.qr(torch.randn(width, width, generator=generator))
                layer.weight.copy_(q)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, width)
        for layer in self.layers:
            x = _GradientGain.apply(layer(x), self.gain)
        return x


GAINS = (1.0, 1.1, 1.3)


def calibrate_growth(layers: int = 12, width: int = 16, batch: int = 32) -> list[Calibration]:
    """The fitted growth (``layer_gradient_norms`` then :func:`fitted_growth`) of
    :class:`GainChain` at each gain of :data:`GAINS`: it must read the gain (1: no growth)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=generator)  # (B, width)
    y = torch.randint(0, width, (batch,), generator=generator)
    out = []
    for gain in GAINS:
        norms = [v for _, v in layer_gradient_norms(GainChain(layers, width, gain), x, y)]
        read = fitted_growth(norms)
        out.append(Calibration("fitted growth of ||dL/dW|| per layer",
                               f"{layers}-layer orthogonal chain, gradient x{gain:g} per layer",
                               f"{gain:.4f}", f"{read:.4f}", abs(read - gain) <= 1e-3 * gain))
    return out


def init_profile(activation: str, depth: int, width: int, seed: int, images, labels) -> list[float]:
    """||dL/dW|| per weight layer of a fresh BN ``deep_mlp`` (seed ``seed``) on one batch,
    in train mode."""
    torch.manual_seed(seed)
    model = deep_mlp(depth, width, activation, "bnlab").train()
    x = images.unsqueeze(1).float().div(255)  # (B, 1, 28, 28)
    return [v for _, v in layer_gradient_norms(model, x, labels)]


Sweep = dict[str, dict[str, dict[int, list[float]]]]  # activation -> width|batch -> value -> seeds


def finite_size_sweep(dataset, seeds: list[int], out: Path,
                      widths: tuple[int, ...] = SWEEP_WIDTHS,
                      sweep_batches: tuple[int, ...] = SWEEP_BATCHES) -> Sweep:
    """Fitted growth factors at initialization of BN nets of depth ``SWEEP_DEPTH``: over
    ``widths`` at batch ``GRADIENT_BATCH`` and over ``sweep_batches`` at width ``WIDTH``, per
    seed. No training is involved; the result is cached in the experiment folder
    (``runs.cached``) keyed by the sweep and the images."""
    batches = {b: gradient_batch(dataset, b) for b in sweep_batches}
    batches.setdefault(GRADIENT_BATCH, gradient_batch(dataset, GRADIENT_BATCH))
    key = {"version": 1, "depth": SWEEP_DEPTH, "widths": widths, "batches": sweep_batches,
           "batch": GRADIENT_BATCH, "width": WIDTH, "seeds": seeds, "activations": ACTIVATIONS,
           "data": {b: fingerprint(*v) for b, v in batches.items()}}

    def compute() -> Sweep:
        def rates(act: str, width: int, batch: int) -> list[float]:
            return [fitted_growth(init_profile(act, SWEEP_DEPTH, width, seed, *batches[batch]))
                    for seed in seeds]

        return {act: {"width": {w: rates(act, w, GRADIENT_BATCH) for w in widths},
                      "batch": {b: rates(act, WIDTH, b) for b in sweep_batches}}
                for act in ACTIVATIONS}

    stored = runs.cached(out, "init_sweep", key, compute)  # JSON: string keys, sorted
    return {act: {axis: {v: stored[act][axis][str(v)] for v in values}
                  for axis, values in (("width", widths), ("batch", sweep_batches))}
            for act in ACTIVATIONS}


def growth_table(growth: dict[tuple, list[float]]) -> str:
    depths = sorted({d for (_, _, d) in growth})
    rows = []
    for act in ACTIVATIONS:
        for norm, name in NORMS.items():
            if not any((act, norm, d) in growth for d in depths):
                continue
            predicted = f"{predicted_growth(act):.4f}" if norm == "bnlab" else "-"
            rows.append([act, name, predicted,
                         *[format_mean_ci(growth.get((act, norm, d), []), ".4f") for d in depths]])
    return format_table(["activation", "norm", "predicted (mean field, BN)",
                         *[f"depth {d}" for d in depths]], rows)


def sweep_table(sweep: Sweep) -> str:
    first = next(iter(sweep.values()))
    widths, batches = list(first["width"]), list(first["batch"])
    rows = [[act, f"{predicted_growth(act):.4f}",
             *[format_mean_ci(sweep[act]["width"][w], ".4f") for w in widths],
             *[format_mean_ci(sweep[act]["batch"][b], ".4f") for b in batches]]
            for act in sweep]
    return format_table(["activation", "predicted",
                         *[f"width {w} (batch {GRADIENT_BATCH})" for w in widths],
                         *[f"batch {b} (width {WIDTH})" for b in batches]], rows)


def agreement(measured: list[float], predicted: float) -> str:
    """How a measured factor (mean ± 95% CI over seeds) stands to the prediction, in words."""
    mean, half = mean_ci(measured)
    if math.isnan(mean):
        return "no measurement"
    off = f"{100 * (mean - predicted) / predicted:+.1f}% from the prediction"
    if half is None:
        return f"{off} (one seed: no interval)"
    if abs(mean - predicted) <= half:
        return f"agrees: the prediction lies inside the 95% interval ({off})"
    return f"**disagrees**: the prediction lies outside the 95% interval ({off})"


def growth_findings(growth: dict[tuple, list[float]], sweep: Sweep | None) -> list[str]:
    lines = []
    depths = sorted({d for (_, _, d) in growth})
    for act in ACTIVATIONS:
        predicted = predicted_growth(act)
        for depth in reversed(depths):
            values = [v for v in growth.get((act, "bnlab", depth), []) if math.isfinite(v)]
            if not values:
                continue
            mean = mean_ci(values)[0]
            lines.append(
                f"- {act}, BN, depth {depth}: measured {format_mean_ci(values)} per layer "
                f"(squared norm {mean ** 2:.4f}) vs predicted {predicted:.4f} (squared "
                f"{predicted ** 2:.4f}); {agreement(values, predicted)}. Over the "
                f"{depth - 3} fitted layer steps that is {(depth - 3) * math.log10(mean):.1f} "
                f"orders of magnitude measured vs {(depth - 3) * math.log10(predicted):.1f} "
                "predicted.")
            break
    bn = {act: mean_ci(growth.get((act, "bnlab", max(depths, default=0)), []))[0]
          for act in ACTIVATIONS}
    if all(math.isfinite(v) for v in bn.values()):
        order = sorted(bn, key=bn.get, reverse=True)
        predicted_order = sorted(ACTIVATIONS, key=predicted_growth, reverse=True)
        lines.append(f"- Ordering by measured growth at depth {max(depths)}: "
                     + " > ".join(order) + (" (the predicted order)." if order == predicted_order
                                            else f" (predicted: {' > '.join(predicted_order)})."))
    for act, axes in (sweep or {}).items():
        predicted = predicted_growth(act)
        for axis, values in axes.items():
            means = {v: mean_ci(s)[0] for v, s in values.items()}
            small, large = min(means), max(means)
            gap_small = means[small] - predicted
            gap_large = means[large] - predicted
            trend = ("shrinks" if abs(gap_large) < abs(gap_small) else "does not shrink")
            lines.append(f"- Finite size, {act}, depth {SWEEP_DEPTH}, {axis} {small} -> {large}: "
                         f"measured minus predicted {gap_small:+.4f} -> {gap_large:+.4f} (the "
                         f"deviation {trend} as the {axis} grows).")
    return lines


def plot_sweep(sweep: Sweep, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
    for ax, axis, fixed in zip(axes[0], ("width", "batch"),
                               (f"batch {GRADIENT_BATCH}", f"width {WIDTH}")):
        for i, (act, axes_of) in enumerate(sweep.items()):
            look = style(i)
            plot_intervals(ax, axes_of[axis], (0.0, math.inf), label=f"{act} measured", **look)
            ax.axhline(predicted_growth(act), color=look["color"], ls=":", lw=0.9,
                       label=f"{act} mean field")
        log_axis(ax, "x", base=2, ticks=sorted({x for a in sweep.values() for x in a[axis]}),
                 label=f"{axis} ({fixed}, depth {SWEEP_DEPTH}, BN)")
        ax.set_ylabel("fitted growth of ||dL/dW|| per layer (ratio)")
        legend(ax)
    save_figure(fig, path)


# --------------------------------------------------------------------------- report

def depths_of(rows: list[Row]) -> list[int]:
    """The depths the grid ran, ascending."""
    return sorted({r.tags["depth"] for r in rows})


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    plot_accuracy_vs_depth(rows, out / "accuracy_vs_depth.png")
    depths = depths_of(rows)
    headers = ["activation", "norm", *[f"depth {d}" for d in depths]]
    table_rows = []
    for act in ACTIVATIONS:
        for norm, name in NORMS.items():
            cells = [act, name]
            for depth in depths:
                lr = best_lr(rows, act, norm, depth)
                if lr is None:
                    cells.append("-")
                    continue
                group = select(rows, activation=act, norm=norm, depth=depth, lr=lr)
                verdict = "" if trains_at(rows, act, norm, depth) else " FAILS"
                cells.append(f"{cell(group)} (lr {lr:g}){verdict}")
            table_rows.append(cells)
    rates = sorted({r.tags["lr"] for r in rows})
    sections = ["## Final test accuracy by depth", "",
                format_table(headers, table_rows), "",
                "Each cell: final test accuracy (mean ± 95% CI over seeds) at the learning rate "
                f"of the sweep {rates} with the highest mean final validation accuracy; FAILS = "
                f"no rate of the sweep trains every seed past {FAIL_ACCURACY} validation "
                "accuracy.", "", "![final accuracy against depth](accuracy_vs_depth.png)", ""]
    findings = depth_findings(rows)
    verdicts = depth_verdicts(rows)
    if dataset is not None and rows:
        profiles = gradient_profiles(rows, dataset)
        plot_profiles(profiles, out / "gradient_norms.png")
        sections += ["## Gradient norms per layer", "", gradient_table(profiles), "",
                     "ratio = ||dL/dW|| of the first weight layer / that of the head, for seed 0 "
                     f"on a class-balanced batch of {GRADIENT_BATCH} training images in train "
                     "mode; 'trained' is the model after its run at the best rate (the steps "
                     "are the run's SGD steps). 'layers at 0': weight gradients that underflow "
                     "to exactly 0 in float32 (not drawn on the log scale).", "",
                     "![per-layer gradient norms](gradient_norms.png)", ""]
        findings += gradient_findings(profiles)
        sweep = finite_size_sweep(dataset, sorted({r.seed for r in rows}), out,
                                  *(QUICK_SWEEP if settings.quick else (SWEEP_WIDTHS, SWEEP_BATCHES)))
        sections += growth_sections(profiles, sweep, sorted({r.seed for r in rows}), out)
        findings += growth_findings(measured_growth(profiles), sweep)
        verdicts += growth_verdicts(profiles)
    return Analysis(sections, findings, verdicts, calibrate_growth())


def growth_sections(profiles: dict[tuple, dict[str, Any]], sweep: Sweep, seeds: list[int],
                    out: Path) -> list[str]:
    growth = measured_growth(profiles)
    plot_sweep(sweep, out / "finite_size.png")
    return ["## Gradient growth per layer at initialization: measured vs mean-field theory", "",
            growth_table(growth), "",
            "Each measured cell: the factor by which ||dL/dW|| grows per layer towards the input, "
            "fitted by least squares to ln ||dL/dW|| against the layer index over the hidden "
            "weight layers (the first layer, which sees the image, and the head are left out), "
            "per seed at initialization, mean ± 95% CI over seeds. Predicted: "
            "sqrt(E[phi'(z)^2] / Var[phi(z)]) for z ~ N(0, 1) "
            "(`bnlab.probes.gradients.mean_field_growth`); for ReLU that is sqrt(pi/(pi-1)) = 1.2112, "
            "Yang et al. (2019)'s rate pi/(pi-1) = 1.4669 of the squared norm. For tanh and "
            "sigmoid the same mean-field argument is our derivation (it gives 'far less' for "
            "tanh and 'barely' for sigmoid), not a number quoted from the paper. The theory "
            "assumes infinite width, an infinite batch and the mean-field limit at "
            "initialization (independent Gaussian weights); the no-BN rows have no prediction "
            f"here. Ours: width {WIDTH}, a batch of {GRADIENT_BATCH} class-balanced training "
            "images, train mode (batch statistics), the grid's initialization "
            "(`bnlab.training.deep`).", "",
            "## Finite width and batch", "", sweep_table(sweep), "",
            f"Fitted factor at initialization of BN nets of depth {SWEEP_DEPTH} (no training), "
            f"mean ± 95% CI over seeds {seeds}: over widths at batch {GRADIENT_BATCH} and over "
            f"batches at width {WIDTH}. The theory's limit is width and batch to infinity.", "",
            "![growth factor against width and batch](finite_size.png)"]


def depth_verdicts(rows: list[Row]) -> list[Verdict]:
    """Per activation, at the grid's deepest depth (each family at its best rate on
    validation): the BN net trains, the net without BN does not (test accuracy against the
    failure bar)."""
    depths = depths_of(rows)
    if not depths:
        return []
    deepest = depths[-1]
    out = []
    for act in ACTIVATIONS:
        for norm, direction in (("bnlab", 1), ("none", -1)):
            lr = best_lr(rows, act, norm, deepest)
            group = [] if lr is None else select(rows, activation=act, norm=norm, depth=deepest,
                                                 lr=lr)
            name = f"{act} {NORMS[norm]}, depth {deepest}" + ("" if lr is None else f", lr {lr:g}")
            claim = (f"BN trains a plain {act} MLP of {deepest} layers" if direction > 0 else
                     f"without BN, the plain {act} MLP of {deepest} layers does not train")
            out.append(judge_bar(claim, "the chapter", f"final test accuracy minus the failure bar "
                                 f"{FAIL_ACCURACY}, at the best of the rates", (name, group),
                                 FAIL_ACCURACY, direction=direction,
                                 paper="BN enabled networks of over 100 layers",
                                 note=f"plain MLP of width {WIDTH}, no residual connections, "
                                      "SGD without momentum, Fashion-MNIST; the chapter's "
                                      "deep nets are (residual) CNNs on ImageNet"))
    return out


def growth_verdicts(profiles: dict[tuple, dict[str, Any]]) -> list[Verdict]:
    """Per activation, BN nets of the deepest depth at initialization: the gradient grows
    towards the input (fitted factor above 1), by the mean-field factor (within
    :data:`GROWTH_MARGIN`)."""
    depths = sorted({d for (_, _, d) in profiles})
    if not depths:
        return []
    deepest = depths[-1]
    out = []
    for act in ACTIVATIONS:
        growth = growth_by_seed(profiles, (act, "bnlab", deepest))
        predicted = predicted_growth(act)
        source = ("Yang et al. 2019" if act == "relu"
                  else "mean-field argument of Yang et al. 2019 (bnlab's derivation)")
        paper = (f"per-layer factor sqrt(pi/(pi-1)) = {predicted:.4f} of the gradient norm"
                 if act == "relu" else f"predicted factor {predicted:.4f}")
        note = (f"width {WIDTH}, batch {GRADIENT_BATCH}, depth {deepest}; the theory is a limit "
                "of infinite width and batch")
        measure = f"fitted growth of ||dL/dW|| per layer at initialization, {act} BN"
        if not growth:
            out.append(not_measured(f"BN nets' gradients explode towards the input ({act})",
                                    source, measure, "no BN net of this activation ran"))
            continue
        out.append(judge_difference(f"BN nets' gradients explode towards the input ({act})",
                                    source, measure + " minus 1", dict.fromkeys(growth, 1.0),
                                    growth, paper=paper, note=note))
        out.append(judge_same(f"the growth factor is the mean-field one ({act})", source,
                              measure + f" minus the prediction (equivalence margin "
                              f"±{GROWTH_MARGIN:.0%} of it)", dict.fromkeys(growth, predicted),
                              growth, GROWTH_MARGIN * predicted, paper=paper, note=note))
    return out


def gradient_table(profiles: dict[tuple, dict[str, Any]]) -> str:
    rows = []
    for (act, norm, depth), p in profiles.items():
        trained = p["trained"]
        rows.append([act, NORMS[norm], depth, f"{p['lr']:g}",
                     _fmt_ratio(first_last_ratio(p["init"])),
                     "diverged" if trained is None else _fmt_ratio(first_last_ratio(trained)),
                     "-" if trained is None else p["row"].steps_per_epoch * len(p["row"].metrics),
                     f"{min(p['init']):.1e} .. {max(p['init']):.1e}",
                     sum(v == 0 for v in p["init"])])
    return format_table(["activation", "norm", "depth", "lr", "first/last at init",
                         "first/last trained", "steps", "init range of ||dL/dW||",
                         "layers at 0 (init)"], rows)


def depth_findings(rows: list[Row]) -> list[str]:
    lines = []
    for act in ACTIVATIONS:
        for norm, name in NORMS.items():
            if not select(rows, activation=act, norm=norm):
                continue
            deepest, failing = deepest_training(rows, act, norm), first_failing(rows, act, norm)
            text = f"- {act}, {name}: "
            text += ("no depth of the grid trains" if deepest is None
                     else f"trains up to depth **{deepest}**")
            text += ("; every depth trains" if failing is None
                     else f"; first depth that fails: **{failing}**")
            lines.append(text + ".")
    for act in ACTIVATIONS:
        with_bn, without = deepest_training(rows, act, "bnlab"), deepest_training(rows, act, "none")
        if not select(rows, activation=act):
            continue
        if (with_bn or 0) > (without or 0):
            lines.append(f"- {act}: BN extends the trainable depth from {without or 'none'} to "
                         f"{with_bn}.")
        elif (with_bn or 0) < (without or 0):
            lines.append(f"- {act}: without BN the net trains deeper ({without}) than with BN "
                         f"({with_bn or 'none'}).")
        else:
            lines.append(f"- {act}: with and without BN the deepest trainable depth is the same "
                         f"({with_bn or 'none'}).")
    over_100 = [act for act in ACTIVATIONS if (deepest_training(rows, act, "bnlab") or 0) > 100]
    lines.append("- With BN, a plain net of more than 100 layers trains here for: "
                 + (", ".join(over_100) if over_100 else "no activation") + ".")
    return lines


def gradient_findings(profiles: dict[tuple, dict[str, Any]]) -> list[str]:
    lines = []
    deepest = max((d for (_, _, d) in profiles), default=None)
    for act in ACTIVATIONS:
        cells = {norm: profiles.get((act, norm, deepest)) for norm in NORMS}
        if deepest is None or not all(cells.values()):
            continue
        ratios = {norm: first_last_ratio(p["init"]) for norm, p in cells.items()}
        parts = [f"{NORMS[n]} {_fmt_ratio(v)}" for n, v in ratios.items()]
        lines.append(f"- {act}, depth {deepest}, at initialization: first/last layer gradient "
                     f"norm ratio {', '.join(parts)} ("
                     + "; ".join(f"{NORMS[n]} {_describe_ratio(v)}" for n, v in ratios.items())
                     + ").")
        trained = {n: first_last_ratio(p["trained"]) for n, p in cells.items() if p["trained"]}
        if trained:
            lines.append(f"- {act}, depth {deepest}, after training: ratio "
                         + ", ".join(f"{NORMS[n]} {_fmt_ratio(v)}" for n, v in trained.items())
                         + ".")
    return lines


def _describe_ratio(ratio: float) -> str:
    if math.isnan(ratio):
        return "undefined"
    if ratio == 0:
        return "the first layer's gradient underflows to 0"
    decades = math.log10(ratio)
    if abs(decades) < 1:
        return "within a factor 10 across depth"
    direction = "vanishes" if decades < 0 else "grows"
    return f"gradient {direction} by {abs(decades):.1f} orders of magnitude towards the input"


EXPERIMENT = Experiment(
    name="depth",
    title="Claim: batch norm makes networks of over 100 layers trainable",
    question="Up to which depth do plain MLPs (no residual connections) train on Fashion-MNIST, "
             "with and without batch norm, with sigmoid, tanh and ReLU, and what happens to the "
             "gradient of each layer?",
    variants=variants,
    analyze=analyze,
    default_epochs=5,
    default_subset=10000,
    notes=f"Plain MLPs of width {WIDTH}, SGD without momentum, batch 128, a small sweep of "
          "learning rates per depth (a depth counts as trainable when one rate "
          "trains every seed; each family's best rate is chosen on validation accuracy). "
          "Gradient norms per layer are measured on one class-balanced batch of training "
          "images, in train mode, at initialization and after training.",
)
