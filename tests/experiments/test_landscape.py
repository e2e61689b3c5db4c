"""The landscape experiment's definitions on fabricated rows and probe records: the rate chosen
on validation, the matched training loss, the verdicts, and calibrations that can fail."""

from __future__ import annotations

import math

import pytest

from bnlab.experiments import landscape
from bnlab.experiments.analysis import Row
from bnlab.experiments.findings import SUPPORTED, UNRESOLVED
from bnlab.experiments.landscape import (
    ARCHITECTURES,
    PROTOCOLS,
    Probed,
    RateChoice,
    at_equal_steps,
    at_matched_loss,
    calibration,
    choose_rate,
    matched_level,
    synthetic_run,
    training_losses,
    verdicts,
)
from bnlab.experiments.runner import QUICK, ExpSettings, resolve
from bnlab.probes.landscape import smoothness


def _row(arch, bn, lr, seed, val, test=None, diverged=False):
    return Row(label=f"{arch} {bn} {lr}", tags={"arch": arch, "bn": bn, "lr": lr}, seed=seed,
               config={}, metrics=[], run_dir=f"{arch}-{bn}-{lr}-{seed}",
               summary={"diverged": diverged, "final_val_acc": None if diverged else val,
                        "final_test_acc": None if diverged else (val if test is None else test)})


def _grid(table, arch="relu-lenet"):
    """table: {(bn, lr): [final val acc or None (diverged) per seed]}."""
    return [_row(arch, bn, lr, seed, acc, diverged=acc is None)
            for (bn, lr), accs in table.items() for seed, acc in enumerate(accs)]


def test_variants_cover_every_architecture_both_arms_and_the_sweep():
    full = landscape.variants(resolve(ExpSettings(), landscape.EXPERIMENT))
    quick = landscape.variants(resolve(QUICK, landscape.EXPERIMENT))
    assert len(full) == len(ARCHITECTURES) * 2 * len(landscape.LEARNING_RATES)
    assert len(quick) == len(ARCHITECTURES) * 2 * len(landscape.QUICK_RATES)
    for v in full:
        assert v.params["norm"] == ("bnlab" if v.tags["bn"] else "none")  # same model, norm only
        assert v.params["model"] == next(a.model for a in ARCHITECTURES if a.key == v.tags["arch"])


def test_the_rate_is_chosen_on_validation_where_both_arms_train():
    rows = _grid({(False, 0.1): [0.80, 0.82], (True, 0.1): [0.85, 0.86],
                  (False, 1.0): [0.15, 0.83], (True, 1.0): [0.90, 0.91],  # a plain seed fails
                  (False, 0.03): [0.70, 0.70], (True, 0.03): [0.75, 0.76]})
    assert choose_rate(rows, "relu-lenet") == RateChoice(0.1, True)
    # the lower arm decides (maximin), not the better one: at 0.3 plain is worse than at 0.1
    rows += _grid({(False, 0.3): [0.78, 0.78], (True, 0.3): [0.95, 0.95]})
    assert choose_rate(rows, "relu-lenet") == RateChoice(0.1, True)


def test_the_rate_never_looks_at_test_accuracy():
    rows = [_row("small-vgg", bn, lr, s, val=0.8 if lr == 0.1 else 0.7,
                 test=0.6 if lr == 0.1 else 0.99) for bn in (False, True) for lr in (0.1, 0.3)
            for s in range(2)]
    assert choose_rate(rows, "small-vgg") == RateChoice(0.1, True)


def test_without_a_rate_that_trains_both_arms_the_runs_are_probed_but_not_judged():
    rows = _grid({(False, 0.1): [0.1, 0.1], (True, 0.1): [0.6, 0.6],
                  (False, 1.0): [None, 0.1], (True, 1.0): [0.8, 0.8]})
    assert choose_rate(rows, "relu-lenet") == RateChoice(0.1, False)
    assert choose_rate(_grid({(False, 1.0): [None], (True, 1.0): [0.9]}), "relu-lenet") \
        == RateChoice(None, False)


def test_training_loss_is_a_running_median_of_the_probed_batches():
    records = [{"step": s, "loss0": v} for s, v in enumerate([9.0, 2.0, 5.0, 1.0, 1.5])]
    assert [s for _, s in training_losses(records)] == [3.5, 2.0, 1.5, 1.25]  # step 0 left out


def test_matched_level_is_the_lowest_loss_every_run_reaches():
    fast, slow = synthetic_run(2.0, 1.0), synthetic_run(1.0, 1.0)
    level = matched_level([fast, slow])
    assert level == pytest.approx(min(s for _, s in training_losses(slow)))
    assert level > min(s for _, s in training_losses(fast))


@pytest.mark.parametrize("factor", [1.0, 10.0, 1000.0])
def test_matched_loss_reads_the_landscape_not_the_speed(factor):
    """Run b twice as fast, its measure factor x loss: at matched loss the log ratio is
    log10(factor) (0 for one landscape); at equal steps the speed shows as a difference."""
    value = lambda r: r["value"]  # noqa: E731
    a, b = synthetic_run(1.0, 1.0), synthetic_run(2.0, factor)
    level = matched_level([a, b])
    ratio = math.log10(at_matched_loss(b, level, value) / at_matched_loss(a, level, value))
    assert ratio == pytest.approx(math.log10(factor), abs=0.1)
    equal = math.log10(at_equal_steps(b, value) / at_equal_steps(a, value))
    assert equal < math.log10(factor) - 0.5


