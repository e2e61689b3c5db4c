"""Paper: EMA vs population statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3).

Why: batch norm predicts with running statistics, an exponential moving average (EMA) of
batch statistics gathered while the weights were still moving. Wu & Johnson show that
the EMA can be far from the population statistics of the *current* weights (early in
training, with a large EMA momentum, at a high learning rate, in large-batch training with
momentum SGD and weight decay) and that recomputing them ("precise BN",
``bnlab.nn.precise``) needs only 10^3-10^4 samples.

The grid, BN-LeNet (bnlab's BN) in three arms (:data:`ARMS`), each for the same epochs on the
same images:

- *chapter*: lr 0.1, batch 128, plain SGD (the chapter's protocol);
- *high rate*: lr :data:`HIGH_LR`, batch 128, plain SGD: each step moves the weights 30 times
  as far;
- *Wu & Johnson*: their regime, SGD with momentum 0.9 and weight decay 5e-4 at batch 1024,
  the rate scaled linearly from the chapter's 0.1 at 128 (Goyal et al. 2017): lr 0.8, and
  8 times fewer steps per epoch.

Both rates above 0.1 are fixed in advance, not tuned. Whether every arm trains is read on
the validation split (a seed whose final validation accuracy is at most
``analysis.FAIL_ACCURACY``, or that diverged, fails); a claim about an arm that does not train
is not judged. The report also reads a finished ``lr`` grid beside this one (its rates are
judged on validation) and says whether :data:`HIGH_LR` trains there.

Probes: every run is re-played (``experiments.probed``) and probed at the same fractions of
training in every arm, every 1/8 epoch in the first epoch and every 1/2 epoch after it
(step 0: the initial weights). At each probe the *same weights* are evaluated on the test
set (``--quick``: a class-stratified :data:`QUICK_TEST_IMAGES` of it) with:

- EMA statistics of momentum m in :data:`MOMENTA`, torch's convention
  ``running = (1 - m) * running + m * batch`` (m = 0.9 weights the newest batch 0.9),
  started at (mean 0, variance 1) as batch norm's buffers are;
- population statistics (``bnlab.nn.precise.population_statistics``, one pass) of the
  first N training samples of a fixed shuffle of the run's training images (epoch 0 of its
  loader, an order no training epoch uses), in batches of the run's own size (the
  normalization batch it trained with), N in :data:`SAMPLES` rounded up to whole batches,
  and the whole training set: the *population*, the reference of every difference.

How three momenta come from one training: shadow EMAs (:class:`ShadowEMA`). Before the
replay's first step, forward pre-hooks are attached to every batch norm; on each training
forward they take the layer input's per-channel mean and unbiased variance (what batch
norm averages) and update one pair of shadow buffers per momentum with the rule above.
Train-mode batch norm normalizes with the batch's own statistics and its running
statistics never feed back into training, so the trajectory is the run's own (the replay
checks it ends on the run's weights), every momentum sees the same weights and batches,
and nothing trains three times; the shadow of momentum 0.1 equals the model's own
buffers. The hooks are off during probes.

The measure (calibrated in every report on :mod:`bn_calibration`'s one-hot model, whose
answer is known exactly): *EMA - population*, the test accuracy of the weights with an
estimate minus with the population statistics, in points, per probe. A run's value in a
phase is its mean over the phase's probes: *first epoch* (after step 0 up to the end of
epoch 1), *end* (the final weights), *over training* (every probe after step 0). Verdicts
pair the seeds (the arms share them); the claims and how each is judged are in
:func:`paper_verdicts`. The gap plot follows one fixed channel, channel 0 of the last batch
norm (``fc2``'s, where the drift of every layer below adds up).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.data.loader import Loader, stratified_subset
from bnlab.experiments import bn_calibration
from bnlab.experiments.analysis import (
    FAIL_ACCURACY,
    Row,
    best_lr_per_model,
    chosen_on_validation,
    failed,
    plot_mean_curves,
    read_results,
    select,
    training_lrs,
)
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    judge_same,
    not_measured,
)
from bnlab.experiments.probed import cached_replay
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import difference, format_mean_ci, mean_ci
from bnlab.nn.precise import Statistics, batch_norm_layers, population_statistics
from bnlab.training.train import TrainConfig, build_loaders, evaluate, resolve_device
from bnlab.util.plots import epoch_axis, legend, log_axis, plt, reference_line, save_figure
from bnlab.util.tables import counted, format_table

SOURCE = "Wu & Johnson 2021"
BASE_LR, BASE_BATCH = 0.1, 128
HIGH_LR = 3.0
"""The high rate: each plain-SGD step moves the weights 30 times as far as at 0.1, which is
what the EMA has to follow. Fixed in advance; whether it trains is read on validation."""
WJ_BATCH, WJ_MOMENTUM, WJ_WEIGHT_DECAY = 1024, 0.9, 5e-4
"""Wu & Johnson's regime: large batch, SGD momentum and weight decay (their ResNet-50's)."""


@dataclass(frozen=True)
class Arm:
    """One arm of the grid: its short name, its settings in words, and the TrainConfig
    fields it sets."""

    short: str
    settings: str
    params: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.short} ({self.settings})"

    @property
    def title(self) -> str:
        """The name on two lines, for a panel's title."""
        return f"{self.short}\n{self.settings}"


