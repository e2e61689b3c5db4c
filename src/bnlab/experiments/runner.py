"""Experiments as grids of training runs: planned from data, stored by key, resumable, parallel.

Why: each of the chapter's exercises is "train these configs over a few seeds and compare".
Describing an experiment as a list of variants (plain dicts of ``TrainConfig`` fields) keeps
it data, not copied code. Every run lives in a folder named by a hash of its config, so a
second invocation skips finished runs and resumes cut-off ones, and an executor
(``bnlab.experiments.executors``: local processes or Ray) can spread the grid without any
two runs touching the same folder.

Layout of ``<out>/``::

    runs/<model>-<norm>-seed<k>-<hash>/   one run folder per config (bnlab.training.runs), shared by
                    every experiment: a config two experiments have in common trains once;
                    its analysis/ keeps the experiments' measurements of the finished model
    <experiment>/settings.json   the ExpSettings used
    <experiment>/results.jsonl   one row per run: variant, config, per-epoch metrics, summary
    <experiment>/summary.md, summary.csv   mean ± 95% CI over seeds per variant
    <experiment>/*.png, report.md   the experiment's own plots and computed conclusions
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bnlab.data.dataset import TRAIN_SIZE, FashionMNIST
from bnlab.experiments.analysis import Row, by_label
from bnlab.experiments.executors import Executor, GridProgress, LocalExecutor
from bnlab.experiments.stats import format_mean_ci, to_csv
from bnlab.training import runs
from bnlab.training.distributed import DistributedConfig
from bnlab.training.norms import check_norm_name
from bnlab.training.train import (
    SUBSET_HELP,
    TrainConfig,
    build_loaders,
    describe_training_set,
    steps_per_epoch,
    training_images,
)
from bnlab.util.config import check, check_at_least, config_to_dict
from bnlab.util.errors import BnlabError, ConfigError
from bnlab.util.io import atomic_write_json, atomic_write_text, remove_stray_temps
from bnlab.util.tables import counted, format_table


@dataclass
class ExpSettings:
    """How big an experiment's grid is. ``epochs=0`` and ``subset=None`` (its flag not given)
    mean the experiment's default; ``subset=0`` means all 60000 training images, as for
    ``bnlab train``."""

    seeds: int = field(default=3, metadata={"help": "seeds per variant (0, 1, ...)"})
    epochs: int = field(default=0, metadata={"help": "epochs per run (0 = experiment default)"})
    subset: int | None = field(default=None, metadata={
        "help": f"{SUBSET_HELP} (default: the experiment's own)"})
    dropout: float = field(default=0.5, metadata={"help": "dropout probability (dropout experiment)"})
    norms: str | None = field(default=None, metadata={
        "help": "comma list of norms (names as for train --norm, plug-ins included) for the "
                "experiments whose variants are norms (norms; batchsize's small-batch part) "
                "(default: the experiment's own list)"})
    flush_denormal: bool = field(default=True, metadata={
        "help": "every run flushes denormal floats to zero on CPU (TrainConfig.flush_denormal; "
                "off: the IEEE arithmetic of runs from before the flush, to time the difference)"})

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"expected seeds >= 1 (got {self.seeds})")
        check_at_least(self, 0, "epochs")
        check(self.subset is None or self.subset >= 0,
              f"expected subset >= 0 (got {self.subset}): 0 = all {TRAIN_SIZE} training images; "
              "leave --subset out for the experiment's default")
        if self.norms is not None:
            norm_list(self)  # every name resolves (plug-ins are imported and checked now)


def norm_list(settings: ExpSettings) -> tuple[str, ...]:
    """The norms of ``settings.norms`` (a comma list), each checked; ConfigError for a bad
    name, a repeated one or an empty list."""
    names = tuple(n.strip() for n in (settings.norms or "").split(",") if n.strip())
    check(bool(names), f"expected --norms as a comma list of norm names (got {settings.norms!r})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    check(not repeated, f"--norms names {repeated} more than once")
    for name in names:
        try:
            check_norm_name(name)
        except ValueError as exc:
            raise ConfigError(f"--norms: {exc}") from None
    return names


QUICK = ExpSettings(seeds=1, epochs=1, subset=1000)
"""``--quick``: the whole grid, tiny (smoke tests)."""
FULL = ExpSettings(seeds=3, epochs=10, subset=0)
"""``--full``: the chapter's settings (10 epochs on all 60000 images)."""


@dataclass(frozen=True)
class Variant:
    """One point of the grid: a label, the TrainConfig fields it sets, and fields for analysis.

    ``epochs`` and ``subset`` come from the grid's settings unless ``params`` sets them (an
    arm of the grid with a budget of its own, e.g. equal steps at every batch size). With
    ``world``, each run trains data-parallel over ``world.nproc`` processes."""

    label: str
    params: dict[str, Any]
    tags: dict[str, Any] = field(default_factory=dict)
    world: DistributedConfig | None = None  # trained over several processes (bnlab.training.distributed)


