"""`bnlab exp onlybn`: the fraction of gamma near zero on gammas with a known count (strictly
below the threshold, pooled per channel), the verdicts it and the accuracies feed, and the
--quick grid end to end with its gammas read from the trained models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bnlab import cli
from bnlab.experiments import onlybn
from bnlab.experiments.analysis import Row
from bnlab.experiments.findings import CONTRADICTED, SMOKE_TEST, SUPPORTED, UNRESOLVED
from bnlab.experiments.onlybn import (
    THRESHOLD,
    fraction_near_zero,
    layer_fractions,
    pooled_fraction,
    read_gammas,
)
from bnlab.training import restore, runs
from tests.util.figure_checks import check_saved_figures


def test_fraction_near_zero_counts_strictly_below_the_threshold_on_both_sides() -> None:
    assert fraction_near_zero([0.0, -0.049, 0.049, THRESHOLD, -THRESHOLD, 1.0, -1.0, 0.2]) == 3 / 8
    assert fraction_near_zero([1.0] * 10) == 0.0
    assert fraction_near_zero([0.0] * 10) == 1.0
    assert fraction_near_zero([0.005, 0.02], threshold=0.01) == 0.5
    assert math.isnan(fraction_near_zero([]))


def test_pooled_fraction_weighs_channels_not_layers() -> None:
    gammas = {"stem.norm": [0.0] * 4 + [1.0] * 12, "stage3.block1.branch.norm1": [1.0] * 64}
    assert layer_fractions(gammas) == [0.25, 0.0]
    assert pooled_fraction(gammas) == 4 / 80


def test_every_calibration_reads_its_known_answer() -> None:
    records = onlybn.calibration()
    assert len(records) == 4 and all(c.ok for c in records)
    assert [c.read for c in records[:3]] == ["0.000", "0.300", "0.600"]  # grows with the count


def _row(arm: str, depth: int, seed: int, test: float, val: float | None = None) -> Row:
    val = test if val is None else val
    return Row(f"{arm} {depth}", {"arm": arm, "depth": depth}, seed,
               {"epochs": 1, "subset": 10000, "val_size": 2000, "batch_size": 64}, [],
               {"diverged": False, "final_val_acc": val, "final_test_acc": test},
               f"{arm}-{depth}-{seed}")


def _grid(random_acc: float = 0.3, bn_deep: float = 0.6, off: float = 0.3) -> tuple[list[Row], dict]:
    """Rows and gammas: γ/β only at 0.4 (ResNet-20) and ``bn_deep`` (ResNet-110), random at
    ``random_acc``, everything at 0.85; γ/β-only nets with ``off`` of their γ at 0, full
    training with none."""
    rows, gammas = [], {}
    for seed in range(3):
        jitter = 0.01 * seed
        for depth, bn in ((20, 0.4), (110, bn_deep)):
            for arm, acc in (("bn", bn), ("random", random_acc), ("all", 0.85)):
                row = _row(arm, depth, seed, acc + jitter)
                rows.append(row)
                near = round(100 * (off + jitter)) if arm == "bn" else 0
                gammas[row.run_dir] = {"a": [0.0] * near + [1.0] * (100 - near), "b": [1.0] * 100}
    return rows, gammas


def test_verdicts_follow_the_numbers() -> None:
    rows, gammas = _grid()
    by_claim = {v.claim: v for v in onlybn.verdicts(rows, gammas, (20, 110))}
    assert len(by_claim) == 5
    assert by_claim["training only γ/β trains a deep ResNet, every other weight random"
                    ].outcome == SUPPORTED
    beats = by_claim["training only γ/β beats training as many randomly chosen other parameters"]
    assert beats.outcome == SUPPORTED and beats.effect == pytest.approx(0.3)
    deeper = by_claim["deeper networks gain more from γ/β-only training"]
    assert deeper.outcome == SUPPORTED and deeper.effect == pytest.approx(0.2)
    more = by_claim["γ/β-only training switches off more features than training everything"]
    assert more.outcome == SUPPORTED and more.effect == pytest.approx(0.155)  # of 200 channels
    third = by_claim["γ/β-only training switches off about a third of the features"]
    assert third.outcome == CONTRADICTED  # 0.155 is not within 0.1 of 1/3
    rows, gammas = _grid(bn_deep=0.4, off=0.66)
    by_claim = {v.claim: v for v in onlybn.verdicts(rows, gammas, (20, 110))}
    assert by_claim["deeper networks gain more from γ/β-only training"].outcome == UNRESOLVED
    assert by_claim["γ/β-only training switches off about a third of the features"
                    ].outcome == SUPPORTED


def test_an_arm_that_does_not_train_is_not_compared() -> None:
    rows, gammas = _grid(random_acc=0.1)
    verdicts = onlybn.verdicts(rows, gammas, (20, 110))
    assert verdicts[0].claim.startswith("training only γ/β trains") and \
        verdicts[0].outcome == SUPPORTED
    beats = verdicts[1]
    assert beats.outcome == UNRESOLVED and beats.effect is None
    assert "train as many random others does not train" in beats.note


@pytest.mark.slow
def test_quick_grid_runs_end_to_end(fake_dataset, tmp_path, capsys, monkeypatch):
    """The --quick grid cut to ResNet-20 (the suite's time): three arms from the same initial
    weights, the gammas read from each trained model in forward order, the report's parts and
    figures, the calibrations, and no verdict stated."""
    monkeypatch.setattr(onlybn, "QUICK_DEPTHS", (20,))
    figures = check_saved_figures(monkeypatch)
    assert cli.main(["exp", "onlybn", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    folder = tmp_path / "onlybn"
    rows = [Row.from_json(json.loads(line))
            for line in (folder / "results.jsonl").read_text().splitlines()]
    assert sorted(r.config.get("train_only", "all") for r in rows) == ["all", "bn", "random"]
    for row in rows:
        gammas = read_gammas(row)  # cached by the analysis: read back, not measured again
        assert (Path(row.run_dir) / runs.ANALYSIS / "onlybn-gammas.json").exists()
        assert len(gammas) == 1 + 2 * 9 and next(iter(gammas)) == "stem.norm"
        model, _ = restore.load_trained_model(row.run_dir)
        assert torch.tensor(gammas["stage3.block3.branch.norm2"]).equal(
            model.stage3.block3.branch.norm2.weight.detach())
        if row.tags["arm"] == "random":
            assert all(v == 1.0 for layer in gammas.values() for v in layer)
    report = (folder / "report.md").read_text()
    for heading in ("## Accuracy by depth", "## γ near zero", "## Calibration", "## Verdicts"):
        assert heading in report
    assert "**NO**" not in report
    findings = json.loads((folder / "findings.json").read_text())
    assert findings["smoke_test"] and {v["outcome"] for v in findings["verdicts"]} == {SMOKE_TEST}
    assert set(figures.problems) == {f"onlybn/{f}" for f in (
        "accuracy_vs_depth.png", "gamma_distribution.png", "gamma_per_layer.png")} | {
        f for f in figures.problems if f.endswith("/curves.png")}
    assert figures.failing == {}