ARMS = {
    "chapter": Arm("chapter", "lr 0.1, batch 128", {"lr": BASE_LR, "batch_size": BASE_BATCH}),
    "high rate": Arm("high rate", f"lr {HIGH_LR:g}, batch 128",
                     {"lr": HIGH_LR, "batch_size": BASE_BATCH}),
    "wu-johnson": Arm("Wu & Johnson", f"lr {BASE_LR * WJ_BATCH / BASE_BATCH:g}, batch {WJ_BATCH}, "
                      f"momentum {WJ_MOMENTUM:g}, wd {WJ_WEIGHT_DECAY:g}",
                      {"lr": BASE_LR * WJ_BATCH / BASE_BATCH, "batch_size": WJ_BATCH,
                       "momentum": WJ_MOMENTUM, "weight_decay": WJ_WEIGHT_DECAY}),
}
MOMENTA = (0.01, 0.1, 0.9)
SAMPLES = (128, 1024, 4096, 10240)
"""Population estimates besides the whole training set: about 10^2, 10^3, 4·10^3 and 10^4
samples (Wu & Johnson's range is 10^3-10^4), in whole batches of 128 (and of 1024)."""
PAPER_LOW, PAPER_HIGH = 1024, 10240
"""The N that stand for the paper's 10^3 and 10^4 samples."""
MARGIN = 0.5
"""Points of test accuracy within which a population estimate counts as accurate (as the
whole training set's): the equivalence margin of the sample-count verdicts, fixed in advance."""
FIRST_EPOCH_PROBES, LATER_EPOCH_PROBES = 8, 2
QUICK_TEST_IMAGES = 2000
"""``--quick`` evaluates each probe on this many test images (class-stratified)."""
PHASES = ("first epoch", "end", "over training")


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(f"BN-LeNet {arm.name}", {"model": "bn-lenet", "norm": "bnlab", **arm.params},
                    {"arm": key, "lr": arm.params["lr"]}) for key, arm in ARMS.items()]


def probe_steps(steps_per_epoch: int, epochs: int) -> list[int]:
    """Every 1/8 epoch in the first epoch, every 1/2 epoch after it, and the last step."""
    first = {round(k * steps_per_epoch / FIRST_EPOCH_PROBES) for k in range(FIRST_EPOCH_PROBES + 1)}
    later = {round(steps_per_epoch * (1 + k / LATER_EPOCH_PROBES))
             for k in range(LATER_EPOCH_PROBES * (epochs - 1) + 1)}
    return sorted(first | later | {steps_per_epoch * epochs})


def sample_sizes(n_train: int, batch_size: int) -> list[int]:
    """:data:`SAMPLES` in whole batches of ``batch_size``, capped at the training set's size,
    and the whole training set (the last: the reference); duplicates dropped."""
    return sorted({min(math.ceil(n / batch_size) * batch_size, n_train) for n in SAMPLES} | {n_train})


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

    def of(self, momentum: float) -> Statistics:
        """The shadow statistics of ``momentum``, per layer name."""
        return {name: per[momentum] for name, per in self.stats.items()}

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


def _statistics(model: nn.Module) -> Statistics:
    return {name: (layer.running_mean.clone(), layer.running_var.clone())
            for name, layer in batch_norm_layers(model)}


@torch.no_grad()
def _load_statistics(model: nn.Module, stats: Statistics) -> None:
    for name, layer in batch_norm_layers(model):
        layer.running_mean.copy_(stats[name][0])
        layer.running_var.copy_(stats[name][1])


def accuracy_with(model: nn.Module, stats: Statistics, batches: Iterable) -> float:
    """Eval-mode accuracy of ``model`` over ``batches`` with its batch norms' running
    statistics replaced by ``stats``; its own are put back."""
    own = _statistics(model)
    try:
        _load_statistics(model, stats)
        return evaluate(model, batches)[1]
    finally:
        _load_statistics(model, own)