@dataclass(frozen=True)
class Experiment:
    """A named grid with default size and an analysis that writes plots and report sections."""

    name: str
    title: str
    question: str
    variants: Callable[[ExpSettings], list[Variant]]
    analyze: Callable[[list[Row], Path, Any], list[str]]  # (rows, out, dataset)
    default_epochs: int
    default_subset: int  # 0 = all, as TrainConfig.subset
    notes: str = ""
    norms: tuple[str, ...] = ()  # the norms its variants compare (``--norms`` replaces them);
    # () = its variants are not a list of norms, and it takes no --norms


@dataclass(frozen=True)
class PlannedRun:
    variant: Variant
    config: TrainConfig
    run_dir: Path

    @property
    def world(self) -> DistributedConfig | None:
        return self.variant.world


def resolve(settings: ExpSettings, experiment: Experiment) -> ExpSettings:
    """Settings with the experiment's defaults filled in."""
    check(settings.norms is None or bool(experiment.norms),
          f"experiment {experiment.name!r} takes no --norms: its variants are not a list of norms")
    return dataclasses.replace(
        settings,
        epochs=settings.epochs or experiment.default_epochs,
        subset=experiment.default_subset if settings.subset is None else settings.subset,
        norms=settings.norms or (",".join(experiment.norms) if experiment.norms else None),
    )


EVALS_PER_RUN = 25
MIN_EVAL_EVERY = 5
"""Periodic test evaluations (``eval_every``): about 25 a run, but at most every 5 steps (a
short run's evaluations of 10000 test images would cost more than its training)."""


