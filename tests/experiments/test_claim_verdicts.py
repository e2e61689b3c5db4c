"""The verdicts of the claim experiments (chapter, lr, placement, dropout, convergence, norms,
robustness, depth, sync) on fabricated rows: for each, a grid that must support the claim,
one that must contradict it and one that must leave it unresolved; a side that does not
train is never compared; and the calibrations of the measures behind them read their known
answers, and fail on a measure that cannot see the effect."""

from __future__ import annotations

import math

import pytest

from bnlab.experiments import (
    arms,
    chapter,
    convergence,
    depth,
    dropout,
    lr,
    measure,
    norm_choice,
    placement,
    robustness_claim,
    sync,
)
from bnlab.experiments.analysis import Row
from bnlab.experiments.findings import CONTRADICTED, SUPPORTED, UNRESOLVED, judge_difference

SEEDS = (0, 1, 2)


def _row(label: str, tags: dict, seed: int, test: float | None, val: float | None = None,
         diverged: bool = False, run_dir: str = "", **summary) -> Row:
    """A finished run: final test accuracy ``test``, validation accuracy ``val`` (default the
    same), or diverged."""
    val = test if val is None else val
    return Row(label=label, tags=tags, seed=seed, config={"val_size": 1000}, metrics=[],
               summary={"diverged": diverged, "final_val_acc": None if diverged else val,
                        "final_test_acc": None if diverged else test, "epochs": 1, **summary},
               run_dir=run_dir or f"{label}-{seed}")


def _arm(label: str, tags: dict, values, **kw) -> list[Row]:
    """One row per seed, ``values[i]`` the final test accuracy of seed i (None: diverged)."""
    return [_row(label, tags, s, v, diverged=v is None, **kw) for s, v in zip(SEEDS, values)]


def _outcomes(verdicts) -> list[str]:
    return [v.outcome for v in verdicts]


# --------------------------------------------------------------------------- the shared pieces

def test_a_cell_counts_diverged_runs_and_shows_n():
    rows = _arm("a", {}, [0.8, 0.82, None])
    assert arms.cell(rows) == "0.8100 ± 0.1271 (n=2); 1/3 diverged"  # t(1) = 12.7
    at_chance = _arm("b", {}, [0.1, 0.8, 0.81])
    assert arms.cell(at_chance).endswith("(n=3)")  # in the mean, with its value
    assert arms.failure_note(at_chance) == "1/3 at chance"
    assert arms.cell([]) == "-"


def test_a_side_that_does_not_train_is_not_compared():
    good = ("good", _arm("good", {}, [0.8, 0.81, 0.82]))
    chance = ("chance", _arm("chance", {}, [0.1, 0.1, None]))
    verdict = arms.judge_arms("good beats chance", "t", "acc", chance, good)
    assert verdict.outcome == UNRESOLVED and verdict.effect is None
    assert "chance (mean validation accuracy 0.100) does not train" in verdict.note
    assert verdict.failed == "chance: 1/3 diverged, 2/3 at chance"
    # against the failure bar, failing is the measurement: a diverged seed counts at chance
    assert arms.judge_bar("chance fails", "t", "acc", chance, 0.2, direction=-1).outcome == SUPPORTED


def test_a_negative_margin_judges_non_inferiority():
    a = {0: 0.80, 1: 0.81, 2: 0.82}

    def judged(shift: float, spread: float = 0.001) -> str:
        b = {s: v + shift + spread * (s - 1) for s, v in a.items()}
        return judge_difference("b is not worse than a by 0.01", "t", "x", a, b,
                                margin=-0.01).outcome

    assert judged(-0.002) == SUPPORTED  # slightly worse, well within the margin
    assert judged(-0.05) == CONTRADICTED  # worse by more than the margin
    assert judged(-0.008, spread=0.01) == UNRESOLVED  # straddles the margin
    # a positive margin keeps the rule it had: contradicted only on the other side of 0
    b = {s: v + 0.005 for s, v in a.items()}
    assert judge_difference("b > a by 0.01", "t", "x", a, b, margin=0.01).outcome == UNRESOLVED


