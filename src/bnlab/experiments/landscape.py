"""Claim: BN makes the loss landscape smoother (Santurkar et al. 2018, Sec. 3.1, Fig. 4).

Why: if BN does not work by reducing internal covariate shift (``experiments.ics``),
Santurkar et al.'s alternative is that it makes the loss and its gradient better behaved
along the steps SGD takes: smaller loss variation and more predictive gradients along the
gradient direction. They show it on VGG networks (ReLU) on CIFAR-10, both arms at one
learning rate. Three things can make such a comparison say more than it measures, and this
grid controls each:

* **the network.** Three architectures, each with and without bnlab's BN (the plain arm is
  the same architecture with ``--norm none``): the chapter's sigmoid LeNet (``bn-lenet``),
  a ReLU LeNet with He init (``relu-lenet``) and a small VGG-style ReLU net (``small-vgg``,
  the kind of net of the paper's figure).
* **the rate.** Every model trains at every rate of :data:`LEARNING_RATES`; per
  architecture one rate is probed for both arms, chosen on the validation split
  (:func:`choose_rate`): of the rates at which every run of both arms trains, the one whose
  lower arm's mean final validation accuracy is highest. Where no rate trains both arms
  there is no verdict (the runs probed are then the best rate without a diverged run, for
  the tables only).
* **the units and the moment.** A net on a plateau has small gradients, so its ``eta * g``
  steps are short and it looks smooth; and at equal steps BN is further along training.
  So beside the paper's protocol (*equal steps*: absolute measures along ``W - eta g``, per
  run the median over its probe steps) the grid compares at *matched training loss*:
  relative measures (``||delta g|| / ||g||``, the loss range over the loss) and beta along
  ``W - d g / ||g||`` (the same distances ``d`` for every net), per run the median over the
  :data:`MATCHED` probes whose training loss is nearest, in log, to the lowest training
  loss that every run of the architecture's two arms reaches (:func:`matched_level`).

The probes (``bnlab.probes.landscape``): every probed run is re-played
(``experiments.probed``) and probed at :data:`~bnlab.experiments.probed.PROBES` steps spread
over training, on that step's batch, in train mode, BN running statistics untouched.
The training loss of a probe is that batch's loss, as a running median over
:data:`SMOOTHING` consecutive probes.

Verdicts: per architecture, claim and protocol, ``judge_difference`` on log10(BN) -
log10(plain) per seed (the arms share seeds: the same data order), claimed below 0. The
measures are calibrated on :class:`~bnlab.probes.landscape.QuadraticLoss` (known
curvature, a linear loss, a flat region, a plateau) and the matching on synthetic
trajectories (:func:`calibration`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from bnlab.experiments.analysis import Row, best_lr, failed, finals, mean_final, select, trains
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    not_measured,
)
from bnlab.experiments.probed import (
    PROBES,
    cached_replay,
    default_probe_steps,
    probe_steps,
    total_steps,
)
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import difference, format_mean_ci
from bnlab.probes.landscape import MEASURES, PATHS, QuadraticLoss, probe, smoothness
from bnlab.util.plots import (
    REFERENCE_LINE,
    count_axis,
    legend,
    log_axis,
    note_empty,
    plt,
    save_figure,
    style,
)
from bnlab.util.tables import counted, format_table

SOURCE = "Santurkar et al. 2018"
ETAS = (0.05, 0.1, 0.2, 0.4)
"""Step sizes of the paper's steps ``W - eta g``, the same for every run."""
DISTANCES = (0.05, 0.1, 0.2, 0.4)
"""Lengths of the normalized steps ``W - d g / ||g||``: the numbers of :data:`ETAS`, so the two
grids coincide where ``||g|| = 1``."""
LEARNING_RATES = (0.03, 0.1, 0.3, 1.0)
QUICK_RATES = (0.1, 1.0)
"""The sweep of a smoke test (``--quick``): the runs of two rates are enough to run every part."""
QUICK_PROBES = 3
"""Probe steps per run of a smoke test (the first, a middle and the last)."""
MATCHED = 3
"""Probes per run read at the matched training loss (the nearest ones, in log loss)."""
SMOOTHING = 3
"""A probe's training loss: the running median of its batch losses over this many probes."""


