"""Paper: EMA vs population statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3).

Why: batch norm predicts with running statistics, an exponential moving average (EMA) of
batch statistics gathered while the weights were still moving. Wu & Johnson show that
the EMA can be far from the population statistics of the *current* weights (early in
training, at a high learning rate, with a large momentum) and that recomputing them
("precise BN", ``bnlab.nn.precise.update_bn_stats``) needs only 10^3-10^4 samples.

The grid: BN-LeNet (bnlab's BN, batch 128, plain SGD) at lr 0.1 (the chapter's) and at
:data:`HIGH_LR` (a high rate at which BN-LeNet still trains; the report reads a finished
``lr`` experiment beside it and says which rates train there). Every run is re-played
(``experiments.probed``) and probed every :data:`FIRST_EPOCH_EVERY` steps in the first
epoch and after every epoch (step 0: the initial weights). At each probe the *same
weights* are evaluated on the whole test set with:

- EMA statistics of momentum m in :data:`MOMENTA`, torch's convention
  ``running = (1 - m) * running + m * batch`` (m = 0.9 weights the newest batch 0.9),
  started at (mean 0, variance 1) as batch norm's buffers are;
- population statistics: ``update_bn_stats`` over the first N training samples of a
  fixed shuffle of the run's training images (epoch 0 of its loader, an order no training
  epoch uses), N in :data:`SAMPLES`, in whole batches of 128; an N above the training set
  is the whole set.

How three momenta come from one training: shadow EMAs (:class:`ShadowEMA`). Before the
replay's first step, forward pre-hooks are attached to every batch norm; on each training
forward they take the layer input's per-channel mean and unbiased variance (what batch
norm averages) and update one pair of shadow buffers per momentum with the rule above.
Train-mode batch norm normalizes with the batch's own statistics and its running
statistics never feed back into training, so the trajectory is the run's own (the replay
checks it ends on the run's weights), every momentum sees the same weights and batches,
and nothing trains three times; the shadow of momentum 0.1 equals the model's own
buffers. The hooks are off during probes.

The gap plot follows one fixed channel, channel 0 of the last batch norm (``fc2``'s,
the input of the classifier, where the drift of every layer below adds up):
``|EMA - population|`` of its mean and of its variance, population = the largest N. The
report also gives, over every channel of every batch norm, the mean of
``|mu_est - mu_pop| / sigma_pop`` (the error of the mean in units of the population's
standard deviation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.experiments.analysis import (
    Row,
    best_lr_per_model,
    plot_mean_curves,
    read_results,
    select,
    training_lrs,
)
from bnlab.experiments.findings import Analysis, Verdict, judge_difference
from bnlab.experiments.probed import cached_replay
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import format_mean_ci, mean_ci
from bnlab.nn.precise import batch_norm_layers, update_bn_stats
from bnlab.training.train import TrainConfig, build_loaders, evaluate, resolve_device
from bnlab.util.plots import legend, log_axis, plt, save_figure
from bnlab.util.tables import format_table

SOURCE = "Wu & Johnson 2021"
LEARNING_RATES = (0.1, 3.0)
HIGH_LR = LEARNING_RATES[1]
"""The default high rate: BN-LeNet trains at 3 (the ``lr`` grid's largest rates that train
are higher; at 3 its accuracy is still close to its best), and the weights move 30 times
faster per step than at 0.1, which is what the EMA has to follow."""
MOMENTA = (0.01, 0.1, 0.9)
SAMPLES = (128, 512, 2048, 8192, 60000)
FIRST_EPOCH_EVERY = 50
WRONG = 0.01
"""EMA is called *wrong* where its accuracy is more than 1 point below the population
statistics' (largest N), as a mean over seeds."""
ENOUGH = 0.005
"""A population estimate from N samples is *enough* when its accuracy is within 0.5 points
of the largest N's, as a mean over seeds."""
PAPER_SAMPLES = (1e3, 1e4)


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(f"BN-LeNet lr={lr:g}", {"model": "bn-lenet", "norm": "bnlab", "lr": lr},
                    {"lr": lr}) for lr in LEARNING_RATES]


