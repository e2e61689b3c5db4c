"""Claims: BN stabilizes the distribution of layer inputs (Ioffe & Szegedy), and that is not why
it works (Santurkar et al.).

Why: the chapter repeats Santurkar et al.'s (2018) verdict on Ioffe & Szegedy's (2015)
motivation without measuring it. This grid measures both papers' quantities the way they
define them, and judges their claims with the shared rule (``findings``).

The grid, for two nets, each without BN, with BN and with Santurkar et al.'s noisy BN at
strengths 0.5, 1, 2 (``bnlab.nn.noisy``: each unit's mean shift and scale re-drawn every
step, small per-sample noise), at three learning rates each:

* **Ioffe & Szegedy's Fig. 1 net** (``ioffe-mlp``: 3 hidden layers x 100 sigmoid units,
  weights ~ N(0, 0.05^2), batch 60), BN before each sigmoid, at rates 0.1, 0.5, 2;
* **the chapter's BN-LeNet architecture** (``bn-lenet``; without BN ``--norm none``: the
  same architecture with nothing in the norm's place), batch 128, at rates 0.1, 0.3, 1.

Plain SGD throughout. Every choice is made on the validation split (final validation
accuracy, mean over seeds, a diverged seed counted at chance; ``analysis.best_lr``): each
model's best rate, and the **same rate** at which the plain net, BN and noisy BN are
compared: the plain net's best rate (so the baseline trains there; BN and noisy BN ran at
it too). The paper's comparisons are at one rate for all; "each model's best rate" adds
plain at its best against BN at its best.

The runs that are compared (every norm at the same rate, BN at its best where that differs;
the others only take part in choosing the rates) are re-played with probes
(``experiments.probed``) at anchors spread over training (``probed.PROBES``, fewer for
short runs) and at the step after each (``bnlab.probes.ics``): on a fixed batch of held-out
images (the first 500 test images, 200 in a ``--quick`` grid) in training mode, each unit's
input mean and standard deviation in every normalized layer (noisy BN's noise included: the
next layer sees it), and its noise-free spread; condensed per layer into the step-to-step
change and the range over training, absolute and relative to the spread, the median over
units. At the anchors also the gradient ICS of every weight layer (Definition 2.1) on that
step's batch at the run's rate, and the 15/50/85th percentiles of the last hidden layer's
input (Ioffe & Szegedy's Fig. 1 picture).

"Trains about as well" is judged on the final epoch's training loss with the noise on, as
Santurkar et al.'s Fig. 2 shows training; the validation numbers of noisy BN (used only to
choose rates and to tell whether a net trains) are in eval mode, where noisy BN applies
its noise's expectation (``bnlab.nn.noisy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.experiments.analysis import Row, best_lr, failed, finals, select
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    judge_same,
    not_measured,
)
from bnlab.experiments.probed import PROBES, cached_replay, default_probe_steps, total_steps
from bnlab.experiments.runner import Experiment, ExpSettings, Variant, periodic_eval_every
from bnlab.experiments.stats import format_mean_ci, mean_ci
from bnlab.probes.ics import (
    gradient_ics,
    layer_moments,
    percentile_record,
    stability,
    unit_moments,
)
from bnlab.training.models import NORM_SLOTS
from bnlab.training.norms import create_norm_layer
from bnlab.util.plots import count_axis, legend, log_axis, note_empty, plt, save_figure, style
from bnlab.util.tables import format_table


@dataclass(frozen=True)
class Net:
    """One of the grid's two nets: its model, batch size, rates, and its normalized layers'
    names in forward order."""

    name: str
    model: str
    batch_size: int
    lrs: tuple[float, ...]
    layers: tuple[str, ...]


NETS = {"mlp": Net("MLP", "ioffe-mlp", 60, (0.1, 0.5, 2.0), ("block1", "block2", "block3")),
        "lenet": Net("LeNet", "bn-lenet", 128, (0.1, 0.3, 1.0), NORM_SLOTS)}
STRENGTHS = (0.5, 1.0, 2.0)
NOISY = tuple(f"noisy-bn:{s:g}:unit" for s in STRENGTHS)
"""Noisy BN's norm names, with the scope spelled out: runs of the noise before issue 25
(``noisy-bn:S``, one shift per layer, large per-sample noise) have other config hashes."""
NORMS = ("none", "bnlab", *NOISY)
HELD_OUT = 500
QUICK_HELD_OUT = 200
"""Images of the fixed batch the layer inputs are measured on (fewer in a ``--quick`` grid)."""
SAME_LOSS = math.log(1.2)
"""Noisy BN trains "about as well" as BN when its final training loss is within a factor 1.2
of BN's: the margin of ``judge_same`` on the log of the loss."""
CHANCE_LOSS = math.log(10)
"""Cross-entropy of a uniform guess over 10 classes: a diverged run's training loss."""