def test_matched_loss_is_nan_without_a_level():
    assert math.isnan(at_matched_loss(synthetic_run(1.0, 1.0), math.nan, lambda r: r["value"]))


def _path(loss0, slope, scale):
    """A probe path on which the gradient change is scale * d (beta = scale)."""
    sizes = [0.1, 0.2]
    return {"sizes": sizes, "moved": sizes, "loss": [loss0 - slope * d for d in sizes],
            "grad_change": [scale * d for d in sizes]}


def _probed(bn_scale, seeds=3, both_train=True, bn_speed=1.0):
    """An architecture whose BN arm's gradient changes are bn_scale x the plain arm's, with a
    little seed-to-seed spread; the BN arm's loss falls bn_speed times as fast."""
    arch = ARCHITECTURES[1]
    rows, records = {}, {}
    for bn in (False, True):
        rows[bn] = [_row(arch.key, bn, 0.1, s, 0.8) for s in range(seeds)]
        speed = bn_speed if bn else 1.0
        for r in rows[bn]:
            scale = (bn_scale if bn else 1.0) * (1 + 0.05 * r.seed)
            losses = [2.0 / (1 + speed * t) for t in range(8)]
            records[r.run_dir] = [
                {"step": t, "loss0": loss, "grad_norm": 1.0, "gradient": _path(loss, 1.0, scale),
                 "normalized": _path(loss, 1.0, scale)} for t, loss in enumerate(losses)]
    probed = Probed(arch, RateChoice(0.1, both_train), rows, records, 0.0)
    probed.level = matched_level(list(records.values()))
    return probed


def test_a_smoother_bn_arm_is_supported_and_an_equal_one_is_not():
    smoother = {v.claim: v for v in verdicts([_probed(0.1)])}
    gradient = [v for c, v in smoother.items() if "more predictive" in c]
    assert len(gradient) == len(PROTOCOLS)
    for v in gradient:
        assert v.outcome == SUPPORTED and v.effect == pytest.approx(-1.0) and v.n == 3
        assert v.method == "paired t over seeds"
    same = [v for v in verdicts([_probed(1.0)]) if "more predictive" in v.claim]
    assert all(v.outcome != SUPPORTED for v in same)
    assert all(v.effect == pytest.approx(0.0, abs=1e-12) for v in same)


def test_nets_that_do_not_both_train_are_not_judged():
    out = verdicts([_probed(0.1, both_train=False)])
    assert len(out) == 3 * len(PROTOCOLS)
    assert all(v.outcome == UNRESOLVED and v.effect is None and "trains" in v.note for v in out)


def test_every_calibration_reads_its_known_answer():
    records = calibration()
    assert records and all(c.ok for c in records), [c for c in records if not c.ok]
    measures = {c.measure for c in records}
    for label in ("loss range, W - eta g", "max ‖dg‖, W - eta g", "beta, W - eta g",
                  "loss range / loss, W - d g/‖g‖", "max ‖dg‖ / ‖g‖, W - d g/‖g‖",
                  "beta, W - d g/‖g‖", "log10 ratio at matched training loss"):
        assert label in measures


def test_a_measure_per_unit_of_eta_fails_the_calibration(monkeypatch):
    """A beta divided by eta instead of the distance moved (or a gradient change not divided
    by ‖g‖) would read wrong at |g| = 2: the calibration says so."""
    def per_eta(loss0, grad_norm, path):
        out = smoothness(loss0, grad_norm, path)
        out["beta"] = max((c / s for c, s in zip(path["grad_change"], path["sizes"])),
                          default=math.nan)
        out["relative_grad_change"] = out["grad_change"]
        return out

    monkeypatch.setattr(landscape, "smoothness", per_eta)
    failing = {c.measure for c in calibration() if not c.ok}
    assert "beta, W - eta g" in failing and "max ‖dg‖ / ‖g‖, W - d g/‖g‖" in failing


def test_a_matching_that_ignores_the_loss_fails_the_calibration(monkeypatch):
    monkeypatch.setattr(landscape, "at_matched_loss",
                        lambda records, level, value: at_equal_steps(records, value))
    failing = {c.case for c in landscape.matching_calibration() if not c.ok}
    assert len(failing) == 3


def test_arms_whose_probes_miss_a_common_loss_are_not_judged_at_matched_loss():
    """BN's loss falls so fast that its probes skip past the level: the matched comparison
    says so instead of comparing different losses; equal steps are still judged."""
    p = _probed(0.1, bn_speed=50.0)
    assert p.mismatch().startswith("the probes read do not match")
    by_protocol = {v.claim: v for v in verdicts([p])}
    matched = [v for c, v in by_protocol.items() if "matched loss" in c]
    assert matched and all(v.effect is None and "do not match" in v.note for v in matched)
    assert all(v.outcome == SUPPORTED for c, v in by_protocol.items() if "equal steps" in c
               and "more predictive" in c)
    assert _probed(0.1).mismatch() == ""