def statistics_error(est: Statistics, pop: Statistics, eps: float = 1e-5) -> list[float]:
    """Over every channel of every layer: mean ``|mu_est - mu_pop| / sqrt(var_pop + eps)`` and
    mean ``|log(var_est / var_pop)|`` (0 when the estimate is the population)."""
    mean_err = torch.cat([(est[n][0] - pop[n][0]).abs().double() / (pop[n][1].double() + eps).sqrt()
                          for n in pop])
    var_err = torch.cat([((est[n][1].double() + eps) / (pop[n][1].double() + eps)).log().abs()
                         for n in pop])
    return [mean_err.mean().item(), var_err.mean().item()]


def probe_record(model: nn.Module, estimates: dict[str, Statistics], batches: Iterable) -> dict[str, Any]:
    """What a probe keeps of one set of weights: per estimate (``ema:M``, ``pop:N``, the
    largest N last: the reference), the accuracy over ``batches`` with it, channel 0 of the
    last batch norm's (mean, variance), and :func:`statistics_error` against the reference."""
    reference = estimates[population_names(estimates)[-1]]
    last = list(reference)[-1]
    record: dict[str, Any] = {"acc": {}, "channel": {}, "error": {}}
    for name, stats in estimates.items():
        record["acc"][name] = accuracy_with(model, stats, batches)
        record["channel"][name] = [stats[last][0][0].item(), stats[last][1][0].item()]
        record["error"][name] = statistics_error(stats, reference)
    return record


def probe_test_set(config: TrainConfig, dataset, images: int | None) -> Loader:
    """The probes' test images: the whole test set, or a class-stratified ``images`` of it."""
    device = resolve_device(config.device)
    test = build_loaders(config, dataset, device).test
    if images is None or images >= len(test.labels):
        return test
    return Loader(*stratified_subset(dataset.test_images, dataset.test_labels, images),
                  config.eval_batch_size, shuffle=False, device=device)


def make_probe(config: TrainConfig, dataset, shadows: ShadowEMA,
               test_images: int | None = None) -> Callable[..., dict[str, Any]]:
    """The probe of one run: :func:`probe_record` of the current weights with each EMA and
    each population estimate; the model's own buffers are left as they were."""
    population = build_loaders(config, dataset, resolve_device(config.device)).train
    sizes = sample_sizes(len(population.labels), population.batch_size)
    test = probe_test_set(config, dataset, test_images)

    def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, Any]:
        shadows.active = False
        try:
            population.set_epoch(0)  # a fixed shuffle no training epoch uses
            counts = [math.ceil(n / population.batch_size) for n in sizes]
            estimates = {f"ema:{m:g}": shadows.of(m) for m in shadows.momenta}
            estimates.update({f"pop:{n}": stats for n, stats in zip(
                sizes, population_statistics(model, population, counts))})
            return probe_record(model, estimates, test)
        finally:
            shadows.active = True

    return probe


def measure(row: Row, dataset, test_images: int | None = None) -> dict[str, Any]:
    """The run's probes (cached in its folder as ``precise-probes.json``)."""
    shadows = ShadowEMA()  # one replay per call: its hooks and its probe share it

    def steps_for(config: TrainConfig) -> list[int]:
        train = build_loaders(config, dataset, "cpu").train
        return probe_steps(len(train), config.epochs)

    return cached_replay(row.run_dir, "precise-probes",
                         {"version": 2, "momenta": list(MOMENTA), "samples": list(SAMPLES),
                          "test_images": test_images},
                         dataset, steps_for, lambda c: make_probe(c, dataset, shadows, test_images),
                         lambda c: shadows.attach)


# --------------------------------------------------------------------------- the measure

def population_names(estimates: Iterable[str]) -> list[str]:
    """The ``pop:N`` names among ``estimates``, ascending N (the last: the reference)."""
    return sorted((n for n in estimates if n.startswith("pop:")), key=lambda n: int(n[4:]))


def estimators(records: list[dict[str, Any]]) -> list[str]:
    """The estimator names of a run's records: ``ema:M`` then ``pop:N`` (ascending N)."""
    names = list(records[0]["acc"]) if records else []
    return [n for n in names if n.startswith("ema:")] + population_names(names)


def gap(record: dict[str, Any], name: str) -> float:
    """EMA - population: accuracy with ``name`` minus with the reference (the largest N), as a
    fraction; 0 for the reference itself."""
    return record["acc"][name] - record["acc"][population_names(record["acc"])[-1]]


def phase_gap(records: list[dict[str, Any]], name: str, steps: Callable[[int], bool]) -> float:
    """Mean :func:`gap` of ``name`` over the probes whose step passes ``steps`` (nan without)."""
    gaps = [gap(r, name) for r in records if steps(r["step"])]
    return sum(gaps) / len(gaps) if gaps else math.nan


