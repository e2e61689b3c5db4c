"""Paper: batch norm and weight decay (van Laarhoven 2017; Hoffer et al. 2018; Li & Arora 2020;
Wan et al. 2021; Summers & Dinneen 2020).

Why: a weight whose output goes into a batch norm does not change the loss when it is
rescaled, so weight decay does not regularize it: it shrinks ``||w||`` and so raises the
effective learning rate ``eta / ||w||^2``, and gradient steps (which grow ``||w||``) and
weight decay settle at an equilibrium of the angular update per step
(``bnlab.probes.spherical``, where the predictions and their sources are). This grid
measures that equilibrium in training and asks whether weight decay on batch norm's
gamma/beta and on the scale-invariant weights changes accuracy.

The grid: BN-LeNet (bnlab's BN) and the same network without norm layers ("no BN"), batch
128, SGD at the effective rates ``eta / (1 - mu)`` in :data:`EFFECTIVE_LRS`, without momentum
and with ``mu = 0.9`` (then ``eta = eta_eff (1 - mu)``, so both move the weights alike per
step), weight decay ``lambda`` in :data:`WEIGHT_DECAYS` (0 included); and, at
:data:`ABLATION`'s setting, BN-LeNet with weight decay left off gamma/beta
(``TrainConfig.norm_weight_decay``) or off the scale-invariant weights
(``TrainConfig.invariant_weight_decay``), at each ``lambda > 0``.

Every run records its conv/linear weights at every step, averaged over windows of
:data:`WINDOW` steps (``TrainConfig.spherical_every``): ``||w||``, the effective learning rate,
the angle between successive weights and ``L = ||w||^2 ||g||^2``. Why on the run and not by
a probed replay (``experiments.probed``): the monitor only reads the weights around each
step (the run's numbers are those of an unmonitored run), its windows go into each epoch's
metrics row, which the checkpoint carries, so a cut-off run resumes with them; and the
grid trains once, where a replay would train every run a second time.

The equilibrium of a run, per hidden weight layer (the four conv/linear layers before the
head; in BN-LeNet exactly its scale-invariant weights, in the no-BN net the same layers as a
control): over its last epoch, the mean angular update per step, the mean effective learning
rate, and ``||w||`` before the epoch's last step, each over its prediction (Wan et al.
2021, for torch's SGD with momentum mu):

* angular update ``sqrt(2 eta lambda / (1 + mu))``;
* ``||w||^4 = eta L / (lambda (1 - mu) (2 - eta lambda / (1 + mu)))``, L the epoch's mean;
* effective learning rate ``eta / ||w||^2`` at that norm.

A run's ratio is the mean over its hidden layers; the verdicts judge the ratio over seeds
against 1 with the margin :data:`MARGIN` (``findings.judge_same``, paired over seeds). The
weights start far from equilibrium (``||w||`` of fc1 is about 13 at initialization) and
shrink towards it by about ``(1 - eta_eff lambda)`` per step, so the tables give each
setting's ``T eta_eff lambda``, the number of such time constants in its T steps.

Accuracy (Summers & Dinneen 2020 list weight decay on gamma/beta among the things that
matter): ``lambda*`` is the weight decay whose fully decayed runs at :data:`ABLATION`'s
setting have the best mean final validation accuracy (a choice on the validation split);
the verdicts compare final test accuracy at ``lambda*`` with and without each part decayed,
and with ``lambda = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.experiments.analysis import FAIL_ACCURACY, Row, failed, final, plot_intervals, select
from bnlab.experiments.findings import (
    SUPPORTED,
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    judge_same,
    not_measured,
)
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import format_mean_ci
from bnlab.probes.spherical import (
    effective_lr,
    equilibrium_angular_update,
    equilibrium_weight_norm,
    simulate_spherical_motion,
)
from bnlab.training.models import build_model
from bnlab.training.weight_decay import exactly_scale_invariant, li_arora_gap, li_arora_growth
from bnlab.util.plots import count_axis, legend, log_axis, note_empty, plt, save_figure, style
from bnlab.util.tables import format_table

EFFECTIVE_LRS = (0.1, 1.0)
WEIGHT_DECAYS = (0.0, 1e-3, 1e-2)
MOMENTA = (0.0, 0.9)
MODELS = {True: ("BN", "bnlab"), False: ("no BN", "none")}
WINDOW = 100
"""Steps per recorded window (``TrainConfig.spherical_every``)."""
ABLATION = {"lr_eff": 0.1, "momentum": 0.9}
"""Where weight decay is left off a part: the chapter's rate 0.1 as an effective rate, with
the usual momentum 0.9."""
ABLATIONS = {"no decay on γ/β": {"norm_weight_decay": False},
             "no decay on scale-invariant weights": {"invariant_weight_decay": False}}
ALL_DECAYED = "all decayed"
MARGIN = 0.1
"""Equilibrium verdicts: measured / predicted within 1 ± 0.1."""
ACCURACY_MARGIN = 0.005
"""Accuracy verdicts: "unchanged" means a difference within ±0.5 points."""
GROWTH_MARGIN = 0.05
"""Growth verdicts: ||w|| "grows" when it ends more than 5% above its first window's value
(at an equilibrium it stays within noise of it)."""
WAN = "Wan et al. 2021"
QUANTITIES = {"angle": "angular update", "norm": "||w||", "effective_lr": "η/||w||²"}


def sgd_lr(lr_eff: float, momentum: float) -> float:
    """The SGD rate whose effective rate ``eta / (1 - mu)`` is ``lr_eff``."""
    return round(lr_eff * (1 - momentum), 12)


def _variant(bn: bool, lr_eff: float, momentum: float, wd: float, decay: str = ALL_DECAYED,
             fields: dict[str, Any] | None = None) -> Variant:
    name, norm = MODELS[bn]
    lr = sgd_lr(lr_eff, momentum)
    label = f"{name} lr={lr:g} mom={momentum:g} wd={wd:g}" + ("" if decay == ALL_DECAYED else f", {decay}")
    return Variant(label, {"model": "bn-lenet", "norm": norm, "lr": lr, "momentum": momentum,
                           "weight_decay": wd, "spherical_every": WINDOW, **(fields or {})},
                   {"part": "sweep" if decay == ALL_DECAYED else "ablation", "bn": bn,
                    "lr_eff": lr_eff, "lr": lr, "momentum": momentum, "wd": wd, "decay": decay})


def variants(settings: ExpSettings) -> list[Variant]:
    sweep = [_variant(bn, lr_eff, momentum, wd) for bn in MODELS for momentum in MOMENTA
             for lr_eff in EFFECTIVE_LRS for wd in WEIGHT_DECAYS]
    ablation = [_variant(True, ABLATION["lr_eff"], ABLATION["momentum"], wd, decay, fields)
                for decay, fields in ABLATIONS.items() for wd in WEIGHT_DECAYS if wd > 0]
    return sweep + ablation


# --------------------------------------------------------------------------- measurement

def windows(row: Row) -> list[dict[str, Any]]:
    """Every recorded window of the run (``TrainConfig.spherical_every``), in step order."""
    return [w for m in row.metrics for w in m.get("spherical", [])]


def hidden_layers(records: list[dict[str, Any]]) -> list[str]:
    """The weight layers of the records, in model order, but the last (the head)."""
    return list(dict.fromkeys(r["layer"] for r in records))[:-1]


def _weighted(records: list[dict[str, Any]], key: str) -> float:
    steps = sum(r["steps"] for r in records)
    return sum(r[key] * r["steps"] for r in records) / steps


def equilibrium(records: list[dict[str, Any]]) -> dict[str, float]:
    """One layer's windows of one epoch: the measured angle, norm and effective lr (step-
    weighted means; the norm of the last window) beside their predictions, and the ratios
    measured / predicted (nan where the prediction is 0 or infinite: no weight decay)."""
    last = records[-1]
    lr, wd, momentum = last["lr"], last["weight_decay"], last["momentum"]
    measured = {"angle": _weighted(records, "mean_angle"), "norm": last["norm"],
                "effective_lr": _weighted(records, "mean_effective_lr")}
    unit_grad_sq = _weighted(records, "mean_unit_grad_sq")
    norm = equilibrium_weight_norm(lr, wd, momentum, unit_grad_sq)
    predicted = {"angle": equilibrium_angular_update(lr, wd, momentum), "norm": norm,
                 "effective_lr": effective_lr(lr, norm) if 0 < norm < math.inf else math.nan}
    out = {**measured, **{f"predicted_{k}": v for k, v in predicted.items()}}
    for key in QUANTITIES:
        p = predicted[key]
        out[f"{key}_ratio"] = measured[key] / p if 0 < p < math.inf else math.nan
    return out


def run_equilibrium(row: Row) -> dict[str, dict[str, float]]:
    """Per hidden layer, :func:`equilibrium` over the run's last epoch ({} when it recorded
    nothing or diverged)."""
    if row.diverged or not row.metrics or "spherical" not in row.metrics[-1]:
        return {}
    last = row.metrics[-1]["spherical"]
    return {layer: equilibrium([r for r in last if r["layer"] == layer])
            for layer in hidden_layers(last)}


def layer_mean(per_layer: dict[str, dict[str, float]], key: str) -> float:
    """Mean over the hidden layers of ``key`` (nan without layers)."""
    values = [v[key] for v in per_layer.values()]
    return sum(values) / len(values) if values else math.nan


def norm_growth(row: Row) -> float:
    """Mean over the hidden layers of ``||w||`` at the end over ``||w||`` in the first window
    (before its last step): how much the norms grew (nan without records)."""
    records = windows(row)
    if row.diverged or not records:
        return math.nan
    layers = hidden_layers(records)
    ratios = [[r for r in records if r["layer"] == layer] for layer in layers]
    return sum(rs[-1]["norm"] / rs[0]["norm"] for rs in ratios) / len(ratios)


def time_constants(row: Row) -> float:
    """``T eta_eff lambda``: the run's steps in units of the time constant ``1 / (eta_eff
    lambda)`` of the norm's shrinking by weight decay."""
    return row.planned_steps * row.tags["lr_eff"] * row.tags["wd"]


