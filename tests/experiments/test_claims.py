"""The four claim experiments (depth, convergence, norms, robustness): the definitions their
reports rest on, on fabricated rows, and the measurements on tiny real runs."""

from __future__ import annotations

import math

import pytest

from bnlab.experiments import convergence, depth, norm_choice, robustness_claim
from bnlab.experiments.analysis import CHANCE, Row
from bnlab.experiments.runner import ExpSettings, resolve
from bnlab.training.runs import CHECKPOINT
from bnlab.training.train import TrainConfig, build_loaders, start_run, steps_per_epoch


def _row(tags, final_acc, diverged=False, seed=0, metrics=(), evals=(), config=None, label=None):
    return Row(label=str(tags) if label is None else label, tags=tags, seed=seed,
               metrics=list(metrics), evals=list(evals), config=config or {}, run_dir="",
               summary={"diverged": diverged, "final_val_acc": None if diverged else final_acc,
                        "final_test_acc": None if diverged else final_acc,
                        "epochs": max(len(metrics), 1)})


# --------------------------------------------------------------------------- depth

def _depth_rows(results):
    """results: {(activation, norm, depth, lr): [final acc or None (diverged) per seed]}."""
    rows = []
    for (act, norm, d, lr), finals in results.items():
        for seed, acc in enumerate(finals):
            rows.append(_row({"activation": act, "norm": norm, "depth": d, "lr": lr}, acc,
                             diverged=acc is None, seed=seed))
    return rows


def test_depth_stops_where_no_rate_trains_every_seed():
    rows = _depth_rows({
        ("sigmoid", "none", 10, 0.1): [0.8, 0.8], ("sigmoid", "none", 10, 0.01): [0.5, 0.5],
        ("sigmoid", "none", 20, 0.1): [0.6, 0.15],   # one seed at chance: 0.1 fails here
        ("sigmoid", "none", 20, 0.01): [0.3, 0.25],  # ... but 0.01 trains: depth 20 trains
        ("sigmoid", "none", 50, 0.1): [0.1, 0.1], ("sigmoid", "none", 50, 0.01): [None, 0.3],
        ("sigmoid", "none", 110, 0.1): [0.1, 0.1],
        ("sigmoid", "bnlab", 10, 0.1): [0.85, 0.85], ("sigmoid", "bnlab", 110, 0.01): [0.7, 0.6],
    })
    assert depth.trains_at(rows, "sigmoid", "none", 20) is True
    assert depth.trains_at(rows, "sigmoid", "none", 50) is False
    assert depth.trains_at(rows, "relu", "none", 50) is None  # no runs
    assert depth.deepest_training(rows, "sigmoid", "none") == 20
    assert depth.first_failing(rows, "sigmoid", "none") == 50
    assert depth.deepest_training(rows, "sigmoid", "bnlab") == 110
    assert depth.first_failing(rows, "sigmoid", "bnlab") is None
    # best rate by mean final accuracy, a diverged seed counting at chance
    assert depth.best_lr(rows, "sigmoid", "none", 20) == 0.1  # 0.375 vs 0.275
    assert depth.best_lr(rows, "sigmoid", "none", 50) == 0.01  # (0.1 + 0.3)/2 > 0.1
    assert depth.best_lr(rows, "relu", "none", 50) is None
    text = "\n".join(depth.depth_findings(rows))
    assert "sigmoid, no BN: trains up to depth **20**; first depth that fails: **50**" in text
    assert "sigmoid: BN extends the trainable depth from 20 to 110" in text
    assert "more than 100 layers trains here for: sigmoid." in text


def test_depth_best_rate_ties_go_to_the_smaller_rate():
    rows = _depth_rows({("relu", "bnlab", 10, 0.1): [0.8], ("relu", "bnlab", 10, 0.01): [0.8]})
    assert depth.best_lr(rows, "relu", "bnlab", 10) == 0.01


def test_first_last_ratio_and_its_description():
    assert depth.first_last_ratio([1e-6, 1e-3, 1.0]) == pytest.approx(1e-6)
    assert math.isnan(depth.first_last_ratio([1.0, 0.0]))
    assert math.isnan(depth.first_last_ratio([math.nan, 1.0]))
    assert "vanishes by 6.0 orders" in depth._describe_ratio(1e-6)
    assert "grows by 2.0 orders" in depth._describe_ratio(100.0)
    assert "underflows" in depth._describe_ratio(0.0)