def probe_steps(steps_per_epoch: int, epochs: int) -> list[int]:
    """Every :data:`FIRST_EPOCH_EVERY` steps in the first epoch, and after every epoch."""
    return sorted({*range(0, steps_per_epoch, FIRST_EPOCH_EVERY),
                   *(e * steps_per_epoch for e in range(1, epochs + 1))})


def sample_sizes(n_train: int) -> list[int]:
    """:data:`SAMPLES` capped at the training set's size (duplicates dropped)."""
    return sorted({min(n, n_train) for n in SAMPLES})


class ShadowEMA:
    """Running statistics of several momenta, updated from every training forward's batch
    statistics by forward pre-hooks (see the module docstring). ``active`` turns them off."""

    def __init__(self, momenta: tuple[float, ...] = MOMENTA) -> None:
        self.momenta = momenta
        self.active = True
        self.stats: dict[str, dict[float, tuple[torch.Tensor, torch.Tensor]]] = {}

    def attach(self, model: nn.Module) -> None:
        for name, layer in batch_norm_layers(model):
            self.stats[name] = {m: (torch.zeros_like(layer.running_mean),
                                    torch.ones_like(layer.running_var)) for m in self.momenta}
            layer.register_forward_pre_hook(partial(self._observe, name))

    @torch.no_grad()
    def _observe(self, name: str, layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not (self.active and layer.training):
            return
        x = args[0]
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x.detach(), dim=dims, correction=1)  # (C,) each, unbiased var
        for m, (running_mean, running_var) in self.stats[name].items():
            running_mean.mul_(1 - m).add_(m * mean.to(running_mean.dtype))
            running_var.mul_(1 - m).add_(m * var.to(running_var.dtype))


def _statistics(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (layer.running_mean.clone(), layer.running_var.clone())
            for name, layer in batch_norm_layers(model)}


@torch.no_grad()
def _load_statistics(model: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name, layer in batch_norm_layers(model):
        layer.running_mean.copy_(stats[name][0])
        layer.running_var.copy_(stats[name][1])


def statistics_error(est: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     pop: dict[str, tuple[torch.Tensor, torch.Tensor]], eps: float = 1e-5) -> list[float]:
    """Over every channel of every layer: mean ``|mu_est - mu_pop| / sqrt(var_pop + eps)`` and
    mean ``|log(var_est / var_pop)|`` (0 when the estimate is the population)."""
    mean_err = torch.cat([(est[n][0] - pop[n][0]).abs().double() / (pop[n][1].double() + eps).sqrt()
                          for n in pop])
    var_err = torch.cat([((est[n][1].double() + eps) / (pop[n][1].double() + eps)).log().abs()
                         for n in pop])
    return [mean_err.mean().item(), var_err.mean().item()]


def make_probe(config: TrainConfig, dataset, shadows: ShadowEMA) -> Callable[..., dict[str, Any]]:
    """The probe of one run: test accuracy of the current weights with each EMA and each
    population estimate, the fixed channel's statistics, and the errors of every estimate
    against the largest N's; the model's own buffers are restored."""
    train, _, test = build_loaders(config, dataset, resolve_device(config.device))
    population = train  # its epoch 0 order: a fixed shuffle no training epoch uses
    sizes = sample_sizes(len(train.labels))

    def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, Any]:
        shadows.active = False
        own = _statistics(model)
        try:
            population.set_epoch(0)
            estimates: dict[str, dict[str, Any]] = {"ema": {}, "pop": {}}
            for m in shadows.momenta:
                estimates["ema"][f"{m:g}"] = {n: s[m] for n, s in shadows.stats.items()}
            for n in sizes:
                batches = math.ceil(n / population.batch_size)
                update_bn_stats(model, population, batches, progress=False)
                estimates["pop"][str(n)] = _statistics(model)
            reference = estimates["pop"][str(sizes[-1])]
            last = list(reference)[-1]
            record: dict[str, Any] = {"acc": {}, "channel": {}, "error": {}}
            for kind, per in estimates.items():
                for key, stats in per.items():
                    _load_statistics(model, stats)
                    name = f"{kind}:{key}"
                    record["acc"][name] = evaluate(model, test)[1]
                    record["channel"][name] = [stats[last][0][0].item(), stats[last][1][0].item()]
                    record["error"][name] = statistics_error(stats, reference)
            return record
        finally:
            _load_statistics(model, own)
            shadows.active = True

    return probe


