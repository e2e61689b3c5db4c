"""bnlab exp decay: the grid, the equilibrium read from recorded windows against its
prediction (supported on a simulated motion at equilibrium, contradicted far from it), the
growth of ||w|| without weight decay, the choice of lambda on validation and the accuracy
verdicts, on synthetic rows with known answers; the calibrations; the quick grid end to end
(re-analysed without training)."""

from __future__ import annotations

import json
import math

import pytest

from bnlab.experiments import decay
from bnlab.experiments.analysis import Row
from bnlab.experiments.findings import CONTRADICTED, SUPPORTED, UNRESOLVED
from bnlab.experiments.runner import QUICK, ExpSettings, resolve
from bnlab.probes.spherical import simulate_spherical_motion
from tests.helpers import without_provenance
from tests.util.figure_checks import check_saved_figures

LR, WD = 0.5, 0.01
LR_EFF = decay.EFFECTIVE_LRS[0]  # the grid's tag of the synthetic rows (their windows say LR)


def test_the_grid_sweeps_rates_decays_momenta_and_models_and_ablates_at_one_setting():
    grid = decay.variants(resolve(ExpSettings(), decay.EXPERIMENT))
    sweep = [v for v in grid if v.tags["part"] == "sweep"]
    assert len(sweep) == 2 * len(decay.MOMENTA) * len(decay.EFFECTIVE_LRS) * len(decay.WEIGHT_DECAYS)
    assert 0.0 in decay.WEIGHT_DECAYS
    for v in sweep:
        assert v.params["spherical_every"] == decay.WINDOW
        assert v.params["lr"] / (1 - v.params["momentum"]) == pytest.approx(v.tags["lr_eff"])
        assert v.params["norm"] == ("bnlab" if v.tags["bn"] else "none")
    ablation = [v for v in grid if v.tags["part"] == "ablation"]
    assert {(v.params.get("norm_weight_decay", True), v.params.get("invariant_weight_decay", True),
             v.params["weight_decay"]) for v in ablation} == {
        (False, True, 1e-3), (False, True, 1e-2), (True, False, 1e-3), (True, False, 1e-2)}
    assert all(v.params["lr"] == pytest.approx(0.01) and v.params["momentum"] == 0.9 for v in ablation)
    assert len({v.label for v in grid}) == len(grid)
    assert decay.sgd_lr(0.1, 0.9) == 0.01


def simulated_windows(seed: int, start: int, stop: int, weight_decay: float = WD,
                      steps: int = 3000) -> list[dict]:
    """Windows of a simulated spherical motion's steps [start, stop), as a run records them,
    for a hidden layer ``a`` and a head (the same numbers, left out as the last layer)."""
    monitor = simulate_spherical_motion(LR, weight_decay, 0.0, steps, seed=seed)
    monitor.steps = [r for r in monitor.steps if start <= r["step"] < stop]
    out = []
    for w in monitor.take_windows(2, 50, start):
        out += [{**w, "layer": "a", "invariant": True}, {**w, "layer": "head", "invariant": False}]
    return out


def row(seed: int, last_epoch: list[dict], tags: dict, final_val: float = 0.8,
        final_test: float = 0.8, diverged: bool = False) -> Row:
    return Row(label="x", tags={"part": "sweep", "bn": True, "lr_eff": LR_EFF, "momentum": 0.0,
                                "wd": WD, "decay": decay.ALL_DECAYED, **tags}, seed=seed,
               config={"subset": 1000, "val_size": 0, "batch_size": 100, "epochs": 2},
               metrics=[{"epoch": 1, "spherical": []}, {"epoch": 2, "spherical": last_epoch}],
               summary={"diverged": diverged, "final_val_acc": final_val, "final_test_acc": final_test},
               run_dir=f"run{seed}-{tags}")


def test_the_equilibrium_of_a_simulated_motion_reads_its_prediction():
    records = [w for w in simulated_windows(0, 2500, 3000) if w["layer"] == "a"]
    eq = decay.equilibrium(records)
    assert eq["predicted_angle"] == pytest.approx(math.sqrt(2 * LR * WD))
    for key in decay.QUANTITIES:
        assert eq[f"{key}_ratio"] == pytest.approx(1.0, abs=0.05), key
    early = decay.equilibrium([w for w in simulated_windows(0, 0, 20) if w["layer"] == "a"])
    assert early["angle_ratio"] > 1.5  # from a small start the angle is far above it
    without = decay.equilibrium([w for w in simulated_windows(0, 2500, 3000, 0.0) if w["layer"] == "a"])
    assert math.isnan(without["angle_ratio"]) and math.isnan(without["norm_ratio"])


