"""Sizes before work: the dry run's counts are what then trains; the estimate's arithmetic.

Why: ``bnlab exp NAME --dry-run`` is how a user decides whether to start a grid (issue 31,
item 1). Its counts must be exactly the runs, steps and evaluations the grid then does, and
its time an honest sum of timed steps scheduled as the executor runs them.
"""

from __future__ import annotations

import io
import json
import re

import pytest

from bnlab import cli
from bnlab.experiments import get_experiment, sizing
from bnlab.experiments.runner import QUICK, plan, resolve
from bnlab.training import runs


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dry_run_counts(text: str) -> tuple[int, int, int, int, int]:
    """(runs, finished, to train, training steps, evaluations) as the dry run prints them."""
    runs_line = re.search(r"= (\d+) runs?: (\d+) finished, (\d+) to train", text)
    steps_line = re.search(r"([\d,]+) training steps? to run, (\d+) evaluations?", text)
    assert runs_line and steps_line, text
    return (*map(int, runs_line.groups()), int(steps_line[1].replace(",", "")), int(steps_line[2]))


@pytest.mark.slow
def test_the_dry_run_counts_what_then_trains(fake_dataset, tmp_path, capsys):
    out = tmp_path / "exp"
    argv = ["exp", "convergence", "--quick", "--out", str(out), "--no-progress"]
    code, text, _ = run_cli(capsys, *argv, "--dry-run", "--jobs", "2")
    assert code == 0 and not out.exists()  # nothing written
    total, finished, todo, steps, evaluations = dry_run_counts(text)
    assert "Estimated training time: about" in text and "--jobs 2" in text
    assert (finished, todo) == (0, total)

    assert run_cli(capsys, *argv)[0] == 0
    folders = [d for d in (out / "runs").iterdir() if (d / runs.SUMMARY).exists()]
    assert len(folders) == total
    trained_steps = sum(len(row["loss"]) for d in folders for row in runs.read_jsonl(d / runs.STEPS))
    assert trained_steps == steps
    evaluated = sum(len(runs.read_jsonl(d / runs.METRICS)) for d in folders) + sum(
        len(runs.read_jsonl(d / runs.EVALS)) for d in folders if (d / runs.EVALS).exists())
    assert evaluated == evaluations

    code, again, _ = run_cli(capsys, *argv, "--dry-run")
    assert dry_run_counts(again) == (total, total, 0, 0, 0)
    assert "Nothing to train: every run is finished." in again


def test_a_cut_off_run_counts_only_its_epochs_left(tmp_path):
    experiment = get_experiment("chapter")
    settings = resolve(QUICK, experiment)
    p = plan(experiment, settings.__class__(seeds=1, epochs=3, subset=1000), tmp_path)[0]
    p.run_dir.mkdir(parents=True)
    assert sizing.run_size(p).epochs == 3
    (p.run_dir / runs.METRICS).write_text(json.dumps({"epoch": 1}) + "\n")
    size = sizing.run_size(p)
    assert (size.epochs, size.steps) == (2, 2 * 8)  # 1000 images at batch 128: 8 steps
    (p.run_dir / runs.METRICS).write_text("{not json\n")  # unreadable: counted from the start
    assert sizing.run_size(p).epochs == 3
    (p.run_dir / runs.SUMMARY).write_text("{}")
    assert sizing.run_size(p).steps == 0


def test_the_estimate_sums_timed_steps_and_schedules_them_as_the_executor(tmp_path):
    experiment = get_experiment("placement")
    planned = plan(experiment, resolve(QUICK, experiment), tmp_path)  # 6 runs, 8 steps each
    timed = []

    def fake_time(config, nproc, threads):
        timed.append((config.norm_slots, nproc, threads))
        return sizing.StepTiming(step=0.5, eval_batch=0.1)

    overheads = sizing.Overheads(run=1.0, start=3.0)
    one = sizing.estimate(planned, jobs=1, time_fn=fake_time, overheads=overheads)
    # 8 steps; one epoch's end: the validation split (--quick's 1000 images, 1 batch of 1000)
    # and the test set (10 batches of 1000)
    per_run = 8 * 0.5 + (1 + 10) * 0.1
    assert one.seconds == {p.run_dir.name: pytest.approx(per_run) for p in planned}
    assert one.wall == pytest.approx(6 * (per_run + 1)) and one.timed_configs == len(timed) == 6
    two = sizing.estimate(planned, jobs=2, time_fn=fake_time, overheads=overheads)
    assert two.wall == pytest.approx(3 * (per_run + 1) + 3)  # two workers started, 3 runs each
    assert sizing.format_duration(40) == "40 s" and sizing.format_duration(600) == "10 min"