def measure(row: Row, dataset) -> dict[str, Any]:
    """The run's probes (cached in its folder as ``precise-probes.json``)."""
    shadows = ShadowEMA()  # one replay per call: its hooks and its probe share it

    def steps_for(config: TrainConfig) -> list[int]:
        train = build_loaders(config, dataset, "cpu").train
        return probe_steps(len(train), config.epochs)

    return cached_replay(row.run_dir, "precise-probes",
                         {"version": 1, "momenta": list(MOMENTA), "samples": list(SAMPLES)},
                         dataset, steps_for, lambda c: make_probe(c, dataset, shadows),
                         lambda c: shadows.attach)


# --------------------------------------------------------------------------- analysis

def estimators(records: list[dict[str, Any]]) -> list[str]:
    """The estimator names of a run's records: ``ema:M`` then ``pop:N`` (ascending N)."""
    names = list(records[0]["acc"]) if records else []
    return ([n for n in names if n.startswith("ema:")]
            + sorted((n for n in names if n.startswith("pop:")), key=lambda n: int(n[4:])))


def largest_population(records: list[dict[str, Any]]) -> str:
    return [n for n in estimators(records) if n.startswith("pop:")][-1]


def phase_gap(records: list[dict[str, Any]], name: str, steps: Callable[[int], bool]) -> float:
    """Mean over the probes whose step passes ``steps`` of accuracy(``name``) minus the
    largest population estimate's accuracy (nan without such probes)."""
    ref = largest_population(records)
    gaps = [r["acc"][name] - r["acc"][ref] for r in records if steps(r["step"])]
    return sum(gaps) / len(gaps) if gaps else math.nan


def phases(row: Row, records: list[dict[str, Any]]) -> dict[str, Callable[[int], bool]]:
    """"first epoch": probes after step 0 up to the end of epoch 1; "end": the last probe."""
    per_epoch = row.steps_per_epoch
    last = records[-1]["step"] if records else -1
    return {"first epoch": lambda s: 0 < s <= per_epoch, "end": lambda s: s == last}


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to probe)"])
    measured = {r.run_dir: measure(r, dataset) for r in rows}
    probes = {run: m["records"] for run, m in measured.items()}
    reproduced = sum(m["reproduces_run"] is True for m in measured.values())
    plot_accuracy(rows, probes, out / "precise_accuracy.png")
    plot_gap(rows, probes, out / "precise_gap.png")
    return Analysis(["## EMA vs population statistics", "", *tables(rows, probes), "",
            "Accuracy differences are points of test accuracy against the population "
            "statistics of the largest N, per run the mean over the probes of the phase "
            "(*first epoch*: every probe after step 0 up to the end of epoch 1; *end*: the final "
            "weights), then mean ± 95% CI over seeds. Error of the mean: over every channel of "
            "every batch norm, |mu_est - mu_pop| / sigma_pop.", "",
            "## Findings", "", *findings(rows, probes), "", *lr_grid_note(out),
            f"- Replays that end on exactly the run's checkpointed weights: {reproduced} of "
            f"{len(rows)} (the probes measured the runs' own trajectories).", "",
            "## Beside the paper", "",
            "Wu & Johnson (ResNet-50 on ImageNet, SGD with momentum and a decaying rate) find "
            "EMA statistics inaccurate early in training and with a large EMA momentum or a "
            "large rate, and precise BN accurate with 10^3-10^4 samples; here BN-LeNet on "
            "Fashion-MNIST, plain SGD at a constant rate. Their momentum is the old average's "
            "weight, torch's (ours) the newest batch's: their large momentum 0.99 is our 0.01.",
            "", *samples_needed(rows, probes), "",
            "![accuracy](precise_accuracy.png)", "", "![gap](precise_gap.png)"],
                    verdicts=paper_verdicts(rows, probes))