# --------------------------------------------------------------------------- chapter

def _chapter(bnlab, torch_bn, lenet):
    return {chapter.BNLAB: _arm(chapter.BNLAB, {}, bnlab), chapter.TORCH: _arm(chapter.TORCH, {}, torch_bn),
            chapter.LENET: _arm(chapter.LENET, {}, lenet)}


def test_chapter_verdicts():
    good = _chapter([0.868, 0.870, 0.866], [0.868, 0.870, 0.866], [0.72, 0.74, 0.73])
    assert _outcomes(chapter.verdicts(good)) == [SUPPORTED] * 4
    bad = _chapter([0.840, 0.842, 0.838], [0.860, 0.862, 0.858], [0.90, 0.91, 0.92])
    assert _outcomes(chapter.verdicts(bad)) == [CONTRADICTED, SUPPORTED, CONTRADICTED, CONTRADICTED]
    noisy = _chapter([0.80, 0.90, 0.86], [0.85, 0.86, 0.87], [0.70, 0.95, 0.80])
    assert _outcomes(chapter.verdicts(noisy)) == [UNRESOLVED] * 4


# --------------------------------------------------------------------------- lr

def _lr_rows(largest: dict[bool, list[float]]) -> list[Row]:
    """Per model and seed, runs at every rate of the grid that train up to ``largest`` and
    diverge above it."""
    rows = []
    for bn, tops in largest.items():
        for seed, top in zip(SEEDS, tops):
            for rate in lr.LEARNING_RATES:
                trains = rate <= top
                acc = 0.85 - 0.01 * abs(math.log10(rate / max(top / 10, 0.01))) if trains else None
                rows.append(_row(f"{lr.MODELS[bn][0]} lr={rate:g}", {"bn": bn, "lr": rate}, seed,
                                 acc, diverged=not trains))
    return rows


def test_lr_tolerance_verdict():
    supported = lr.verdicts(_lr_rows({False: [1.0, 1.0, 3.0], True: [30.0, 30.0, 100.0]}))
    assert supported[0].outcome == SUPPORTED  # 1.48, 1.48 and 1.52 decades
    assert supported[0].effect == pytest.approx((2 * math.log10(30) + math.log10(100 / 3)) / 3)
    contradicted = lr.verdicts(_lr_rows({False: [30.0, 30.0, 100.0], True: [1.0, 1.0, 3.0]}))
    assert contradicted[0].outcome == CONTRADICTED
    unresolved = lr.verdicts(_lr_rows({False: [1.0, 100.0, 0.3], True: [3.0, 3.0, 10.0]}))
    assert unresolved[0].outcome == UNRESOLVED
    at_top = lr.verdicts(_lr_rows({False: [1.0] * 3, True: [1000.0] * 3}))
    assert "lower bound" in at_top[0].note
    never = lr.verdicts(_lr_rows({False: [0.001] * 3, True: [10.0] * 3}))
    assert never[0].outcome == UNRESOLVED and "trains at no rate" in never[0].note


def test_lr_tolerance_stops_at_the_first_failure_not_at_a_fluke_over_the_bar():
    """A run that clears the bar above rates that all failed (BN-LeNet at lr 1000 with 25%
    after failing at 100, in the default grid) is not a rate that trains: the plain maximum
    counted it."""
    rows = _lr_rows({False: [1.0] * 3, True: [30.0] * 3})
    for row in rows:
        if row.tags["bn"] and row.tags["lr"] == 1000.0 and row.seed != SEEDS[0]:
            row.summary.update(diverged=False, final_val_acc=0.25, final_test_acc=0.25)
    assert lr.largest_training_rate(rows, bn=True) == dict.fromkeys(SEEDS, 30.0)
    assert lr.verdicts(rows)[0].effect == pytest.approx(math.log10(30))