IOFFE = "Ioffe & Szegedy 2015"
SANTURKAR = "Santurkar et al. 2018"
SETTING = "here Fashion-MNIST, far fewer steps, sigmoid nets, plain SGD"


def norm_label(norm: str) -> str:
    return {"none": "plain", "bnlab": "BN"}.get(norm) or f"noisy BN {strength(norm):g}"


def strength(norm: str) -> float:
    """The noise strength of a noisy-BN norm name (0 for the others)."""
    return float(norm.split(":")[1]) if norm.startswith("noisy-bn:") else 0.0


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(f"{net.name} {norm_label(norm)} lr={lr:g}",
                    {"model": net.model, "norm": norm, "lr": lr, "batch_size": net.batch_size,
                     "eval_every": periodic_eval_every(settings, net.batch_size)},
                    {"net": key, "norm": norm, "lr": lr})
            for key, net in NETS.items() for norm in NORMS for lr in net.lrs]


# --------------------------------------------------------------------------- measurement

def anchors_and_steps(total: int) -> tuple[list[int], list[int]]:
    """The anchor steps (``probed.default_probe_steps``) and every step probed: each anchor
    and the step after it (one SGD update later)."""
    anchors = default_probe_steps(total)
    return anchors, sorted(set(anchors) | {a + 1 for a in anchors})


def held_out_count(settings: ExpSettings) -> int:
    return QUICK_HELD_OUT if settings.quick else HELD_OUT


def measure(row: Row, dataset, settings: ExpSettings) -> dict[str, Any]:
    """The run's probes, condensed (:func:`condense`) and cached in its folder."""
    count = held_out_count(settings)
    held_out = dataset.test_images[:count].unsqueeze(1).float().div(255)  # (count, 1, 28, 28)

    def probe_for(config):
        anchors = set(anchors_and_steps(total_steps(config, dataset))[0])

        def probe(model, x, y, step):
            x_held = held_out.to(x.device)
            record: dict[str, Any] = {"layers": layer_moments(model, x_held, seed=step)}
            if step in anchors:
                record.update(anchor=True,
                              train=percentile_record(model, x_held, train=True, seed=step),
                              ics=gradient_ics(model, x, y, config.lr))
            return record
        return probe

    return cached_replay(row.run_dir, "ics-stability",
                         {"probes": PROBES, "held_out": count, "measure": "moments-v1"}, dataset,
                         lambda c: anchors_and_steps(total_steps(c, dataset))[1], probe_for,
                         reduce=condense)


def condense(result: dict[str, Any]) -> dict[str, Any]:
    """A replay's probes -> per normalized layer :func:`bnlab.probes.ics.stability` over the
    (anchor, next step) pairs, and the anchors' percentiles and gradient ICS."""
    records = result["records"]
    by_step = {r["step"]: r for r in records}
    pairs = [(r, by_step[r["step"] + 1]) for r in records
             if r.get("anchor") and r["step"] + 1 in by_step]
    layers = []
    for i in range(len(records[0]["layers"]) if records else 0):
        # (T, C) each: every unit's moments at the anchors (0) and one step later (1)
        m = {(which, key): torch.stack([pair[which]["layers"][i][key] for pair in pairs])
             for which in (0, 1) for key in ("mean", "std", "spread")} if len(pairs) >= 2 else {}
        layers.append(stability(m[0, "mean"], m[0, "std"], m[1, "mean"], m[1, "std"],
                                m[0, "spread"]) if m else {})
    anchors = [{k: r[k] for k in ("step", "train", "ics")} for r in records
               if r.get("anchor")]
    return {"reproduces_run": result["reproduces_run"], "layers": layers, "anchors": anchors}


# --------------------------------------------------------------------------- per-run numbers

def layer_mean(probe: dict[str, Any], key: str) -> float:
    """Mean over the normalized layers of one stability number (nan when none has it)."""
    values = [layer.get(key, math.nan) for layer in probe["layers"]]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def mean_ics(probe: dict[str, Any], key: str = "relative") -> float:
    """Mean over anchors (step 0 included) and weight layers of one gradient-ICS quantity."""
    values = [layer[key] for a in probe["anchors"] for layer in a["ics"]
              if layer[key] is not None and math.isfinite(layer[key])]
    return sum(values) / len(values) if values else math.nan