def _per_phase(rows: list[Row], probes, name: str, phase: str, value) -> list[float]:
    out = []
    for r in rows:
        recs = probes[r.run_dir]
        if recs:
            out.append(value(recs, name, phases(r, recs)[phase]))
    return [v for v in out if not math.isnan(v)]


def _phase_error(records, name: str, steps) -> float:
    errs = [r["error"][name][0] for r in records if steps(r["step"])]
    return sum(errs) / len(errs) if errs else math.nan


def tables(rows: list[Row], probes) -> list[str]:
    headers = ["lr", "statistics", "acc − pop, first epoch", "acc − pop, end",
               "error of the mean, first epoch", "error of the mean, end"]
    table = []
    for lr in LEARNING_RATES:
        group = select(rows, lr=lr)
        recs = [probes[r.run_dir] for r in group if probes[r.run_dir]]
        if not recs:
            continue
        for name in estimators(recs[0]):
            table.append([f"{lr:g}", _describe(name), *[
                format_mean_ci(_gaps(group, probes, lr, name, p), ".2f")
                for p in ("first epoch", "end")], *[
                format_mean_ci(_per_phase(group, probes, name, p, _phase_error), ".3g")
                for p in ("first epoch", "end")]])
    return [format_table(headers, table)]


def _describe(name: str) -> str:
    kind, _, value = name.partition(":")
    return f"EMA momentum {value}" if kind == "ema" else f"population, N = {value}"


def findings(rows: list[Row], probes) -> list[str]:
    lines, wrong = [], []
    for lr in LEARNING_RATES:
        group = select(rows, lr=lr)
        recs = [probes[r.run_dir] for r in group if probes[r.run_dir]]
        if not recs:
            continue
        for name in [n for n in estimators(recs[0]) if n.startswith("ema:")]:
            cells = []
            for phase in ("first epoch", "end"):
                gaps = _gaps(group, probes, lr, name, phase)
                cells.append(f"{phase} {format_mean_ci(gaps, '.2f')}")
                if gaps and mean_ci(gaps)[0] < -100 * WRONG:
                    wrong.append(f"lr {lr:g}, momentum {name[4:]}, {phase}")
            lines.append(f"- lr {lr:g}, EMA momentum {name[4:]}: accuracy minus population "
                         f"statistics' (points) {'; '.join(cells)}.")
        for phase in ("first epoch", "end"):
            n = _enough(group, probes, phase)
            largest = largest_population(recs[0])[4:]
            lines.append(f"- lr {lr:g}, {phase}: the smallest N within {100 * ENOUGH:g} points of "
                         f"N = {largest}'s accuracy is "
                         + (f"**{n}** samples ({_beside_paper(n)})" if n is not None else "none")
                         + ".")
    lines.insert(0, f"- EMA more than {100 * WRONG:g} point below population statistics (mean "
                 "over seeds): " + ("; ".join(wrong) if wrong else "nowhere in this grid") + ".")
    return lines


def _gaps(rows: list[Row], probes, lr: float, name: str, phase: str) -> list[float]:
    """Per seed at ``lr``, points of accuracy of ``name`` minus the largest population
    estimate's, over the probes of ``phase``."""
    return [100 * g for g in _per_phase(select(rows, lr=lr), probes, name, phase, phase_gap)]


def _enough(rows: list[Row], probes, phase: str) -> int | None:
    """:func:`enough_samples` over the probed runs of ``rows`` in ``phase``."""
    return enough_samples([(probes[r.run_dir], phases(r, probes[r.run_dir])[phase])
                           for r in rows if probes[r.run_dir]])