def test_the_largest_stable_rate_is_calibrated_on_known_answers():
    readings = lr.calibration()
    assert [c.ok for c in readings] == [True] * 4, readings
    assert math.isnan(lr.largest_stable_rate({0.1: False, 1.0: False}))
    assert lr.largest_stable_rate({0.1: True, 1.0: False, 10.0: True}) == 0.1


def test_lr_accuracy_verdict_compares_each_model_at_its_validated_best_rate():
    rows = [_row("LeNet lr=1", {"bn": False, "lr": 1.0}, s, 0.80, val=0.9) for s in SEEDS]
    rows += [_row("LeNet lr=0.3", {"bn": False, "lr": 0.3}, s, 0.95, val=0.5) for s in SEEDS]
    rows += [_row("BN-LeNet lr=1", {"bn": True, "lr": 1.0}, s, 0.86 + 0.001 * s) for s in SEEDS]
    accuracy = lr.verdicts(rows)[1]
    # LeNet's best on validation is lr 1 (its test accuracy 0.80), never lr 0.3's test 0.95
    assert "LeNet lr 1" in accuracy.measure and accuracy.outcome == SUPPORTED
    assert accuracy.effect == pytest.approx(0.061)


# --------------------------------------------------------------------------- placement

def test_placement_verdicts():
    def groups(first_layer):
        return {"every layer": _arm("every layer", {}, [0.88, 0.885, 0.89]),
                "first layer only": _arm("first layer only", {}, first_layer),
                "no BN": _arm("no BN", {}, [0.70, 0.71, 0.72])}

    same, no_bn = placement.verdicts(groups([0.879, 0.884, 0.891]))
    assert (same.outcome, no_bn.outcome) == (SUPPORTED, SUPPORTED)
    assert placement.verdicts(groups([0.80, 0.81, 0.80]))[0].outcome == CONTRADICTED
    assert placement.verdicts(groups([0.86, 0.90, 0.87]))[0].outcome == UNRESOLVED
    assert "first layer alone" in same.claim


# --------------------------------------------------------------------------- dropout

def _dropout_groups(bn_acc, drop_acc, gaps):
    """Variants with final test accuracies and measured generalization gaps per seed."""
    accs = {dropout.NEITHER: [0.80, 0.81, 0.82], dropout.BN_ONLY: bn_acc,
            "dropout 0.5 only": drop_acc}
    groups = {label: _arm(label, {}, values) for label, values in accs.items()}
    measured = {r.run_dir: {"train_eval": gaps[label][r.seed] + 0.5, "test_eval": 0.5,
                            "test_train": 0.5}
                for label, g in groups.items() for r in g}
    return groups, dropout._gap(measured)


def test_dropout_verdicts():
    gaps = {dropout.NEITHER: [0.08, 0.09, 0.10], dropout.BN_ONLY: [0.025, 0.03, 0.035],
            "dropout 0.5 only": [0.02, 0.025, 0.03]}
    groups, gap = _dropout_groups([0.88, 0.885, 0.89], [0.87, 0.875, 0.88], gaps)
    replace, as_well, bn_narrows, dropout_narrows = dropout.verdicts(groups, gap, True)
    assert replace.outcome == SUPPORTED  # BN is better: not worse by more than 1 point
    assert as_well.outcome == SUPPORTED  # BN's gap half a point above dropout's: within 1
    assert bn_narrows.outcome == dropout_narrows.outcome == SUPPORTED
    worse = {**gaps, dropout.BN_ONLY: [0.12, 0.125, 0.13]}
    groups, gap = _dropout_groups([0.80, 0.805, 0.81], [0.87, 0.875, 0.88], worse)
    assert _outcomes(dropout.verdicts(groups, gap, True))[:3] == [CONTRADICTED] * 3
    groups, gap = _dropout_groups([0.80, 0.90, 0.86], [0.87, 0.86, 0.85], gaps)
    assert dropout.verdicts(groups, gap, True)[0].outcome == UNRESOLVED
    assert len(dropout.verdicts(groups, gap, False)) == 1  # no gap measured: no gap verdicts


