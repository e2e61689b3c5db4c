"""`bnlab exp residual`: the predictions of the branch/skip ratio (closed forms), the measures
behind its verdicts on synthetic inputs with known answers (where the effect is large and where
it is absent), the learning-rate measures on synthetic rows, the verdicts they feed, and the
--quick grid end to end."""

from __future__ import annotations

import json
import math

import pytest

from bnlab import cli
from bnlab.experiments import residual
from bnlab.experiments.analysis import Row
from bnlab.experiments.findings import CONTRADICTED, SMOKE_TEST, SUPPORTED, UNRESOLVED
from bnlab.experiments.residual import (
    at_chosen_rate,
    doubling_skip,
    growth_per_block,
    keeps_shape,
    largest_stable_rate,
    log_stable_rates,
    predicted_ratio,
    predicted_skip,
    ratio_agreement,
    stable,
    stage_shapes,
)
from bnlab.experiments.runner import QUICK, resolve
from bnlab.probes.residual import BlockVariance
from tests.util.figure_checks import check_saved_figures

PRE, POST = 1 - 1 / math.pi, 1 - 2 / math.pi


def test_stage_shapes_of_a_cifar_resnet() -> None:
    assert stage_shapes(20) == [(16, 16)] * 3 + [(16, 32)] + [(32, 32)] * 2 + [(32, 64)] \
        + [(64, 64)] * 2
    assert keeps_shape(20) == [True] * 3 + [False] + [True] * 2 + [False] + [True] * 2
    assert len(stage_shapes(1202)) == 600


def test_predicted_skip_with_bn_adds_the_increment_and_halves_at_zero_padding() -> None:
    """Pre-activation: the stem's BN gives 1, every block adds 1 - 1/pi; the downsampling
    block's zero channels halve the mean channel variance first. Post-activation: the same
    from one reflected step, adding 1 - 2/pi."""
    c = PRE
    pre = predicted_skip(20, "pre")
    stage2 = (1 + 3 * c) / 2
    stage3 = (stage2 + 3 * c) / 2
    expected = [1, 1 + c, 1 + 2 * c, stage2, stage2 + c, stage2 + 2 * c, stage3, stage3 + c,
                stage3 + 2 * c]
    assert pre == pytest.approx(expected, rel=1e-12)
    assert predicted_ratio(20, "pre") == pytest.approx([c / s for s in expected], rel=1e-12)
    post = predicted_skip(20, "post")
    assert post[:3] == pytest.approx([POST, 2 * POST, 3 * POST], rel=1e-12)
    assert post[3] == pytest.approx(4 * POST / 2, rel=1e-12)
    assert predicted_ratio(20, "post") == pytest.approx([1 / s for s in post], rel=1e-12)


def test_pre_activation_prediction_is_one_over_l_deep_in_a_stage() -> None:
    """De & Smith's 1/l: block 200 of ResNet-1202's first stage."""
    ratio = predicted_ratio(1202, "pre")
    assert ratio[199] * 200 == pytest.approx(1.0, abs=0.003)
    assert ratio[0] == pytest.approx(PRE) and ratio[1] * 2 < 1  # not yet 1/l at the start


def test_doubling_skip_doubles_and_halves_at_zero_padding() -> None:
    assert doubling_skip(20, 1.0) == [1, 2, 4, 4, 12, 24, 24, 72, 144]
    assert doubling_skip(20, 3.0) == [3 * s for s in doubling_skip(20, 1.0)]


def test_ratio_agreement_reads_one_on_the_prediction_and_the_factor_off_it() -> None:
    predicted = [1 / ell for ell in range(1, 41)]
    assert ratio_agreement(predicted, predicted) == pytest.approx(1.0)
    assert ratio_agreement([2 * p for p in predicted], predicted) == pytest.approx(2.0)
    assert ratio_agreement([4 * p for p in predicted], predicted) == pytest.approx(4.0)
    # a ratio of 1 at every block against 1/l: the geometric mean of l, growing with the blocks
    assert ratio_agreement([1.0] * 40, predicted) == pytest.approx(math.factorial(40) ** (1 / 40))
    assert ratio_agreement([0.0, math.inf, 0.5], [1.0, 1.0, 1.0]) == pytest.approx(0.5)
    assert math.isnan(ratio_agreement([0.0, math.nan], [1.0, 1.0]))


def test_growth_per_block_over_the_blocks_that_keep_the_shape() -> None:
    doubling = [2.0 ** ell for ell in range(10)]
    assert growth_per_block(doubling, [True] * 10) == pytest.approx(2.0)
    assert growth_per_block([1.0] * 10, [True] * 10) == pytest.approx(1.0)
    linear = [float(ell) for ell in range(1, 41)]
    assert growth_per_block(linear, [True] * 40) == pytest.approx(40 ** (1 / 39))
    # a downsampling block's jump is left out
    jump = [1.0, 2.0, 4.0, 400.0, 800.0]
    assert growth_per_block(jump, [True, True, True, False, True]) == pytest.approx(2.0)
    assert math.isnan(growth_per_block([1.0, 2.0], [True, False]))