def phases(row: Row, records: list[dict[str, Any]]) -> dict[str, Callable[[int], bool]]:
    """The probes of each of :data:`PHASES` (see the module docstring)."""
    per_epoch = row.steps_per_epoch
    last = records[-1]["step"] if records else -1
    return {"first epoch": lambda s: 0 < s <= per_epoch, "end": lambda s: s == last,
            "over training": lambda s: s > 0}


def calibration() -> list[Calibration]:
    """The EMA - population measure (:func:`probe_record`, :func:`gap`) on
    :mod:`bn_calibration`'s one-hot model: the population statistics of 1000 balanced
    training images; the "EMA" equal to them, or with the mean of the first k of the 10
    channels 2 class signals too high, which moves the images of those k classes to
    another class and nothing else: accuracy 1 - k/10, a gap of exactly -10k points."""
    model = bn_calibration.one_hot_model()
    labels = bn_calibration.balanced_labels(1000)
    images = bn_calibration.one_hot_images(labels)
    (population,) = population_statistics(model, Loader(images, labels, 100, shuffle=False), [10])
    test = Loader(images, labels, 250, shuffle=False)
    out = []
    for k in (0, 2, 5):
        name = next(iter(population))
        mean, var = population[name]
        wrong = {name: (mean + 2.0 * (torch.arange(len(mean)) < k), var)}
        record = probe_record(model, {"ema:wrong": wrong, "pop:1000": population}, test)
        read = 100 * gap(record, "ema:wrong")
        out.append(Calibration(
            "EMA - population (points of test accuracy)",
            "one-hot model, EMA = population statistics" if not k else
            f"one-hot model, EMA mean of {k} of 10 channels 2 class signals too high",
            f"{-10 * k:+.1f}", f"{read:+.1f}", abs(read + 10 * k) < 1e-9))
    return out


# --------------------------------------------------------------------------- analysis

def arm_rows(rows: list[Row], arm: str) -> list[Row]:
    return select(rows, arm=arm)


def per_seed(rows: list[Row], probes, value: Callable[[list[dict], Callable[[int], bool]], float],
             phase: str) -> dict[int, float]:
    """``{seed: value(records, phase filter)}`` over the probed runs of ``rows`` (nan left out)."""
    out = {}
    for r in rows:
        recs = probes.get(r.run_dir) or []
        if recs:
            v = value(recs, phases(r, recs)[phase])
            if not math.isnan(v):
                out[r.seed] = v
    return out


def gaps(rows: list[Row], probes, name: str, phase: str) -> dict[int, float]:
    """Per seed, points of EMA - population of estimator ``name`` over the probes of ``phase``."""
    return {s: 100 * g for s, g in per_seed(
        rows, probes, lambda recs, f: phase_gap(recs, name, f), phase).items()}


def accuracies(rows: list[Row], probes, name: str, phase: str) -> dict[int, float]:
    """Per seed, points of test accuracy with ``name`` over the probes of ``phase``."""
    def mean_acc(recs, f):
        values = [r["acc"][name] for r in recs if f(r["step"]) and name in r["acc"]]
        return sum(values) / len(values) if values else math.nan
    return {s: 100 * a for s, a in per_seed(rows, probes, mean_acc, phase).items()}


def _phase_error(records, name: str, steps) -> float:
    errs = [r["error"][name][0] for r in records if steps(r["step"])]
    return sum(errs) / len(errs) if errs else math.nan