def log_train_loss(row: Row) -> float:
    """Log of the last epoch's mean training loss (train mode: noisy BN's noise on); a
    diverged run counts at chance, :data:`CHANCE_LOSS`."""
    if row.diverged or not row.metrics:
        return math.log(CHANCE_LOSS)
    return math.log(row.metrics[-1]["train_loss"])


# --------------------------------------------------------------------------- rates

def best_rate(rows: list[Row], net: str, norm: str) -> float | None:
    """The rate of ``NETS[net].lrs`` with the best mean final validation accuracy."""
    return best_lr(rows, NETS[net].lrs, net=net, norm=norm)


def rates(rows: list[Row], net: str) -> dict[str, float | None]:
    """``{"same": the plain net's best rate, norm: that norm's best rate}``."""
    best = {norm: best_rate(rows, net, norm) for norm in NORMS}
    return {"same": best["none"], **best}


# --------------------------------------------------------------------------- verdicts

MEASURES = {
    "run_mean_rel": "unit input mean's range over training / noise-free spread (median unit, "
                    "mean over layers)",
    "step_mean_rel": "unit input mean's change in one step / noise-free spread (median unit, "
                     "mean over layers)",
    "ics": "gradient ICS ‖G - G'‖/‖G‖ (mean over layers and probes)",
    "loss": "log final training loss, noise on",
}


def _not_measured(claim: str, source: str, measure: str, why: str, **details: str) -> Verdict:
    """``not_measured``, the reason before the setting's note."""
    note = details.pop("note", "")
    return not_measured(claim, source, measure, f"not measured: {why}" + (f". {note}" if note
                                                                          else ""), **details)


def _failures(groups: dict[str, list[Row]]) -> str:
    return "; ".join(f"{name}: {sum(failed(r) for r in group)}/{len(group)} failed"
                     for name, group in groups.items() if any(failed(r) for r in group))


def compare(claim: str, source: str, measure: str, a: list[Row], b: list[Row], value,
            direction: int, names: tuple[str, str], **details: str) -> Verdict:
    """``judge_difference`` of ``value(row)`` between the runs of ``a`` and ``b`` that trained
    (paired by seed; a run fails when it diverged or ends at or below ``FAIL_ACCURACY``),
    or ``not_measured`` when a side has none that trained, or no runs."""
    failures = _failures({names[0]: a, names[1]: b})
    if not a or not b:
        return _not_measured(claim, source, measure, "a side of the comparison did not run",
                             **details)
    trained = [{r.seed: value(r) for r in side if not failed(r)} for side in (a, b)]
    if not all(trained):
        return _not_measured(claim, source, measure,
                             f"compared only between nets that both train ({failures})",
                             failed=failures, **details)
    return judge_difference(claim, source, measure, trained[0], trained[1], direction,
                            failed=failures, **details)