def periodic_eval_every(settings: ExpSettings, batch_size: int) -> int:
    """``TrainConfig.eval_every`` that evaluates a run of resolved ``settings`` at batch
    ``batch_size`` about :data:`EVALS_PER_RUN` times, at most every :data:`MIN_EVAL_EVERY` steps."""
    steps = steps_per_epoch(training_images(settings.subset), batch_size) * settings.epochs
    return max(MIN_EVAL_EVERY, steps // EVALS_PER_RUN)


def config_key(config: TrainConfig) -> str:
    """A short stable hash of every field of ``config``."""
    blob = json.dumps(config_to_dict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def run_folder_name(config: TrainConfig, world: DistributedConfig | None = None) -> str:
    """Readable and unique: ``bn-lenet-bnlab-lr0.1-seed0-<hash>``, and ``-w4`` (``-w4-sync``
    with SyncBN) for a run over 4 processes."""
    readable = f"{config.model}-{config.norm}-lr{config.lr:g}-seed{config.seed}"
    name = f"{re.sub(r'[^A-Za-z0-9.]+', '-', readable)}-{config_key(config)}"
    if world is not None:
        name += f"-w{world.nproc}{'-sync' if world.sync_bn else ''}"
    return name


def plan(experiment: Experiment, settings: ExpSettings, runs_root: Path) -> list[PlannedRun]:
    """Every (variant, seed) run of the grid with its folder under ``runs_root``.

    Every config is built (so validated) here, before anything trains; a bad one is a
    ``ConfigError`` naming its variant.
    """
    planned = []
    for variant in experiment.variants(settings):
        for seed in range(settings.seeds):
            try:
                config = TrainConfig(**{"epochs": settings.epochs, "subset": settings.subset,
                                        "flush_denormal": settings.flush_denormal,
                                        **variant.params, "seed": seed})
            except ValueError as exc:
                raise ConfigError(f"{experiment.name}: variant {variant.label!r}: {exc}") from None
            planned.append(PlannedRun(variant, config,
                                      runs_root / run_folder_name(config, variant.world)))
    return planned


def check_data(planned: list[PlannedRun], dataset: FashionMNIST) -> None:
    """DatasetError unless the grid's subset fits ``dataset`` (one rule, ``build_loaders``';
    all runs share the subset)."""
    if planned:
        build_loaders(planned[0].config, dataset, torch.device("cpu"))


def is_finished(run_dir: Path) -> bool:
    return (run_dir / runs.SUMMARY).exists()


# --------------------------------------------------------------------------- execution

class GridIncomplete(BnlabError):
    """Some runs of a grid could not be used; the others were trained and reported."""


@dataclass(frozen=True)
class BadRun:
    """A run of the grid left out, and why (a file of its folder cannot be read, say)."""

    run: PlannedRun
    reason: str


def _left_out(p: PlannedRun, exc: BnlabError, bad: list[BadRun]) -> None:
    bad.append(BadRun(p, str(exc)))
    print(f"bnlab: error: {p.variant.label} seed {p.config.seed}: {exc}", file=sys.stderr)


def execute(planned: list[PlannedRun], dataset: FashionMNIST, jobs: int = 1,
            progress: bool = True, executor: Executor | None = None,
            tensorboard: str | Path | None = None, bad: list[BadRun] | None = None) -> None:
    """Train every unfinished run of ``planned`` (resuming cut-off ones) with ``executor``
    (default: ``LocalExecutor(jobs)``, see ``bnlab.experiments.executors``); with
    ``tensorboard``, each run logs into its own sub-folder of it. A run whose folder cannot
    be used (a ``BnlabError``) is said on stderr, added to ``bad`` and skipped; the grid goes on.
    """
    bad = [] if bad is None else bad
    todo = [p for p in planned if not is_finished(p.run_dir)]

    bar = GridProgress(len(planned), len(planned) - len(todo), progress,
                       lambda p, exc: _left_out(p, exc, bad))
    try:
        (executor or LocalExecutor(jobs)).run(todo, dataset, bar, tensorboard)
    finally:
        bar.close()


# --------------------------------------------------------------------------- results

def collect(planned: list[PlannedRun], bad: list[BadRun] | None = None) -> list[Row]:
    """One row per finished run, in grid order.

    A finished run whose files cannot be read is said on stderr, added to ``bad`` and left out.
    """
    rows = []
    bad = [] if bad is None else bad
    known_bad = {b.run.run_dir for b in bad}
    for p in planned:
        if not is_finished(p.run_dir) or p.run_dir in known_bad:
            continue
        try:
            rows.append(Row.from_run(p.run_dir, p.variant.label, p.variant.tags))
        except runs.RunFolderError as exc:
            _left_out(p, exc, bad)
    return rows


SUMMARY_HEADERS = ["variant", "seeds", "final val acc", "best val acc", "final train acc",
                   "diverged", "s/epoch"]


def summary_rows(rows: list[Row]) -> list[list[object]]:
    """Per variant: mean ± 95% CI over seeds of the headline numbers (diverged runs excluded)."""
    out = []
    for label, group in by_label(rows).items():
        ok = [r.summary for r in group if not r.diverged]
        out.append([
            label, len(group),
            format_mean_ci([s["final_val_acc"] for s in ok]),
            format_mean_ci([s["best_val_acc"] for s in ok]),
            format_mean_ci([s["final_train_acc"] for s in ok]),
            f"{len(group) - len(ok)}/{len(group)}",
            format_mean_ci([s["median_seconds_per_epoch"] for s in ok], ".2f"),
        ])
    return out


def describe_settings(settings: ExpSettings) -> str:
    data = describe_training_set(settings.subset)
    return (f"{counted(settings.epochs, 'epoch')} on {data}, {counted(settings.seeds, 'seed')} "
            "per variant; "
            "validation on the full test set (10000 images). Intervals are 95% Student-t "
            "intervals over seeds.")


def write_results(out: Path, rows: list[Row]) -> str:
    """Write a grid's ``results.jsonl`` and its ``summary.csv``/``summary.md`` (mean ± 95% CI
    over seeds per variant) into ``out``; return the summary table."""
    atomic_write_text(out / "results.jsonl",
                      "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in rows))
    table_rows = summary_rows(rows)
    atomic_write_text(out / "summary.csv", to_csv(SUMMARY_HEADERS, table_rows))
    table = format_table(SUMMARY_HEADERS, table_rows)
    atomic_write_text(out / "summary.md", table + "\n")
    return table


def run_experiment(experiment: Experiment, settings: ExpSettings, out: str | Path,
                   dataset: FashionMNIST, jobs: int = 1, progress: bool = True,
                   executor: Executor | None = None,
                   tensorboard: str | Path | None = None) -> str:
    """Plan and validate every run, train (skipping finished runs), collect and analyze; return
    ``report.md``'s text. Runs that cannot be used are left out of the report, which says so,
    and end in ``GridIncomplete`` once everything else is written.

    A second call on a finished grid trains nothing, and the analysis reads the expensive
    measurements back from the run folders (``runs.cached``)."""
    settings = resolve(settings, experiment)
    runs_root = Path(out) / "runs"
    out = Path(out) / experiment.name
    planned = plan(experiment, settings, runs_root)  # validates every config before any trains
    check_data(planned, dataset)
    out.mkdir(parents=True, exist_ok=True)
    remove_stray_temps(out)
    atomic_write_json(out / "settings.json", config_to_dict(settings))
    bad: list[BadRun] = []
    execute(planned, dataset, jobs, progress, executor, tensorboard, bad)
    rows = collect(planned, bad)
    table = write_results(out, rows)
    sections = experiment.analyze(rows, out, dataset)
    report = "\n".join([
        f"# {experiment.title}", "", f"**Question.** {experiment.question}", "",
        f"**Settings.** {describe_settings(settings)} {experiment.notes}".rstrip(), "",
        "## Summary", "", table, "", *sections, *_left_out_section(bad, len(planned)),
    ]) + "\n"
    atomic_write_text(out / "report.md", report)
    if bad:
        raise GridIncomplete(f"{len(bad)} of {len(planned)} runs could not be used (see above); "
                             f"{out / 'report.md'} covers the others")
    return report


def _left_out_section(bad: list[BadRun], total: int) -> list[str]:
    if not bad:
        return []
    return ["", "## Runs left out", "", f"{len(bad)} of {total} runs left out: their folders "
            "could not be used.", "",
            *(f"- {b.run.variant.label}, seed {b.run.config.seed} (`{b.run.run_dir.name}`): "
              f"{b.reason}" for b in bad)]
