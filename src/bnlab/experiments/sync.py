"""Experiment: what per-process batches do to batch norm, and what synchronizing costs.

Why: with data parallelism over W processes and a per-process batch b, DDP's default
batch norm normalizes each process's b images by themselves (local BN: ghost batch norm
of ghost size b within a global batch of W * b), while ``SyncBatchNorm`` normalizes with
all W * b. GroupNorm does not depend on the batch at all. So at small b local BN should
suffer as BN at batch b does, SyncBN should train like BN at batch W * b, and GroupNorm
should not care; the price of SyncBN is two all-reduces per BN layer and step.

Grid: BN-LeNet, W = 4 processes on this machine (``bnlab.training.distributed``), per-process batch
2, 4, 8 and 32 (global 8, 16, 32, 128): local BN, SyncBN, GroupNorm; 3 seeds. Learning
rate 0.1 at global batch 128, scaled with the square root of the global batch (as the
``norms`` experiment). Measured: final test accuracy (eval mode), the train/val
gap (training accuracy over the last epoch, train mode, minus validation accuracy), and
the per-step cost: BN-LeNet training steps under DDP with local BN and with SyncBN,
stepped in turn on the same batches (per-process batch 32), at W = 2 and W = 4; the
median difference is the synchronization's cost (cached in ``cost.json``). ``--quick``
runs the smallest and largest per-process batches and the cost at 4 processes only.

Verdicts (``findings``' rule, paired over seeds, final test accuracy): at the smallest
per-process batch, SyncBN is more accurate than local BN (it normalizes over all W * b
images) and so is GroupNorm (no batch statistics); at the largest, SyncBN and local BN are
as accurate as each other within :data:`MARGIN` (the batch is large enough on its own).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bnlab.experiments.analysis import Row, plot_intervals, select, train_val_gap
from bnlab.experiments.arms import REPORTED, cell, judge_arms, same_arms
from bnlab.experiments.findings import Analysis, Verdict
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import mean_ci
from bnlab.nn.sync import SyncBatchNorm
from bnlab.training.distributed import DistributedConfig, join_world, spawn
from bnlab.training.train import TrainConfig, make_step, model_for, optimizer_for
from bnlab.util.io import atomic_write_json, read_json
from bnlab.util.plots import legend, log_axis, plt, save_figure
from bnlab.util.tables import format_table

WORLD = 4
PER_RANK_BATCHES = (2, 4, 8, 32)
VARIANTS = {"local": ("bnlab", False), "sync": ("bnlab", True), "group": ("group", False)}
NAMES = {"local": "local BN", "sync": "SyncBN", "group": "GroupNorm"}
BASE_LR, BASE_BATCH = 0.1, 128
COST_WORLDS = (2, 4)
QUICK_PER_RANK_BATCHES = (2, 32)
QUICK_COST_WORLDS = (4,)
"""--quick: the smallest and largest per-process batches, and the cost at 4 processes only
(every run and cost measurement starts its processes anew: a smoke test within minutes)."""
COST_BATCH = 32  # per process
COST_STEPS = 30
MARGIN = 0.01  # "as accurate": final test accuracies within 1 point, paired over seeds


def lr_for(global_batch: int) -> float:
    return BASE_LR * math.sqrt(global_batch / BASE_BATCH)


def per_rank_batches(settings: ExpSettings) -> tuple[int, ...]:
    """The grid's per-process batches: :data:`PER_RANK_BATCHES`, or the quick ones."""
    return QUICK_PER_RANK_BATCHES if settings.quick else PER_RANK_BATCHES


def batches_of(rows: list[Row]) -> list[int]:
    """The per-process batches the grid ran, ascending."""
    return sorted({r.tags["per_rank_batch"] for r in rows})


def variants(settings: ExpSettings) -> list[Variant]:
    """Every (norm, per-process batch) point, each run on :data:`WORLD` processes."""
    return [Variant(f"{NAMES[variant]} b={b}",
                    {"model": "bn-lenet", "norm": norm, "batch_size": WORLD * b,
                     "lr": lr_for(WORLD * b)},
                    {"variant": variant, "per_rank_batch": b},
                    world=DistributedConfig(nproc=WORLD, sync_bn=sync_bn))
            for variant, (norm, sync_bn) in VARIANTS.items() for b in per_rank_batches(settings)]


# --------------------------------------------------------------------------- cost


