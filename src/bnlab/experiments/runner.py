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
    <experiment>/results.jsonl   one row per run: variant, config, per-epoch metrics, summary,
                    and the provenance of this analysis
    <experiment>/summary.md, summary.csv   mean ± 95% CI over seeds per variant (the CSV in
                    numeric columns: mean, low, high, n, diverged)
    <experiment>/findings.json   the analysis's verdicts, findings, calibrations, provenance,
                    whether the grid was a smoke test (what pages are built from), and this
                    call's timing: wall seconds training and analysing, and the names of the
                    measurements the analysis read (``bnlab.experiments.costs``)
    <experiment>/*.png, report.md   the experiment's own plots and computed conclusions
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bnlab.data.dataset import FashionMNIST
from bnlab.experiments.analysis import Row, by_label
from bnlab.experiments.executors import Executor, GridProgress, LocalExecutor
from bnlab.experiments.findings import Analysis, calibration_table, verdict_table
from bnlab.experiments.stats import Estimate, estimate, to_csv
from bnlab.training import runs
from bnlab.training.distributed import DistributedConfig
from bnlab.training.norms import check_norm_name, norm_revision
from bnlab.training.train import (
    DEFAULT_VAL_SIZE,
    SUBSET_HELP,
    TrainConfig,
    build_loaders,
    describe_training_set,
    steps_per_epoch,
    training_images,
)
from bnlab.util.config import check, check_at_least, config_to_dict
from bnlab.util.errors import BnlabError, ConfigError
from bnlab.util.io import atomic_write_json, atomic_write_text, folder_lock, remove_stray_temps
from bnlab.util.provenance import provenance, provenance_line
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
    val_size: int = field(default=DEFAULT_VAL_SIZE, metadata={
        "help": "training images held out as the validation split, where every choice is "
                "made (0 = none; an experiment that keeps the chapter's protocol overrides it)"})
    dropout: float = field(default=0.5, metadata={"help": "dropout probability (dropout experiment)"})
    norms: str | None = field(default=None, metadata={
        "help": "comma list of norms (names as for train --norm, plug-ins included) for the "
                "experiments whose variants are norms (norms; batchsize's small-batch part) "
                "(default: the experiment's own list)"})
    flush_denormal: bool = field(default=True, metadata={
        "help": "every run flushes denormal floats to zero on CPU (TrainConfig.flush_denormal; "
                "off: the IEEE arithmetic of runs from before the flush, to time the difference)"})
    quick: bool = field(default=False, metadata={
        "help": "a smoke test (set by --quick): analyses are scaled down with the grid, and no "
                "verdict is stated"})

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"expected seeds >= 1 (got {self.seeds})")
        check_at_least(self, 0, "epochs")
        check_at_least(self, 0, "val_size")
        check(self.subset is None or self.subset >= 0,
              f"expected subset >= 0 (got {self.subset}): 0 = all that the validation split leaves; "
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


QUICK = ExpSettings(seeds=1, epochs=1, subset=1000, val_size=1000, quick=True)
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
    analyze: Callable[[list[Row], Path, Any, ExpSettings], Analysis]  # (rows, out, dataset, settings)
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
    images = training_images(settings.subset, settings.val_size)
    steps = steps_per_epoch(images, batch_size) * settings.epochs
    return max(MIN_EVAL_EVERY, steps // EVALS_PER_RUN)


def config_key(config: TrainConfig) -> str:
    """A short stable hash of every field of ``config``, and of its norm's revision where
    that is not 0 (``norms.Norm.revision``: runs of a layer whose numbers have changed since
    are not taken for runs of the new one)."""
    values = config_to_dict(config)
    if revision := norm_revision(config.norm):
        values["norm_revision"] = revision
    blob = json.dumps(values, sort_keys=True).encode()
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
                                        "val_size": settings.val_size,
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


SUMMARY_COLUMNS = {"final val acc": "final_val_acc", "final test acc": "final_test_acc",
                   "best val acc": "best_val_acc", "final train acc": "final_train_acc",
                   "s/epoch": "median_seconds_per_epoch"}
"""The summary's columns: summary.json keys of every run, over the seeds that did not diverge."""


def _summary_cells(rows: list[Row]) -> dict[str, list[tuple[str, int, Estimate]]]:
    """Per variant: (column, diverged runs, estimate) of every summary column."""
    cells = {}
    for label, group in by_label(rows).items():
        ok = [r.summary for r in group if not r.diverged]
        cells[label] = [(column, len(group) - len(ok), estimate([s.get(key) for s in ok]))
                        for column, key in SUMMARY_COLUMNS.items()]
    return cells


def summary_table(rows: list[Row]) -> str:
    """Per variant: mean ± 95% CI over seeds of the headline numbers (diverged runs counted
    and left out), with n in every cell."""
    cells = _summary_cells(rows)
    return format_table(
        ["variant", "runs", "diverged", *SUMMARY_COLUMNS],
        [[label, len(by_label(rows)[label]), f"{c[0][1]}/{len(by_label(rows)[label])}",
          *(e.format(".2f" if column == "s/epoch" else ".4f") for column, _, e in c)]
         for label, c in cells.items()])


def summary_csv(rows: list[Row]) -> str:
    """The summary in numbers: per variant and column, mean, low, high, n and diverged."""
    lines = []
    for label, cells in _summary_cells(rows).items():
        for column, diverged, e in cells:
            lines.append([label, SUMMARY_COLUMNS[column], e.mean, e.low, e.high, e.n, diverged])
    return to_csv(["variant", "measure", "mean", "low", "high", "n", "diverged"], lines)


def describe_settings(settings: ExpSettings, planned: list[PlannedRun]) -> str:
    """The grid that ran, in words: its size, budget and data."""
    variants = len({p.variant.label for p in planned})
    budgets = sorted({(p.config.epochs, p.config.subset, p.config.val_size) for p in planned})
    data = "; ".join(f"{counted(epochs, 'epoch')} on {describe_training_set(subset, val_size)}"
                     for epochs, subset, val_size in budgets)
    return (f"{counted(variants, 'variant')} x {counted(settings.seeds, 'seed')} = "
            f"{counted(len(planned), 'run')}; {data}. Test "
            "accuracy is on the full test set (10000 images). Intervals are 95% Student-t "
            "intervals over seeds; n is the number of seeds in a cell.")


def write_results(out: Path, rows: list[Row], facts: dict[str, Any]) -> str:
    """Write a grid's ``results.jsonl`` (each row with the analysis's provenance) and its
    ``summary.csv``/``summary.md`` into ``out``; return the summary table."""
    atomic_write_text(out / "results.jsonl", "".join(
        json.dumps({**r.to_json(), "provenance": facts}, sort_keys=True) + "\n" for r in rows))
    atomic_write_text(out / "summary.csv", summary_csv(rows))
    table = summary_table(rows)
    atomic_write_text(out / "summary.md", table + "\n")
    return table


def is_smoke_test(settings: ExpSettings) -> bool:
    """Whether a grid is too small for verdicts: ``--quick``, or one seed per variant."""
    return settings.quick or settings.seeds < 2


SMOKE_BANNER = ("> **Smoke test.** This grid ({why}) checks that the experiment runs end to end; "
                "it is too small for conclusions, so this report states no verdicts and no "
                "findings. Run it at its defaults for those.")


def run_experiment(experiment: Experiment, settings: ExpSettings, out: str | Path,
                   dataset: FashionMNIST, jobs: int = 1, progress: bool = True,
                   executor: Executor | None = None,
                   tensorboard: str | Path | None = None, command: str | None = None) -> str:
    """Plan and validate every run, train (skipping finished runs), collect and analyze; return
    ``report.md``'s text. Runs that cannot be used are left out of the report, which says so,
    and end in ``GridIncomplete`` once everything else is written. A smoke test
    (``settings.quick``, or one seed) states no verdicts or findings. ``command``: the command
    line recorded as provenance.

    A second call on a finished grid trains nothing, and the analysis reads the expensive
    measurements back from the run folders (``runs.cached``)."""
    settings = resolve(settings, experiment)
    runs_root = Path(out) / "runs"
    out = Path(out) / experiment.name
    planned = plan(experiment, settings, runs_root)  # validates every config before any trains
    check_data(planned, dataset)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):  # another process on this --out would remove our temps in flight
        remove_stray_temps(out)
        atomic_write_json(out / "settings.json", config_to_dict(settings))
    bad: list[BadRun] = []
    started = time.perf_counter()
    execute(planned, dataset, jobs, progress, executor, tensorboard, bad)
    timing = {"training_s": time.perf_counter() - started, "analysis_started_at": time.time()}
    with folder_lock(out):
        report = _analyze_and_report(experiment, settings, planned, out, dataset, command, bad,
                                     timing)
    if bad:
        raise GridIncomplete(f"{len(bad)} of {len(planned)} runs could not be used (see above); "
                             f"{out / 'report.md'} covers the others")
    return report


def _analyze_and_report(experiment: Experiment, settings: ExpSettings,
                        planned: list[PlannedRun], out: Path, dataset: FashionMNIST,
                        command: str | None, bad: list[BadRun], timing: dict[str, Any]) -> str:
    """Collect the runs, analyze them, write results, findings.json and report.md."""
    remove_stray_temps(out)
    started, measurements = time.perf_counter(), set()
    with runs.observing_measurements(lambda name, computed: measurements.add(name)):
        rows = collect(planned, bad)
        facts = provenance(command or f"run_experiment({experiment.name!r})", settings.quick)
        table = write_results(out, rows, facts)
        smoke = is_smoke_test(settings)
        analysis = experiment.analyze(rows, out, dataset, settings)
    if smoke:
        analysis = analysis.as_smoke_test()
    timing.update(analysis_s=time.perf_counter() - started, measurements=sorted(measurements))
    atomic_write_json(out / "findings.json", {
        "experiment": experiment.name, "title": experiment.title, "question": experiment.question,
        "smoke_test": smoke, "provenance": facts, "settings": config_to_dict(settings),
        "verdicts": [v.to_json() for v in analysis.verdicts], "findings": analysis.findings,
        "calibration": [c.to_json() for c in analysis.calibration], "timing": timing})
    report = "\n".join(_report_lines(experiment, settings, planned, smoke, facts, table,
                                      analysis, bad)) + "\n"
    atomic_write_text(out / "report.md", report)
    return report


def _report_lines(experiment: Experiment, settings: ExpSettings, planned: list[PlannedRun],
                  smoke: bool, facts: dict[str, Any], table: str, analysis: Analysis,
                  bad: list[BadRun]) -> list[str]:
    why = "--quick" if facts["quick"] else f"{settings.seeds} seed"
    lines = [f"# {experiment.title}", ""]
    if smoke:
        lines += [SMOKE_BANNER.format(why=why), ""]
    lines += [f"**Question.** {experiment.question}", "",
              f"**Settings.** {describe_settings(settings, planned)} {experiment.notes}".rstrip(), "",
              f"**Provenance.** {provenance_line(facts)}", ""]
    if analysis.verdicts:
        lines += ["## Verdicts", "",
                  "Each from the shared rule (bnlab.experiments.findings): supported or "
                  "contradicted only where the 95% interval of the effect excludes the other "
                  "side, unresolved otherwise.", "", verdict_table(analysis.verdicts), ""]
    lines += ["## Summary", "", table, "", *analysis.sections]
    if analysis.findings:
        lines += ["", "## Findings (computed from the numbers above)", "", *analysis.findings]
    if analysis.calibration:
        lines += ["", "## Calibration", "",
                  "Each measure behind a verdict, read on synthetic inputs with a known answer.",
                  "", calibration_table(analysis.calibration)]
    return lines + _left_out_section(bad, len(planned))


def _left_out_section(bad: list[BadRun], total: int) -> list[str]:
    if not bad:
        return []
    return ["", "## Runs left out", "", f"{len(bad)} of {total} runs left out: their folders "
            "could not be used.", "",
            *(f"- {b.run.variant.label}, seed {b.run.config.seed} (`{b.run.run_dir.name}`): "
              f"{b.reason}" for b in bad)]