def failures(rows: list[Row]) -> str:
    """``"1/3 failed"`` (diverged or at most FAIL_ACCURACY on validation); "" when none did."""
    bad = sum(failed(r) for r in rows)
    return f"{bad}/{len(rows)} failed" if bad else ""


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to probe)"],
                        calibration=calibration())
    images = QUICK_TEST_IMAGES if settings.quick else None
    measured = {r.run_dir: measure(r, dataset, images) for r in rows}
    probes = {run: m["records"] for run, m in measured.items()}
    reproduced = sum(m["reproduces_run"] is True for m in measured.values())
    plot_accuracy(rows, probes, out / "precise_accuracy.png")
    plot_departure(rows, probes, out / "precise_departure.png")
    plot_gap(rows, probes, out / "precise_gap.png")
    test = (f"a class-stratified {images} of the test images" if images
            else "the whole test set")
    sections = [
        "## EMA vs population statistics", "", phase_table(rows, probes), "",
        f"EMA - population: test accuracy ({test}) of the same weights with an estimate minus "
        "with the population statistics of the whole training set, in points; per run the "
        "mean over the probes of the phase (*first epoch*: after step 0 up to the end of "
        "epoch 1; *end*: the final weights; *over training*: every probe after step 0), then "
        "mean ± 95% CI over seeds. Error of the mean (final weights): over every channel of "
        "every batch norm, |mu_est - mu_pop| / sigma_pop.", "",
        "## When EMA departs, over training", "", *departure_tables(rows, probes), "",
        "EMA - population at each probe (points), mean ± 95% CI over seeds.", "",
        "![departure](precise_departure.png)", "",
        "## Population estimates from N samples", "", samples_table(rows, probes), "",
        "Accuracy with population statistics of the first N training samples (in whole "
        "batches of the run's own size) minus with the whole training set's, final weights "
        "(points).", "",
        "## Beside the paper", "",
        "Wu & Johnson (ResNet-50 on ImageNet, SGD with momentum 0.9, weight decay, a decaying "
        "rate) find EMA statistics inaccurate early in training, with a large EMA momentum, "
        "at a large rate and in large-batch training, and precise BN accurate with "
        "10^3-10^4 samples; here BN-LeNet on Fashion-MNIST for a few epochs at a constant "
        "rate, in three arms, one of them their optimizer and batch. Their momentum is the "
        "old average's weight, torch's (ours) the newest batch's: their 0.9 and 0.99 are our "
        "0.1 and 0.01.", "",
        "![accuracy](precise_accuracy.png)", "", "![gap](precise_gap.png)"]
    return Analysis(sections, findings(rows, probes, out, reproduced),
                    paper_verdicts(rows, probes), calibration())


def phase_table(rows: list[Row], probes) -> str:
    headers = ["arm", "statistics", *(f"EMA - population, {p}" for p in PHASES),
               "error of the mean, end"]
    table = []
    for key, arm in ARMS.items():
        group = arm_rows(rows, key)
        recs = [probes[r.run_dir] for r in group if probes.get(r.run_dir)]
        if not recs:
            continue
        for name in estimators(recs[0])[:-1]:  # the reference reads 0
            errors = per_seed(group, probes, lambda rs, f, n=name: _phase_error(rs, n, f), "end")
            table.append([arm.name, _describe(name),
                          *(format_mean_ci(list(gaps(group, probes, name, p).values()), ".2f")
                            for p in PHASES),
                          format_mean_ci(list(errors.values()), ".3g")])
    return format_table(headers, table)


def _describe(name: str) -> str:
    kind, _, value = name.partition(":")
    return f"EMA momentum {value}" if kind == "ema" else f"population, N = {value}"


def _probe_gaps(group: list[Row], probes, name: str) -> dict[int, dict[int, float]]:
    """Per probe step, ``{seed: points of EMA - population}`` of ``name``."""
    out: dict[int, dict[int, float]] = {}
    for r in group:
        for rec in probes.get(r.run_dir) or []:
            if rec["step"] > 0 and name in rec["acc"]:
                out.setdefault(rec["step"], {})[r.seed] = 100 * gap(rec, name)
    return dict(sorted(out.items()))


def departure_tables(rows: list[Row], probes) -> list[str]:
    lines = []
    for key, arm in ARMS.items():
        group = arm_rows(rows, key)
        if not any(probes.get(r.run_dir) for r in group):
            continue
        per_epoch = group[0].steps_per_epoch
        per_momentum = {m: _probe_gaps(group, probes, f"ema:{m:g}") for m in MOMENTA}
        steps = sorted({s for g in per_momentum.values() for s in g})
        table = [[str(s), f"{s / per_epoch:.3g}",
                  *(format_mean_ci(list(per_momentum[m].get(s, {}).values()), ".2f")
                    for m in MOMENTA)] for s in steps]
        lines += [f"**{arm.name}**", "", format_table(
            ["step", "epoch", *(f"EMA {m:g} - population" for m in MOMENTA)], table), ""]
    return lines[:-1]


def samples_table(rows: list[Row], probes) -> str:
    table = []
    for key, arm in ARMS.items():
        group = arm_rows(rows, key)
        recs = [probes[r.run_dir] for r in group if probes.get(r.run_dir)]
        if not recs:
            continue
        for name in population_names(recs[0][0]["acc"])[:-1]:
            table.append([arm.name, name[4:],
                          format_mean_ci(list(gaps(group, probes, name, "end").values()), ".2f")])
    return format_table(["arm", "N", "population(N) - population (points), end"], table)


def departures(group: list[Row], probes, name: str) -> list[tuple[int, Any]]:
    """Per probe step after 0, the paired interval of EMA - population (points) of ``name``
    over seeds (``stats.difference`` against 0)."""
    return [(step, difference({s: 0.0 for s in values}, values))
            for step, values in _probe_gaps(group, probes, name).items()]