def test_every_calibration_reads_its_known_answer() -> None:
    records = residual.init_calibration() + residual.training_calibration()
    assert len(records) >= 12 and all(c.ok for c in records), [c for c in records if not c.ok]
    measures = {c.measure for c in records}
    assert {"measured / predicted ratio", "skip growth per block"} <= measures


def _row(arm: str, lr: float, seed: int, val: float | None, test: float | None = None,
         part: str = "batch", loss: float = 1.0, **tags) -> Row:
    config = {"epochs": 1, "subset": 1024, "val_size": 1000, "batch_size": tags.get("batch", 16)}
    summary = {"diverged": val is None, "final_val_acc": val,
               "final_test_acc": val if test is None else test}
    metrics = [] if val is None else [{"train_loss": loss}]
    return Row(f"{arm} {lr}", {"part": part, "arm": arm, "lr": lr, **tags}, seed, config, metrics,
               summary, "")


def test_largest_stable_rate_per_arm_and_per_seed() -> None:
    """Stable: finite loss and the last epoch's training loss below ln 10, trained or not."""
    rows = [_row("BN", 0.1, 0, 0.8), _row("BN", 0.1, 1, 0.8), _row("BN", 1.0, 0, 0.7),
            _row("BN", 1.0, 1, None), _row("BN", 3.0, 0, None), _row("BN", 3.0, 1, None),
            _row("SkipInit", 0.1, 0, 0.15, loss=2.2), _row("SkipInit", 0.1, 1, 0.12, loss=2.25),
            _row("SkipInit", 0.3, 0, 0.1, loss=2.4), _row("SkipInit", 0.3, 1, 0.1, loss=2.2)]
    assert largest_stable_rate(rows, arm="BN") == 0.1  # seed 1 diverges at 1.0
    assert largest_stable_rate(rows, 0, arm="BN") == 1.0
    assert largest_stable_rate(rows, 1, arm="BN") == 0.1
    assert largest_stable_rate(rows, arm="SkipInit") == 0.1  # near chance, yet stable
    assert largest_stable_rate(rows, 1, arm="SkipInit") == 0.3
    assert largest_stable_rate(rows, arm="Fixup") is None
    assert not stable(_row("BN", 0.1, 0, 0.5, loss=math.log(10)))
    assert log_stable_rates(rows, arm="BN") == {0: 0.0, 1: -1.0}
    assert log_stable_rates([_row("BN", 1.0, 0, None)], arm="BN") == {0: None}


def test_the_rate_is_chosen_on_validation_and_test_is_reported_at_it() -> None:
    rows = [_row("BN", lr, seed, val, test) for seed in (0, 1)
            for lr, val, test in ((0.1, 0.7, 0.9), (0.3, 0.8, 0.6))]
    assert at_chosen_rate(rows, (0.1, 0.3), arm="BN") == {0: 0.6, 1: 0.6}
    assert at_chosen_rate(rows, (0.1, 0.3), arm="SkipInit") == {}


def _grid(bn_large: float, skip_large: float, skip_deep: float | None = 0.6) -> list[Row]:
    """Synthetic rows of both parts: at the large batch BN trains up to ``bn_large`` and
    SkipInit up to ``skip_large``; at depth 110 SkipInit ends at ``skip_deep`` (None: diverges)."""
    rows = []
    for seed in range(3):
        jitter = 0.01 * seed
        for lr in residual.BATCH_RATES:
            for arm, small, large in (("BN", 0.85, bn_large), ("SkipInit", 0.84, skip_large)):
                rows.append(_row(arm, lr, seed, small + jitter, batch=residual.BATCHES[0]))
                rows.append(_row(arm, lr, seed, 0.8 - 0.1 * lr + jitter if lr <= large else None,
                                 batch=residual.BATCHES[1]))
        for arm, acc in (("BN", 0.7), ("none", None), ("SkipInit", skip_deep), ("Fixup", 0.5)):
            for lr in residual.LEARNING_RATES:
                rows.append(_row(arm, lr, seed, acc if acc is None else acc + jitter,
                                 part="depth", depth=110))
    return rows


