"""Sizes before work: what a grid will train, about how long it takes, and progress through it.

Why: a grid of runs can take a minute or an afternoon, and its size is hidden in its
variants (an equal-steps arm at batch 2, runs over 4 processes, periodic evaluations).
``bnlab exp NAME --dry-run`` says it before anything trains: variants x seeds, the runs
already finished, the training steps left, and an *estimate* of the training time. The
estimate comes from this machine, now: a few training steps (and one evaluation batch) of
each distinct model and batch size of the grid, timed on synthetic data with the threads
each run will get, then scheduled the way the local executor runs them. It leaves out what
cannot be known before training (runs that diverge stop early; the analysis measures each
finished run, its cost set by the experiment) and what training adds besides steps
(start-up, checkpoints, the frozen phase's one pass of statistics).

While a grid runs, :func:`grid_progress` says its size first; the executor's bar counts its
runs; then a bar counts the analysis's measurements of the finished runs
(``bnlab.training.runs.cached``, where every expensive one is kept), with an ETA, so the
part after training is not silent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bnlab.data.dataset import TEST_SIZE, FashionMNIST
from bnlab.experiments.runner import (
    Experiment,
    ExpSettings,
    PlannedRun,
    config_key,
    is_finished,
    plan,
    resolve,
)
from bnlab.training import runs
from bnlab.training.train import (
    TrainConfig,
    bar_disabled,
    make_step,
    model_for,
    optimizer_for,
    resolve_device,
    start_run,
    steps_per_epoch,
    training_images,
)
from bnlab.util.denormals import denormals_flushed
from bnlab.util.scoped import in_mode
from bnlab.util.tables import counted, format_table

TIMED_STEPS = 5
WARM_UP_STEPS = 2
"""Training steps timed per distinct configuration, after steps left untimed (first calls)."""


@dataclass(frozen=True)
class RunSize:
    """What is left of one planned run: its epochs and steps, and its evaluations."""

    run: PlannedRun
    epochs: int  # epochs left to train (all of them unless the run was cut off)
    steps: int  # training steps left
    evaluations: int  # evaluations left: one at each epoch's end, plus periodic ones


def epochs_done(run_dir: Path) -> int:
    """Finished epochs of a cut-off run, as its ``metrics.jsonl`` says (0 when unreadable)."""
    try:
        return len(runs.read_jsonl(run_dir / runs.METRICS))
    except (OSError, runs.RunFolderError):
        return 0


def run_size(p: PlannedRun) -> RunSize:
    """What training ``p`` still takes (nothing for a finished run)."""
    config = p.config
    left = 0 if is_finished(p.run_dir) else max(0, config.epochs - epochs_done(p.run_dir))
    per_epoch = steps_per_epoch(training_images(config.subset, config.val_size), config.batch_size)
    total, done = config.epochs * per_epoch, (config.epochs - left) * per_epoch
    every = config.eval_every
    periodic = total // every - done // every if every else 0  # at multiples of every steps
    return RunSize(p, left, total - done, left + periodic)


# --------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class StepTiming:
    """Seconds of one training step and of one evaluation batch, measured on this machine."""

    step: float
    eval_batch: float


def timed_config(p: PlannedRun) -> tuple[TrainConfig, int]:
    """What sets a run's cost per step: its config without the fields that do not (seed,
    learning rate, budget, ...), and the processes it trains over."""
    config = dataclasses.replace(p.config, epochs=1, lr=0.1, seed=0, subset=0, eval_every=0,
                                 freeze_bn_epochs=0)
    return config, p.world.nproc if p.world is not None else 1


def threads_per_run(jobs: int, nproc: int = 1, threads: int | None = None) -> int:
    """The torch threads a run gets from the local executor (and each of its processes)."""
    if nproc > 1:
        return max(1, (os.cpu_count() or 1) // nproc)
    return threads or max(1, (os.cpu_count() or 1) // jobs)


def time_config(config: TrainConfig, nproc: int, threads: int) -> StepTiming:
    """Median seconds of :data:`TIMED_STEPS` training steps of ``config``'s model on random
    images (per process: the global batch split over ``nproc``; communication not timed),
    and of one evaluation batch, with ``threads`` torch threads. Draws no random numbers
    from the caller's generators."""
    device = resolve_device(config.device)
    batch = max(1, config.batch_size // nproc)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                denormals_flushed(config.flush_denormal):
            torch.manual_seed(0)
            model = model_for(config, device).train()
            step = make_step(model, optimizer_for(model, config))
            x = torch.rand(batch, 1, 28, 28, device=device)
            y = torch.randint(0, 10, (batch,), device=device)
            seconds = [_timed(lambda: step(x, y), device) for _ in range(WARM_UP_STEPS + TIMED_STEPS)]
            images = torch.rand(config.eval_batch_size, 1, 28, 28, device=device)
            with in_mode(model, False), torch.no_grad():
                model(images[:2])  # untimed: a kernel's first eval call can load it (seconds)
                eval_seconds = _timed(lambda: model(images), device)
    finally:
        torch.set_num_threads(before)
    return StepTiming(statistics.median(seconds[WARM_UP_STEPS:]), eval_seconds)


def _timed(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Overheads:
    """Seconds a grid costs besides steps and evaluations, measured on this machine."""

    run: float  # per run: building the model, checkpoints, history files, curves.png
    start: float  # per process started to train (an exp --jobs worker, a rank of a run)


def measure_overheads(starts_processes: bool) -> Overheads:
    """:class:`Overheads` now: a tiny run trained to the end in a temporary folder (two steps
    and an evaluation of 20 images, so nearly all of its time is the rest), and, where the
    grid starts processes, a Python started to import what a worker imports."""
    images = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8, generator=torch.Generator())
    labels = torch.arange(20) % 10
    tiny = FashionMNIST(images, labels, images, labels, root=Path("synthetic"))
    config = TrainConfig(epochs=1, subset=20, val_size=0, batch_size=10, eval_batch_size=20,
                         device="cpu")
    with tempfile.TemporaryDirectory() as folder, torch.random.fork_rng(devices=[]):
        start = time.perf_counter()
        start_run(config, tiny, Path(folder) / "run", progress=False).train()
        run = time.perf_counter() - start
    if not starts_processes:
        return Overheads(run, 0.0)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import bnlab.experiments.executors"], check=True,
                   capture_output=True)
    return Overheads(run, time.perf_counter() - start)