Measured = dict[str, dict[str, dict[str, float]]]  # run_dir -> layer -> equilibrium


def per_seed(rows: list[Row], value: Callable[[Row], float]) -> dict[int, float]:
    """``value(row)`` by seed, for the rows that did not diverge (a run at chance level still
    moves its weights: its dynamics are measured, and its failure is counted beside them)."""
    return {r.seed: value(r) for r in rows if not r.diverged}


# --------------------------------------------------------------------------- analysis

def sweep_rows(rows: list[Row], bn: bool, momentum: float, lr_eff: float, wd: float) -> list[Row]:
    return select(rows, part="sweep", bn=bn, momentum=momentum, lr_eff=lr_eff, wd=wd)


def settings_of(rows: list[Row], bn: bool) -> list[tuple[float, float, float]]:
    """(momentum, lr_eff, wd) of the sweep's settings with rows, in grid order."""
    return [(m, e, w) for m in MOMENTA for e in EFFECTIVE_LRS for w in WEIGHT_DECAYS
            if sweep_rows(rows, bn, m, e, w)]


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    measured: Measured = {r.run_dir: run_equilibrium(r) for r in rows}
    plot_dynamics(rows, True, out / "decay_bn.png")
    plot_dynamics(rows, False, out / "decay_no_bn.png")
    chosen = chosen_weight_decay(rows)
    plot_accuracy(rows, out / "decay_accuracy.png")
    sections = [
        "## The equilibrium, BN-LeNet", "", equilibrium_table(rows, measured, True), "",
        "## The same measurements without batch norm (control)", "",
        equilibrium_table(rows, measured, False), "",
        "Per run, over its last epoch: the mean angular update per step (radians), the mean "
        "effective learning rate η/||w||² and ||w|| (before the epoch's last step) of each "
        "hidden weight layer, over the prediction (Wan et al. 2021: angle √(2ηλ/(1+μ)); "
        "||w||⁴ = ηL/(λ(1−μ)(2−ηλ/(1+μ))) with L = ||w||²||g||² the epoch's mean; η/||w||² at "
        "that norm), then the mean over the four hidden layers; mean ± 95% CI over seeds. "
        "T·η_eff·λ: the run's T steps in time constants 1/(η_eff λ) of the norm's shrinking "
        "by weight decay. Without weight decay there is no equilibrium (prediction 0 or "
        "infinite): '-'. Without batch norm the weights are not scale-invariant and the "
        "prediction does not apply: the control shows what the same formula reads there.", "",
        "## Per layer, BN-LeNet", "", layer_table(rows, measured), "",
        "![BN-LeNet](decay_bn.png)", "", "![no BN](decay_no_bn.png)", "",
        "## Weight decay on γ/β and on the scale-invariant weights", "",
        accuracy_table(rows), "",
        f"BN-LeNet at effective rate {ABLATION['lr_eff']:g} (η = "
        f"{sgd_lr(ABLATION['lr_eff'], ABLATION['momentum']):g}, momentum "
        f"{ABLATION['momentum']:g}); final accuracy, mean ± 95% CI over seeds. λ* = "
        + (f"{chosen:g}" if chosen is not None else "-") + ", the weight decay whose fully "
        "decayed runs have the best mean final validation accuracy (chosen on the validation "
        "split; the verdicts compare test accuracy there).", "",
        "![accuracy](decay_accuracy.png)"]
    return Analysis(sections, findings(rows, measured, chosen),
                    equilibrium_verdicts(rows, measured) + growth_verdicts(rows)
                    + accuracy_verdicts(rows, chosen),
                    calibrate())