@dataclass(frozen=True)
class Architecture:
    """One network of the grid: a key for tags, a name for people, a ``--model``."""

    key: str
    name: str
    model: str


ARCHITECTURES = (Architecture("sigmoid-lenet", "sigmoid LeNet", "bn-lenet"),
                 Architecture("relu-lenet", "ReLU LeNet", "relu-lenet"),
                 Architecture("small-vgg", "small VGG", "small-vgg"))
NORMS = {False: "none", True: "bnlab"}
"""The two arms: the plain architecture and the same with bnlab's BN after every hidden
weight layer."""


def arm(bn: bool) -> str:
    return "BN" if bn else "plain"


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(f"{a.name}, {arm(bn)}, lr={lr:g}",
                    {"model": a.model, "norm": NORMS[bn], "lr": lr},
                    {"arch": a.key, "bn": bn, "lr": lr})
            for a in ARCHITECTURES for bn in (False, True) for lr in sweep(settings)]


def sweep(settings: ExpSettings) -> tuple[float, ...]:
    """The learning rates of the grid: :data:`QUICK_RATES` for ``--quick``, else
    :data:`LEARNING_RATES`."""
    return QUICK_RATES if settings.quick else LEARNING_RATES


# --------------------------------------------------------------------------- the rate

@dataclass(frozen=True)
class RateChoice:
    """The rate probed for an architecture's two arms, and whether both arms train at it."""

    lr: float | None  # None: every rate has a diverged run in an arm
    both_train: bool  # every run of both arms trains there: a comparison can be judged


def _lower_arm(rows: list[Row]) -> float:
    """The lower of the two arms' mean final validation accuracy (a diverged run at chance)."""
    return min(mean_final(select(rows, bn=bn)) for bn in (False, True))


def choose_rate(rows: list[Row], arch: str) -> RateChoice:
    """Of the rates ``arch`` ran at, the rate at which every run of both arms of ``arch`` trains
    (``analysis.trains``) and the lower arm's mean final *validation* accuracy is highest
    (ties: the smaller rate). Without such a rate: the same choice among the rates without
    a diverged run, marked as not training."""
    group = select(rows, arch=arch)
    rates = sorted({r.tags["lr"] for r in group})

    def arms_at(lr: float, ok: Callable[[list[Row]], bool]) -> bool:
        return all(ok(select(group, bn=bn, lr=lr)) for bn in (False, True))

    both = [lr for lr in rates if arms_at(lr, trains)]
    if both:
        return RateChoice(best_lr(group, both, _lower_arm), True)
    finite = [lr for lr in rates
              if arms_at(lr, lambda g: bool(g) and not any(r.diverged for r in g))]
    return RateChoice(best_lr(group, finite, _lower_arm) if finite else None, False)


# --------------------------------------------------------------------------- probes

def measure(row: Row, dataset, quick: bool = False) -> list[dict[str, Any]]:
    """The run's landscape probes (cached in its folder as ``landscape-probes.json``): at
    ``probed.default_probe_steps``, or :data:`QUICK_PROBES` steps for a smoke test."""

    def steps_for(config) -> list[int]:
        total = total_steps(config, dataset)
        return probe_steps(total, QUICK_PROBES) if quick else default_probe_steps(total)

    def probe_for(config):
        def at_step(model, x, y, step):
            return probe(model, lambda m: F.cross_entropy(m(x), y), ETAS, DISTANCES)
        return at_step

    return cached_replay(row.run_dir, "landscape-probes",
                         {"version": 2, "etas": list(ETAS), "distances": list(DISTANCES)},
                         dataset, steps_for, probe_for)["records"]


Value = Callable[[dict[str, Any]], float]  # a probe record -> one number


def reading(path: str, key: str) -> Value:
    """The measure ``key`` (of ``probes.landscape.MEASURES``) along ``path`` of a probe record."""
    return lambda record: smoothness(record["loss0"], record["grad_norm"], record[path])[key]