# --------------------------------------------------------------------------- convergence

def _curve_rows(bn: bool, rate: float, crossings: list[float], final: float = 0.86) -> list[Row]:
    """Runs evaluated every 10 steps whose validation accuracy rises linearly through 0.80 at
    ``crossings[seed]`` and ends at ``final`` (1000 images: 8 steps an epoch, 100 epochs)."""
    rows = []
    for seed, cross in zip(SEEDS, crossings):
        def acc(step, cross=cross):
            return min(final, 0.1 + 0.7 * step / cross)
        evals = [{"step": s, "train_seconds": s / 100, "val_acc": acc(s)} for s in range(10, 801, 10)]
        metrics = [{"epoch": e, "val_acc": acc(8 * e), "train_seconds": 0.08} for e in range(1, 101)]
        rows.append(Row(f"{'BN-LeNet' if bn else 'LeNet'} lr={rate:g}", {"bn": bn, "lr": rate}, seed,
                        {"subset": 1000, "val_size": 1000, "batch_size": 128}, metrics,
                        {"diverged": False, "final_val_acc": final, "final_test_acc": final},
                        f"{bn}-{rate}-{seed}", evals))
    return rows


def test_convergence_verdicts():
    base = _curve_rows(False, 1.0, [400, 420, 380])
    fast = _curve_rows(True, 0.3, [70, 75, 72], final=0.9)
    to_80, to_85, ioffe = convergence.verdicts(base + fast)
    assert to_80.outcome == SUPPORTED and to_80.effect < -300
    assert ioffe.outcome == CONTRADICTED  # about 6x fewer steps to LeNet's best, not 14x
    slow = _curve_rows(True, 0.3, [700, 750, 720], final=0.9)
    assert convergence.verdicts(base + slow)[0].outcome == CONTRADICTED
    mixed = _curve_rows(True, 0.3, [100, 700, 380], final=0.9)
    assert convergence.verdicts(base + mixed)[0].outcome == UNRESOLVED
    never = _curve_rows(True, 0.3, [100, 100, 100], final=0.75)
    assert "does not reach it in 3/3 seeds" in convergence.verdicts(base + never)[0].note
    very_fast = _curve_rows(True, 0.3, [20, 21, 22], final=0.95)
    slow_base = _curve_rows(False, 1.0, [790, 795, 800], final=0.81)
    assert convergence.verdicts(slow_base + very_fast)[2].outcome == SUPPORTED


def test_steps_calibration_reads_the_known_crossing_and_fails_a_blind_measure(monkeypatch):
    records = convergence.calibrate_steps()
    assert records and all(c.ok for c in records)
    monkeypatch.setattr(convergence, "steps_to_reach", lambda points, threshold: (points[0][0], 0.0))
    assert not all(c.ok for c in convergence.calibrate_steps())


# --------------------------------------------------------------------------- norms

def _norm_rows(accs: dict[tuple[str, int], list[float]]) -> list[Row]:
    return [r for (norm, bs), values in accs.items()
            for r in _arm(f"{norm} bs={bs}", {"norm": norm, "batch_size": bs,
                                              "arm": norm_choice.EPOCHS}, values)]


