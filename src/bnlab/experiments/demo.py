"""The chapter's demo: plain LeNet, BN-LeNet with bnlab's BN, BN-LeNet with torch's BN.

Why: this is the first thing a user runs (``make demo``). It reproduces the chapter's two
trainings plus the no-BN baseline, and answers its two questions with numbers: does BN
help, and is the from-scratch BN as good and as fast as the built-in one? The three runs
advance epoch by epoch in turn, so the machine's load hits them alike and the speed ratio
bnlab/torch is measured side by side.
"""

from __future__ import annotations

import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.data.dataset import FashionMNIST
from bnlab.experiments.stats import median_interval
from bnlab.training import runs
from bnlab.training.inspection import PARAMS_FIGURE, inspect_run
from bnlab.training.train import SUBSET_HELP, TrainConfig, describe, describe_training_set, start_run
from bnlab.util.config import config_to_dict
from bnlab.util.io import atomic_write_json, atomic_write_text, remove_stray_temps
from bnlab.util.plots import plot_comparison
from bnlab.util.tables import counted, format_table

REPORT = "report.md"
COMPARISON_FIGURE = "comparison.png"


@dataclass
class DemoConfig:
    """The demo's settings; defaults are the chapter's (10 epochs, lr 0.1, batch 128)."""

    epochs: int = field(default=10, metadata={"help": "epochs of each run"})
    subset: int = field(default=0, metadata={"help": SUBSET_HELP})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate"})
    batch_size: int = field(default=128, metadata={"help": "minibatch size"})
    seed: int = field(default=0, metadata={"help": "seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training steps"})

    def __post_init__(self) -> None:
        demo_runs(self)  # the three runs' configs check every value


def demo_runs(config: DemoConfig) -> dict[str, TrainConfig]:
    """The three runs, named as their folders are."""
    # The chapter's protocol: no validation split, the test set is the "validation" set.
    common = dict(epochs=config.epochs, subset=config.subset, val_size=0, lr=config.lr,
                  batch_size=config.batch_size, seed=config.seed, device=config.device,
                  compile=config.compile)
    return {
        "lenet": TrainConfig(model="lenet", norm="none", **common),
        "bn-lenet-bnlab": TrainConfig(model="bn-lenet", norm="bnlab", **common),
        "bn-lenet-torch": TrainConfig(model="bn-lenet", norm="torch", **common),
    }


def run_demo(config: DemoConfig, out: str | Path, dataset: FashionMNIST, fresh: bool = False,
             progress: bool = True) -> str:
    """Train the three runs interleaved (resuming any that were cut off); return the report."""
    out = Path(out)
    plan = demo_runs(config)
    if fresh:
        for name in plan:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    remove_stray_temps(out)
    atomic_write_json(out / "config.json", config_to_dict(config))
    active = {name: start_run(cfg, dataset, out / name, resume=True, progress=progress, label=name)
              for name, cfg in plan.items()}
    while not all(run.done for run in active.values()):
        for run in active.values():
            if not run.done:
                run.train_next_epoch()
    summaries = {name: run.finish() for name, run in active.items()}
    histories = {name: run.history for name, run in active.items()}
    results = {"config": config_to_dict(config), "summaries": summaries}
    atomic_write_json(out / "results.json", results)
    return write_report(config, out, plan, summaries, histories)


WARM_UP_EPOCHS = 1
"""Epochs left out of the speed ratio: the first epoch of a run also pays one-time costs
(first calls, allocations, caches), so its ratio says little about the steady state."""


@dataclass(frozen=True)
class SpeedRatio:
    """The training time of one run over another's, epoch by epoch (the epochs ran in turn)."""

    median: float  # of the per-epoch ratios after the warm-up
    epochs: tuple[int, ...]  # the epochs (1-based) it is the median of
    interval: tuple[float, float, float] | None  # (low, high, coverage); None for one epoch


def speed_ratio(numerator: list[dict[str, Any]], denominator: list[dict[str, Any]],
                key: str = "train_seconds") -> SpeedRatio | None:
    """``numerator[e][key] / denominator[e][key]`` per epoch after the first
    :data:`WARM_UP_EPOCHS`: their median and a distribution-free interval for it
    (``stats.median_interval``); None when no epoch is past the warm-up."""
    pairs = list(zip(numerator, denominator))[WARM_UP_EPOCHS:]
    if not pairs:
        return None
    ratios = [a[key] / b[key] for a, b in pairs]
    return SpeedRatio(statistics.median(ratios), tuple(a["epoch"] for a, _ in pairs),
                      median_interval(ratios))