def net_verdicts(rows: list[Row], probes: dict[str, Any], net: str) -> list[Verdict]:
    """The three papers' claims for one net (module docstring)."""
    group = select(rows, net=net)
    if not group:
        return []
    rate = rates(group, net)
    name = NETS[net].name

    def at(norm: str, lr: float | None) -> list[Row]:
        return select(group, norm=norm, lr=lr) if lr is not None else []

    def value(key: str):
        return lambda r: layer_mean(probes[r.run_dir], key) if key != "ics" else \
            mean_ics(probes[r.run_dir])

    same = rate["same"]
    if same is None:  # no plain runs: no rate to compare at
        return []
    where = f"{name}, lr {same:g} for both (the plain net's best)"
    out = [compare("BN stabilizes the distribution of layer inputs", IOFFE,
                   f"{MEASURES['run_mean_rel']}, BN - plain; {where}",
                   at("none", same), at("bnlab", same), value("run_mean_rel"), -1,
                   ("plain", "BN"), paper="Fig. 1(b, c): a sigmoid input's 15/50/85th "
                   "percentiles drift over training without BN, stay put with it (MNIST MLP)",
                   note=SETTING, evidence="Stability of layer inputs; ioffe_fig1.png")]
    for norm in NOISY:
        s = f"noisy BN {strength(norm):g}"
        out.append(compare(f"{s}'s layer inputs are less stable than the plain net's",
                           SANTURKAR, f"{MEASURES['step_mean_rel']}, noisy - plain; {where}",
                           at("none", same), at(norm, same), value("step_mean_rel"), 1,
                           ("plain", s), paper="Fig. 2: noisy BN's distributions are less "
                           "stable than even the standard net's (VGG, CIFAR-10)",
                           note=f"{SETTING}; noise of bnlab.nn.noisy", evidence="stability.png"))
        out.append(trains_as_well(at("bnlab", same), at(norm, same), s, where))
    out.append(compare("BN does not reduce gradient ICS (BN nets have as much or more)",
                       SANTURKAR, f"{MEASURES['ics']}, BN - plain; {where}",
                       at("none", same), at("bnlab", same), value("ics"), 1, ("plain", "BN"),
                       paper="Fig. 5: BN nets' gradient ICS is as large as or larger than "
                       "the standard nets' (VGG, CIFAR-10; deep linear nets)",
                       note=f"{SETTING}; supported: BN's is larger; contradicted: smaller",
                       evidence="gradient_ics.png"))
    if rate["bnlab"] is not None and rate["bnlab"] != same:
        where = f"{name}, each one's best rate (plain {same:g}, BN {rate['bnlab']:g})"
        plain, bn = at("none", same), at("bnlab", rate["bnlab"])
        out.append(compare("BN stabilizes the distribution of layer inputs", IOFFE,
                           f"{MEASURES['run_mean_rel']}, BN - plain; {where}", plain, bn,
                           value("run_mean_rel"), -1, ("plain", "BN"), note=SETTING,
                           evidence="Stability of layer inputs"))
        out.append(compare("BN does not reduce gradient ICS (BN nets have as much or more)",
                           SANTURKAR, f"{MEASURES['ics']}, BN - plain; {where}", plain, bn,
                           value("ics"), 1, ("plain", "BN"),
                           note=f"{SETTING}; G' after each net's step at its own rate",
                           evidence="Gradient ICS"))
    return out


def trains_as_well(bn: list[Row], noisy: list[Row], name: str, where: str) -> Verdict:
    """Santurkar et al.'s "noisy BN trains about as well as BN": ``judge_same`` on the log
    final training loss within :data:`SAME_LOSS`; BN must train, noisy BN's failures count
    (a diverged run at chance loss)."""
    claim = f"{name} (more ICS) trains about as well as BN"
    measure = f"{MEASURES['loss']}, noisy - BN, within ±log 1.2; {where}"
    details = {"paper": "Fig. 2: the noisy-BN net trains nearly as well as BN and better than "
                        "the standard net, despite less stable distributions (VGG, CIFAR-10)",
               "note": f"{SETTING}; noise of bnlab.nn.noisy", "evidence": "Learning rates "
               "and training"}
    failures = _failures({"BN": bn, name: noisy})
    trained_bn = {r.seed: log_train_loss(r) for r in bn if not failed(r)}
    if not trained_bn or not noisy:
        return _not_measured(claim, SANTURKAR, measure, f"BN did not train here ({failures})"
                             if bn else "a side of the comparison did not run",
                             failed=failures, **details)
    return judge_same(claim, SANTURKAR, measure, trained_bn,
                      {r.seed: log_train_loss(r) for r in noisy}, SAME_LOSS,
                      failed=failures, **details)


# --------------------------------------------------------------------------- calibration