def _cell(rows: list[Row], value: Callable[[Row], float], spec: str = ".3f") -> str:
    values = list(per_seed(rows, value).values())
    finite = [v for v in values if math.isfinite(v)]
    return format_mean_ci(finite, spec) if finite else "-"


def equilibrium_table(rows: list[Row], measured: Measured, bn: bool) -> str:
    table = []
    for momentum, lr_eff, wd in settings_of(rows, bn):
        group = sweep_rows(rows, bn, momentum, lr_eff, wd)
        mean = {key: (lambda r, k=key: layer_mean(measured[r.run_dir], k))
                for key in ("angle", "predicted_angle", *(f"{q}_ratio" for q in QUANTITIES))}
        fails = sum(map(failed, group))
        table.append([f"{lr_eff:g}", f"{momentum:g} ({sgd_lr(lr_eff, momentum):g})", f"{wd:g}",
                      f"{time_constants(group[0]):.3g}", _cell(group, mean["angle"], ".4f"),
                      f"{equilibrium_angular_update(group[0].tags['lr'], wd, momentum):.4f}",
                      *(_cell(group, mean[f"{q}_ratio"]) for q in QUANTITIES),
                      _cell(group, lambda r: final(r, "final_test_acc"), ".4f"),
                      f"{fails}/{len(group)}"])
    return format_table(["η_eff", "μ (η)", "λ", "T·η_eff·λ", "angle (rad)", "predicted",
                         *(f"{name} / predicted" for name in QUANTITIES.values()),
                         "final test acc", "failed"], table)