def run_seconds(size: RunSize, timing: StepTiming) -> float:
    """Estimated seconds of what is left of a run: its steps and its evaluations (at each
    epoch's end the validation split and the test set, periodically the validation split;
    without a split the test set is both)."""
    config = size.run.config
    val_batches = math.ceil((config.val_size or TEST_SIZE) / config.eval_batch_size)
    test_batches = math.ceil(TEST_SIZE / config.eval_batch_size) if config.val_size else 0
    batches = size.evaluations * val_batches + size.epochs * test_batches
    return size.steps * timing.step + batches * timing.eval_batch


def wall_seconds(seconds: list[tuple[PlannedRun, float]], jobs: int,
                 overheads: Overheads = Overheads(0.0, 0.0)) -> float:
    """The grid's wall time as ``LocalExecutor(jobs)`` runs it: runs over several processes
    (and every run when ``jobs == 1``) one after another, each starting its processes, then
    the others on ``jobs`` workers started together, each run to the worker free first, in
    grid order; every run with its overhead."""
    alone = sum(s + overheads.run + (overheads.start if p.world is not None else 0.0)
                for p, s in seconds if jobs == 1 or p.world is not None)
    workers = [0.0] * jobs
    for p, s in seconds:
        if jobs > 1 and p.world is None:
            workers[workers.index(min(workers))] += s + overheads.run
    pool = max(workers) + overheads.start if max(workers) else 0.0
    return alone + pool


# --------------------------------------------------------------------------- the dry run

@dataclass(frozen=True)
class GridEstimate:
    """A planned grid's size, and its training time estimated from steps timed now."""

    planned: list[PlannedRun]
    sizes: list[RunSize]
    seconds: dict[str, float]  # run folder name -> estimated seconds left
    wall: float  # estimated wall time of the training left
    timed_configs: int  # distinct (model, norm, batch size, ...) configurations timed
    jobs: int
    overheads: Overheads

    @property
    def finished(self) -> int:
        return sum(is_finished(p.run_dir) for p in self.planned)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.sizes)


def estimate(planned: list[PlannedRun], jobs: int = 1, threads: int | None = None,
             time_fn=time_config, overheads: Overheads | None = None) -> GridEstimate:
    """Size every run of ``planned`` and estimate the grid's training time on this machine,
    timing each distinct configuration of the runs left once (``time_fn``), with the
    ``overheads`` of runs and processes (measured now when not given)."""
    sizes = [run_size(p) for p in planned]
    timings: dict[tuple[str, int], StepTiming] = {}  # (config_key, processes) -> timing
    seconds = {}
    for size in sizes:
        if not size.steps:
            seconds[size.run.run_dir.name] = 0.0
            continue
        config, nproc = timed_config(size.run)
        key = (config_key(config), nproc)
        if key not in timings:
            timings[key] = time_fn(config, nproc, threads_per_run(jobs, nproc, threads))
        seconds[size.run.run_dir.name] = run_seconds(size, timings[key])
    todo = [(size.run, seconds[size.run.run_dir.name]) for size in sizes if size.steps]
    if overheads is None:
        overheads = measure_overheads(any(jobs > 1 or p.world is not None for p, _ in todo)) \
            if todo else Overheads(0.0, 0.0)
    return GridEstimate(planned, sizes, seconds, wall_seconds(todo, jobs, overheads),
                        len(timings), jobs, overheads)