def _cost_rank(batch: int, steps: int) -> dict[str, float] | None:
    """In a spawned world: ms per DDP training step with local BN and with SyncBN."""
    torch.manual_seed(0)
    config = TrainConfig(model="bn-lenet", norm="bnlab")
    local = model_for(config)
    synced = SyncBatchNorm.convert_sync_batchnorm(model_for(config))
    steps_by_name = {}
    for name, model in (("local", local), ("sync", synced)):
        ddp = nn.parallel.DistributedDataParallel(model)
        steps_by_name[name] = make_step(ddp, optimizer_for(model, config))
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for i in range(steps + 5):
        for name, step in steps_by_name.items():
            dist.barrier()
            start = time.perf_counter()
            step(x, y)
            if i >= 5:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - start)
    medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return medians if dist.get_rank() == 0 else None


def _cost_world(out: str, batch: int, steps: int) -> None:
    join_world("gloo")
    try:
        medians = _cost_rank(batch, steps)
        if medians is not None:
            atomic_write_json(Path(out), {**medians, "world": int(os.environ["WORLD_SIZE"])})
    finally:
        dist.destroy_process_group()


def measure_cost(out: Path, steps: int = COST_STEPS,
                 worlds: tuple[int, ...] | None = None) -> list[dict[str, float]]:
    """Per-step ms of local BN and SyncBN at each world size of ``worlds`` (default
    :data:`COST_WORLDS`), cached in ``out/cost.json``."""
    cache = out / "cost.json"
    if cache.exists():
        return read_json(cache)
    rows = []
    for world in worlds or COST_WORLDS:
        path = out / f".cost-{world}.json"
        spawn(_cost_world, (str(path), COST_BATCH, steps), world, timeout=600)
        rows.append(read_json(path))
        path.unlink()
    atomic_write_json(cache, rows)
    return rows


# --------------------------------------------------------------------------- report


def _final_test_acc(row: Row) -> float:
    return row.summary[REPORTED]


def _select(rows: list[Row], variant: str, b: int) -> list[Row]:
    return select(rows, variant=variant, per_rank_batch=b)


def report_sections(rows: list[Row], cost: list[dict[str, float]]) -> list[str]:
    batches = batches_of(rows)
    headers = ["norm", *[f"b={b} (global {WORLD * b})" for b in batches]]
    acc = [[NAMES[v], *[cell(_select(rows, v, b), _final_test_acc) for b in batches]]
           for v in VARIANTS]
    gap = [[NAMES[v], *[cell(_select(rows, v, b), train_val_gap) for b in batches]]
           for v in VARIANTS]
    cost_rows = [[c["world"], f"{c['local']:.2f}", f"{c['sync']:.2f}",
                  f"{c['sync'] - c['local']:+.2f}", f"{c['sync'] / c['local']:.2f}x"]
                 for c in cost]
    return [
        "## Final test accuracy (eval mode) by per-process batch", "",
        format_table(headers, acc), "",
        "## Train/val gap (training accuracy of the last epoch, train mode, minus validation "
        "accuracy)", "", format_table(headers, gap), "",
        "Mean ± 95% CI over seeds, n per cell; diverged runs counted, not averaged.", "",
        f"## Cost of synchronization (BN-LeNet step under DDP, per-process batch {COST_BATCH}, "
        "median ms, stepped in turn)", "",
        format_table(["processes", "local BN", "SyncBN", "difference", "ratio"], cost_rows),
    ]


def verdicts(rows: list[Row]) -> list[Verdict]:
    """SyncBN and GroupNorm against local BN at the smallest per-process batch; SyncBN and
    local BN the same at the largest (see the module docstring)."""
    batches = batches_of(rows)
    if not batches:
        return []
    small, large = batches[0], batches[-1]

    def side(variant: str, b: int) -> tuple[str, list[Row]]:
        return f"{NAMES[variant]} b={b}", _select(rows, variant, b)

    note = (f"{WORLD} processes (gloo, one machine), BN-LeNet, global batch {WORLD} x b, lr "
            "scaled with the square root of the global batch, equal epochs")
    return [
        judge_arms(f"SyncBN recovers small per-process batches: more accurate than local BN at "
                   f"b={small}", "Peng et al. 2018 (cross-GPU BN)",
                   f"final test accuracy, SyncBN minus local BN, b={small}",
                   side("local", small), side("sync", small),
                   paper="normalizing over every process's images makes small per-GPU batches "
                         "train as a large batch", note=note),
        judge_arms(f"GroupNorm is more accurate than local BN at b={small}", "Wu & He 2018",
                   f"final test accuracy, GroupNorm minus local BN, b={small}",
                   side("local", small), side("group", small),
                   paper="GN's accuracy does not depend on the batch; BN's falls at small batches",
                   note=note),
        same_arms(f"at b={large}, SyncBN and local BN are as accurate", "Peng et al. 2018",
                  f"final test accuracy, SyncBN minus local BN, b={large} (equivalence margin "
                  f"±{MARGIN})", side("local", large), side("sync", large), MARGIN,
                  paper="synchronizing matters only where per-process batches are small",
                  note=note),
    ]