def layer_table(rows: list[Row], measured: Measured) -> str:
    layers = next((list(m) for m in measured.values() if m), [])
    table = []
    for momentum, lr_eff, wd in settings_of(rows, True):
        if wd == 0:
            continue
        group = sweep_rows(rows, True, momentum, lr_eff, wd)
        for q, name in QUANTITIES.items():
            table.append([f"{lr_eff:g}", f"{momentum:g}", f"{wd:g}", f"{name} / predicted", *(
                _cell(group, lambda r, la=layer, k=f"{q}_ratio":
                      measured[r.run_dir].get(la, {}).get(k, math.nan)) for layer in layers)])
    return format_table(["η_eff", "μ", "λ", "measure", *layer_labels(layers)], table) if table \
        else "(no BN-LeNet run with weight decay)"


def layer_labels(names: list[str]) -> list[str]:
    """BN-LeNet's parameter names as readable column heads: ``0.weight`` -> ``conv 1 (0.weight)``,
    numbered per kind in model order."""
    model = build_model("bn-lenet")
    counts: dict[str, int] = {}
    labels = []
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        kind = {nn.Conv2d: "conv", nn.Linear: "linear"}.get(type(module), type(module).__name__)
        counts[kind] = counts.get(kind, 0) + 1
        labels.append(f"{kind} {counts[kind]} ({name})")
    return labels


def ablation_rows(rows: list[Row], wd: float, decay: str) -> list[Row]:
    """The runs at :data:`ABLATION`'s setting with weight decay ``wd`` and ``decay``."""
    return select(rows, bn=True, momentum=ABLATION["momentum"], lr_eff=ABLATION["lr_eff"], wd=wd,
                  decay=decay)


def chosen_weight_decay(rows: list[Row]) -> float | None:
    """λ*: of the weight decays > 0, the one whose fully decayed runs at :data:`ABLATION`'s
    setting have the best mean final validation accuracy (a failed seed counting at chance);
    ties to the smaller; None without such runs."""
    scores = {}
    for wd in WEIGHT_DECAYS:
        group = ablation_rows(rows, wd, ALL_DECAYED)
        if wd > 0 and group:
            scores[wd] = sum(final(r) for r in group) / len(group)
    return max(sorted(scores), key=lambda wd: scores[wd], default=None)


def accuracy_table(rows: list[Row]) -> str:
    table = []
    for wd in WEIGHT_DECAYS:
        for decay in (ALL_DECAYED, *ABLATIONS):
            group = ablation_rows(rows, wd, decay)
            if group:
                table.append([f"{wd:g}", decay if wd else "(no weight decay)",
                              format_mean_ci([final(r) for r in group]),
                              format_mean_ci([final(r, "final_test_acc") for r in group]),
                              f"{sum(map(failed, group))}/{len(group)}"])
    return format_table(["λ", "weight decay on", "final val acc", "final test acc", "failed"], table)


# --------------------------------------------------------------------------- verdicts

def _failed_note(rows: list[Row]) -> str:
    bad = sum(map(failed, rows))
    return f"{bad}/{len(rows)} failed (diverged or at chance)" if bad else ""


def equilibrium_verdict(rows: list[Row], measured: Measured, bn: bool, momentum: float,
                        lr_eff: float, wd: float, key: str) -> Verdict:
    """The setting's last-epoch ``key`` (angle or norm) over its prediction, mean over the
    hidden layers, judged against 1 with the margin :data:`MARGIN` over seeds."""
    group = sweep_rows(rows, bn, momentum, lr_eff, wd)
    lr = sgd_lr(lr_eff, momentum)
    setting = f"{MODELS[bn][0]}, η {lr:g}, μ {momentum:g}, λ {wd:g}"
    claim, paper = {
        "angle": (f"the angular update settles at √(2ηλ/(1+μ)) ({setting})",
                  f"√(2ηλ/(1+μ)) = {equilibrium_angular_update(lr, wd, momentum):.4f} rad per step"),
        "norm": (f"||w|| settles at Wan et al.'s equilibrium norm ({setting})",
                 "||w||⁴ = ηL/(λ(1−μ)(2−ηλ/(1+μ))), L measured")}[key]
    ratio = per_seed(group, lambda r: layer_mean(measured[r.run_dir], f"{key}_ratio"))
    layers = "scale-invariant layers" if bn else "hidden layers (not scale-invariant)"
    return judge_same(
        claim, WAN, f"last-epoch {QUANTITIES[key]} / prediction, mean over the 4 {layers} "
        f"(margin ±{MARGIN:g})", {s: 1.0 for s in ratio}, ratio, MARGIN, paper=paper,
        note=f"BN-LeNet{'' if bn else ' without BN'} on Fashion-MNIST, batch 128; T·η_eff·λ = "
             f"{time_constants(group[0]):.3g} time constants of the norm's shrinking in the run "
             "(the prediction is for equilibrium)", failed=_failed_note(group),
        evidence="The equilibrium, BN-LeNet")