def findings(rows: list[Row], probes, out: Path, reproduced: int) -> list[str]:
    lines = []
    for key, arm in ARMS.items():
        group = arm_rows(rows, key)
        if not group:
            continue
        if failures(group):
            lines.append(f"- {arm.name}: {failures(group)} to train (validation accuracy at most "
                         f"{FAIL_ACCURACY:g} or diverged); its rows are not judged.")
        if not any(probes.get(r.run_dir) for r in group):
            continue
        per_epoch = group[0].steps_per_epoch
        for m in MOMENTA:
            measured = departures(group, probes, f"ema:{m:g}")
            below = [s for s, d in measured if d.n >= 2 and d.high < 0]
            measured = [(s, d) for s, d in measured if d.n >= 1]
            if not measured:
                continue
            worst_step, worst = min(measured, key=lambda sd: sd[1].effect)
            where = (f"at {counted(len(below), 'probe')} of {len(measured)}, first at epoch "
                     f"{below[0] / per_epoch:.3g} (step {below[0]})" if below else "at no probe")
            lines.append(f"- {arm.name}, EMA momentum {m:g}: below the population statistics "
                         f"(95% interval under 0) {where}; largest departure "
                         f"{worst.effect:+.2f} points [{worst.low:+.2f}, {worst.high:+.2f}] at "
                         f"epoch {worst_step / per_epoch:.3g}.")
        needed = needed_samples(group, probes)
        if needed:
            lines.append(f"- {arm.name}: per seed, the smallest N within {MARGIN:g} points of the "
                         "whole training set (final weights): "
                         + ", ".join(f"seed {s}: {n if n else 'only the whole set'}"
                                     for s, n in needed.items())
                         + " (Wu & Johnson: 10^3-10^4).")
    lines += lr_grid_note(out)
    lines.append(f"- Replays that end on exactly the run's checkpointed weights: {reproduced} of "
                 f"{len(rows)} (the probes measured the runs' own trajectories).")
    return lines


def needed_samples(rows: list[Row], probes) -> dict[int, int | None]:
    """Per seed, the smallest N whose accuracy with the final weights is within
    :data:`MARGIN` points of the whole training set's (None: none smaller is)."""
    out = {}
    for r in rows:
        recs = probes.get(r.run_dir) or []
        if not recs:
            continue
        final = recs[-1]
        names = population_names(final["acc"])
        out[r.seed] = next((int(n[4:]) for n in names[:-1]
                            if 100 * gap(final, n) >= -MARGIN), None)
    return out


def paper_verdicts(rows: list[Row], probes) -> list[Verdict]:
    """The paper's claims, each judged with the shared rule on per-seed values (paired), in
    points of EMA - population (lower: the EMA is worse):

    - EMA worse early than late: end minus first epoch > 0 (momentum 0.1), in the chapter's
      arm and in Wu & Johnson's;
    - a large EMA momentum (a slow average) is worse: momentum 0.1 minus 0.01 > 0, first
      epoch, in the same two arms;
    - a large rate, and large-batch momentum SGD, make EMA worse: the high-rate arm and Wu &
      Johnson's arm against the chapter's, first epoch, momentum 0.1, < 0;
    - precise BN is accurate with 10^3 and with 10^4 samples: in Wu & Johnson's arm, the
      final weights' accuracy with N = 1024 and N = 10240 against the whole training set's,
      the same within ±:data:`MARGIN` points (equivalence).

    A claim on an arm with a seed that does not train is not judged."""
    chapter, high, wj = (arm_rows(rows, k) for k in ARMS)
    unit = "EMA - population (points of test accuracy)"
    note = ("BN-LeNet (sigmoid) on Fashion-MNIST, a few epochs at a constant rate; theirs: "
            "ResNet-50 on ImageNet, momentum SGD with a decaying rate")
    verdicts = []
    for key in ("chapter", "wu-johnson"):
        group, name = arm_rows(rows, key), ARMS[key].name
        verdicts.append(_judge(
            group, f"EMA is worse early than late ({name})",
            f"{unit}, end minus first epoch, momentum 0.1", judge_difference,
            gaps(group, probes, "ema:0.1", "first epoch"), gaps(group, probes, "ema:0.1", "end"),
            paper="EMA far from the population statistics early in training", note=note))
        verdicts.append(_judge(
            group, f"a large EMA momentum (slow average) is worse ({name})",
            f"{unit}, momentum 0.1 minus 0.01, first epoch", judge_difference,
            gaps(group, probes, "ema:0.01", "first epoch"),
            gaps(group, probes, "ema:0.1", "first epoch"),
            paper="EMA momentum 0.99 (our 0.01) worse than 0.9 (our 0.1)", note=note))
    for key, group, claim, paper in (
            ("high rate", high, "a large learning rate makes EMA worse",
             "EMA inaccurate at a large learning rate"),
            ("wu-johnson", wj, "large-batch momentum SGD makes EMA worse",
             "EMA inaccurate in large-batch training (momentum SGD, weight decay)")):
        verdicts.append(_judge(
            chapter + group, claim, f"{unit}, {ARMS[key].name} minus the chapter's arm, first "
            "epoch, momentum 0.1", judge_difference,
            gaps(chapter, probes, "ema:0.1", "first epoch"),
            gaps(group, probes, "ema:0.1", "first epoch"), direction=-1, paper=paper, note=note))
    finals = [(probes.get(r.run_dir) or [{"acc": {}}])[-1]["acc"] for r in wj]
    for n, label in ((PAPER_HIGH, "10^4"), (PAPER_LOW, "10^3")):
        claim = f"precise BN is accurate with {label} samples"
        measure = (f"test accuracy (points) with population statistics of N = {n} minus of the "
                   f"whole training set, final weights, {ARMS['wu-johnson'].name}; "
                   f"equivalence margin ±{MARGIN:g}")
        if not wj or any(f"pop:{n}" not in acc or population_names(acc)[-1] == f"pop:{n}"
                         for acc in finals):
            verdicts.append(not_measured(claim, SOURCE, measure, f"no probed run has a population "
                                         f"estimate of N = {n} below its whole training set"))
            continue
        whole = population_names(finals[0])[-1]
        verdicts.append(_judge(
            wj, claim, measure, judge_same, accuracies(wj, probes, whole, "end"),
            accuracies(wj, probes, f"pop:{n}", "end"), margin=MARGIN,
            paper="10^3-10^4 samples give accurate population statistics", note=note))
    return verdicts