def describe_speed(ratio: SpeedRatio | None) -> str:
    """The demo's speed finding for ``ratio`` (bnlab's BN over torch's)."""
    left_out = "epoch 1" if WARM_UP_EPOCHS == 1 else f"epochs 1-{WARM_UP_EPOCHS}"
    advice = f"--epochs {WARM_UP_EPOCHS + 6} or more give a 95% interval"
    if ratio is None:
        return (f"Speed: not measured: {left_out}, which includes the warm-up, is left out, and "
                f"this demo has no later epoch ({advice}).")
    first, last = ratio.epochs[0], ratio.epochs[-1]
    which = f"epoch {first}" if first == last else f"epochs {first}-{last}"
    text = (f"Speed: a training epoch with bnlab's BN took {ratio.median:.3f}x the time of one "
            f"with torch's BN (median of the per-epoch ratios of {which}, the runs' epochs "
            f"alternating; {left_out}, which includes the warm-up, left out)")
    if ratio.interval is None:
        return text + f"; one epoch gives no interval ({advice})."
    low, high, coverage = ratio.interval
    return text + (f"; {low:.3f}x-{high:.3f}x is a distribution-free "
                   f"{math.floor(100 * coverage)}% interval for the median ratio"
                   + ("." if coverage >= 0.95 else f" ({advice})."))


def results_table(summaries: dict[str, dict[str, Any]],
                  histories: dict[str, list[dict[str, Any]]]) -> str:
    torch_history = histories.get("bn-lenet-torch", [])
    rows = []
    for name, s in summaries.items():
        ratio = speed_ratio(histories[name], torch_history) if torch_history else None
        rows.append([
            name,
            _fmt(s["final_val_acc"], ".4f"),
            f"{_fmt(s['best_val_acc'], '.4f')} (ep {s['best_epoch']})",
            _fmt(s["median_seconds_per_epoch"], ".2f"),
            _fmt(s["median_images_per_s"], ",.0f"),
            "-" if ratio is None else f"{ratio.median:.3f}x",
            "yes" if s["diverged"] else "no",
        ])
    return format_table(["run", "final val acc", "best val acc", "s/epoch (median)",
                         "train img/s", "train time vs torch BN (median, epoch 2 on)",
                         "diverged"], rows)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def findings(summaries: dict[str, dict[str, Any]], histories: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Sentences computed from the numbers (nothing canned)."""
    out = []
    plain, ours, theirs = (summaries[k]["final_val_acc"] for k in
                           ("lenet", "bn-lenet-bnlab", "bn-lenet-torch"))
    if None not in (plain, ours, theirs):
        better = "better" if min(ours, theirs) > plain else "not better"
        out.append(f"Batch norm: BN-LeNet ended at {ours:.4f} (bnlab) and {theirs:.4f} (torch) "
                   f"validation accuracy against {plain:.4f} for plain LeNet at the same learning "
                   f"rate: {100 * (ours - plain):+.1f} / {100 * (theirs - plain):+.1f} points, "
                   f"{better} with BN.")
        out.append(f"Scratch vs built-in: the two BN-LeNets differ by {100 * abs(ours - theirs):.2f} "
                   "points of final accuracy (same seed, same data order; they differ only in "
                   "floating-point rounding inside the BN layers).")
    out.append(describe_speed(speed_ratio(histories["bn-lenet-bnlab"], histories["bn-lenet-torch"])))
    return out


def write_report(config: DemoConfig, out: Path, plan: dict[str, TrainConfig],
                 summaries: dict[str, dict[str, Any]],
                 histories: dict[str, list[dict[str, Any]]]) -> str:
    """Print-ready text; also writes ``report.md``, ``comparison.png`` and norm figures."""
    plot_comparison(histories, out / COMPARISON_FIGURE,
                    title=f"Fashion-MNIST, lr {config.lr:g}, batch {config.batch_size}")
    table = results_table(summaries, histories)
    inspections = {name: inspect_run(out / name) for name in ("bn-lenet-bnlab", "bn-lenet-torch")
                   if (out / name / runs.CHECKPOINT).exists()}
    scope = describe_training_set(config.subset, val_size=0)
    lines = [
        "# bnlab demo: LeNet with and without batch norm on Fashion-MNIST",
        "",
        f"{counted(config.epochs, 'epoch')} on {scope}; evaluated on the full test set "
        f"(10000 images) after every epoch; SGD lr {config.lr:g}, batch {config.batch_size}, "
        f"seed {config.seed}.",
        "",
        table,
        "",
        *[f"- {line}" for line in findings(summaries, histories)],
        "",
        f"![training curves]({COMPARISON_FIGURE})",
    ]
    for name, text in inspections.items():
        lines += ["", f"## {name}: {describe(plan[name])}", "", "```", text, "```", "",
                  f"![norm parameters]({name}/{PARAMS_FIGURE})"]
    report = "\n".join(lines) + "\n"
    atomic_write_text(out / REPORT, report)
    return report