def equilibrium_verdicts(rows: list[Row], measured: Measured) -> list[Verdict]:
    """Per BN-LeNet setting with weight decay: the angular update and ||w|| at their
    predictions (ratio within 1 ± :data:`MARGIN`, over seeds)."""
    return [equilibrium_verdict(rows, measured, True, momentum, lr_eff, wd, key)
            for momentum, lr_eff, wd in settings_of(rows, True) if wd
            for key in ("angle", "norm")]


def growth_verdicts(rows: list[Row]) -> list[Verdict]:
    """Per BN-LeNet setting without weight decay: ``||w||`` only grows (no equilibrium)."""
    verdicts = []
    for momentum, lr_eff, wd in settings_of(rows, True):
        if wd != 0:
            continue
        group = sweep_rows(rows, True, momentum, lr_eff, wd)
        growth = per_seed(group, norm_growth)
        verdicts.append(judge_difference(
            f"without weight decay ||w|| grows (η {sgd_lr(lr_eff, momentum):g}, μ {momentum:g})",
            "van Laarhoven 2017; Hoffer et al. 2018", "||w|| at the end / in the first window, "
            f"mean over the 4 scale-invariant layers, minus 1 (by more than {GROWTH_MARGIN:g})",
            {s: 1.0 for s in growth}, growth, margin=GROWTH_MARGIN,
            paper="||w_{t+1}||² = ||w_t||² + η²||g_t||² for a scale-invariant weight (no momentum)",
            note="BN-LeNet on Fashion-MNIST, batch 128", failed=_failed_note(group),
            evidence="decay_bn.png"))
    return verdicts


def accuracy_verdicts(rows: list[Row], chosen: float | None) -> list[Verdict]:
    """At λ*: weight decay at all, left off γ/β, left off the scale-invariant weights."""
    measure = "final test accuracy"
    claims = [("weight decay raises BN-LeNet's test accuracy", "Zhang et al. 2019 (weight "
               "decay with BN acts through the effective learning rate)", None),
              ("leaving γ/β out of weight decay leaves test accuracy unchanged (±0.5 points)",
               "Summers & Dinneen 2020 (find that weight decay on γ/β matters)", "no decay on γ/β"),
              ("leaving the scale-invariant weights out of weight decay leaves test accuracy "
               "unchanged (±0.5 points)", "van Laarhoven 2017 (weight decay does not regularize "
               "them: it only sets their effective learning rate)",
               "no decay on scale-invariant weights")]
    if chosen is None:
        return [not_measured(claim, source, measure, "no fully decayed runs at the ablation's "
                             "setting") for claim, source, _ in claims]
    decayed = ablation_rows(rows, chosen, ALL_DECAYED)
    note = (f"BN-LeNet, Fashion-MNIST, η {sgd_lr(ABLATION['lr_eff'], ABLATION['momentum']):g}, "
            f"momentum {ABLATION['momentum']:g}, λ* = {chosen:g} chosen on validation accuracy; "
            "the paper: ResNets on CIFAR-100 and others")
    out = []
    for claim, source, decay in claims:
        other = ablation_rows(rows, 0.0, ALL_DECAYED) if decay is None else ablation_rows(rows, chosen, decay)
        both = decayed + other
        if not other or not decayed or any(failed(r) for r in both):
            out.append(not_measured(claim, source, measure, "a side has no runs or one that does "
                                    f"not train (final validation accuracy <= {FAIL_ACCURACY})",
                                    failed=_failed_note(both)))
            continue
        a = {r.seed: final(r, "final_test_acc") for r in (other if decay is None else decayed)}
        b = {r.seed: final(r, "final_test_acc") for r in (decayed if decay is None else other)}
        measure_text = (f"{measure}, λ* minus λ = 0" if decay is None
                        else f"{measure}, {decay} minus all decayed (λ*)")
        if decay is None:
            out.append(judge_difference(claim, source, measure_text, a, b, note=note,
                                        evidence="Weight decay on γ/β and on the scale-invariant weights"))
        else:
            out.append(judge_same(claim, source, measure_text, a, b, ACCURACY_MARGIN, note=note,
                                  evidence="Weight decay on γ/β and on the scale-invariant weights"))
    return out


