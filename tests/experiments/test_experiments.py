"""Experiments: every one runs --quick end to end; grids skip, resume and parallelize; the
definitions their reports rest on (failure, CI, epochs to a threshold) are exact."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest

from bnlab import cli
from bnlab.experiments import (
    EXPERIMENTS,
    depth,
    dropout,
    executors,
    get_experiment,
    norm_choice,
    robustness_claim,
    runner,
)
from bnlab.experiments.analysis import (
    Row,
    best_lr,
    best_lr_per_model,
    describe_epochs_to_reach,
    epochs_to_reach,
    failed,
    mean_curve,
    mean_final,
    plot_intervals,
    training_lrs,
)
from bnlab.experiments.report import build_report
from bnlab.experiments.runner import (
    QUICK,
    SUMMARY_COLUMNS,
    ExpSettings,
    execute,
    periodic_eval_every,
    plan,
    resolve,
)
from bnlab.experiments.stats import ACCURACY, interval, mean_ci
from bnlab.training import restore, runs
from bnlab.training.train import start_run
from bnlab.util.config import config_to_dict
from tests.helpers import without_provenance
from tests.util.figure_checks import check_saved_figures

# tests/training/test_distributed.py runs sync's multi-process grid end to end (cut to 2
# processes), and tests/experiments/test_ics.py, tests/probes/test_landscape.py,
# tests/experiments/test_precise.py, test_batchsize.py, test_adapt.py (Fashion-MNIST-C in a
# temporary cache folder) and test_decay.py run their quick grids (with their caches),
# test_residual.py and test_onlybn.py theirs with fewer depths; each checks its figures
# (tests/util/figure_checks.py) as these do.
OWN_QUICK_TESTS = {"ics", "landscape", "precise", "batchsize", "sync", "adapt", "decay",
                   "residual", "onlybn"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n, e in EXPERIMENTS.items()
                                        if n not in OWN_QUICK_TESTS))
def test_quick_experiment_runs_end_to_end(name, fake_dataset, tmp_path, capsys, monkeypatch):
    figures = check_saved_figures(monkeypatch)
    code = cli.main(["exp", name, "--quick", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    folder = tmp_path / name
    experiment = get_experiment(name)
    expected_runs = len(experiment.variants(resolve(QUICK, experiment)))
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert len(rows) == expected_runs
    # an arm with its own budget (Variant.params sets epochs/subset) keeps it; others are --quick's
    budgets = {v.label: v.params for v in experiment.variants(resolve(QUICK, experiment))}
    for r in rows:
        own = budgets[r["label"]]
        assert len(r["metrics"]) == own.get("epochs", 1) or r["summary"]["diverged"]
        assert r["config"]["subset"] == own.get("subset", 1000)
    report = (folder / "report.md").read_text()
    assert report.startswith(f"# {experiment.title}") and "## Summary" in report
    # one line per variant (one seed each) and summary column, and the header
    assert len((folder / "summary.csv").read_text().splitlines()) == \
        len(SUMMARY_COLUMNS) * expected_runs + 1
    for figure in [line.split("](")[1].rstrip(")") for line in report.splitlines()
                   if line.startswith("![")]:
        assert (folder / figure).exists(), figure
        assert f"{name}/{figure}" in figures.problems, figure  # checked as it was saved
    trained = {r["run_dir"] for r in rows}  # variants may share a run
    assert sum(f.endswith("/curves.png") for f in figures.problems) == len(trained)
    assert figures.failing == {}


@pytest.mark.slow
def test_a_second_invocation_trains_nothing(fake_dataset, tmp_path, monkeypatch, capsys):
    argv = ["exp", "placement", "--quick", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    first = (tmp_path / "placement" / "summary.md").read_text()

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(executors, "start_run", must_not_train)
    assert cli.main(argv) == 0
    assert (tmp_path / "placement" / "summary.md").read_text() == first


# Experiments that measure finished models: grid constants that shrink their --quick grids,
# and flags (robustness measures only runs past chance, which one epoch here is not).
SMALL_GRIDS = {"robustness": ({}, ["--epochs", "2"]), "dropout": ({}, []),
               "depth": ({"QUICK_DEPTHS": (5,), "QUICK_LEARNING_RATES": (0.1,)}, []),
               "norms": ({"QUICK_BATCH_SIZES": (8, 128)}, [])}


def _count_measurements(monkeypatch) -> list[str]:
    """Make training fail, and record every model reload and gradient measurement."""
    from bnlab.probes import gradients

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(executors, "start_run", must_not_train)
    calls: list[str] = []
    for module, name in ((restore, "load_trained_model"), (gradients, "layer_gradient_norms")):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_GRIDS))
def test_a_finished_grid_is_reanalysed_from_the_run_folders(name, fake_dataset, tmp_path,
                                                            monkeypatch, capsys):
    module = {"robustness": robustness_claim, "dropout": dropout, "depth": depth,
              "norms": norm_choice}[name]
    constants, flags = SMALL_GRIDS[name]
    for constant, value in constants.items():
        monkeypatch.setattr(module, constant, value)
    figures = check_saved_figures(monkeypatch)  # here robustness's has models to draw
    argv = ["exp", name, "--quick", *flags, "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    assert figures.problems and figures.failing == {}
    first = (tmp_path / name / "report.md").read_text()
    assert list(tmp_path.glob("runs/*/analysis/*.json"))  # measurements were cached
    calls = _count_measurements(monkeypatch)
    assert cli.main(argv) == 0
    assert calls == []  # nothing trained, reloaded or measured again
    assert without_provenance((tmp_path / name / "report.md").read_text()) == \
        without_provenance(first)


@pytest.mark.slow
def test_a_changed_measurement_setting_recomputes(fake_dataset, tmp_path, monkeypatch, capsys):
    argv = ["exp", "robustness", "--quick", "--epochs", "2", "--out", str(tmp_path),
            "--no-progress"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in
            (tmp_path / "robustness" / "results.jsonl").read_text().splitlines()]
    trained = [r for r in rows if not failed(Row.from_json(r))]
    assert trained
    calls = _count_measurements(monkeypatch)
    monkeypatch.setattr(robustness_claim, "PGD_STEPS", 3)
    assert cli.main(argv) == 0
    assert calls == ["load_trained_model"] * len(trained)  # every measured run, once
    for r in trained:
        stored = json.loads((Path(r["run_dir"]) / runs.ANALYSIS / "robustness.json").read_text())
        assert stored["key"]["pgd_steps"] == 3


def test_cached_computes_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"acc": [0.5, math.nan], "size": (0.1,)}

    first = runs.cached(tmp_path, "m", {"setting": 1}, compute)
    again = runs.cached(tmp_path, "m", {"setting": 1}, compute)
    assert len(calls) == 1 and first["size"] == again["size"] == [0.1]  # as JSON gives it back
    assert math.isnan(again["acc"][1])
    runs.cached(tmp_path, "m", {"setting": 2}, compute)
    assert len(calls) == 2
    runs.cached(tmp_path, "m", {"setting": 2}, compute)
    runs.cached(tmp_path, "other", {"setting": 2}, compute)
    assert len(calls) == 3
    assert not list(tmp_path.glob("**/*.tmp"))


def test_cached_records_what_the_measurement_cost(tmp_path):
    before = time.time()
    runs.cached(tmp_path, "slow", {"k": 1}, lambda: time.sleep(0.05) or 1)
    stored = json.loads((tmp_path / runs.ANALYSIS / "slow.json").read_text())
    assert stored["seconds"] >= 0.05 and before <= stored["computed_at"] <= time.time()


@pytest.mark.slow
def test_runs_shared_between_experiments_train_once(synthetic_fashion, tmp_path, monkeypatch):
    settings = ExpSettings(seeds=1, epochs=1, subset=1000, val_size=200)
    chapter = plan(get_experiment("dropout"), settings, tmp_path)
    placement = plan(get_experiment("placement"), settings, tmp_path)
    shared = {p.run_dir for p in chapter} & {p.run_dir for p in placement}
    assert len(shared) == 1  # BN-LeNet with bnlab's BN everywhere, no dropout
    trained = []

    def recording(config, dataset, run_dir, **kwargs):
        trained.append(run_dir)
        return start_run(config, dataset, run_dir, **kwargs)

    monkeypatch.setattr(executors, "start_run", recording)
    execute(chapter, synthetic_fashion, progress=False)
    execute(placement, synthetic_fashion, progress=False)
    assert sorted(trained) == sorted({p.run_dir for p in chapter + placement})  # each once


@pytest.mark.slow
def test_a_cut_off_run_is_resumed(synthetic_fashion, tmp_path):
    settings = ExpSettings(seeds=1, epochs=2, subset=1000)
    planned = plan(get_experiment("chapter"), settings, tmp_path)
    first = planned[0]
    partial = start_run(first.config, synthetic_fashion, first.run_dir, progress=False)
    partial.train_next_epoch()  # killed after one of two epochs
    execute(planned, synthetic_fashion, jobs=1, progress=False)
    assert len(runs.load_run(first.run_dir)["metrics"]) == 2
    assert all(runner.is_finished(p.run_dir) for p in planned)


@pytest.mark.slow
def test_parallel_jobs_give_the_serial_results(synthetic_fashion, tmp_path):
    settings = ExpSettings(seeds=2, epochs=1, subset=1000)
    experiment = get_experiment("chapter")
    serial = plan(experiment, settings, tmp_path / "serial")
    parallel = plan(experiment, settings, tmp_path / "parallel")
    execute(serial, synthetic_fashion, jobs=1, progress=False)
    execute(parallel, synthetic_fashion, jobs=2, progress=False)
    for a, b in zip(serial, parallel):
        ra, rb = runs.load_run(a.run_dir), runs.load_run(b.run_dir)
        assert ra["metrics"][0]["val_acc"] == rb["metrics"][0]["val_acc"]
        assert ra["metrics"][0]["train_loss"] == pytest.approx(rb["metrics"][0]["train_loss"],
                                                               rel=1e-5)


def _row(tags, final_acc, diverged=False, accs=()):
    metrics = [{"epoch": i + 1, "val_acc": a, "train_acc": a, "val_loss": 1.0}
               for i, a in enumerate(accs)]
    return Row(label=str(tags), tags=tags, seed=0, config={"val_size": 1000}, metrics=metrics,
               run_dir="",
               summary={"diverged": diverged, "final_val_acc": None if diverged else final_acc,
                        "epochs": max(len(accs), 1)})


@pytest.mark.parametrize("settings", [QUICK, ExpSettings()])
def test_norms_equal_steps_arm_has_equal_step_counts(settings):
    from bnlab.training.train import TrainConfig, steps_per_epoch, training_images

    settings = resolve(settings, norm_choice.EXPERIMENT)
    arm = [v for v in norm_choice.variants(settings) if v.tags["arm"] == norm_choice.STEPS]
    assert {v.tags["batch_size"] for v in arm} == set(norm_choice.batch_sizes(settings))
    steps = set()
    for v in arm:
        config = TrainConfig(**v.params)
        assert config.subset <= settings.subset
        steps.add(config.epochs * steps_per_epoch(training_images(config.subset), config.batch_size))
    # batch EQUAL_STEPS_BATCH's step count in the equal-epochs arm, at every batch size
    assert steps == {settings.epochs * steps_per_epoch(settings.subset, norm_choice.EQUAL_STEPS_BATCH)}
    # the equal-epochs arm keeps the grid's epochs and images (so its step counts differ)
    epochs_arm = [v for v in norm_choice.variants(settings) if v.tags["arm"] == norm_choice.EPOCHS]
    assert all("epochs" not in v.params and "subset" not in v.params for v in epochs_arm)


def test_equal_steps_budget_picks_whole_batches_and_fewest_epochs():
    assert norm_choice.equal_steps_budget(1875, 2, 10000) == (1, 3750)
    assert norm_choice.equal_steps_budget(1875, 128, 10000) == (25, 9600)  # 24 does not divide
    with pytest.raises(ValueError, match="no budget of 7 steps at batch 128 fits 100 images"):
        norm_choice.equal_steps_budget(7, 128, 100)  # not even one batch of 128 fits


def test_failure_means_diverged_or_chance_level():
    assert failed(_row({}, 0.2)) and failed(_row({}, 0.15)) and failed(_row({}, None, True))
    assert not failed(_row({}, 0.21))


def test_a_learning_rate_trains_only_when_every_seed_does():
    rows = [_row({"bn": True, "lr": 0.1}, 0.8), _row({"bn": True, "lr": 0.1}, 0.8),
            _row({"bn": True, "lr": 1.0}, 0.8), _row({"bn": True, "lr": 1.0}, 0.1),
            _row({"bn": True, "lr": 3.0}, None, diverged=True),
            _row({"bn": False, "lr": 0.01}, 0.1)]
    assert training_lrs(rows, bn=True) == [0.1]
    assert training_lrs(rows, bn=False) == []


def test_epochs_to_reach_and_mean_curve_with_a_diverged_seed():
    a = _row({}, 0.86, accs=[0.7, 0.82, 0.86])
    b = _row({}, 0.85, accs=[0.75, 0.79, 0.85])
    assert epochs_to_reach(a, 0.80) == 2 and epochs_to_reach(b, 0.80) == 3
    assert epochs_to_reach(a, 0.9) is None
    assert describe_epochs_to_reach([a, b], 0.80) == "2.5 (2, 3)"
    assert describe_epochs_to_reach([a, b], 0.86) == "not reached by 1/2 seeds"
    gone = _row({}, None, diverged=True, accs=[0.5])
    gone.summary["epochs"] = 3
    xs, means, _ = mean_curve([a, gone])
    assert xs == [1, 2, 3] and means[2] == pytest.approx((0.86 + 0.1) / 2)


def test_report_gathers_and_relinks(tmp_path):
    (tmp_path / "exp" / "lr").mkdir(parents=True)
    (tmp_path / "exp" / "lr" / "report.md").write_text("# LR\n\n![plot](a.png)\n")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "report.md").write_text("# Demo\n\n![c](comparison.png)\n")
    out, gathered = build_report([tmp_path / "demo", tmp_path / "exp"], tmp_path / "report.md")
    text = out.read_text()
    assert len(gathered) == 2
    assert "![plot](exp/lr/a.png)" in text and "![c](demo/comparison.png)" in text
    assert "## LR" in text and "## Demo" in text


def test_report_follows_the_given_order(tmp_path):
    for name in ("placement", "lr", "zeta"):
        (tmp_path / "exp" / name).mkdir(parents=True)
        (tmp_path / "exp" / name / "report.md").write_text(f"# {name}\n")
    _, gathered = build_report([tmp_path / "exp"], tmp_path / "r.md", order=("lr", "placement"))
    assert [p.parent.name for p in gathered] == ["lr", "placement", "zeta"]


def test_accuracy_intervals_stay_inside_zero_and_one():
    split = [0.1, 0.85, 0.86]  # seeds split between diverging (chance) and training
    mean, half = mean_ci(split)
    assert mean - half < 0 and mean + half > 1  # the raw 3-seed t interval leaves [0, 1]
    assert interval(split, ACCURACY) == (mean, 0.0, 1.0)
    assert interval(split) == (mean, mean - half, mean + half)
    assert interval([0.5]) == (0.5, 0.5, 0.5)
    from bnlab.util.plots import plt

    fig, ax = plt.subplots()
    plot_intervals(ax, {0.1: [0.8, 0.82, 0.81], 100.0: split})
    (_, _, (whiskers,)) = ax.containers[0]
    ys = [y for segment in whiskers.get_segments() for _, y in segment]
    assert min(ys) == 0.0 and max(ys) == 1.0
    plt.close(fig)


def test_best_lr_by_a_criterion_ties_to_the_smaller_rate():
    rows = [_row({"bn": True, "lr": 0.1}, 0.8), _row({"bn": True, "lr": 1.0}, 0.8),
            _row({"bn": True, "lr": 3.0}, None, diverged=True), _row({"bn": False, "lr": 1.0}, 0.9)]
    assert best_lr(rows, (0.1, 1.0, 3.0), bn=True) == 0.1
    assert best_lr(rows, (0.1, 1.0, 3.0), lambda g: -mean_final(g), bn=True) == 3.0
    assert best_lr(rows, (0.1, 1.0, 3.0), bn=False) == 1.0
    assert best_lr(rows, (0.01,), bn=True) is None


def test_best_lr_per_model_reads_the_lr_experiment_beside(tmp_path):
    assert best_lr_per_model(tmp_path / "lr") is None  # no lr experiment has run
    rows = [_row({"bn": True, "lr": 0.1}, 0.8), _row({"bn": True, "lr": 1.0}, 0.85),
            _row({"bn": False, "lr": 0.1}, 0.5), _row({"bn": False, "lr": 1.0}, None, diverged=True)]
    (tmp_path / "lr").mkdir()
    (tmp_path / "lr" / "results.jsonl").write_text(
        "".join(json.dumps(r.to_json()) + "\n" for r in rows))
    assert best_lr_per_model(tmp_path / "lr") == {True: 1.0, False: 0.1}
    (tmp_path / "lr" / "results.jsonl").write_text(json.dumps(rows[0].to_json()) + "\n")
    assert best_lr_per_model(tmp_path / "lr") is None  # LeNet has no rate
    # a grid without a validation split chose on the test set: none of its rates is read
    on_test = [dataclasses.replace(r, config={"val_size": 0}) for r in rows]
    (tmp_path / "lr" / "results.jsonl").write_text(
        "".join(json.dumps(r.to_json()) + "\n" for r in on_test))
    assert best_lr_per_model(tmp_path / "lr") is None


def test_periodic_evaluations_about_25_a_run_at_most_every_5_steps():
    # 30000 images / 60 = 500 steps an epoch; all 50000 that the validation split of 10000
    # leaves / 128 = 391 (the last batch partial)
    assert periodic_eval_every(ExpSettings(epochs=3, subset=30000), 60) == 1500 // 25
    assert periodic_eval_every(ExpSettings(epochs=5, subset=0), 128) == 391 * 5 // 25
    assert periodic_eval_every(ExpSettings(epochs=1, subset=1000), 128) == 5  # 8 steps


def test_no_flush_denormal_reaches_every_run_and_the_default_keeps_run_folders(tmp_path):
    """``bnlab exp --no-flush-denormal`` (the arithmetic before the flush, to time it) gives
    every run of the grid IEEE denormals and folders of its own; the default changes no
    run folder name, so grids run before the setting existed are still found."""
    lr = get_experiment("lr")
    default = plan(lr, QUICK, tmp_path)
    ieee = plan(lr, dataclasses.replace(QUICK, flush_denormal=False), tmp_path)
    assert all(p.config.flush_denormal for p in default)
    assert not any(p.config.flush_denormal for p in ieee)
    assert not {p.run_dir for p in default} & {p.run_dir for p in ieee}
    assert "flush_denormal" not in json.dumps(config_to_dict(default[0].config))