def test_norms_verdicts():
    rows = _norm_rows({("bnlab", 2): [0.70, 0.71, 0.72], ("bnlab", 128): [0.85, 0.86, 0.87],
                       ("layer", 2): [0.80, 0.81, 0.82], ("layer", 128): [0.848, 0.858, 0.869]})
    measured = {r.run_dir: {"eval": r.summary["final_test_acc"],
                            "train": r.summary["final_test_acc"]
                            - (0.2 + 0.01 * r.seed if r.tags["norm"] == "bnlab" else 0.0)}
                for r in rows}
    as_good, better, bn_mode, ln_mode = norm_choice.verdicts(rows, measured)
    assert _outcomes([as_good, better, bn_mode, ln_mode]) == [SUPPORTED] * 4
    assert as_good.claim == "LayerNorm is as accurate as BN at batch 128"
    rows = _norm_rows({("bnlab", 2): [0.80, 0.81, 0.82], ("bnlab", 128): [0.85, 0.86, 0.87],
                       ("layer", 2): [0.70, 0.71, 0.72], ("layer", 128): [0.80, 0.81, 0.82]})
    assert _outcomes(norm_choice.verdicts(rows, {})) == [CONTRADICTED, CONTRADICTED]
    rows = _norm_rows({("bnlab", 2): [0.80, 0.70, 0.75], ("bnlab", 128): [0.85, 0.86, 0.87],
                       ("layer", 2): [0.72, 0.78, 0.74], ("layer", 128): [0.80, 0.90, 0.85]})
    assert _outcomes(norm_choice.verdicts(rows, {})) == [UNRESOLVED, UNRESOLVED]
    assert norm_choice.verdicts(_norm_rows({("layer", 2): [0.8] * 3}), {}) == []  # no BN


def test_mode_difference_calibration_reads_known_answers_and_fails_a_blind_measure(monkeypatch):
    records = measure.calibrate_mode_difference() + measure.calibrate_generalization_gap()
    assert all(c.ok for c in records), records
    reads = [float(c.read) for c in records if c.case.startswith("BN running mean")]
    assert reads == sorted(reads) and reads[0] == 0.0 and reads[-1] > 0.25  # grows with the shift
    monkeypatch.setattr(measure, "accuracy_in_mode", lambda model, x, y, training, *a, **k: 1.0)
    blind = measure.calibrate_mode_difference() + measure.calibrate_generalization_gap()
    assert not all(c.ok for c in blind)


# --------------------------------------------------------------------------- robustness

def _robust(bn_fgsm, nobn_fgsm) -> tuple[list[Row], robustness_claim.Measured]:
    with_bn, without = robustness_claim.PAIR
    rows = _arm(with_bn, {"bn": True}, [0.9] * 3) + _arm(without, {"bn": False}, [0.88] * 3)
    size = robustness_claim.VERDICT_SIZES["fgsm"]
    measured = {with_bn: {"fgsm": {size: dict(zip(SEEDS, bn_fgsm))}},
                without: {"fgsm": {size: dict(zip(SEEDS, nobn_fgsm))}}}
    return rows, measured


def test_robustness_verdicts():
    def fgsm(rows, measured):
        return next(v for v in robustness_claim.verdicts(rows, measured) if "FGSM" in v.measure)

    assert fgsm(*_robust([0.30, 0.31, 0.32], [0.50, 0.52, 0.51])).outcome == SUPPORTED
    assert fgsm(*_robust([0.50, 0.52, 0.51], [0.30, 0.31, 0.32])).outcome == CONTRADICTED
    assert fgsm(*_robust([0.30, 0.50, 0.40], [0.45, 0.35, 0.42])).outcome == UNRESOLVED
    rows, measured = _robust([0.3] * 3, [0.5] * 3)
    noise = next(v for v in robustness_claim.verdicts(rows, measured) if "noise" in v.measure)
    assert noise.outcome == UNRESOLVED and "nothing measured" in noise.note


def test_attack_calibration_reads_the_linear_model_and_fails_a_blind_attack(monkeypatch):
    records = robustness_claim.calibrate_attacks()
    assert all(c.ok for c in records), records
    fgsm = [float(c.read) for c in records if "FGSM" in c.measure]
    assert fgsm[0] == 1.0 and fgsm == sorted(fgsm, reverse=True) and fgsm[-1] < 0.5
    monkeypatch.setattr(robustness_claim, "fgsm_accuracy",
                        lambda model, batches, sizes, **k: [(s, 1.0) for s in sizes])
    assert not all(c.ok for c in robustness_claim.calibrate_attacks())