def issue25_distortion(strength: float, probes: int = 25, n: int = 500, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Issue 25's case: a fixed N(0, 1) batch ``(n, 1)`` and at each of ``probes`` steps the
    noise of noisy BN before issue 25 (``mu_t ~ U(-S, S)``, ``sigma_t ~ U(1, 1 + S)``, per
    sample ``m ~ N(mu_t, S^2)``, ``s ~ N(sigma_t, (S/2)^2)``; ``x * s + m``). Returns the
    outputs ``(probes, n, 1)``, the clean batch, and the known answer: the range over the steps
    of the unit's mean ``mu_t + sigma_t * mean(x)``, in units of ``std(x)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)  # (n, 1)
    outputs, centres = [], []
    for _ in range(probes):
        mu = (torch.rand((), generator=g, dtype=torch.float64) * 2 - 1) * strength
        sigma = 1 + torch.rand((), generator=g, dtype=torch.float64) * strength
        m = mu + strength * torch.randn(n, 1, generator=g, dtype=torch.float64)
        s = sigma + strength / 2 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        outputs.append(x * s + m)
        centres.append((mu + sigma * x.mean()).item())
    return torch.stack(outputs), x, (max(centres) - min(centres)) / x.std().item()


def over_training_shift(outputs: torch.Tensor, clean: torch.Tensor) -> float:
    """``stability``'s ``run_mean_rel`` of outputs ``(T, N, C)`` at T probes, the spread
    being that of ``clean`` ``(N, C)``."""
    mean, std = (torch.stack(m) for m in zip(*(unit_moments(o) for o in outputs)))  # (T, C)
    spread = unit_moments(clean)[1].expand_as(std)
    return stability(mean, std, mean, std, spread)["run_mean_rel"]


def noisy_bn_stability(norm: str, steps: int = 25, n: int = 500, units: int = 100
                       ) -> dict[str, float]:
    """``stability`` of a lone norm layer ``norm`` (then a sigmoid) on a fixed N(0, 1) batch
    ``(n, units)``, probed at ``steps + 1`` consecutive steps (its weights never change: any
    shift is the noise's)."""
    x = torch.randn(n, units, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(create_norm_layer(norm, "fc", units), nn.Sigmoid()).double()
    probes = [layer_moments(model, x, seed=t)[0] for t in range(steps + 1)]
    m = {k: torch.stack([p[k] for p in probes]) for k in ("mean", "std", "spread")}  # (T+1, C)
    return stability(m["mean"][:-1], m["std"][:-1], m["mean"][1:], m["std"][1:],
                     m["spread"][:-1])


def tiny_bn_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 5-7-6-3 sigmoid MLP with BN and a batch of 16, float64, for gradient ICS."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), create_norm_layer("bnlab", "fc", 7), nn.Sigmoid(),
                              nn.Linear(7, 6), create_norm_layer("bnlab", "fc", 6), nn.Sigmoid(),
                              nn.Linear(6, 3)).double()
    return model, x, y


def calibration() -> list[Calibration]:
    """Each measure behind a verdict on synthetic inputs with a known answer (cheap), on one
    torch thread (tensors this small run slower on more, and far slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _calibration()
    finally:
        torch.set_num_threads(threads)


def _calibration() -> list[Calibration]:
    out = []
    step = "stability: one-step change of the unit mean / noise-free spread"
    for s in STRENGTHS:
        read = noisy_bn_stability(f"noisy-bn:{s:g}:unit")["step_mean_rel"]
        known = 2 * s / 3
        out.append(Calibration(step, f"noisy BN S={s:g} (bnlab.nn.noisy) on a fixed N(0,1) batch "
                               "500 x 100, 25 steps", f"2S/3 = {known:.3f} (±15%)",
                               f"{read:.3f}", abs(read - known) <= 0.15 * known))
    read = noisy_bn_stability("bnlab")["step_mean_rel"]
    out.append(Calibration(step, "plain BN, same batch (no shift)", "0", f"{read:.2g}",
                           abs(read) < 1e-9))
    run = "stability: range over training of the unit mean / noise-free spread"
    for s in (0.5, 2.0, 20.0):
        outputs, clean, known = issue25_distortion(s)
        read = over_training_shift(outputs, clean)
        out.append(Calibration(run, f"issue 25's case: N(0,1) x 500, 25 steps, S={s:g} with "
                               "per-sample noise of sd S", f"{known:.2f} (0.8-1.25x)",
                               f"{read:.2f}", 0.8 * known <= read <= 1.25 * known))
    outputs, clean, _ = issue25_distortion(0.0)
    read = over_training_shift(outputs, clean)
    out.append(Calibration(run, "issue 25's case, S=0 (no shift)", "0", f"{read:.2g}",
                           abs(read) < 1e-9))
    model, x, y = tiny_bn_mlp()
    at = {lr: gradient_ics(model, x, y, lr)[-1]["relative"] for lr in (0.0, 1e-3, 1e-2)}
    ics = "gradient ICS ‖G - G'‖/‖G‖ (last layer)"
    out.append(Calibration(ics, "5-7-6-3 BN MLP, lr 0 (previous layers do not move)", "0",
                           f"{at[0.0]:.2g}", at[0.0] == 0.0))
    ratio = at[1e-2] / at[1e-3]
    out.append(Calibration(ics, "same net, lr 1e-3 -> 1e-2 (first order: in proportion)",
                           "x10 (±20%)", f"{at[1e-3]:.2e} -> {at[1e-2]:.2e} (x{ratio:.1f})",
                           8 <= ratio <= 12))
    return out


# --------------------------------------------------------------------------- report

STABILITY_COLUMNS = {"step_mean": "step: mean", "step_mean_rel": "step: mean / spread",
                     "step_std": "step: sd", "step_std_rel": "step: sd / spread",
                     "run_mean": "training: mean", "run_mean_rel": "training: mean / spread",
                     "run_std": "training: sd", "run_std_rel": "training: sd / spread"}


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    calibrated = calibration()
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to measure)"],
                        calibration=calibrated)
    nets = [net for net in NETS if select(rows, net=net)]
    probed = [r for net in nets for _, group in _stability_rows(rows, net) for r in group]
    probes = {r.run_dir: measure(r, dataset, settings) for r in probed}
    plot_fig1(rows, probes, nets, out / "ioffe_fig1.png")
    plot_stability(rows, probes, nets, out / "stability.png")
    plot_ics(rows, probes, nets, out / "gradient_ics.png")
    sections = [*method_lines(),
                "## Learning rates and training", "", *(rate_table(rows, net) for net in nets),
                "## Stability of layer inputs", "",
                *stability_notes(min(len(dataset.test_images), held_out_count(settings))),
                *(stability_table(rows, probes, net) for net in nets),
                "![stability of layer inputs](stability.png)", "",
                "![Ioffe & Szegedy Fig. 1 on Fashion-MNIST](ioffe_fig1.png)", "",
                "## Gradient ICS", "", *(ics_table(rows, probes, net) for net in nets),
                "![gradient ICS](gradient_ics.png)", "", *replay_lines(probed, probes)]
    verdicts = [v for net in nets for v in net_verdicts(rows, probes, net)]
    return Analysis(sections, rate_findings(rows, nets), verdicts, calibrated)


def method_lines() -> list[str]:
    return ["**Method.** Noisy BN (bnlab.nn.noisy): after BN, y*s + m with each unit's "
            "mu_t ~ U(-S, S) and sigma_t ~ U(1, 1 + S) re-drawn every step, per-sample noise "
            "of sd 0.1*S (small next to the one-step shift of the mean, E = 2S/3); in eval "
            "mode its expectation y*(1 + S/2). Rates are chosen on the validation split: each "
            "model's best, and the same rate for the three (the plain net's best). Verdicts "
            "compare runs that trained (validation accuracy above 0.2), paired by seed; "
            "\"trains about as well\" is judged on the training loss with the noise on.", ""]


def stability_notes(images: int) -> list[str]:
    return ["Per normalized layer (the input of each sigmoid: BN's output with noisy BN's "
            f"noise, or the plain net's pre-activation), on {images} fixed test images in "
            "training mode: *step* is the mean over the anchors of a unit's change in one SGD "
            "step, *training* the range over the anchors; *mean* and *sd* are the unit's "
            "moments, */ spread* divides by the unit's noise-free standard deviation first "
            "(the plain net's: its own pre-activation's). Each cell: the median over units, "
            "then mean ± 95% CI over seeds (n). At the same rate (the plain net's best), and "
            "BN at its own best where that differs. In training mode BN's output mean on the "
            "batch is its beta: BN's shifts are those of its affine.", ""]


def rate_table(rows: list[Row], net: str) -> str:
    spec = NETS[net]
    rate = rates(select(rows, net=net), net)
    lines = []
    for norm in NORMS:
        cells = [norm_label(norm)]
        for lr in spec.lrs:
            group = select(rows, net=net, norm=norm, lr=lr)
            fails = sum(failed(r) for r in group)
            cells.append(f"{format_mean_ci(finals(group))}, {fails}/{len(group)} failed"
                         if group else "-")
        same = select(rows, net=net, norm=norm, lr=rate["same"])
        cells += [f"{rate[norm]:g}" if rate[norm] is not None else "-",
                  format_mean_ci([math.exp(log_train_loss(r)) for r in same], ".3f"),
                  format_mean_ci(finals(same, "final_test_acc"))]
        lines.append(cells)  # validation accuracy at each rate, the best, the same rate's numbers
    same = f"{rate['same']:g}" if rate["same"] is not None else "-"
    headers = ["model", *(f"final val acc, lr {lr:g}" for lr in spec.lrs), "best lr (val)",
               f"final train loss (noise on), lr {same}", f"final test acc, lr {same}"]
    return f"**{spec.name}** (same rate: {same})\n\n" + format_table(headers, lines) + "\n"


def _stability_rows(rows: list[Row], net: str) -> list[tuple[str, list[Row]]]:
    """(label, runs) of every variant of ``net`` that is measured (the others only took part
    in choosing the rates): each norm at the same rate, and BN at its best where that differs."""
    rate = rates(select(rows, net=net), net)
    out = [(f"{norm_label(norm)} lr={rate['same']:g}", select(rows, net=net, norm=norm,
                                                             lr=rate["same"]))
           for norm in NORMS if rate["same"] is not None]
    if rate["bnlab"] is not None and rate["bnlab"] != rate["same"]:
        out.append((f"BN lr={rate['bnlab']:g} (its best)",
                    select(rows, net=net, norm="bnlab", lr=rate["bnlab"])))
    return [(label, group) for label, group in out if group]


def stability_table(rows: list[Row], probes: dict[str, Any], net: str) -> str:
    spec = NETS[net]
    lines = []
    for label, group in _stability_rows(rows, net):
        for i, layer in enumerate(spec.layers):
            lines.append([label if i == 0 else "", layer, *(
                format_mean_ci([_layer_value(probes[r.run_dir], i, key) for r in group], ".3g")
                for key in STABILITY_COLUMNS)])
    return (f"**{spec.name}**\n\n" + format_table(["variant", "layer", *STABILITY_COLUMNS.values()],
                                                  lines) + "\n")


def _layer_value(probe: dict[str, Any], i: int, key: str) -> float:
    layers = probe["layers"]
    value = layers[i].get(key) if i < len(layers) else None
    return math.nan if value is None else value


def ics_table(rows: list[Row], probes: dict[str, Any], net: str) -> str:
    lines = []
    for label, group in _stability_rows(rows, net):
        lines.append([label, format_mean_ci(finals(group)),
                      format_mean_ci([mean_ics(probes[r.run_dir]) for r in group], ".3g"),
                      format_mean_ci([mean_ics(probes[r.run_dir], "cosine") for r in group],
                                     ".3f")])
    return (f"**{NETS[net].name}**: mean over weight layers and probe steps (Santurkar et al., "
            "Def. 2.1: G' after the previous layers' SGD step at the run's rate).\n\n"
            + format_table(["variant", "final val acc", "‖G - G'‖ / ‖G‖", "cos(G, G')"],
                           lines) + "\n")


def replay_lines(rows: list[Row], probes: dict[str, Any]) -> list[str]:
    """Whether the probed replays of ``rows`` ended on their runs' weights."""
    unreproduced = [r.label for r in rows if probes[r.run_dir]["reproduces_run"] is False]
    if unreproduced:
        return ["The probed replay did not end on the run's weights for "
                f"{unreproduced}; their probes describe a slightly different trajectory."]
    return ["Every probed replay ended on exactly its run's weights."]


def rate_findings(rows: list[Row], nets: list[str]) -> list[str]:
    lines = []
    for net in nets:
        rate = rates(select(rows, net=net), net)
        best = ", ".join(f"{norm_label(n)} {rate[n]:g}" for n in NORMS if rate[n] is not None)
        lines.append(f"- {NETS[net].name}: the best rates on validation are {best}; the three "
                     f"are compared at {rate['same']:g}, the plain net's best.")
    return lines


# --------------------------------------------------------------------------- figures

def _seed0(rows: list[Row]) -> Row | None:
    return min(rows, key=lambda r: r.seed) if rows else None


def plot_fig1(rows: list[Row], probes: dict[str, Any], nets: list[str], path: Path) -> None:
    """Ioffe & Szegedy's Fig. 1 per net at the same rate (seed 0): validation accuracy over
    steps, and the last hidden layer's input percentiles (training mode) for plain, BN and
    noisy BN 1."""
    shown = ("none", "bnlab", NOISY[1])
    fig, axes = plt.subplots(len(nets), 4, figsize=(18, 4 * len(nets)), squeeze=False)
    for row_axes, net in zip(axes, nets):
        same = rates(select(rows, net=net), net)["same"]
        name = NETS[net].name
        for i, norm in enumerate(shown):
            run = _seed0(select(rows, net=net, norm=norm, lr=same))
            ax = row_axes[i + 1]
            if run is None:
                note_empty(ax, "no run")
                continue
            row_axes[0].plot([e["step"] for e in run.evals], [e["val_acc"] for e in run.evals],
                             label=norm_label(norm), **style(i))
            anchors = probes[run.run_dir]["anchors"]
            steps = [a["step"] for a in anchors]
            for j, (which, label) in enumerate((("unit", "unit 0"), ("median", "median unit"))):
                look = style(j)  # p50 as the line, p15 to p85 as its band
                low, mid, high = zip(*(a["train"][which] for a in anchors))
                ax.plot(steps, mid, label=f"{label}: p50, band p15-p85", **look)
                ax.fill_between(steps, low, high, color=look["color"], alpha=0.15, linewidth=0)
            ax.set_title(f"{name} {norm_label(norm)}, lr {same:g}: last hidden layer's input")
            ax.set_ylabel("sigmoid input (training mode)")
            count_axis(ax, "step")
            legend(ax)
        row_axes[0].set_title(f"{name}: validation accuracy (seed 0)")
        row_axes[0].set_ylabel("validation accuracy")
        count_axis(row_axes[0], "step")
        legend(row_axes[0])
    save_figure(fig, path)


def plot_stability(rows: list[Row], probes: dict[str, Any], nets: list[str], path: Path) -> None:
    """Per net, the one-step and the over-training shift of the unit means (relative), per
    layer, mean over seeds with its 95% interval, at the same rate."""
    fig, axes = plt.subplots(len(nets), 2, figsize=(12, 4 * len(nets)), squeeze=False)
    for row_axes, net in zip(axes, nets):
        same = rates(select(rows, net=net), net)["same"]
        layers = NETS[net].layers
        for ax, key, what in ((row_axes[0], "step_mean_rel", "in one step"),
                              (row_axes[1], "run_mean_rel", "over training")):
            drawn = False
            for i, norm in enumerate(NORMS):
                group = select(rows, net=net, norm=norm, lr=same)
                cells = [mean_ci([_layer_value(probes[r.run_dir], j, key) for r in group])
                         for j in range(len(layers))]
                xs = [j + 1 for j, (m, _) in enumerate(cells) if math.isfinite(m) and m > 0]
                if not xs:
                    continue
                ax.errorbar(xs, [cells[j - 1][0] for j in xs],
                            yerr=[cells[j - 1][1] or 0.0 for j in xs],
                            label=norm_label(norm), **style(i))
                drawn = True
            if not drawn:
                note_empty(ax, "no finite shifts to draw")
                continue
            ax.set_title(f"{NETS[net].name}, lr {same:g}: unit mean's shift {what}")
            log_axis(ax, "y", label="shift / noise-free spread (median unit)")
            ax.set_xticks(range(1, len(layers) + 1), layers)
            ax.set_xlabel("normalized layer")
            legend(ax)
    save_figure(fig, path)


def plot_ics(rows: list[Row], probes: dict[str, Any], nets: list[str], path: Path) -> None:
    """Per net, the gradient ICS over training (seed 0) of plain and BN at the same rate."""
    fig, axes = plt.subplots(len(nets), 2, figsize=(12, 4 * len(nets)), squeeze=False)
    for row_axes, net in zip(axes, nets):
        same = rates(select(rows, net=net), net)["same"]
        for i, norm in enumerate(("none", "bnlab")):
            run = _seed0(select(rows, net=net, norm=norm, lr=same))
            if run is None:
                continue
            anchors = probes[run.run_dir]["anchors"]
            steps = [a["step"] for a in anchors]
            for ax, key in zip(row_axes, ("relative", "cosine")):
                ax.plot(steps, [sum(layer[key] for layer in a["ics"]) / len(a["ics"])
                                for a in anchors], label=norm_label(norm), **style(i))
        for ax, key in zip(row_axes, ("‖G - G'‖ / ‖G‖", "cos(G, G')")):
            if not ax.lines:
                note_empty(ax, "no run")
                continue
            label = f"{key}, mean over layers (seed 0)"
            if "‖" in key:
                log_axis(ax, "y", label=label)
            else:
                ax.set_ylabel(label)
            ax.set_title(f"{NETS[net].name}, lr {same:g}")
            count_axis(ax, "step")
            legend(ax)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="ics",
    title="Claims: BN stabilizes layer inputs, and that is not why it works (internal covariate "
          "shift)",
    question="Does BN keep layer inputs more stable (Ioffe & Szegedy's Fig. 1), does noisy BN "
             "that destabilizes them still train about as well as BN, and does BN reduce "
             "gradient ICS (Santurkar et al.)?",
    variants=variants,
    analyze=analyze,
    default_epochs=3,
    default_subset=30000,
    notes="MLP: ioffe-mlp (3x100 sigmoid, N(0, 0.05^2) init), batch 60, rates 0.1, 0.5, 2; "
          "LeNet: bn-lenet (--norm none without BN), batch 128, rates 0.1, 0.3, 1; plain SGD; "
          "each without BN, with BN and with noisy BN at S = 0.5, 1, 2. The compared runs are "
          "re-played with probes at anchors spread over training and the step after each.",
)