def paper_verdicts(rows: list[Row], probes) -> list[Verdict]:
    """The paper's claims about EMA, each against this grid's numbers (accuracy minus the
    largest population estimate's, in points; lower is worse)."""
    low, high = LEARNING_RATES[0], HIGH_LR
    slow, default = f"ema:{min(MOMENTA)}", "ema:0.1"
    gap = "EMA accuracy minus population accuracy (points)"
    return [
        judge_difference("EMA is worse early than late", SOURCE,
                         f"{gap}, end minus first epoch, lr {low:g}, momentum 0.1",
                         _gaps(rows, probes, low, default, "first epoch"),
                         _gaps(rows, probes, low, default, "end")),
        judge_difference("a large EMA momentum (slow average) is worse", SOURCE,
                         f"{gap}, momentum 0.1 minus {min(MOMENTA):g}, first epoch, lr {low:g}",
                         _gaps(rows, probes, low, slow, "first epoch"),
                         _gaps(rows, probes, low, default, "first epoch")),
        judge_difference("a large rate makes EMA worse", SOURCE,
                         f"{gap}, lr {low:g} minus lr {high:g}, final weights, momentum 0.1",
                         _gaps(rows, probes, high, default, "end"),
                         _gaps(rows, probes, low, default, "end"))]


def samples_needed(rows: list[Row], probes) -> list[str]:
    """How many samples precise BN needed here, beside the paper's 10^3-10^4."""
    lines = []
    needed = [n for lr in LEARNING_RATES for phase in ("first epoch", "end")
              if (n := _enough(select(rows, lr=lr), probes, phase)) is not None]
    if needed:
        within = all(PAPER_SAMPLES[0] <= n <= PAPER_SAMPLES[1] for n in needed)
        here = f"{min(needed)}" if min(needed) == max(needed) else f"{min(needed)}-{max(needed)}"
        lines.append(f"- precise BN needs 10^3-10^4 samples: here {here} (the smallest N within "
                     f"{100 * ENOUGH:g} points of the largest N's accuracy, at each rate and "
                     f"phase): **{'agrees' if within else 'disagrees'}**.")
    return lines


def enough_samples(per_seed: list[tuple[list[dict[str, Any]], Callable[[int], bool]]]) -> int | None:
    """The smallest N whose accuracy minus the largest N's, per seed the mean over the probes
    its filter selects, then the mean over seeds, is at least ``-ENOUGH`` (None without
    probes). ``per_seed``: each seed's records and step filter."""
    if not per_seed or not per_seed[0][0]:
        return None
    pops = [n for n in estimators(per_seed[0][0]) if n.startswith("pop:")]
    for name in pops:
        gaps = [phase_gap(recs, name, f) for recs, f in per_seed]
        gaps = [g for g in gaps if not math.isnan(g)]
        if gaps and sum(gaps) / len(gaps) >= -ENOUGH:
            return int(name[4:])
    return None


def _beside_paper(n: int) -> str:
    low, high = PAPER_SAMPLES
    if n < low:
        return "fewer than the paper's 10^3-10^4"
    return "within the paper's 10^3-10^4" if n <= high else "more than the paper's 10^3-10^4"


def lr_grid_note(out: Path) -> list[str]:
    rows = read_results(out.parent / "lr")
    if rows is None:
        return [f"- High rate: the default {HIGH_LR:g} (no finished `lr` experiment beside this one)."]
    rates = training_lrs(rows, bn=True)
    if not rates:
        return ["- The `lr` experiment beside this one finds no rate at which BN-LeNet trains."]
    best = (best_lr_per_model(out.parent / "lr") or {}).get(True)
    inside = HIGH_LR in rates
    return [f"- The `lr` experiment beside this one finds BN-LeNet training at lr "
            f"{', '.join(f'{r:g}' for r in rates)}"
            + (f" (best {best:g})" if best is not None else "")
            + f"; this grid's high rate {HIGH_LR:g} is "
            + ("among them." if inside else "**not** among them (read its rows with care).")]