# --------------------------------------------------------------------------- findings

def findings(rows: list[Row], measured: Measured, chosen: float | None) -> list[str]:
    lines = []
    for bn in MODELS:
        within, outside = [], []
        for momentum, lr_eff, wd in settings_of(rows, bn):
            if not wd:
                continue
            verdict = equilibrium_verdict(rows, measured, bn, momentum, lr_eff, wd, "angle")
            if verdict.effect is None or not math.isfinite(verdict.effect):
                continue
            text = (f"η_eff {lr_eff:g}, μ {momentum:g}, λ {wd:g} (ratio {1 + verdict.effect:.2f}, "
                    f"T·η_eff·λ = {time_constants(sweep_rows(rows, bn, momentum, lr_eff, wd)[0]):.3g})")
            (within if verdict.outcome == SUPPORTED else outside).append(text)
        lines.append(f"- {MODELS[bn][0]}: the last epoch's angular update over √(2ηλ/(1+μ)) is "
                     f"within 1 ± {MARGIN:g} (95% interval over seeds) at "
                     + ("; ".join(within) or "no setting") + "; not shown to be at "
                     + ("; ".join(outside) or "any other") + ".")
    for momentum in MOMENTA:
        pairs = [(lr_eff, wd) for lr_eff in EFFECTIVE_LRS for wd in WEIGHT_DECAYS if wd]
        products: dict[float, list[tuple[float, float]]] = {}
        for lr_eff, wd in pairs:
            products.setdefault(round(lr_eff * wd, 12), []).append((lr_eff, wd))
        for product, same in products.items():
            if len(same) < 2:
                continue
            cells = []
            for lr_eff, wd in same:
                group = sweep_rows(rows, True, momentum, lr_eff, wd)
                angles = per_seed(group, lambda r: layer_mean(measured[r.run_dir], "angle"))
                if angles:
                    cells.append(f"η_eff {lr_eff:g}, λ {wd:g}: "
                                 f"{format_mean_ci(list(angles.values()), '.4f')} rad")
            if len(cells) == len(same):
                lines.append(f"- BN-LeNet, μ {momentum:g}, the same η_eff·λ = {product:g} (the "
                             "prediction depends on the product only): " + "; ".join(cells) + ".")
    # Every run of every rate and momentum: keyed by seed, the settings would overwrite each other.
    growth = [norm_growth(r) for r in select(rows, part="sweep", bn=True, wd=0.0) if not r.diverged]
    if growth:
        lines.append(f"- BN-LeNet without weight decay: ||w|| ends at {min(growth):.2f}-"
                     f"{max(growth):.2f} times its first window's value ({len(growth)} runs over "
                     "every rate and momentum, mean over the hidden layers).")
    if chosen is not None:
        cells = {decay: [final(r, "final_test_acc") for r in ablation_rows(rows, chosen, decay)]
                 for decay in (ALL_DECAYED, *ABLATIONS)}
        lines.append(f"- λ* = {chosen:g} (best mean final validation accuracy); final test "
                     "accuracy there: " + "; ".join(f"{k} {format_mean_ci(v)}" for k, v in
                                                    cells.items() if v) + ".")
    return lines


# --------------------------------------------------------------------------- calibration

CALIBRATION_STEPS = 3000
SIMULATED = {"lr": 0.5, "weight_decay": 0.01}


def calibrate() -> list[Calibration]:
    """The measures behind the verdicts on cases with known answers: the angular update and
    ||w|| of a simulated spherical motion against the predictions (and without weight decay,
    no equilibrium), Li & Arora's equivalence, and the scale invariance the rest assumes."""
    steps = CALIBRATION_STEPS  # the simulations take about a second each
    lr, wd = SIMULATED["lr"], SIMULATED["weight_decay"]
    out = []
    for momentum in MOMENTA:
        last = simulate_spherical_motion(lr, wd, momentum, steps).epochs[-1]
        read = (f"angle {last['mean_angle'] / last['predicted_angle']:.3f}, ||w|| "
                f"{last['norm'] / last['predicted_norm']:.3f} of predicted")
        ok = all(abs(last[m] / last[p] - 1) < 0.03 for m, p in
                 (("mean_angle", "predicted_angle"), ("norm", "predicted_norm")))
        out.append(Calibration("angular update, ||w|| (measured / predicted)",
                               f"simulated spherical motion (Wan et al.'s idealization), η {lr:g}, "
                               f"λ {wd:g}, μ {momentum:g}, last 500 of {steps} steps",
                               "1 ± 0.03 each", read, ok))
    low = simulate_spherical_motion(lr, wd, 0.0, steps).epochs[-1]["mean_angle"]
    high = simulate_spherical_motion(lr, 4 * wd, 0.0, steps).epochs[-1]["mean_angle"]
    out.append(Calibration("angular update (grows with ηλ)", f"the same, λ {wd:g} and {4 * wd:g}",
                           "2 (√4) ± 3%", f"{high / low:.3f}", abs(high / low / 2 - 1) < 0.03))
    epochs = simulate_spherical_motion(lr, 0.0, 0.0, steps).epochs
    fall = epochs[-1]["mean_angle"] / epochs[0]["mean_angle"]
    growth = epochs[-1]["norm"] / epochs[0]["norm"]
    out.append(Calibration("angular update, ||w|| (no weight decay)", "the same, λ 0",
                           "no equilibrium: the angle falls, ||w|| grows",
                           f"angle x{fall:.2f}, ||w|| x{growth:.2f} from the first 500 steps to "
                           "the last", fall < 0.8 and growth > 1.2))
    out += equivalence_calibration()
    out += invariance_calibration()
    return out