@pytest.mark.slow
def test_depth_gradient_profiles_measure_init_and_trained_models(synthetic_fashion, tmp_path):
    config = TrainConfig(val_size=200, model="deep-mlp", norm="bnlab", depth=10, activation="sigmoid", lr=0.1,
                         epochs=1, subset=1000, device="cpu")
    start_run(config, synthetic_fashion, tmp_path / "run", progress=False).train()
    row = Row.from_run(tmp_path / "run",
                       tags={"activation": "sigmoid", "norm": "bnlab", "depth": 10, "lr": 0.1})
    checkpoint = tmp_path / "run" / CHECKPOINT
    before = checkpoint.read_bytes()
    profiles = depth.gradient_profiles([row], synthetic_fashion)
    profile = profiles[("sigmoid", "bnlab", 10)]
    assert len(profile["init"]) == 10 and len(profile["trained"]) == 10
    assert all(v > 0 for v in profile["init"] + profile["trained"])
    assert profile["init"] != profile["trained"]
    assert row.steps_per_epoch * len(row.metrics) == 8  # 1000 images, batch 128, one epoch
    assert checkpoint.read_bytes() == before  # measuring leaves the trained model as it was


# --------------------------------------------------------------------------- convergence

def _metrics(accs, seconds=1.0):
    return [{"epoch": i + 1, "val_acc": a, "train_seconds": seconds} for i, a in enumerate(accs)]


def _conv_row(bn, lr, evals, accs, diverged=False, subset=1000, seed=0):
    return _row({"bn": bn, "lr": lr}, accs[-1] if accs else None, diverged=diverged, seed=seed,
                metrics=_metrics(accs), config={"subset": subset, "batch_size": 128},
                evals=[{"step": s, "train_seconds": t, "val_acc": a} for s, t, a in evals])


def test_steps_per_epoch_matches_the_training_loader(synthetic_fashion):
    for n, bs in ((1000, 128), (1025, 128), (1000, 8), (129, 128)):
        loader = build_loaders(TrainConfig(val_size=200, subset=n, batch_size=bs), synthetic_fashion,
                               "cpu").train
        assert steps_per_epoch(n, bs) == len(loader)
    whole, small = ExpSettings(subset=0), ExpSettings(subset=1000)
    assert convergence.eval_interval(whole, True) == 50 and convergence.eval_interval(whole, False) == 100
    assert convergence.eval_interval(small, True) == convergence.eval_interval(small, False) == 4


def test_progress_merges_periodic_and_epoch_end_evaluations():
    # 1000 images / batch 128 = 8 steps per epoch; evaluations every 3 steps.
    row = _conv_row(True, 1.0, [(3, 0.3, 0.5), (6, 0.6, 0.7), (9, 1.2, 0.75), (12, 1.5, 0.8),
                                (15, 1.8, 0.81)], [0.72, 0.86])
    points = convergence.progress(row)
    assert [p[0] for p in points] == [3, 6, 8, 9, 12, 15, 16]
    assert points[2] == (8, 1.0, 0.72) and points[-1] == (16, 2.0, 0.86)
    assert convergence.steps_to_reach(points, 0.80) == (12, 1.5)
    assert convergence.steps_to_reach(points, 0.85) == (16, 2.0)
    assert convergence.steps_to_reach(points, 0.9) is None


def test_progress_reads_evals_from_a_real_run_folder(synthetic_fashion, tmp_path):
    config = TrainConfig(val_size=200, model="lenet", norm="none", lr=1.0, epochs=2, subset=1000,
                         eval_every=3, device="cpu")
    start_run(config, synthetic_fashion, tmp_path, progress=False).train()
    row = Row.from_run(tmp_path)
    steps = [p[0] for p in convergence.progress(row)]
    assert steps == [3, 6, 8, 9, 12, 15, 16]
    seconds = [p[1] for p in convergence.progress(row)]
    assert seconds == sorted(seconds)