def _median(values: list[float]) -> float:
    """The median of the values that are not nan (an infinite one counts: the loss blew up)."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def at_equal_steps(records: list[dict[str, Any]], value: Value) -> float:
    """The median of ``value`` over a run's probes after step 0 (the paper's protocol: every
    run read over the same steps)."""
    return _median([value(r) for r in records if r["step"] > 0])


def training_losses(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """(record, training loss) of each probe after step 0: the running median of the batch
    losses over :data:`SMOOTHING` consecutive probes (fewer at the ends)."""
    probed = [r for r in records if r["step"] > 0]
    losses = [r["loss0"] for r in probed]
    half = SMOOTHING // 2
    return [(r, _median(losses[max(0, i - half):i + half + 1])) for i, r in enumerate(probed)]


def matched_level(runs: list[list[dict[str, Any]]]) -> float:
    """The lowest training loss every run of ``runs`` reaches: the largest of the runs' lowest
    (smoothed) training losses; nan without a finite one."""
    lows = [min(finite) for records in runs
            if (finite := [s for _, s in training_losses(records) if math.isfinite(s)])]
    return max(lows) if lows else math.nan


def matched_probes(records: list[dict[str, Any]], level: float
                   ) -> list[tuple[dict[str, Any], float]]:
    """(record, training loss) of the :data:`MATCHED` probes of a run whose training loss is
    nearest ``level`` in log (none where the level is not a finite positive loss)."""
    if not (math.isfinite(level) and level > 0):
        return []
    losses = [(r, s) for r, s in training_losses(records) if math.isfinite(s) and s > 0]
    return sorted(losses, key=lambda point: abs(math.log(point[1] / level)))[:MATCHED]


def at_matched_loss(records: list[dict[str, Any]], level: float, value: Value) -> float:
    """The median of ``value`` over :func:`matched_probes` (nan without them)."""
    return _median([value(r) for r, _ in matched_probes(records, level)])


MATCH_TOLERANCE = 1.25
"""Two arms are *matched* when the mean training losses of the probes read (over seeds) are
within this factor of each other; otherwise the probes missed the level (one arm passed it
between two probes) and the matched comparison is not judged."""


# --------------------------------------------------------------------------- the comparisons

@dataclass(frozen=True)
class Protocol:
    """How a pair is compared: the path, per claim the measure read, and when it is read."""

    name: str
    path: str
    measures: dict[str, str]  # claim key -> a key of probes.landscape.MEASURES
    matched: bool  # read at matched training loss (else over all steps)
    description: str


PROTOCOLS = (
    Protocol("equal steps", "gradient",
             {"loss": "loss_range", "gradient": "grad_change", "beta": "beta"}, False,
             "absolute, eta in {etas}, per run the median over training (the paper's protocol)"),
    Protocol("matched loss", "normalized",
             {"loss": "relative_loss_range", "gradient": "relative_grad_change", "beta": "beta"},
             True, "d in {distances}, per run at training loss {level}"),
)
CLAIMS = {"loss": "BN makes the loss vary less along the gradient",
          "gradient": "BN makes the gradient more predictive along the gradient",
          "beta": "BN lowers the effective beta-smoothness along the gradient"}
LABELS = {"loss_range": "loss range", "relative_loss_range": "loss range / loss",
          "grad_change": "max ‖dg‖", "relative_grad_change": "max ‖dg‖ / ‖g‖",
          "beta": "beta"}
PAPER = ("with BN the loss range, the gradient change and the effective beta along the gradient "
         "are all smaller, throughout training (Fig. 4: VGG on CIFAR-10)")


@dataclass
class Probed:
    """An architecture's probed runs: its rate, each arm's rows and records, the matched level."""

    arch: Architecture
    choice: RateChoice
    rows: dict[bool, list[Row]]
    records: dict[str, list[dict[str, Any]]]  # run folder -> probe records
    level: float

    def per_seed(self, bn: bool, path: str, key: str, matched: bool) -> dict[int, float]:
        """Seed -> the run's reading of ``key`` along ``path``, at the matched training loss
        or (``matched=False``) over all its steps."""
        value = reading(path, key)
        return {r.seed: (at_matched_loss(self.records[r.run_dir], self.level, value)
                         if matched else at_equal_steps(self.records[r.run_dir], value))
                for r in self.rows[bn]}

    def losses_read(self, bn: bool) -> list[float]:
        """Per run of the arm, the median training loss of the probes read at the level."""
        return [_median([s for _, s in matched_probes(self.records[r.run_dir], self.level)])
                for r in self.rows[bn]]

    def mismatch(self) -> str:
        """Why the arms are not matched at the level ("" when they are; :data:`MATCH_TOLERANCE`)."""
        read = [statistics.fmean(v) if (v := [x for x in self.losses_read(bn) if math.isfinite(x)])
                else math.nan for bn in (False, True)]
        if all(math.isfinite(x) and x > 0 for x in read) and \
                max(read) / min(read) <= MATCH_TOLERANCE:
            return ""
        return (f"the probes read do not match in training loss within x{MATCH_TOLERANCE:g} "
                f"(plain {read[0]:.3g}, BN {read[1]:.3g} at the level {self.level:.3g})")

    def readings(self, protocol: Protocol, key: str) -> dict[bool, dict[int, float]]:
        """Per arm, :meth:`per_seed` of ``key`` under ``protocol``."""
        return {bn: self.per_seed(bn, protocol.path, key, protocol.matched) for bn in (False, True)}


def probed_architectures(rows: list[Row], dataset, quick: bool = False) -> list[Probed]:
    """Each architecture with runs: its rate (:func:`choose_rate`) and, at it, every run probed."""
    out = []
    for arch in ARCHITECTURES:
        if not select(rows, arch=arch.key):
            continue
        choice = choose_rate(rows, arch.key)
        arms = {bn: select(rows, arch=arch.key, bn=bn, lr=choice.lr) if choice.lr is not None else []
                for bn in (False, True)}
        records = {r.run_dir: measure(r, dataset, quick) for group in arms.values() for r in group}
        out.append(Probed(arch, choice, arms, records, matched_level(list(records.values()))))
    return out


def _log10(value: float) -> float:
    return math.log10(value) if math.isfinite(value) and value > 0 else math.nan


def _failures(rows: list[Row]) -> str:
    """"1/3 failed (1 diverged)": failed runs (``analysis.failed``), the diverged ones among them."""
    diverged = sum(r.diverged for r in rows)
    return (f"{sum(failed(r) for r in rows)}/{len(rows)} failed"
            + (f" ({diverged} diverged)" if diverged else ""))


def _failed_text(p: Probed, readings: dict[bool, dict[int, float]]) -> str:
    """Per arm, failed runs and runs without a finite reading ("BN 1/3 failed (1 diverged)")."""
    parts = []
    for bn in (False, True):
        runs = p.rows[bn]
        missing = sum(not math.isfinite(_log10(v)) for v in readings[bn].values())
        if any(failed(r) for r in runs):
            parts.append(f"{arm(bn)} {_failures(runs)}")
        if missing:
            parts.append(f"{arm(bn)} {missing}/{len(runs)} without a finite positive reading")
    return "; ".join(parts)


def verdicts(probed: list[Probed]) -> list[Verdict]:
    """Per architecture, protocol and claim: BN below plain in log10 of the measure, per seed."""
    out = []
    for p in probed:
        for protocol in PROTOCOLS:
            for claim, key in protocol.measures.items():
                text = f"{CLAIMS[claim]} ({p.arch.name}, {protocol.name})"
                measure = (f"log10 {LABELS[key]} along {_path_name(protocol.path)}, BN - plain "
                           f"({'matched training loss' if protocol.matched else 'equal steps'})")
                if not p.choice.both_train:
                    out.append(not_measured(
                        text, SOURCE, measure, "no rate of the sweep at which every run of "
                        "both arms trains (final validation accuracy above chance, no divergence)",
                        paper=PAPER))
                    continue
                if protocol.matched and (why := p.mismatch()):
                    out.append(not_measured(text, SOURCE, measure, why, paper=PAPER))
                    continue
                readings = p.readings(protocol, key)
                logs = {bn: {s: _log10(v) for s, v in readings[bn].items()} for bn in (False, True)}
                out.append(judge_difference(
                    text, SOURCE, measure, logs[False], logs[True], direction=-1, paper=PAPER,
                    note=_note(p, protocol), evidence="landscape.png" if not protocol.matched
                    else "landscape_matched.png", failed=_failed_text(p, readings)))
    return out


def _note(p: Probed, protocol: Protocol) -> str:
    level = f"{p.level:.3g} (the lowest both arms reach)"
    epochs = {r.config.get("epochs") for group in p.rows.values() for r in group} - {None}
    budget = f", {counted(epochs.pop(), 'epoch')}" if len(epochs) == 1 else ""
    return (f"{p.arch.name}, Fashion-MNIST, plain SGD{budget}, both arms at lr {p.choice.lr:g} "
            "(chosen on validation); "
            + protocol.description.format(etas=list(ETAS), distances=list(DISTANCES), level=level))


def _path_name(path: str) -> str:
    return "W - eta g" if path == "gradient" else "W - d g/‖g‖"


# --------------------------------------------------------------------------- analysis

def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to probe)"],
                        calibration=calibration())
    probed = probed_architectures(rows, dataset, settings.quick)
    plot_equal_steps(probed, out / "landscape.png")
    plot_matched(probed, out / "landscape_matched.png")
    sections = [
        "## Learning rates (chosen on validation)", "", rate_table(rows, probed), "",
        "Final validation accuracy, mean ± 95% CI over seeds (a diverged run counts at "
        "chance), and the runs that failed (diverged, or final validation accuracy at most "
        "0.2). "
        "*probed*: the rate of both arms, chosen on the validation split: of the rates at which "
        "every run of both arms trains, the one whose lower arm's mean validation accuracy is "
        "highest.", "",
        "## Smoothness at equal steps", "", smoothness_table(probed, matched=False), "",
        "Per run the median over its probe steps (step 0 excluded), then mean ± 95% CI over "
        f"seeds. *W - eta g*: eta in {list(ETAS)} (the paper's steps); *W - d g/‖g‖*: d in "
        f"{list(DISTANCES)}. Loss range: max - min of the loss along the path (its start "
        "included), over the loss at the start; max ‖dg‖: the largest change of the "
        "gradient, over ‖g‖; beta: the largest ‖dg‖ per unit of distance moved.", "",
        "![landscape](landscape.png)", "",
        "## Smoothness at matched training loss", "", smoothness_table(probed, matched=True), "",
        f"Per run the median over the {MATCHED} probes whose training loss (the probed batch's "
        f"loss, running median over {SMOOTHING} probes) is nearest, in log, to the *level*: the "
        "lowest training loss that every run of the architecture's two arms reaches. Then "
        "mean ± 95% CI over seeds. *loss read*: the training loss of those probes; where the "
        f"two arms' differ by more than x{MATCH_TOLERANCE:g}, the probes missed the level and "
        "the matched comparison is not judged.", "",
        "![landscape at matched loss](landscape_matched.png)", "",
        "**Beside the paper.** Santurkar et al. probe VGG on CIFAR-10; here three small nets on "
        "Fashion-MNIST (28x28 grayscale) with plain SGD, batch 128, a few epochs. The verdicts "
        "compare log10(BN) - log10(plain) per seed (paired over seeds), at equal steps as the "
        "paper does and at matched training loss with step lengths that do not depend on the "
        "gradient's size."]
    return Analysis(sections, findings(probed), verdicts(probed), calibration())


def rate_table(rows: list[Row], probed: list[Probed]) -> str:
    chosen = {p.arch.key: p.choice for p in probed}
    table = []
    for arch in ARCHITECTURES:
        choice = chosen.get(arch.key)
        for lr in sorted({r.tags["lr"] for r in rows}):
            cells = []
            for bn in (False, True):
                group = select(rows, arch=arch.key, bn=bn, lr=lr)
                cells.append(f"{format_mean_ci(finals(group))}, {_failures(group)}" if group else "-")
            if all(c == "-" for c in cells):
                continue
            mark = ("" if choice is None or choice.lr != lr
                    else "**probed**" if choice.both_train else "probed (no rate trains both)")
            table.append([arch.name, f"{lr:g}", *cells, mark])
    return format_table(["architecture", "lr", "plain: final val acc", "BN: final val acc", ""],
                        table)


def smoothness_table(probed: list[Probed], matched: bool) -> str:
    table = []
    for p in probed:
        if p.choice.lr is None:
            continue
        for bn in (False, True):
            for path in PATHS:
                readings = [list(p.per_seed(bn, path, key, matched).values()) for key in MEASURES]
                level = [f"{p.level:.3g}", format_mean_ci(p.losses_read(bn), ".3g")]
                table.append([p.arch.name, f"{arm(bn)} lr={p.choice.lr:g}",
                              *(level if matched else []), _path_name(path),
                              *(format_mean_ci(v, ".3g") for v in readings)])
    headers = ["architecture", "arm", *(["level", "loss read"] if matched else []), "path",
               *(LABELS[k] for k in MEASURES)]
    return format_table(headers, table) if table else "(no architecture has probed runs)"


def findings(probed: list[Probed]) -> list[str]:
    """Per architecture and protocol: plain / BN as geometric-mean ratios over seeds."""
    lines = []
    for p in probed:
        if not p.choice.both_train:
            lines.append(f"- {p.arch.name}: no rate of the sweep trains both arms; not compared.")
            continue
        for protocol in PROTOCOLS:
            if protocol.matched and (why := p.mismatch()):
                lines.append(f"- {p.arch.name}, {protocol.name}: not compared: {why}.")
                continue
            cells = []
            for key in protocol.measures.values():
                readings = p.readings(protocol, key)
                d = difference(*({s: _log10(v) for s, v in readings[bn].items()}
                                 for bn in (False, True)))
                cells.append(f"{LABELS[key]} {10 ** -d.effect:.3g}x" if math.isfinite(d.effect)
                             else f"{LABELS[key]} -")
            lines.append(f"- {p.arch.name}, lr {p.choice.lr:g}, {protocol.name}: plain / BN "
                         f"(geometric mean over seeds; > 1: BN smoother): {', '.join(cells)}.")
    return lines


# --------------------------------------------------------------------------- calibration

def closed_form(slope: float, curvature: float, c: float, path: str) -> dict[str, float]:
    """What :func:`smoothness` must read on ``QuadraticLoss([slope], [curvature], c)`` along
    ``path`` over :data:`ETAS` / :data:`DISTANCES` (the class docstring's closed forms)."""
    sizes = ETAS if path == "gradient" else DISTANCES
    moved = [s * slope if path == "gradient" else s for s in sizes] if slope > 0 else []
    if path == "normalized" and slope == 0:
        return dict.fromkeys(MEASURES, math.nan)
    losses = [c, *(c - s * slope + s * s * curvature / 2 for s in moved)]
    change = max((s * curvature for s in moved), default=0.0)
    loss_range = max(losses) - min(losses)
    return {"loss_range": loss_range, "relative_loss_range": loss_range / c,
            "grad_change": change, "relative_grad_change": change / slope if slope else math.nan,
            "beta": curvature if moved else math.nan}


def read_quadratic(slope: float, curvature: float, c: float = 1.0) -> dict[str, dict[str, float]]:
    """What the probe reads on ``QuadraticLoss`` along each path."""
    model = QuadraticLoss([slope, 0.0], [curvature, 1.0], c)
    out = probe(model, lambda m: m(), ETAS, DISTANCES)
    return {path: smoothness(out["loss0"], out["grad_norm"], out[path]) for path in PATHS}


def _agrees(read: float, expected: float) -> bool:
    if math.isnan(expected):
        return math.isnan(read)
    return math.isclose(read, expected, rel_tol=1e-6, abs_tol=1e-12)


SLOPE = 2.0
"""The gradient's norm in the calibration's quadratics: not 1, so that a measure per unit of
``eta`` instead of distance, or an absolute one instead of a relative one, reads wrong."""
PLATEAU = 1e-4
"""The scale of the plateau case: the curvature-4 quadratic times this (slope and curvature)."""


def calibration() -> list[Calibration]:
    """Each measure behind a verdict on a synthetic landscape with a known answer (large
    effects registering and growing, absent ones reading 0), and the matching on synthetic
    trajectories."""
    records = []

    def add(path: str, key: str, case: str, slope: float, curvature: float) -> None:
        expected = closed_form(slope, curvature, 1.0, path)[key]
        read = read_quadratic(slope, curvature)[path][key]
        records.append(Calibration(f"{LABELS[key]}, {_path_name(path)}", case, f"{expected:.4g}",
                                   f"{read:.4g}", _agrees(read, expected)))

    for path in PATHS:
        for lam in (1.0, 4.0, 16.0):
            add(path, "beta", f"quadratic, curvature {lam:g} along g, ‖g‖ = {SLOPE:g}", SLOPE, lam)
        add(path, "beta", f"linear loss, ‖g‖ = {SLOPE:g}", SLOPE, 0.0)
        key = "grad_change" if path == "gradient" else "relative_grad_change"
        for lam in (1.0, 4.0, 16.0):
            add(path, key, f"quadratic, curvature {lam:g} along g, ‖g‖ = {SLOPE:g}", SLOPE, lam)
        add(path, key, f"linear loss, ‖g‖ = {SLOPE:g}", SLOPE, 0.0)
        key = "loss_range" if path == "gradient" else "relative_loss_range"
        for slope in (0.5, 1.0, 2.0):
            add(path, key, f"linear loss, slope {slope:g}, loss 1 at the start", slope, 0.0)
        add(path, key, f"quadratic, curvature 16 along g, ‖g‖ = {SLOPE:g}", SLOPE, 16.0)
    add("gradient", "loss_range", "flat region (g = 0)", 0.0, 0.0)
    add("gradient", "grad_change", "flat region (g = 0)", 0.0, 0.0)
    for path, key in (("normalized", "relative_grad_change"), ("gradient", "grad_change")):
        add(path, key, f"plateau: the curvature-4 quadratic times {PLATEAU:g}",
            SLOPE * PLATEAU, 4 * PLATEAU)
    return records + matching_calibration()


def synthetic_run(speed: float, factor: float, probes: int = 25) -> list[dict[str, Any]]:
    """Probe records of a run whose training loss falls as ``ln(10) exp(-3 speed t)`` over
    ``t`` in [0, 1], with a measure ``value = factor * loss`` (one landscape, ``factor`` times
    rougher)."""
    out = []
    for i in range(probes):
        loss = math.log(10) * math.exp(-3 * speed * i / (probes - 1))
        out.append({"step": i, "loss0": loss, "value": factor * loss})
    return out


def matching_calibration() -> list[Calibration]:
    """log10(b) - log10(a) at matched loss, for run b twice as fast as run a: 0 on one
    landscape, log10(factor) on a rougher one; and at equal steps, where speed shows."""
    value = lambda record: record["value"]  # noqa: E731
    out = []
    for factor in (1.0, 10.0, 100.0):
        a, b = synthetic_run(1.0, 1.0), synthetic_run(2.0, factor)
        level = matched_level([a, b])
        read = math.log10(at_matched_loss(b, level, value) / at_matched_loss(a, level, value))
        expected = math.log10(factor)
        out.append(Calibration(
            "log10 ratio at matched training loss", f"run b twice as fast as run a, measure "
            f"{factor:g} x loss on b, loss on a", f"{expected:g} (± 0.1)", f"{read:.3g}",
            abs(read - expected) < 0.1))
    a, b = synthetic_run(1.0, 1.0, probes=26), synthetic_run(2.0, 1.0, probes=26)
    read = math.log10(at_equal_steps(b, value) / at_equal_steps(a, value))
    expected = -3 * (13 / 25) / math.log(10)  # the medians: the 13th of 25 probes, t = 13/25
    out.append(Calibration("log10 ratio at equal steps", "run b twice as fast as run a, one "
                           "landscape (measure = loss): speed reads as smoothness",
                           f"{expected:.3g}", f"{read:.3g}", abs(read - expected) < 1e-9))
    return out


# --------------------------------------------------------------------------- figures

EQUAL_STEP_PANELS = ("loss_range", "grad_change", "beta")
MATCHED_PANELS = ("relative_loss_range", "relative_grad_change", "beta")


def _finite_positive(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def plot_equal_steps(probed: list[Probed], path: Path) -> None:
    """Per architecture, the paper's measures along ``W - eta g`` against the step: per arm
    the median over seeds and their range."""
    shown = [p for p in probed if p.records]
    fig, axes = plt.subplots(max(1, len(shown)), 3, figsize=(15, 3.6 * max(1, len(shown))),
                             squeeze=False)
    for row, p in zip(axes, shown):
        for bn in (False, True):
            per_step: dict[int, list[dict[str, float]]] = {}
            for r in p.rows[bn]:
                for rec in p.records[r.run_dir]:
                    per_step.setdefault(rec["step"], []).append(
                        smoothness(rec["loss0"], rec["grad_norm"], rec["gradient"]))
            steps = sorted(per_step)
            for ax, key in zip(row, EQUAL_STEP_PANELS):
                values = [[s[key] for s in per_step[t]] for t in steps]
                look = style(int(bn))
                ax.plot(steps, _finite_positive([_median(v) for v in values]),
                        label=f"{arm(bn)}, lr {p.choice.lr:g}", **look)
                ax.fill_between(steps, _finite_positive([min(v) for v in values]),
                                _finite_positive([max(v) for v in values]), alpha=0.15,
                                color=look["color"], linewidth=0)
        for ax, key in zip(row, EQUAL_STEP_PANELS):
            ax.set_title(f"{p.arch.name}: {LABELS[key]}, W - eta g")
            log_axis(ax, "y", label=LABELS[key])
            count_axis(ax, "step")
            legend(ax)
    if not shown:
        note_empty(axes[0][0], "no architecture has probed runs")
        for ax in axes[0][1:]:
            ax.set_axis_off()
    save_figure(fig, path)


def plot_matched(probed: list[Probed], path: Path) -> None:
    """Per architecture, the relative measures along ``W - d g/||g||`` against the training
    loss (every probe of every seed, sorted by loss), with the matched level."""
    shown = [p for p in probed if p.records]
    fig, axes = plt.subplots(max(1, len(shown)), 3, figsize=(15, 3.6 * max(1, len(shown))),
                             squeeze=False)
    for row, p in zip(axes, shown):
        for bn in (False, True):
            points = sorted(((s, rec) for r in p.rows[bn]
                             for rec, s in training_losses(p.records[r.run_dir])
                             if math.isfinite(s) and s > 0), key=lambda point: point[0])
            losses = [s for s, _ in points]
            for ax, key in zip(row, MATCHED_PANELS):
                ax.plot(losses, _finite_positive([reading("normalized", key)(rec) for _, rec in points]),
                        label=f"{arm(bn)}, lr {p.choice.lr:g}", **style(int(bn)))
        for ax, key in zip(row, MATCHED_PANELS):
            if math.isfinite(p.level) and p.level > 0:
                ax.axvline(p.level, **REFERENCE_LINE)
            ax.set_title(f"{p.arch.name}: {LABELS[key]}, W - d g/‖g‖")
            ax.set_xlabel("training loss (nats; dashed: matched level)")
            log_axis(ax, "y", label=LABELS[key])
            legend(ax)
    if not shown:
        note_empty(axes[0][0], "no architecture has probed runs")
        for ax in axes[0][1:]:
            ax.set_axis_off()
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="landscape",
    title="Claim: batch norm smooths the loss landscape",
    question="Along the gradient step, do the loss and the gradient change less with BN than "
             "without, in the same network (Santurkar et al.'s loss range, gradient "
             "predictiveness and effective beta-smoothness), at equal steps and at matched "
             "training loss?",
    variants=variants,
    analyze=analyze,
    default_epochs=3,
    default_subset=0,
    notes="Sigmoid LeNet, ReLU LeNet (He init) and a small VGG (ReLU, He init), each with and "
          f"without BN, at lr {', '.join(f'{lr:g}' for lr in LEARNING_RATES)} (a smoke test: "
          f"{', '.join(f'{lr:g}' for lr in QUICK_RATES)}), batch 128, plain SGD. Per "
          "architecture one rate for both arms is probed, chosen on the validation split; its "
          f"runs are re-played and probed at {PROBES} steps spread over training (fewer in short "
          f"runs; a smoke test: {QUICK_PROBES}), along W - eta g (eta in {list(ETAS)}) and "
          f"W - d g/‖g‖ (d in {list(DISTANCES)}), on the step's batch in train mode.",
)
