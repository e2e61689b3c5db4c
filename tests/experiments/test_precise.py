"""bnlab exp precise: shadow EMAs, the probe's population statistics, the analysis rules, and
the quick grid end to end (cached, re-analysed without training or replaying)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from bnlab.experiments import precise
from bnlab.experiments.analysis import Row
from bnlab.experiments.probed import replay
from bnlab.nn.precise import update_bn_stats
from bnlab.training.norms import create_norm_layer
from bnlab.training.train import TrainConfig, build_loaders, evaluate, start_run
from tests.helpers import without_provenance
from tests.util.figure_checks import check_saved_figures


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(create_norm_layer("bnlab", "fc", 3), nn.Linear(3, 4),
                         create_norm_layer("bnlab", "fc", 4))


def test_shadow_of_momentum_0_1_equals_the_layers_own_running_statistics():
    model = _tiny().train()
    shadows = precise.ShadowEMA((0.01, 0.1, 0.9))
    shadows.attach(model)
    for _ in range(5):
        model(torch.randn(16, 3) * 3 + 1)
    for name, layer in precise.batch_norm_layers(model):
        mean, var = shadows.stats[name][0.1]
        torch.testing.assert_close(mean, layer.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, layer.running_var, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(shadows.stats[name][0.9][0], shadows.stats[name][0.01][0])


def test_shadow_of_momentum_1_is_the_last_batch_and_inactive_or_eval_forwards_change_nothing():
    model = _tiny().train()
    shadows = precise.ShadowEMA((1.0,))
    shadows.attach(model)
    model(torch.randn(10, 3))
    last = torch.randn(20, 3) * 2 - 1
    model(last)
    mean, var = shadows.stats["0"][1.0]
    torch.testing.assert_close(mean, last.mean(0))
    torch.testing.assert_close(var, last.var(0, unbiased=True))
    before = [t.clone() for t in shadows.stats["0"][1.0]]
    shadows.active = False
    model(torch.randn(8, 3))
    shadows.active = True
    model.eval()
    model(torch.randn(8, 3))
    assert all(torch.equal(a, b) for a, b in zip(before, shadows.stats["0"][1.0]))


def test_probes_every_eighth_of_the_first_epoch_and_every_half_epoch_after_it():
    assert precise.probe_steps(16, 3) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 24, 32, 40, 48]
    assert precise.probe_steps(8, 1) == list(range(9))
    assert precise.probe_steps(1, 2) == [0, 1, 2]  # 0.125 epoch rounds to step 0
    # whole batches of the run's size, capped at the training set, which is the last
    assert precise.sample_sizes(50000, 128) == [128, 1024, 4096, 10240, 50000]
    assert precise.sample_sizes(50000, 1024) == [1024, 4096, 10240, 50000]
    assert precise.sample_sizes(1000, 128) == [128, 1000]


def test_statistics_error_is_zero_for_the_population_and_in_units_of_its_sigma():
    pop = {"a": (torch.zeros(2), torch.full((2,), 4.0))}
    est = {"a": (torch.tensor([2.0, -2.0]), torch.full((2,), 4.0 * math.e))}
    assert precise.statistics_error(pop, pop) == [0.0, 0.0]
    mean_err, var_err = precise.statistics_error(est, pop, eps=0.0)
    assert mean_err == pytest.approx(1.0) and var_err == pytest.approx(1.0)


def test_the_probe_evaluates_ema_0_1_as_the_model_and_population_as_update_bn_stats(synthetic_fashion):
    config = TrainConfig(val_size=200, lr=0.1, epochs=1, subset=300, device="cpu")
    run = start_run(config, synthetic_fashion, progress=False)
    shadows = precise.ShadowEMA()
    shadows.attach(run.model)
    run.train()
    own = {k: v.clone() for k, v in run.model.state_dict().items()}
    probe = precise.make_probe(config, synthetic_fashion, shadows)
    record = probe(run.model, None, None, 3)
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in own.items())  # restored
    assert shadows.active
    train, _, test = build_loaders(config, synthetic_fashion, "cpu")
    assert record["acc"]["ema:0.1"] == evaluate(run.model, test)[1]
    # The largest N is the whole (300-image) training set: exactly update_bn_stats over it.
    train.set_epoch(0)
    exact = update_bn_stats(copy.deepcopy(run.model), train, len(train), progress=False)
    last = precise.batch_norm_layers(exact)[-1][1]
    assert record["channel"]["pop:300"] == [last.running_mean[0].item(), last.running_var[0].item()]
    assert record["error"]["pop:300"] == [0.0, 0.0]
    assert record["acc"]["pop:300"] == evaluate(exact, test)[1]
    assert set(record["acc"]) == {"ema:0.01", "ema:0.1", "ema:0.9", "pop:128", "pop:300"}


@pytest.mark.parametrize("optimizer", [{}, {"momentum": 0.9, "weight_decay": 5e-4}],
                         ids=["plain SGD", "Wu & Johnson's momentum and weight decay"])
def test_a_replay_with_shadows_keeps_the_trajectory_and_probes_the_final_weights(synthetic_fashion,
                                                                              tmp_path, optimizer):
    config = TrainConfig(val_size=200, lr=0.1, epochs=2, subset=200, batch_size=64, device="cpu",
                         **optimizer)
    start_run(config, synthetic_fashion, tmp_path, progress=False).train()
    shadows = precise.ShadowEMA()
    steps = precise.probe_steps(4, 2)  # 200 images at batch 64: 4 steps an epoch
    out = replay(config, synthetic_fashion, steps, precise.make_probe(config, synthetic_fashion, shadows),
                 tmp_path / "checkpoint.pt", progress=False, setup=shadows.attach)
    assert out["reproduces_run"] is True
    assert [r["step"] for r in out["records"]] == [0, 1, 2, 3, 4, 6, 8]
    first = out["records"][0]  # before any step the shadows hold batch norm's (0, 1) start
    assert first["channel"]["ema:0.9"] == [0.0, 1.0] == first["channel"]["ema:0.01"]


def test_the_ema_gap_reads_its_known_answers_on_the_one_hot_model():
    """A measure that could not see wrong statistics would read 0 in every case."""
    records = precise.calibration()
    assert [c.ok for c in records] == [True, True, True]
    assert [c.read for c in records] == ["+0.0", "-20.0", "-50.0"]


def _record(step: int, ema: float, pops: dict[int, float], slow: float | None = None) -> dict:
    acc = {"ema:0.1": ema, **{f"pop:{n}": a for n, a in pops.items()}}
    if slow is not None:
        acc["ema:0.01"] = slow
    return {"step": step, "acc": acc}


def test_gap_phases_and_needed_samples_follow_their_definitions():
    records = [_record(0, 0.1, {128: 0.1, 512: 0.1, 1000: 0.1}),
               _record(5, 0.50, {128: 0.70, 512: 0.798, 1000: 0.80}),
               _record(10, 0.70, {128: 0.80, 512: 0.85, 1000: 0.90})]
    assert precise.estimators(records) == ["ema:0.1", "pop:128", "pop:512", "pop:1000"]
    assert precise.gap(records[1], "ema:0.1") == pytest.approx(-0.30)
    assert precise.gap(records[1], "pop:1000") == 0.0
    assert precise.phase_gap(records, "ema:0.1", lambda s: s > 0) == pytest.approx(-0.25)
    row = _row("chapter", 0)  # 10 steps an epoch
    ph = precise.phases(row, records)
    assert [r["step"] for r in records if ph["first epoch"](r["step"])] == [5, 10]
    assert [r["step"] for r in records if ph["end"](r["step"])] == [10]
    probes = {row.run_dir: records}
    assert precise.gaps([row], probes, "ema:0.1", "over training") == {0: pytest.approx(-25.0)}
    assert precise.needed_samples([row], probes) == {0: None}  # 512 is 5 points below at the end
    probes[row.run_dir] = records[:2]  # final weights at step 5: N = 512 is 0.2 points below
    assert precise.needed_samples([row], probes) == {0: 512}


def _row(arm: str, seed: int, val_acc: float = 0.8) -> Row:
    return Row(label=arm, tags={"arm": arm, "lr": 0.1}, seed=seed,
               config={"subset": 1280, "val_size": 0, "batch_size": 128, "epochs": 1},
               metrics=[], summary={"final_val_acc": val_acc, "diverged": False},
               run_dir=f"{arm}-{seed}")


def _grid(early: dict[str, list[float]], fail: str = "") -> tuple[list[Row], dict]:
    """Three seeds per arm; per arm the EMA 0.1 gaps of the first-epoch probe (step 5) per
    seed, the final probe (step 10) 1 point below the population, momentum 0.01 5 points
    worse early; population of N = 1024 and 10240 within 0.1 points of the whole set."""
    rows, probes = [], {}
    for arm, firsts in early.items():
        for seed, first in enumerate(firsts):
            row = _row(arm, seed, 0.1 if arm == fail else 0.8)
            pops = {1024: 0.799 + 0.0005 * seed, 10240: 0.8, 50000: 0.8}
            probes[row.run_dir] = [_record(0, 0.1, pops), _record(5, 0.8 + first / 100, pops,
                                                                   0.8 + (first - 5) / 100),
                                   _record(10, 0.79, pops, 0.79)]
            rows.append(row)
    return rows, probes


def test_paper_verdicts_pair_the_seeds_and_judge_only_arms_that_train():
    rows, probes = _grid({"chapter": [-3.0, -4.0, -3.5], "high rate": [-9.0, -8.0, -10.0],
                          "wu-johnson": [-1.9, -2.9, -2.6]})
    verdicts = {v.claim: v for v in precise.paper_verdicts(rows, probes)}
    chapter = precise.ARMS["chapter"].name
    assert verdicts[f"EMA is worse early than late ({chapter})"].outcome == "supported"
    # first epoch: steps 5 and 10 (a one-epoch run), mean (-3.5 - 1) / 2; end: -1
    assert verdicts[f"EMA is worse early than late ({chapter})"].effect == pytest.approx(1.25)
    assert verdicts[f"a large EMA momentum (slow average) is worse ({chapter})"].outcome == "supported"
    assert verdicts["a large learning rate makes EMA worse"].outcome == "supported"
    wj = verdicts["large-batch momentum SGD makes EMA worse"]  # better than the chapter's
    assert wj.outcome == "contradicted" and wj.method == "paired t over seeds" and wj.n == 3
    assert verdicts["precise BN is accurate with 10^4 samples"].outcome == "supported"
    assert verdicts["precise BN is accurate with 10^3 samples"].outcome == "supported"
    for v in verdicts.values():
        assert v.paper and v.note and v.source == precise.SOURCE

    rows, probes = _grid({"chapter": [-3.0, -4.0, -3.5], "high rate": [-9.0, -8.0, -10.0],
                          "wu-johnson": [-2.9, -3.9, -3.6]}, fail="high rate")
    rate = next(v for v in precise.paper_verdicts(rows, probes)
                if v.claim == "a large learning rate makes EMA worse")
    assert rate.outcome == "unresolved" and rate.effect is None and rate.failed == "3/6 failed"
    assert "does not train" in rate.note


def test_departures_are_paired_intervals_at_each_probe(tmp_path):
    rows, probes = _grid({"chapter": [-3.0, -4.0, -3.5]})
    measured = dict(precise.departures(rows, probes, "ema:0.1"))
    assert sorted(measured) == [5, 10]
    assert measured[5].effect == pytest.approx(-3.5) and measured[5].high < 0
    lines = precise.findings(rows, probes, tmp_path / "precise", reproduced=3)
    assert any("EMA momentum 0.1: below the population statistics (95% interval under 0) at "
               "2 probes of 2, first at epoch 0.5 (step 5)" in line for line in lines), lines


@pytest.mark.slow
def test_precise_quick_grid_runs_and_a_rerun_trains_and_replays_nothing(synthetic_fashion, tmp_path,
                                                                     monkeypatch):
    from bnlab.experiments import executors, get_experiment, probed
    from bnlab.experiments.runner import QUICK, run_experiment

    experiment = get_experiment("precise")
    figures = check_saved_figures(monkeypatch)
    report = run_experiment(experiment, QUICK, tmp_path, synthetic_fashion, progress=False)
    for section in ("## EMA vs population statistics", "EMA momentum 0.9", "population, N = 128",
                    "## When EMA departs, over training", "**Wu & Johnson (lr 0.8, batch 1024",
                    "## Population estimates from N samples", "## Beside the paper",
                    "> **Smoke test.**", "## Calibration", "EMA mean of 5 of 10 channels"):
        assert section in report, section
    assert "## Findings" not in report  # a smoke test states none
    verdicts = json.loads((tmp_path / "precise" / "findings.json").read_text())["verdicts"]
    assert len(verdicts) == 8 and {v["outcome"] for v in verdicts} == {"no verdict (smoke test)"}
    caches = sorted(tmp_path.glob("runs/*/analysis/precise-probes.json"))
    assert len(caches) == len(precise.ARMS)
    for figure in ("precise_accuracy.png", "precise_departure.png", "precise_gap.png"):
        assert (tmp_path / "precise" / figure).stat().st_size > 0
        assert f"precise/{figure}" in figures.problems
    assert figures.failing == {}

    def must_not_run(*args, **kwargs):
        raise AssertionError("trained or replayed again")

    monkeypatch.setattr(executors, "start_run", must_not_run)
    monkeypatch.setattr(probed, "replay", must_not_run)
    again = run_experiment(experiment, QUICK, tmp_path, synthetic_fashion, progress=False)
    assert without_provenance(again) == without_provenance(report)


def test_the_lr_grid_beside_is_read_for_the_high_rate(tmp_path):
    import json

    assert "3, fixed in advance" in precise.lr_grid_note(tmp_path / "precise")[0]
    (tmp_path / "lr").mkdir()

    def row(bn: bool, lr: float, acc: float, val_size: int = 200) -> str:
        return json.dumps({"label": "", "tags": {"bn": bn, "lr": lr}, "seed": 0,
                           "config": {"val_size": val_size},
                           "metrics": [], "run_dir": "", "summary": {"final_val_acc": acc,
                                                                     "diverged": False}})

    lines = [row(True, 1.0, 0.9), row(True, 3.0, 0.85), row(True, 10.0, 0.1), row(False, 1.0, 0.8)]
    (tmp_path / "lr" / "results.jsonl").write_text("\n".join(lines) + "\n")
    note = precise.lr_grid_note(tmp_path / "precise")[0]
    assert "training at lr 1, 3 (on its validation split), best 1" in note
    assert "is among them" in note
    (tmp_path / "lr" / "results.jsonl").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert "**not** among them" in precise.lr_grid_note(tmp_path / "precise")[0]
    # A grid without a validation split chose on the test set: it is not read.
    on_test = [row(True, 1.0, 0.9, 0), row(True, 3.0, 0.85, 0), row(False, 1.0, 0.8, 0)]
    (tmp_path / "lr" / "results.jsonl").write_text("\n".join(on_test) + "\n")
    assert "3, fixed in advance" in precise.lr_grid_note(tmp_path / "precise")[0]