def _judge(group: list[Row], claim: str, measure: str, rule, a, b, **details) -> Verdict:
    """``rule(claim, SOURCE, measure, a, b, **details)``, or ``not_measured`` where the group
    has no runs or a seed of it does not train."""
    if not group:
        return not_measured(claim, SOURCE, measure, "no runs of this arm")
    if failures(group):
        return not_measured(claim, SOURCE, measure, "an arm does not train (validation "
                            f"accuracy at most {FAIL_ACCURACY:g}, or diverged)",
                            failed=failures(group))
    return rule(claim, SOURCE, measure, a, b, **details)


def lr_grid_note(out: Path) -> list[str]:
    rows = read_results(out.parent / "lr")
    rows = None if rows is None else [r for r in rows if chosen_on_validation(r)] or None
    if rows is None:
        return [f"- High rate: {HIGH_LR:g}, fixed in advance (no finished `lr` experiment with "
                "a validation split beside this one to compare with)."]
    rates = training_lrs(rows, bn=True)
    if not rates:
        return ["- The `lr` experiment beside this one finds no rate at which BN-LeNet trains."]
    best = (best_lr_per_model(out.parent / "lr") or {}).get(True)
    inside = HIGH_LR in rates
    return [f"- The `lr` experiment beside this one finds BN-LeNet training at lr "
            f"{', '.join(f'{r:g}' for r in rates)} (on its validation split)"
            + (f", best {best:g}" if best is not None else "")
            + f"; this grid's high rate {HIGH_LR:g} is "
            + ("among them." if inside else "**not** among them (read its rows with care).")]


# --------------------------------------------------------------------------- plots

Curves = dict[str, tuple[list[float], list[float], list[float]]]


def _curves(group: list[Row], probes, names: list[str], value) -> Curves:
    """Per estimator name, the mean and 95% CI half-width over seeds of ``value(record,
    name)`` at each probe, x in epochs."""
    recs = [probes[r.run_dir] for r in group if probes.get(r.run_dir)]
    if not recs:
        return {}
    per_epoch = group[0].steps_per_epoch
    steps = sorted({rec["step"] for rs in recs for rec in rs})
    curves = {}
    for name in names:
        xs, means, halves = [], [], []
        for s in steps:
            values = [value(rec, name) for rs in recs for rec in rs
                      if rec["step"] == s and name in rec["acc"]]
            if values:
                mean, half = mean_ci(values)
                xs.append(s / per_epoch)
                means.append(mean)
                halves.append(half or 0.0)
        if xs:
            curves[_describe(name)] = (xs, means, halves)
    return curves


