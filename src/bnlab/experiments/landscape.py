"""Claim: BN makes the loss landscape smoother (Santurkar et al. 2018, Sec. 3.1, Fig. 4).

Why: if BN does not work by reducing internal covariate shift (``experiments.ics``),
Santurkar et al.'s alternative is that it makes the loss and its gradient better behaved
along the steps SGD takes. This grid trains the chapter's plain LeNet and BN-LeNet at the
chapter's lr 0.1 and at lr 1 (each model's best rate by default; the report reads a
finished ``lr`` experiment beside it and says what it found best), and re-plays every run
(``experiments.probed``) with ``bnlab.probes.landscape.probe`` at 25 steps spread over training:
on that step's batch, along ``W - eta * g``, the loss range, the gradient predictiveness
``||grad L(W - eta g) - g||`` and the effective beta-smoothness, in train mode with BN
running statistics untouched.

Step-size grid: eta in {0.05, 0.1, 0.2, 0.4} (the same for every run, so models compare at
equal distances; Santurkar et al. use a range of this kind around their lr 0.1) and
eta = the run's own lr (the step SGD actually takes), reported apart.

Default: 5 epochs on all 60000 training images (2345 steps), 3 seeds: 12 runs, the same
configs as ``ics``'s LeNets when both use the same epochs and subset; training plus replay
plus 25 probes of 6 forward/backward passes each, sized to fit the lab's 40-minute budget
on 2 cores with ``--jobs 2``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from bnlab.experiments.analysis import Row, best_lr_per_model, by_label, finals, select
from bnlab.experiments.findings import Analysis
from bnlab.experiments.probed import PROBES, cached_replay, default_probe_steps, total_steps
from bnlab.experiments.runner import Experiment, ExpSettings, Variant, periodic_eval_every
from bnlab.experiments.stats import format_mean_ci, mean_ci
from bnlab.probes.landscape import probe
from bnlab.util.plots import count_axis, legend, log_axis, plt, save_figure
from bnlab.util.tables import format_table

ETAS = (0.05, 0.1, 0.2, 0.4)
LEARNING_RATES = (0.1, 1.0)
DEFAULT_BEST_LR = {False: 1.0, True: 1.0}
"""Used when no ``lr`` experiment has finished: LeNet at 0.1 stays at chance for hundreds of
steps (``convergence``'s docstring), 1 trains; BN-LeNet's best of ``lr``'s quick grid was 1."""
EARLY = 0.2
""""Early in training": the first 20% of probe steps (step 0 excluded)."""
MODELS = {False: ("LeNet", {"model": "lenet", "norm": "none"}),
          True: ("BN-LeNet", {"model": "bn-lenet", "norm": "bnlab"})}


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(f"{MODELS[bn][0]} lr={lr:g}",
                    {**MODELS[bn][1], "lr": lr, "eval_every": periodic_eval_every(settings, 128)},
                    {"bn": bn, "lr": lr})
            for bn in (False, True) for lr in LEARNING_RATES]


def measure(row: Row, dataset) -> dict[str, Any]:
    """The run's landscape probes (cached in its folder as ``landscape-probes.json``)."""

    def probe_for(config):
        etas = (*ETAS, config.lr)

        def at_step(model, x, y, step):
            return probe(model, lambda m: F.cross_entropy(m(x), y), etas)
        return at_step

    return cached_replay(row.run_dir, "landscape-probes", {"probes": PROBES, "etas": list(ETAS)},
                         dataset, lambda c: default_probe_steps(total_steps(c, dataset)), probe_for)


def summarize_probe(p: dict[str, Any]) -> dict[str, float]:
    """Over the fixed grid: loss range, max gradient change, beta; at eta = lr: the change."""
    n = len(ETAS)
    losses = [p["loss0"], *p["loss"][:n]]
    finite = [v for v in losses if math.isfinite(v)]
    changes = p["grad_change"][:n]
    ratios = [c / (eta * p["grad_norm"]) for c, eta in zip(changes, ETAS) if p["grad_norm"] > 0]
    ratios = [r for r in ratios if math.isfinite(r)]
    return {"loss_range": max(finite) - min(finite) if len(finite) == len(losses) else math.inf,
            "grad_change": max(changes), "beta": max(ratios) if ratios else math.nan,
            "grad_change_at_lr": p["grad_change"][n], "grad_norm": p["grad_norm"]}