def test_runs_over_processes_run_alone_before_the_pool():
    class Run:
        def __init__(self, world):
            self.world = world

    alone, pooled = Run(world=object()), [Run(None) for _ in range(3)]
    seconds = [(alone, 10.0), (pooled[0], 3.0), (pooled[1], 1.0), (pooled[2], 1.0)]
    assert sizing.wall_seconds(seconds, jobs=2) == 10.0 + 3.0  # 3 | 1 + 1 on two workers
    assert sizing.wall_seconds(seconds, jobs=1) == 15.0
    overheads = sizing.Overheads(run=0.5, start=2.0)
    # the multi-process run starts its processes; the pool starts its workers once
    assert sizing.wall_seconds(seconds, 2, overheads) == (10.0 + 0.5 + 2.0) + (3.5 + 2.0)
    assert sizing.wall_seconds(seconds, 1, overheads) == 15.0 + 4 * 0.5 + 2.0


def test_the_overheads_are_measured_by_a_tiny_run_and_a_started_python():
    overheads = sizing.measure_overheads(starts_processes=True)
    assert 0 < overheads.run < 60 and 0 < overheads.start < 120
    assert sizing.measure_overheads(starts_processes=False).start == 0.0


def test_timing_a_config_draws_no_random_numbers_and_restores_threads():
    import torch

    from bnlab.training.train import TrainConfig

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    timing = sizing.time_config(TrainConfig(batch_size=8, eval_batch_size=50, val_size=200), 1, 1)
    after = torch.rand(2)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(2)) and torch.get_num_threads() == threads
    assert timing.step > 0 and timing.eval_batch > 0


def test_the_analysis_bar_follows_the_measurements(tmp_path, capsys):
    experiment = get_experiment("placement")
    planned = plan(experiment, resolve(QUICK, experiment), tmp_path)
    seen = []
    with sizing.grid_progress(planned, progress=True):
        with runs.observing_measurements(lambda name, computed: seen.append((name, computed))):
            runs.cached(tmp_path, "m", {"k": 1}, lambda: 1)  # the bar sees it too
        runs.cached(tmp_path, "m", {"k": 1}, lambda: 1)
    assert seen == [("m", True)]
    assert "grid: 6 runs, 0 finished; 48 training steps to run" in capsys.readouterr().err


def test_nested_observers_each_see_every_measurement(tmp_path):
    outer, inner = [], []
    with runs.observing_measurements(lambda name, computed: outer.append((name, computed))):
        with runs.observing_measurements(lambda name, computed: inner.append((name, computed))):
            runs.cached(tmp_path, "m", {"k": 1}, lambda: 1)
        runs.cached(tmp_path, "m", {"k": 1}, lambda: 1)
    assert inner == [("m", True)]
    assert outer == [("m", True), ("m", False)]


def test_the_analysis_bar_counts_measurements_left_per_name():
    bar = sizing.AnalysisBar(4, file=io.StringIO(), disable=False)
    for computed in (True, False, True):
        bar.observe("norm_modes", computed)
    assert (bar.bar.n, bar.bar.total) == (2, 3)  # a stored value is no work left
    bar.observe("robustness", True)
    assert (bar.bar.n, bar.bar.total) == (1, 4) and "analysis: robustness" in bar.bar.desc
    bar.close()


def test_a_cut_off_run_is_sized_by_what_its_resume_then_trains(synthetic_fashion, tmp_path):
    from bnlab.experiments.runner import PlannedRun, Variant
    from bnlab.training.train import TrainConfig, start_run

    config = TrainConfig(epochs=3, subset=1000, val_size=200, eval_every=3,
                         eval_batch_size=100)  # 8 steps an epoch
    p = PlannedRun(Variant("v", {}), config, tmp_path / "run")
    start_run(config, synthetic_fashion, p.run_dir, progress=False).train_next_epoch()  # cut off
    size = sizing.run_size(p)
    before = len(runs.read_jsonl(p.run_dir / runs.EVALS))
    start_run(config, synthetic_fashion, p.run_dir, resume=True, progress=False).train()
    steps = [len(row["loss"]) for row in runs.read_jsonl(p.run_dir / runs.STEPS)]
    evals = len(runs.read_jsonl(p.run_dir / runs.EVALS)) - before
    assert (size.epochs, size.steps, size.evaluations) == (2, sum(steps[1:]), 2 + evals)