@pytest.mark.parametrize(("window", "outcome"), [((2500, 3000), SUPPORTED), ((0, 20), CONTRADICTED)])
def test_the_equilibrium_verdict_is_supported_at_equilibrium_and_contradicted_far_from_it(window, outcome):
    rows = [row(seed, simulated_windows(seed, *window), {}) for seed in range(3)]
    measured = {r.run_dir: decay.run_equilibrium(r) for r in rows}
    assert all(list(m) == ["a"] for m in measured.values())  # the head is left out
    verdict = decay.equilibrium_verdict(rows, measured, True, 0.0, LR_EFF, WD, "angle")
    assert verdict.outcome == outcome and verdict.n == 3
    assert [v.claim for v in decay.equilibrium_verdicts(rows, measured)][0] == verdict.claim


def test_a_diverged_run_is_left_out_of_the_equilibrium_and_counted():
    rows = [row(seed, simulated_windows(seed, 2500, 3000), {}) for seed in range(3)]
    rows.append(row(3, [], {}, diverged=True, final_val=None))
    measured = {r.run_dir: decay.run_equilibrium(r) for r in rows}
    verdict = decay.equilibrium_verdict(rows, measured, True, 0.0, LR_EFF, WD, "angle")
    assert verdict.n == 3 and verdict.failed == "1/4 failed (diverged or at chance)"


def test_without_weight_decay_the_norm_growth_is_read_and_judged():
    def growth_rows(weight_decay: float) -> list[Row]:
        out = []
        for seed in range(3):
            first = simulated_windows(seed, 0, 1500, weight_decay)
            last = simulated_windows(seed, 1500, 3000, weight_decay)
            r = row(seed, last, {"wd": 0.0})
            r.metrics[0]["spherical"] = first
            out.append(r)
        return out

    grows = growth_rows(0.0)
    assert all(decay.norm_growth(r) > 1.2 for r in grows)
    (verdict,) = decay.growth_verdicts(grows)
    assert verdict.outcome == SUPPORTED
    # At equilibrium (weight decay on) the norm ends where it began: not a growth.
    settled = growth_rows(WD)
    for r in settled:
        r.metrics[0]["spherical"] = r.metrics[1]["spherical"]
        r.tags["wd"] = 0.0
    assert all(decay.norm_growth(r) == pytest.approx(1.0, abs=0.05) for r in settled)
    assert decay.growth_verdicts(settled)[0].outcome != SUPPORTED


def test_the_growth_finding_spans_every_setting_not_one_per_seed():
    """The same seeds at two rates, the norm doubled at one and grown by 1.3 at the other: the
    finding's range covers both (keyed by seed, one setting would hide the other)."""
    rows = []
    for lr_eff, factor in ((0.1, 1.3), (1.0, 2.0)):
        for seed in range(3):
            first = [{"layer": name, "norm": 1.0, "steps": 100} for name in ("a", "head")]
            last = [{"layer": name, "norm": factor, "steps": 100} for name in ("a", "head")]
            r = row(seed, last, {"wd": 0.0, "lr_eff": lr_eff})
            r.metrics[0]["spherical"] = first
            rows.append(r)
    (line,) = [f for f in decay.findings(rows, {}, None) if "without weight decay" in f]
    assert "1.30-2.00 times" in line and "6 runs" in line


def test_the_per_layer_table_names_bn_lenets_layers():
    assert decay.layer_labels(["0.weight", "4.weight", "9.weight", "12.weight"]) == [
        "conv 1 (0.weight)", "conv 2 (4.weight)", "linear 1 (9.weight)", "linear 2 (12.weight)"]