EQUIVALENCE = {"lr": 0.5, "weight_decay": 0.05, "steps": 10, "batch": 8}


def synthetic_batches(steps: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random float64 images in [0, 1] and random labels: the equivalence is exact on any data."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 1, 28, 28, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (batch,), generator=g)) for _ in range(steps)]


def equivalence_calibration() -> list[Calibration]:
    """Li & Arora's two runs on BN-LeNet (float64, eps 1e-30, only the scale-invariant weights
    trained): with their schedule the same to float rounding; without it, apart."""
    lr, wd, steps = EQUIVALENCE["lr"], EQUIVALENCE["weight_decay"], EQUIVALENCE["steps"]
    torch.manual_seed(0)
    model = exactly_scale_invariant(build_model("bn-lenet", norm="bnlab"))
    batches = synthetic_batches(steps, EQUIVALENCE["batch"])
    out = []
    for momentum in (0.0, 0.5):
        gap = li_arora_gap(model, batches, lr, wd, momentum)
        alpha = li_arora_growth(lr, wd, momentum)
        out.append(Calibration(
            "Li & Arora's equivalence", f"BN-LeNet float64, η {lr:g}, λ {wd:g}, μ {momentum:g}, "
            f"{steps} steps: with weight decay vs without it at η α^(-2t-1)",
            "the same losses and w/||w|| to float rounding (< 1e-12); ||w~||/||w|| = α^-T",
            f"losses {gap.loss:.1e}, w/||w|| {gap.direction:.1e}; ||w~||/||w|| {gap.norm_ratio:.4f} "
            f"vs α^-T {alpha ** -steps:.4f}",
            gap.loss < 1e-12 and gap.direction < 1e-12
            and math.isclose(gap.norm_ratio, alpha ** -steps, rel_tol=1e-9)))
    contrast = li_arora_gap(model, batches, lr, wd, 0.0, schedule=False)
    out.append(Calibration("Li & Arora's equivalence (contrast)", "the same without the schedule "
                           "(constant η)", "apart (w/||w|| > 1e-3)",
                           f"w/||w|| {contrast.direction:.1e}", contrast.direction > 1e-3))
    return out


INVARIANCE_SCALE = 10.0


def invariance_calibration() -> list[Calibration]:
    """BN-LeNet (train mode, float64, eps 1e-30) with its first conv weight scaled by c = 10:
    the loss unchanged and its gradient scaled by 1/c; the same network without BN: not."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    c = INVARIANCE_SCALE
    out = []
    for norm, name, expected in (("bnlab", "BN-LeNet", "both 0 (< 1e-12)"),
                                 ("none", "LeNet without BN", "the gradient's > 0.1")):
        torch.manual_seed(0)
        model = exactly_scale_invariant(build_model("bn-lenet", norm=norm)).train()
        weight = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, weight)
        with torch.no_grad():
            weight.mul_(c)
        scaled_loss = F.cross_entropy(model(x), y)
        (scaled_grad,) = torch.autograd.grad(scaled_loss, weight)
        loss_change = abs(scaled_loss.item() - loss.item()) / loss.item()
        grad_change = abs(c * scaled_grad.norm().item() / grad.norm().item() - 1)
        ok = max(loss_change, grad_change) < 1e-12 if norm == "bnlab" else grad_change > 0.1
        out.append(Calibration("scale invariance: relative change of the loss, and of "
                               "c·||∇L|| (1/c scaling)", f"{name}, first conv weight x{c:g}",
                               expected, f"{loss_change:.1e}, {grad_change:.1e}", ok))
    return out


# --------------------------------------------------------------------------- plots

PANEL_QUANTITIES = {"mean_angle": "angular update per step (rad)", "norm": "||w||",
                    "mean_effective_lr": "effective lr η/||w||²"}


def _curve(group: list[Row], key: str) -> tuple[list[int], list[float]]:
    """Window end steps and the mean over seeds and hidden layers of ``key``."""
    per_step: dict[int, list[float]] = {}
    for r in group:
        if r.diverged:
            continue
        records = windows(r)
        hidden = set(hidden_layers(records))
        by_window: dict[int, list[float]] = {}
        for w in records:
            if w["layer"] in hidden:
                by_window.setdefault(w["first_step"] + w["steps"], []).append(w[key])
        for step, values in by_window.items():
            per_step.setdefault(step, []).append(sum(values) / len(values))
    steps = sorted(per_step)
    return steps, [sum(per_step[s]) / len(per_step[s]) for s in steps]


def plot_dynamics(rows: list[Row], bn: bool, path: Path) -> None:
    """Rows: angle, ||w||, effective lr; columns: (momentum, effective rate); a line per λ
    with its prediction (dotted, same colour) where there is one."""
    columns = [(m, e) for m in MOMENTA for e in EFFECTIVE_LRS]
    fig, axes = plt.subplots(len(PANEL_QUANTITIES), len(columns),
                             figsize=(4.2 * len(columns), 3.3 * len(PANEL_QUANTITIES)),
                             squeeze=False)
    for col, (momentum, lr_eff) in enumerate(columns):
        for row_i, (key, label) in enumerate(PANEL_QUANTITIES.items()):
            ax = axes[row_i][col]
            for i, wd in enumerate(WEIGHT_DECAYS):
                group = sweep_rows(rows, bn, momentum, lr_eff, wd)
                xs, ys = _curve(group, key)
                if not xs:
                    continue
                look = style(i)
                ax.plot(xs, ys, label=f"λ={wd:g}", markevery=max(1, len(xs) // 8), **look)
                lr = sgd_lr(lr_eff, momentum)
                if key == "mean_angle" and wd:
                    ax.axhline(equilibrium_angular_update(lr, wd, momentum), color=look["color"],
                               ls=":", lw=0.9)
            if not ax.lines:
                note_empty(ax, "no run recorded (all failed or none in the grid)")
                continue
            log_axis(ax, "y", label=label)
            count_axis(ax, "training step")
            ax.set_title(f"μ={momentum:g}, η_eff={lr_eff:g}", fontsize=9)
            legend(ax)
    fig.suptitle(f"{MODELS[bn][0]}-LeNet: mean over seeds and the 4 hidden layers, per "
                 f"{WINDOW}-step window; dotted: √(2ηλ/(1+μ))" if bn else
                 f"LeNet without BN (control): mean over seeds and the 4 hidden layers, per "
                 f"{WINDOW}-step window; dotted: √(2ηλ/(1+μ))", fontsize=10)
    save_figure(fig, path)


def plot_accuracy(rows: list[Row], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], (("final_val_acc", "final validation accuracy"),
                                          ("final_test_acc", "final test accuracy"))):
        for decay in (ALL_DECAYED, *ABLATIONS):
            points = {i: [final(r, key) for r in ablation_rows(rows, wd, decay)]
                      for i, wd in enumerate(WEIGHT_DECAYS)}
            points = {i: p for i, p in points.items() if p}
            if points:
                plot_intervals(ax, points, label=decay)
        if not ax.lines:
            note_empty(ax, "no runs at the ablation's setting")
        ax.set_xticks(range(len(WEIGHT_DECAYS)), [f"{wd:g}" for wd in WEIGHT_DECAYS])
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel(label)
        ax.set_title(f"BN-LeNet, η_eff {ABLATION['lr_eff']:g}, μ {ABLATION['momentum']:g} "
                     "(mean, 95% CI)", fontsize=9)
        legend(ax)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="decay",
    title="Paper: batch norm and weight decay (scale invariance, spherical motion)",
    question="With batch norm, does the angular update per step settle at Wan et al.'s "
             "equilibrium √(2ηλ/(1+μ)) and ||w|| at its predicted norm (with and without "
             "momentum, and not without BN), does ||w|| only grow without weight decay, and "
             "does weight decay on γ/β or on the scale-invariant weights change accuracy?",
    variants=variants,
    analyze=analyze,
    default_epochs=6,
    default_subset=0,
    notes=f"BN-LeNet and LeNet without norm layers (the same layers), batch 128, SGD at "
          f"effective rates η/(1−μ) in {list(EFFECTIVE_LRS)} with momentum μ in {list(MOMENTA)} "
          f"(η = η_eff (1−μ)), weight decay λ in {list(WEIGHT_DECAYS)}; at η_eff "
          f"{ABLATION['lr_eff']:g}, μ {ABLATION['momentum']:g}, also BN-LeNet with weight decay "
          "left off γ/β or off the scale-invariant weights. Every run records each conv/linear "
          f"weight at every step in windows of {WINDOW} steps (TrainConfig.spherical_every); "
          "the equilibrium is read over each run's last epoch. The analysis trains and measures "
          "nothing more (its calibrations take seconds).",
)