def test_training_verdicts_follow_the_numbers() -> None:
    verdicts = residual.training_verdicts(_grid(3.0, 0.3), (110,), residual.LEARNING_RATES,
                                          residual.BATCH_RATES)
    by_claim = {v.claim: v for v in verdicts}
    assert by_claim["SkipInit trains a deep ResNet without normalization"].outcome == SUPPORTED
    assert by_claim["Fixup trains a deep ResNet without normalization"].outcome == SUPPORTED
    assert by_claim["without normalization, SkipInit or Fixup a deep ResNet does not train"
                    ].outcome == SUPPORTED
    larger = by_claim["at large batch BN trains at larger learning rates than SkipInit"]
    assert larger.outcome == SUPPORTED and larger.effect == pytest.approx(1.0)
    same = by_claim["at small batch BN's benefit over SkipInit is minimal (same accuracy)"]
    assert same.outcome == SUPPORTED and same.effect == pytest.approx(0.01)
    # equal limits: the rate claim has no effect to find; SkipInit failing at depth: contradicted
    verdicts = residual.training_verdicts(_grid(1.0, 1.0, None), (110,), residual.LEARNING_RATES,
                                          residual.BATCH_RATES)
    by_claim = {v.claim: v for v in verdicts}
    assert by_claim["at large batch BN trains at larger learning rates than SkipInit"
                    ].outcome == UNRESOLVED
    assert by_claim["SkipInit trains a deep ResNet without normalization"].outcome == CONTRADICTED


def test_a_comparison_with_an_arm_that_does_not_train_is_not_measured() -> None:
    rows = [r for r in _grid(3.0, 0.3) if not (r.tags["arm"] == "SkipInit"
                                               and r.tags.get("batch") == residual.BATCHES[1])]
    rows += [_row("SkipInit", lr, seed, 0.15, batch=residual.BATCHES[1])
             for lr in residual.BATCH_RATES for seed in range(3)]
    by_claim = {v.claim: v for v in residual.batch_verdicts(rows, residual.BATCH_RATES)}
    grows = by_claim["BN's advantage over SkipInit grows with the batch size"]
    assert grows.outcome == UNRESOLVED and grows.effect is None
    assert "does not train" in grows.note


def test_the_init_verdicts_judge_the_measured_ratios() -> None:
    """Probes read exactly as predicted agree; a probe with the branch 4x too large does not."""
    def probe(layout: str, norm: str, scale: float) -> dict:
        if norm == "bnlab":
            skips = predicted_skip(56, layout)
            ratios = [r * scale for r in predicted_ratio(56, layout)]
            return {seed: [BlockVariance(i, "", r * s, s) for i, (r, s) in
                           enumerate(zip(ratios, skips), 1)] for seed in range(3)}
        skips = doubling_skip(56, 1.0)
        return {seed: [BlockVariance(i, "", s, s) for i, s in enumerate(skips, 1)]
                for seed in range(3)}

    probes = {(layout, norm, 56): probe(layout, norm, 1.0) for layout in residual.LAYOUTS
              for norm in residual.PROBE_NORMS}
    assert [v.outcome for v in residual.init_verdicts(probes, 56)] == [SUPPORTED] * 3
    probes[("pre", "bnlab", 56)] = probe("pre", "bnlab", 4.0)
    assert residual.init_verdicts(probes, 56)[0].outcome == CONTRADICTED


@pytest.mark.slow
def test_quick_grid_runs_end_to_end(fake_dataset, tmp_path, capsys, monkeypatch):
    """The --quick grid with its probes cut to ResNet-20 (the suite's time): every run, the
    report's parts, the figures' rules, the calibrations, and no verdict stated."""
    monkeypatch.setattr(residual, "QUICK_PROBE_DEPTHS", (20,))
    monkeypatch.setattr(residual, "OFF_DEPTH", 20)
    figures = check_saved_figures(monkeypatch)
    argv = ["exp", "residual", "--quick", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    folder = tmp_path / "residual"
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(residual.variants(resolve(QUICK, residual.EXPERIMENT)))
    assert {r["config"]["val_size"] for r in rows} == {QUICK.val_size}
    assert {r["config"]["momentum"] for r in rows} == {residual.MOMENTUM}
    report = (folder / "report.md").read_text()
    for heading in ("## At initialization", "## Short training: which arms",
                    "## Short training: BN and SkipInit", "## Calibration", "## Verdicts"):
        assert heading in report
    assert "**NO**" not in report
    findings = json.loads((folder / "findings.json").read_text())
    assert findings["smoke_test"] and findings["findings"] == []
    assert {v["outcome"] for v in findings["verdicts"]} == {SMOKE_TEST}
    assert len(findings["verdicts"]) == 9
    assert set(figures.problems) >= {f"residual/{f}" for f in
                                     ("init_ratio.png", "depth_lr.png", "batch_lr.png")}
    assert figures.failing == {}
    assert len(list(folder.glob("analysis/residual-init-*.json"))) == 4 + 2