def _mean(rows: list[Row], variant: str, b: int) -> float:
    """Mean final test accuracy of a cell's runs that did not diverge (nan if none)."""
    return mean_ci([_final_test_acc(r) for r in _select(rows, variant, b) if not r.diverged])[0]


def findings(rows: list[Row], cost: list[dict[str, float]]) -> list[str]:
    lines = []
    for b in batches_of(rows):
        means = {v: _mean(rows, v, b) for v in VARIANTS}
        if any(math.isnan(m) for m in means.values()):
            continue
        best = max(means, key=means.get)
        lines.append(f"- b={b}: SyncBN − local BN = {100 * (means['sync'] - means['local']):+.2f} "
                     f"points, GroupNorm − local BN = "
                     f"{100 * (means['group'] - means['local']):+.2f}; best: {NAMES[best]}.")
    for v in VARIANTS:
        cells = [(b, m) for b in batches_of(rows) if not math.isnan(m := _mean(rows, v, b))]
        if len(cells) > 1:
            (b0, first), (b1, last) = cells[0], cells[-1]
            steps = [_select(rows, v, b)[0].planned_steps for b in (b0, b1)]
            lines.append(f"- {NAMES[v]}: accuracy from b={b0} to b={b1} moves by "
                         f"{100 * (last - first):+.2f} points, but the grid holds epochs fixed, so "
                         f"b={b0} takes {steps[0]} SGD steps and b={b1} {steps[1]}: a step-count "
                         f"effect as much as a batch-size one. Only the comparisons at one b "
                         f"(above) hold the budget fixed.")
    for c in cost:
        lines.append(f"- {c['world']} processes: SyncBN costs {c['sync'] - c['local']:+.2f} ms a "
                     f"step over local BN ({c['sync'] / c['local']:.2f}x).")
    return lines


def plot(rows: list[Row], path: Path) -> None:
    """Final test accuracy against the per-process batch, one line per norm."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, v in zip((-0.04, 0.0, 0.04), VARIANTS):
        points = {b * 2 ** offset: [_final_test_acc(r) for r in _select(rows, v, b)
                                   if not r.diverged]
                  for b in batches_of(rows) if any(not r.diverged for r in _select(rows, v, b))}
        if points:
            plot_intervals(ax, points, label=NAMES[v])
    log_axis(ax, "x", base=2, ticks=batches_of(rows) or list(PER_RANK_BATCHES),
             label=f"per-process batch ({WORLD} processes)")
    ax.set_ylabel("final test accuracy (eval mode)")
    ax.set_title("Batch norm across processes (mean, 95% CI over seeds)")
    legend(ax)
    save_figure(fig, path)


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    """The tables, the synchronization's cost per step (measured once, ``cost.json``), the
    findings and ``sync.png``."""
    cost = (measure_cost(out, 10, QUICK_COST_WORLDS) if settings.quick
            else measure_cost(out, COST_STEPS))
    plot(rows, out / "sync.png")
    return Analysis([*report_sections(rows, cost), "", "![accuracy by per-process batch](sync.png)"],
                    findings(rows, cost), verdicts(rows))


EXPERIMENT = Experiment(
    name="sync",
    title="Batch norm across processes: local BN vs SyncBN vs GroupNorm",
    question="With 4 data-parallel processes, how do small per-process batches hurt batch "
             "norm, does synchronizing the statistics (SyncBN) recover it, and what does "
             "synchronizing cost per step?",
    variants=variants,
    analyze=analyze,
    default_epochs=2,
    default_subset=4000,
    notes=f"Every run: {WORLD} processes on this machine (gloo), global batch = {WORLD} x "
          "per-process batch, lr 0.1 x sqrt(global batch / 128).",
)