def per_run(records: list[dict[str, Any]], early: bool = False) -> dict[str, float]:
    """Medians over a run's probe steps (all, or only the early ones) of each summary."""
    steps = [r for r in records if r["step"] > 0] or records
    if early:
        steps = steps[:max(1, math.ceil(EARLY * len(steps)))]
    summaries = [summarize_probe(r) for r in steps]
    return {k: _median([s[k] for s in summaries]) for k in summaries[0]} if summaries else {}


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to probe)"])
    probes = {r.run_dir: measure(r, dataset)["records"] for r in rows}
    plot(rows, probes, out / "landscape.png")
    keys = ["loss_range", "grad_change", "beta", "grad_change_at_lr"]
    table = []
    for label, group in by_label(rows).items():
        for early in (True, False):
            stats = [per_run(probes[r.run_dir], early) for r in group]
            table.append([label, "early" if early else "all",
                          format_mean_ci(finals(group)),
                          *[format_mean_ci([s.get(k, math.nan) for s in stats], ".4g") for k in keys]])
    headers = ["variant", "steps", "final test acc", "loss range", "max ||dg||", "beta",
               "||dg|| at eta=lr"]
    best = best_lr_per_model(out.parent / "lr")
    best_note = (f"- Best rates: the defaults LeNet {DEFAULT_BEST_LR[False]:g}, BN-LeNet "
                 f"{DEFAULT_BEST_LR[True]:g} (no finished `lr` experiment beside this one)."
                 if best is None else
                 f"- The `lr` experiment beside this one finds the best rates LeNet "
                 f"{best[False]:g}, BN-LeNet {best[True]:g}; this grid used {list(LEARNING_RATES)}.")
    return Analysis(["## Smoothness along the gradient", "", format_table(headers, table), "",
            f"Per run, the median over probe steps (*early*: the first {EARLY:.0%} of them, step 0 "
            f"excluded) of: the loss range over eta in {list(ETAS)} (and 0); the largest "
            "gradient change ||grad L(W - eta g) - g|| over that grid; the effective "
            "beta-smoothness max_eta ||dg||/||eta g||; and the gradient change at eta = the run's "
            "lr. Then mean ± 95% CI over seeds.", "", best_note, *findings(rows, probes), "",
            "**Beside the paper.** Santurkar et al. probe VGG on CIFAR-10 (and a deep linear net); "
            "here LeNet on Fashion-MNIST with plain SGD. The quantities are absolute gradient "
            "changes, as theirs: a model with smaller gradients shows smaller changes.", "",
            "![landscape](landscape.png)"])


def findings(rows: list[Row], probes: dict[str, Any]) -> list[str]:
    lines = []
    for lr in LEARNING_RATES:
        plain, bn = select(rows, bn=False, lr=lr), select(rows, bn=True, lr=lr)
        if not plain or not bn:
            continue
        for early in (True, False):
            p = [per_run(probes[r.run_dir], early) for r in plain]
            b = [per_run(probes[r.run_dir], early) for r in bn]
            ratio = {k: mean_ci([s[k] for s in p])[0] / mean_ci([s[k] for s in b])[0]
                     for k in ("grad_change", "beta", "loss_range")}
            lines.append(
                f"- lr {lr:g}, {'early' if early else 'all'} steps: LeNet / BN-LeNet ratio of the "
                f"gradient change {ratio['grad_change']:.3g}x, of beta {ratio['beta']:.3g}x, of "
                f"the loss range {ratio['loss_range']:.3g}x (> 1: BN smoother). "
                + ("Santurkar et al. report about 100x in gradient predictiveness early in "
                   f"training; here it is {ratio['grad_change']:.3g}x: "
                   f"**{_order(ratio['grad_change'])}**."
                   if early else ""))
    return lines


def _order(ratio: float) -> str:
    """How a LeNet / BN-LeNet gradient-change ratio compares with the paper's ~100x."""
    if ratio >= 30:
        return "of that order"
    return "BN smoother, but far less than 100x" if ratio > 1 else "BN not smoother"


PANELS = {"loss_range": ("loss range", "nats"),
          "grad_change": ("gradient predictiveness max ||dg||", "gradient norm"),
          "beta": ("effective beta-smoothness", "||dg|| per unit of ||eta g||")}
"""The figure's panels: a key of ``summarize_probe``, its name and its unit."""


def plot(rows: list[Row], probes: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), squeeze=False)
    for label, group in by_label(rows).items():
        per_step: dict[int, list[dict[str, float]]] = {}
        for r in group:
            for rec in probes[r.run_dir]:
                per_step.setdefault(rec["step"], []).append(summarize_probe(rec))
        steps = sorted(per_step)
        for ax, key in zip(axes[0], PANELS):
            lo = [min(s[key] for s in per_step[t]) for t in steps]
            hi = [max(s[key] for s in per_step[t]) for t in steps]
            mid = [_median([s[key] for s in per_step[t]]) for t in steps]
            (line,) = ax.plot(steps, mid, label=label)
            ax.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
    for ax, (name, unit) in zip(axes[0], PANELS.values()):
        ax.set_title(f"{name} (median and range over seeds)")
        log_axis(ax, "y", label=f"{name} ({unit})")
        count_axis(ax, "step")
        legend(ax)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="landscape",
    title="Claim: batch norm smooths the loss landscape",
    question="Along the gradient step, how much do the loss and the gradient change, with and "
             "without BN (Santurkar et al.'s loss range, gradient predictiveness and "
             "beta-smoothness)?",
    variants=variants,
    analyze=analyze,
    default_epochs=5,
    default_subset=0,
    notes=f"LeNet and BN-LeNet at lr {', '.join(f'{lr:g}' for lr in LEARNING_RATES)}, batch 128, "
          f"plain SGD; 25 probe steps per run, eta in {list(ETAS)} and the run's lr.",
)