def accuracy_rows(no_decay: float, no_norm: float, no_invariant: float, best: float = 1e-3,
                  diverge: str | None = None) -> list[Row]:
    """Rows at the ablation's setting: test accuracy per arm (plus a seed's small offset),
    validation accuracy highest at ``best``."""
    setting = {"bn": True, "lr_eff": decay.ABLATION["lr_eff"], "momentum": decay.ABLATION["momentum"]}
    arms = [(0.0, decay.ALL_DECAYED, no_decay)]
    for wd in (1e-3, 1e-2):
        arms += [(wd, decay.ALL_DECAYED, 0.85), (wd, "no decay on γ/β", no_norm),
                 (wd, "no decay on scale-invariant weights", no_invariant)]
    rows = []
    for wd, arm, test in arms:
        for seed in range(3):
            val = 0.9 if wd == best else 0.8
            diverged = arm == diverge and wd == best
            rows.append(row(seed, [], {**setting, "wd": wd, "decay": arm,
                                       "part": "sweep" if arm == decay.ALL_DECAYED else "ablation"},
                            final_val=None if diverged else val, diverged=diverged,
                            final_test=test + 0.001 * seed))
    return rows


def test_lambda_is_chosen_on_validation_accuracy():
    assert decay.chosen_weight_decay(accuracy_rows(0.8, 0.85, 0.85, best=1e-2)) == 1e-2
    assert decay.chosen_weight_decay(accuracy_rows(0.8, 0.85, 0.85, best=1e-3)) == 1e-3
    assert decay.chosen_weight_decay([]) is None


def test_the_accuracy_verdicts_read_known_differences():
    rows = accuracy_rows(no_decay=0.80, no_norm=0.85, no_invariant=0.82)
    raised, norm, invariant = decay.accuracy_verdicts(rows, decay.chosen_weight_decay(rows))
    assert raised.outcome == SUPPORTED and raised.effect == pytest.approx(0.05)
    assert norm.outcome == SUPPORTED and norm.effect == pytest.approx(0.0, abs=1e-12)  # unchanged
    assert invariant.outcome == CONTRADICTED and invariant.effect == pytest.approx(-0.03)
    absent = decay.accuracy_verdicts(accuracy_rows(0.85, 0.85, 0.85), 1e-3)[0]
    assert absent.outcome != SUPPORTED and absent.effect == pytest.approx(0.0, abs=1e-12)


def test_an_arm_that_does_not_train_is_not_measured():
    rows = accuracy_rows(0.80, 0.85, 0.82, diverge="no decay on γ/β")
    verdicts = decay.accuracy_verdicts(rows, 1e-3)
    assert verdicts[1].outcome == UNRESOLVED and verdicts[1].effect is None
    assert "does not train" in verdicts[1].note
    assert all(v.effect is None for v in decay.accuracy_verdicts(rows, None))


def test_every_calibration_reads_its_known_answer():
    calibration = decay.calibrate()
    assert calibration and all(c.ok for c in calibration), [c for c in calibration if not c.ok]
    assert any("without BN" in c.case for c in calibration)  # the contrast is there


@pytest.mark.slow
def test_decay_quick_grid_records_windows_and_a_rerun_trains_nothing(synthetic_fashion, tmp_path,
                                                                     monkeypatch):
    from bnlab.experiments import executors, get_experiment
    from bnlab.experiments.runner import run_experiment

    figures = check_saved_figures(monkeypatch)
    report = run_experiment(get_experiment("decay"), QUICK, tmp_path, synthetic_fashion,
                            progress=False)
    for section in ("## The equilibrium, BN-LeNet", "## Per layer, BN-LeNet", "## Calibration",
                    "## Weight decay on γ/β and on the scale-invariant weights", "> **Smoke test.**"):
        assert section in report, section
    assert "**NO**" not in report
    rows = [json.loads(r) for r in (tmp_path / "decay" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(decay.variants(resolve(QUICK, decay.EXPERIMENT)))
    assert all(w["invariant"] == (r["config"]["norm"] == "bnlab" and i % 5 < 4)
               for r in rows for i, w in enumerate(r["metrics"][0]["spherical"]))
    assert {f"decay/{name}" for name in ("decay_bn.png", "decay_no_bn.png", "decay_accuracy.png")} \
        <= set(figures.problems) and figures.failing == {}

    def must_not_run(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(executors, "start_run", must_not_run)
    again = run_experiment(get_experiment("decay"), QUICK, tmp_path, synthetic_fashion, progress=False)
    assert without_provenance(again) == without_provenance(report)