def format_duration(seconds: float) -> str:
    """``seconds`` rounded for reading: "40 s", "12 min", "2.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_grid(experiment: Experiment, settings: ExpSettings, grid: GridEstimate) -> str:
    """The dry run's text: one row per variant, the totals and the estimate, said as one."""
    rows, by_variant = [], {}
    for size in grid.sizes:
        by_variant.setdefault(size.run.variant.label, []).append(size)
    for label, sizes in by_variant.items():
        done = sum(is_finished(s.run.run_dir) for s in sizes)
        left = sum(grid.seconds[s.run.run_dir.name] for s in sizes)
        rows.append([label, len(sizes), done, f"{sum(s.steps for s in sizes):,}",
                     format_duration(left) if left else "-"])
    runs_left = len(grid.planned) - grid.finished
    cut_off = sum(0 < s.epochs < s.run.config.epochs for s in grid.sizes)
    per_run = (f"{counted(threads_per_run(grid.jobs), 'thread')} per run" if grid.jobs > 1
               else "one run at a time")
    lines = [
        f"{experiment.name}: {experiment.title}",
        f"{counted(len(by_variant), 'variant')} x {counted(settings.seeds, 'seed')} = "
        f"{counted(len(grid.planned), 'run')}: {grid.finished} finished, {runs_left} to train"
        + (f" ({cut_off} of them cut off, resumed)" if cut_off else ""),
        f"{grid.steps:,} training {'step' if grid.steps == 1 else 'steps'} to run, "
        f"{counted(sum(s.evaluations for s in grid.sizes), 'evaluation')} (each epoch's "
        "end: the validation split and the test set; periodic: the validation split).",
        "",
        format_table(["variant", "runs", "finished", "steps to train", "estimated time"], rows),
        "",
    ]
    if runs_left:
        starts = (f", {grid.overheads.start:.1f} s to start a process" if grid.overheads.start
                  else "")
        lines.append(
            f"Estimated training time: about {format_duration(grid.wall)} with --jobs "
            f"{grid.jobs} ({per_run}). An estimate, from this machine now: {TIMED_STEPS} "
            f"training steps and one evaluation batch of each of the grid's "
            f"{counted(grid.timed_configs, 'distinct configuration')} timed on random "
            f"images, plus {grid.overheads.run:.1f} s a run for the rest (model, checkpoints, "
            f"curves){starts}. Runs that diverge stop early, the machine's load changes it, "
            "and runs over several processes were timed as one process with its share of "
            "the batch (communication left out).")
    else:
        lines.append("Nothing to train: every run is finished.")
    lines.append("Then the analysis measures the finished runs (not in this estimate; a "
                 "progress bar with an ETA follows it). Nothing was trained or written.")
    return "\n".join(lines)


def planned_runs(experiment: Experiment, settings: ExpSettings, out: str | Path) -> list[PlannedRun]:
    """The grid ``run_experiment`` will train for ``settings`` under ``out`` (nothing written)."""
    return plan(experiment, resolve(settings, experiment), Path(out) / "runs")


def dry_run(experiment: Experiment, settings: ExpSettings, out: str | Path, jobs: int = 1,
            threads: int | None = None) -> str:
    """``bnlab exp NAME --dry-run``: the grid of ``settings`` under ``out`` with its estimate;
    trains and writes nothing."""
    planned = planned_runs(experiment, settings, out)
    return describe_grid(experiment, resolve(settings, experiment),
                         estimate(planned, jobs, threads))


# --------------------------------------------------------------------------- progress

class AnalysisBar:
    """A bar over the analysis's measurements: per measurement name (``norm_modes``,
    ``robustness``, ...) the runs measured, out of ``runs`` less those whose stored value was
    used (no work left there). Its ETA is an upper bound: an experiment that measures only
    some of the runs ends early. Made at the first measurement, so it is not shown while
    the grid trains."""

    def __init__(self, runs_total: int, **tqdm_options) -> None:
        self.runs_total = runs_total
        self.options = {"unit": "run", "dynamic_ncols": True, "leave": False, **tqdm_options}
        self.bar: tqdm | None = None
        self.name = ""

    def observe(self, name: str, computed: bool) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.runs_total, **self.options)
        if name != self.name:
            self.name = name
            self.bar.reset(total=self.runs_total)
            self.bar.set_description(f"analysis: {name}")
        if computed:
            self.bar.update(1)
        else:
            self.bar.total = max(self.bar.n, self.bar.total - 1)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def grid_progress(planned: list[PlannedRun], progress: bool) -> Iterator[None]:
    """Around ``run_experiment``: one line with the grid's size before it trains, and an
    :class:`AnalysisBar` following the analysis's measurements (``runs.cached``)."""
    if bar_disabled(progress):
        yield
        return
    sizes = [run_size(p) for p in planned]
    done = sum(is_finished(p.run_dir) for p in planned)
    steps = sum(s.steps for s in sizes)
    tqdm.write(f"grid: {counted(len(planned), 'run')}, {done} finished; {steps:,} training "
               f"{'step' if steps == 1 else 'steps'} to run (--dry-run estimates the time)",
               file=sys.stderr)
    bar = AnalysisBar(len(planned), disable=bar_disabled(progress))
    try:
        with runs.observing_measurements(bar.observe):
            yield
    finally:
        bar.close()