def test_best_lr_steps_and_the_ioffe_comparison():
    base = [_conv_row(False, 0.3, [(4, 0.1, 0.3)], [0.6, 0.8], seed=s) for s in (0, 1)]
    base_hot = [_conv_row(False, 1.0, [], [0.5, 0.81], seed=0),
                _conv_row(False, 1.0, [], [0.7, 0.83], seed=1)]
    bn = [_conv_row(True, 1.0, [(4, 0.2, 0.83), (12, 0.9, 0.86)], [0.82, 0.87], seed=s)
          for s in (0, 1)]
    bn_div = [_conv_row(True, 3.0, [(4, 0.2, 0.4)], [], diverged=True, seed=0)]
    rows = base + base_hot + bn + bn_div
    assert convergence.best_lr(rows, False) == 1.0
    assert convergence.best_lr(rows, True) == 1.0
    stats = convergence.reach_stats(base_hot, 0.82)
    assert stats["reached"] == 1 and convergence.describe_reach(stats) == "not reached by 1/2 seeds"
    stats = convergence.reach_stats(bn, 0.80)
    assert stats["mean_steps"] == 4 and convergence.describe_reach(stats) == "4 steps, 0.2 s (4, 4)"
    comparison = convergence.ioffe_comparison(rows)
    # LeNet lr 1: mean curve (8: 0.6, 16: 0.82) -> target 0.82 at step 16
    assert comparison["target"] == pytest.approx(0.82) and comparison["base_steps"] == 16
    assert comparison["bn"] == {1.0: 4, 3.0: None}
    text = "\n".join(convergence.findings(rows))
    assert "4.0x fewer steps" in text  # 0.80: LeNet 16 steps, BN 4 steps
    assert "lr 1 (1x the rate): step 4, 4.0x fewer steps; lr 3 (3x the rate): never" in text


def test_no_speed_up_is_claimed_against_a_baseline_at_chance():
    rows = [_conv_row(False, 0.3, [(4, 0.1, 0.1)], [0.1, 0.1]),
            _conv_row(True, 0.1, [(4, 0.1, 0.1)], [0.5, 0.7])]
    text = "\n".join(convergence.findings(rows))
    assert "not made" in text and "fewer steps" not in text


def test_mean_progress_counts_a_diverged_seed_at_chance():
    ok = _conv_row(True, 3.0, [(4, 0.1, 0.5)], [0.6, 0.7], seed=0)
    gone = _conv_row(True, 3.0, [(4, 0.1, 0.3)], [], diverged=True, seed=1)
    curve = convergence.mean_progress([ok, gone])
    assert [p[0] for p in curve] == [4, 8, 16]
    assert curve[0][2] == pytest.approx(0.4)
    assert curve[1][2] == pytest.approx((0.6 + CHANCE) / 2) and curve[1][1] == 1.0


# --------------------------------------------------------------------------- norms

def test_norms_lr_rule_and_grid():
    assert norm_choice.lr_for(128) == pytest.approx(0.1)
    assert norm_choice.lr_for(2) == pytest.approx(0.0125)
    grid = norm_choice.variants(resolve(ExpSettings(), norm_choice.EXPERIMENT))
    assert len(grid) == 40  # 5 norms x 4 batch sizes, in each of the two arms
    assert {v.tags["arm"] for v in grid} == set(norm_choice.ARMS)
    at_two = {v.params["lr"] for v in grid if v.params["batch_size"] == 2}
    assert at_two == {norm_choice.lr_for(2)}  # one rate for every norm and arm at a batch size


def test_mode_gaps_and_mode_independence():
    measured = {("bnlab", 2): [{"train": 0.4, "eval": 0.8}, {"train": 0.5, "eval": 0.8}],
                ("bnlab", 128): [{"train": 0.85, "eval": 0.85}],
                ("layer", 2): [{"train": 0.7, "eval": 0.7}],
                ("layer", 128): [{"train": 0.8, "eval": 0.8}]}
    gaps = norm_choice.mode_gaps(measured)
    assert gaps[("bnlab", 2)] == pytest.approx(-0.35) and gaps[("layer", 2)] == 0.0
    assert norm_choice.mode_independent(gaps, "layer") is True
    assert norm_choice.mode_independent(gaps, "bnlab") is False
    assert norm_choice.mode_independent(gaps, "group") is None
    text = "\n".join(norm_choice.findings([], gaps))
    assert "BN: largest |train mode − eval mode| accuracy gap 35.00 points" in text
    assert "depends on the mode" in text and "LayerNorm" in text


@pytest.mark.slow
def test_only_batch_norm_depends_on_the_mode(synthetic_fashion, tmp_path):
    measured = {}
    for norm in ("bnlab", "layer", "instance"):
        config = TrainConfig(val_size=200, model="bn-lenet", norm=norm, batch_size=2,
                             lr=norm_choice.lr_for(2), epochs=1, subset=200, device="cpu")
        run_dir = tmp_path / norm
        start_run(config, synthetic_fashion, run_dir, progress=False).train()
        measured[norm] = norm_choice.mode_accuracies(Row.from_run(run_dir), synthetic_fashion)
    assert measured["layer"]["train"] == measured["layer"]["eval"]
    assert measured["instance"]["train"] == measured["instance"]["eval"]
    assert measured["bnlab"]["train"] != measured["bnlab"]["eval"]
    assert norm_choice.mode_accuracies(_row({}, None, diverged=True), synthetic_fashion) is None