def _shown(group: list[Row], probes) -> list[str]:
    """The estimators a panel draws: every EMA, N = 1024 (the paper's 10^3) and the whole set."""
    recs = [probes[r.run_dir] for r in group if probes.get(r.run_dir)]
    if not recs:
        return []
    names = estimators(recs[0])
    pops = population_names(names)
    return [n for n in names if n.startswith("ema:")] + sorted(
        {n for n in pops if n == f"pop:{PAPER_LOW}"} | {pops[-1]}, key=lambda n: int(n[4:]))


def _panels(n: int, height: float = 4.5, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(6.5 * n, height * rows), squeeze=False)
    return fig, axes


def plot_accuracy(rows: list[Row], probes, path: Path) -> None:
    fig, axes = _panels(len(ARMS))
    for ax, (key, arm) in zip(axes[0], ARMS.items()):
        group = arm_rows(rows, key)
        curves = _curves(group, probes, _shown(group, probes), lambda rec, n: rec["acc"][n])
        if curves:
            plot_mean_curves(curves, ax, "test accuracy", epochs=True)
            legend(ax)
        else:
            ax.set_ylabel("test accuracy")
            epoch_axis(ax)
        ax.set_title(f"{arm.title}: test accuracy with each estimate")
    save_figure(fig, path)


def plot_departure(rows: list[Row], probes, path: Path) -> None:
    fig, axes = _panels(len(ARMS))
    for ax, (key, arm) in zip(axes[0], ARMS.items()):
        group = arm_rows(rows, key)
        names = [f"ema:{m:g}" for m in MOMENTA]
        curves = _curves(group, probes, names, lambda rec, n: 100 * gap(rec, n))
        if curves:
            plot_mean_curves(curves, ax, "EMA - population (points of test accuracy)",
                             bounds=(-math.inf, math.inf))
            reference_line(ax, 0.0)
            legend(ax)
        else:
            ax.set_ylabel("EMA - population (points of test accuracy)")
            epoch_axis(ax)
        ax.set_title(f"{arm.title}: EMA minus population")
    save_figure(fig, path)


def plot_gap(rows: list[Row], probes, path: Path) -> None:
    fig, axes = _panels(len(ARMS), 5.0, rows=2)
    for col, (key, arm) in enumerate(ARMS.items()):
        group = arm_rows(rows, key)
        shown = [n for n in _shown(group, probes)][:-1]  # the reference reads 0
        for row_i, what in enumerate(("mean", "variance")):
            ax = axes[row_i][col]

            def distance(rec, name, i=row_i):
                ref = rec["channel"][population_names(rec["channel"])[-1]]
                return max(abs(rec["channel"][name][i] - ref[i]), 1e-12)

            curves = _curves(group, probes, shown, distance)
            for label, (xs, means, _) in curves.items():
                ax.plot(xs, means, label=label)
            label = f"|estimate - population|, {what}"
            if curves:
                log_axis(ax, "y", label=label)
                legend(ax)
            else:
                ax.set_ylabel(label)
            epoch_axis(ax)
            if not row_i:
                ax.set_title(arm.title)
    fig.suptitle("Channel 0 of the last batch norm: distance of each estimate from the "
                 "population statistics, in activation units (mean; variance: squared units), "
                 "mean over seeds")
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="precise",
    title="Paper: EMA vs population batch-norm statistics",
    question="Evaluating the same weights during training, when and by how much are batch "
             "norm's EMA running statistics wrong (early, with a large momentum, at a high "
             "learning rate, in large-batch momentum SGD as Wu & Johnson train), and how many "
             "samples does a population estimate need (Wu & Johnson: 10^3-10^4)?",
    variants=variants,
    analyze=analyze,
    default_epochs=3,
    default_subset=0,  # all the images the validation split leaves: the largest N is 5·10^4
    notes=f"BN-LeNet in three arms trained on the same images for the same epochs: lr "
          f"{BASE_LR:g} and lr {HIGH_LR:g} at batch {BASE_BATCH} with plain SGD, and Wu & "
          f"Johnson's regime, batch {WJ_BATCH} with momentum {WJ_MOMENTUM:g} and weight decay "
          f"{WJ_WEIGHT_DECAY:g} at lr {BASE_LR * WJ_BATCH / BASE_BATCH:g} (0.1 at 128 scaled "
          "linearly). Each run is replayed and probed every 1/8 epoch in the first epoch and "
          "every 1/2 epoch after it: test accuracy of the same weights with EMA statistics of "
          f"momentum {', '.join(map(str, MOMENTA))} (shadow EMAs of one training) and with "
          f"population statistics of N in {list(SAMPLES)} samples and of the whole training "
          "set (one pass; whole batches of the run's own size), N capped at the training set.",
)