# --------------------------------------------------------------------------- depth

def _depth_rows(bn_deep, none_deep) -> list[Row]:
    rows = []
    for norm, values in (("bnlab", bn_deep), ("none", none_deep)):
        for act in depth.ACTIVATIONS:
            tags = {"activation": act, "norm": norm, "depth": 110, "lr": 0.1}
            rows += _arm(depth.label(act, norm, 110, 0.1), tags, values)
    return rows


def test_depth_verdicts():
    verdicts = depth.depth_verdicts(_depth_rows([0.80, 0.81, 0.82], [0.1, 0.1, None]))
    assert _outcomes(verdicts) == [SUPPORTED] * 6  # BN trains, none does not, per activation
    verdicts = depth.depth_verdicts(_depth_rows([0.1, 0.1, 0.1], [0.8, 0.81, 0.82]))
    assert _outcomes(verdicts) == [CONTRADICTED] * 6
    verdicts = depth.depth_verdicts(_depth_rows([0.1, 0.8, 0.15], [0.1, 0.6, 0.15]))
    assert _outcomes(verdicts) == [UNRESOLVED] * 6


def test_growth_verdicts_against_the_mean_field_factor():
    def profiles(*factors: float) -> dict:
        """Per seed, a profile growing by ``factor`` times the prediction per layer."""
        out = {}
        for act in depth.ACTIVATIONS:
            init = [[(depth.predicted_growth(act) * f) ** (60 - layer) for layer in range(50)]
                    for f in factors]
            out[(act, "bnlab", 50)] = {"init_by_seed": init, "seeds": list(SEEDS)}
        return out

    explode, same = depth.growth_verdicts(profiles(1.0, 1.0, 1.0))[:2]
    assert explode.outcome == same.outcome == SUPPORTED
    assert same.effect == pytest.approx(0.0, abs=1e-9)
    halved = depth.growth_verdicts(profiles(0.5, 0.5, 0.5))
    assert halved[1].outcome == CONTRADICTED  # half the factor (for every activation)
    assert depth.growth_verdicts(profiles(1.0, 1.1, 1.02))[1].outcome == UNRESOLVED


def test_growth_calibration_reads_the_chain_s_gain_and_fails_a_blind_fit(monkeypatch):
    records = depth.calibrate_growth()
    assert all(c.ok for c in records)
    assert [float(c.read) for c in records] == pytest.approx(list(depth.GAINS), rel=1e-3)
    monkeypatch.setattr(depth, "fitted_growth", lambda norms: 1.0)
    assert not all(c.ok for c in depth.calibrate_growth())


# --------------------------------------------------------------------------- sync

def test_sync_verdicts():
    small, large = 2, 32

    def grid(local_small, sync_small):
        cells = {("local", small): local_small, ("sync", small): sync_small,
                 ("group", small): [0.80, 0.81, 0.82], ("local", large): [0.85, 0.86, 0.87],
                 ("sync", large): [0.851, 0.859, 0.871]}
        return [r for (v, b), values in cells.items()
                for r in _arm(f"{v} b={b}", {"variant": v, "per_rank_batch": b}, values)]

    recovers, group, same = sync.verdicts(grid([0.70, 0.71, 0.72], [0.84, 0.85, 0.86]))
    assert _outcomes([recovers, group, same]) == [SUPPORTED] * 3
    assert sync.verdicts(grid([0.84, 0.85, 0.86], [0.70, 0.71, 0.72]))[0].outcome == CONTRADICTED
    assert sync.verdicts(grid([0.70, 0.85, 0.78], [0.80, 0.75, 0.79]))[0].outcome == UNRESOLVED