# --------------------------------------------------------------------------- robustness

def test_relative_accuracy_and_comparison():
    def seeds(*values):
        return dict(enumerate(values))

    measured = {
        "BN (lr 0.1)": {"fgsm": {0.0: seeds(0.9, 0.9), 0.1: seeds(0.45, 0.45),
                                 0.2: seeds(0.1, 0.12)}},
        "no BN (lr 1)": {"fgsm": {0.0: seeds(0.8, 0.8), 0.1: seeds(0.6, 0.62),
                                  0.2: seeds(0.3, 0.31)}},
    }
    rel = robustness_claim.relative(measured["BN (lr 0.1)"]["fgsm"])
    assert rel[0.0] == {0: 1.0, 1: 1.0} and rel[0.1] == pytest.approx({0: 0.5, 1: 0.5})
    rows = robustness_claim.compare(measured, "fgsm", "BN (lr 0.1)")
    assert [r["size"] for r in rows] == [0.1, 0.2]
    assert rows[0]["acc"] == pytest.approx(0.45) and rows[0]["base_rel"] == pytest.approx(0.7625)
    assert rows[0]["apart"] and rows[1]["apart"]
    assert robustness_claim.compare(measured, "fgsm", "BN (lr 1)") == []
    text = "\n".join(robustness_claim.findings(measured))
    assert "FGSM (epsilon), BN (lr 0.1) vs no BN (lr 1): more accurate at sizes none, less " \
           "accurate at {0.1, 0.2}" in text


def test_failed_runs_are_not_measured_and_no_baseline_means_no_comparison(synthetic_fashion):
    rows = [_row({"bn": False, "lr": 1.0}, 0.1, label=robustness_claim.BASELINE),
            _row({"bn": False, "lr": 1.0}, None, diverged=True, label=robustness_claim.BASELINE)]
    assert robustness_claim.measure(rows, synthetic_fashion) == {}  # no model is even loaded
    assert robustness_claim.skipped(rows) == [f"- {robustness_claim.BASELINE}: 2/2 seeds failed "
                                              "and are not measured."]
    text = robustness_claim.findings({"BN (lr 0.1)": {"noise": {0.0: {0: 0.9}}}})
    assert text[-1].startswith("- No comparison")


def test_robustness_controls_resolve_each_sigma_by_the_seeds_intervals():
    mine = {0.0: [0.9, 0.91, 0.9], 0.1: [0.8, 0.81, 0.8], 0.3: [0.2, 0.21, 0.2], 0.5: [0.5, 0.1, 0.3]}
    theirs = {0.0: [0.9, 0.9, 0.91], 0.1: [0.5, 0.51, 0.5], 0.3: [0.6, 0.61, 0.6], 0.5: [0.3, 0.4, 0.2]}
    mine, theirs = ({size: dict(enumerate(v)) for size, v in d.items()} for d in (mine, theirs))
    assert robustness_claim.resolved_by_size(mine, theirs) == {"more": [0.1], "less": [0.3],
                                                              "open": [0.5]}


@pytest.mark.slow
def test_measured_curves_start_at_the_run_s_own_clean_accuracy(synthetic_fashion, tmp_path):
    config = TrainConfig(val_size=200, model="bn-lenet", norm="bnlab", lr=1.0, epochs=2, subset=1000,
                         device="cpu")
    summary = start_run(config, synthetic_fashion, tmp_path, progress=False).train()
    assert summary["final_val_acc"] > 0.2  # a run that trained, so it is measured
    row = Row.from_run(tmp_path, label="BN (lr 1)")
    measured = robustness_claim.measure([row], synthetic_fashion)["BN (lr 1)"]
    assert set(measured) == {"noise", "fgsm", "pgd"}
    assert sorted(measured["fgsm"]) == list(robustness_claim.SIZES["fgsm"])
    # size 0 is the clean test accuracy the trainer measured (same images, eval mode)
    assert measured["noise"][0.0] == measured["fgsm"][0.0] == {0: summary["final_test_acc"]}
    assert measured["fgsm"][0.2][0] < measured["fgsm"][0.0][0]