# --------------------------------------------------------------------------- plots

def _curves(group: list[Row], probes, value) -> dict[str, tuple[list[int], list[float], list[float]]]:
    recs = [probes[r.run_dir] for r in group if probes[r.run_dir]]
    if not recs:
        return {}
    steps = sorted({rec["step"] for rs in recs for rec in rs})
    curves = {}
    for name in estimators(recs[0]):
        xs, means, halves = [], [], []
        for s in steps:
            values = [value(rec, name) for rs in recs for rec in rs if rec["step"] == s]
            if values:
                mean, half = mean_ci(values)
                xs.append(s)
                means.append(mean)
                halves.append(half or 0.0)
        curves[_describe(name)] = (xs, means, halves)
    return curves


STEP_AXIS = f"training step (symlog: linear up to {FIRST_EPOCH_EVERY})"


def plot_accuracy(rows: list[Row], probes, path: Path) -> None:
    fig, axes = plt.subplots(1, len(LEARNING_RATES), figsize=(6 * len(LEARNING_RATES), 4.5),
                             squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], LEARNING_RATES):
        curves = _curves(select(rows, lr=lr), probes, lambda rec, n: rec["acc"][n])
        if curves:
            plot_mean_curves(curves, ax, "test accuracy", epochs=False)
        log_axis(ax, "x", linthresh=FIRST_EPOCH_EVERY, label=STEP_AXIS)
        ax.set_title(f"BN-LeNet lr={lr:g}: the same weights with each estimate (mean, 95% CI)")
        legend(ax)
    save_figure(fig, path)


def plot_gap(rows: list[Row], probes, path: Path) -> None:
    fig, axes = plt.subplots(2, len(LEARNING_RATES), figsize=(6 * len(LEARNING_RATES), 8),
                             squeeze=False)
    for col, lr in enumerate(LEARNING_RATES):
        group = select(rows, lr=lr)
        for row_i, what in enumerate(("mean", "variance")):
            ax = axes[row_i][col]

            def gap(rec, name, i=row_i):
                ref = rec["channel"][largest_population([rec])]
                return abs(rec["channel"][name][i] - ref[i])

            for label, (xs, means, _) in _curves(group, probes, gap).items():
                if label.startswith("EMA") or label.endswith(f"N = {SAMPLES[0]}"):
                    ax.plot(xs, [max(m, 1e-12) for m in means], label=label)
            log_axis(ax, "x", linthresh=FIRST_EPOCH_EVERY, label=STEP_AXIS)
            unit = "activation units" + ("" if what == "mean" else " squared")
            log_axis(ax, "y", label=f"|estimate - population| of the {what} ({unit})")
            ax.set_title(f"lr={lr:g}: channel 0 of the last batch norm (mean over seeds)")
            legend(ax)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="precise",
    title="Paper: EMA vs population batch-norm statistics",
    question="Evaluating the same weights during training, when are batch norm's EMA running "
             "statistics wrong (early, at a high learning rate, with a large momentum), and how "
             "many samples does a population estimate need (Wu & Johnson: 10^3-10^4)?",
    variants=variants,
    analyze=analyze,
    default_epochs=3,
    default_subset=0,
    notes=f"BN-LeNet at lr {', '.join(f'{lr:g}' for lr in LEARNING_RATES)}, batch 128, plain SGD; "
          f"probes every {FIRST_EPOCH_EVERY} steps in epoch 1 and after every epoch, EMA momentum "
          f"{', '.join(map(str, MOMENTA))} (shadow EMAs of one training), population over N in "
          f"{list(SAMPLES)}. Default: 3 epochs on all 60000 images (N up to 60000 needs them all), "
          "3 seeds, sized to fit 40 minutes on 2 cores with --jobs 2: the probes (8 test "
          "evaluations and 5 population passes each), run one run after another in the "
          "analysis, cost more than the training.",
)
