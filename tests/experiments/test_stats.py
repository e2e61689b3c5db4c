"""Intervals and differences over seeds, against closed forms and scipy's own tests; the one
verdict rule on cases with a known answer (a large effect is resolved, no effect is not); and
distribution-free intervals for a median (the demo's speed ratio), by their coverage."""

from __future__ import annotations

import math
import random

import pytest
import torch
from scipy import stats as scipy_stats

from bnlab.experiments.findings import (
    CONTRADICTED,
    SMOKE_TEST,
    SUPPORTED,
    UNRESOLVED,
    Analysis,
    Calibration,
    judge_difference,
    judge_same,
    verdict_table,
)
from bnlab.experiments.stats import (
    ACCURACY,
    apart,
    difference,
    estimate,
    format_mean_ci,
    intervals_apart,
    mean_ci,
    median_interval,
    t_quantile_975,
)


def test_mean_ci_uses_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_ci([0.5]) == (0.5, None)
    assert t_quantile_975(1) == pytest.approx(12.7062, rel=1e-4)
    assert t_quantile_975(100) == pytest.approx(1.98397, rel=1e-4)


def test_a_cell_counts_what_it_left_out():
    cell = estimate([0.8, math.nan, 0.9, None])
    assert (cell.n, cell.total, cell.excluded) == (2, 4, 2)
    assert cell.mean == pytest.approx(0.85)
    assert format_mean_ci([0.8, math.nan, 0.9]).endswith("(n=2; 1 of 3 not finite)")
    assert format_mean_ci([0.8, 0.9, 0.85]).endswith("(n=3)")
    assert format_mean_ci([0.8]) == "0.8000 (n=1)"
    assert format_mean_ci([math.inf]) == "- (n=0; 1 of 1 not finite)"


def test_bounded_intervals_stay_inside_their_bounds():
    cell = estimate([0.99, 1.0, 0.98], ACCURACY)
    assert cell.high == 1.0 and cell.low < cell.mean


def test_paired_difference_is_scipy_s_paired_t_interval():
    a = {0: 0.80, 1: 0.85, 2: 0.78, 3: 0.82}
    b = {0: 0.83, 1: 0.86, 2: 0.82, 3: 0.84}
    d = difference(a, b)
    expected = scipy_stats.ttest_rel(list(b.values()), list(a.values())).confidence_interval()
    assert d.paired and d.n == 4
    assert (d.low, d.high) == pytest.approx((expected.low, expected.high), rel=1e-9)


def test_unpaired_difference_is_scipy_s_welch_interval():
    a, b = [0.80, 0.85, 0.78], [0.83, 0.86, 0.82, 0.90]
    d = difference(a, b)
    expected = scipy_stats.ttest_ind(b, a, equal_var=False).confidence_interval()
    assert not d.paired
    assert (d.low, d.high) == pytest.approx((expected.low, expected.high), rel=1e-9)


def test_pairing_cancels_what_the_seeds_share():
    """Seeds that move both settings together: the paired interval resolves a small
    consistent effect that the unpaired one cannot."""
    seed_effect = {0: 0.0, 1: 0.2, 2: -0.2, 3: 0.1}
    a = {s: 0.5 + e for s, e in seed_effect.items()}
    b = {s: 0.51 + e + 0.001 * s for s, e in seed_effect.items()}
    assert difference(a, b).resolved and apart(a, b)
    assert not difference(list(a.values()), list(b.values())).resolved


def test_pairing_uses_only_seeds_finite_on_both_sides():
    a = {0: 0.5, 1: math.nan, 2: 0.6, 3: 0.55}
    b = {0: 0.7, 1: 0.8, 2: 0.75, 3: math.inf}
    d = difference(a, b)
    assert d.paired and d.n == 2


def test_a_single_seed_is_never_resolved():
    assert not apart([0.9], [0.1])
    assert not intervals_apart([0.9], [0.1])
    assert intervals_apart([0.9, 0.91], [0.1, 0.11])
    assert not intervals_apart([0.5, 0.9], [0.4, 0.8])


def _noisy(mean: float, seeds: int, sd: float, rng: random.Random) -> dict[int, float]:
    return {s: mean + rng.gauss(0, sd) for s in range(seeds)}


def test_the_rule_resolves_a_large_effect_in_its_direction():
    rng = random.Random(0)
    for _ in range(50):
        a, b = _noisy(0.5, 3, 0.01, rng), _noisy(0.6, 3, 0.01, rng)
        assert judge_difference("b > a", "test", "x", a, b).outcome == SUPPORTED
        assert judge_difference("b < a", "test", "x", a, b, direction=-1).outcome == CONTRADICTED


def test_the_rule_rarely_resolves_no_effect():
    """No effect: at most about 5% of grids (the interval's error rate) are resolved."""
    rng = random.Random(1)
    outcomes = [judge_difference("b > a", "test", "x", _noisy(0.5, 3, 0.05, rng),
                                 _noisy(0.5, 3, 0.05, rng)).outcome for _ in range(2000)]
    resolved = sum(o != UNRESOLVED for o in outcomes) / len(outcomes)
    assert resolved < 0.09


def test_a_margin_asks_for_more_than_the_sign():
    a, b = [0.50, 0.51, 0.49], [0.53, 0.54, 0.52]
    assert judge_difference("b > a", "t", "x", a, b).outcome == SUPPORTED
    assert judge_difference("b > a by 0.1", "t", "x", a, b, margin=0.1).outcome == UNRESOLVED


def test_sameness_needs_an_interval_inside_the_margin():
    a, b = {0: 0.50, 1: 0.51, 2: 0.49}, {0: 0.501, 1: 0.512, 2: 0.4905}  # paired by seed
    assert judge_same("a = b", "t", "x", a, b, margin=0.01).outcome == SUPPORTED
    unpaired = judge_same("a = b", "t", "x", list(a.values()), list(b.values()), margin=0.01)
    assert unpaired.outcome == UNRESOLVED  # the seeds' spread is wider than the margin
    far = [0.60, 0.61, 0.59]
    assert judge_same("a = b", "t", "x", a, far, margin=0.01).outcome == CONTRADICTED
    assert judge_same("a = b", "t", "x", [0.5], [0.5], margin=0.01).outcome == UNRESOLVED


def test_a_smoke_test_states_no_verdict_and_no_finding():
    verdict = judge_difference("b > a", "t", "x", [0.5, 0.51, 0.49], [0.6, 0.61, 0.59])
    analysis = Analysis(["## Table"], ["- a finding"], [verdict],
                        [Calibration("m", "c", "1", "1.0", True)])
    smoke = analysis.as_smoke_test()
    assert smoke.sections == ["## Table"] and smoke.findings == []
    assert [v.outcome for v in smoke.verdicts] == [SMOKE_TEST]
    assert smoke.calibration == analysis.calibration
    assert "**no verdict (smoke test)**" in verdict_table(smoke.verdicts)


def test_median_interval_picks_the_order_statistics_of_its_coverage():
    values = [9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0]  # 1..9, shuffled
    low, high, coverage = median_interval(values)
    # n = 9: [x_(2), x_(8)] covers with 1 - 2 (1 + 9) / 512; [x_(3), x_(7)] only 1 - 2*46/512
    assert (low, high) == (2.0, 8.0) and coverage == pytest.approx(1 - 20 / 512)
    assert median_interval([3.0, 1.0]) == (1.0, 3.0, 0.5)  # too few values: the range
    assert median_interval([1.0, 2.0, 3.0])[2] == 0.75
    assert median_interval([1.0]) is None and median_interval([]) is None


@pytest.mark.parametrize("n", [3, 6, 9, 20])
def test_median_interval_covers_the_median_as_often_as_it_says(n):
    # Log-normal "timings" (skewed), median 1: the stated coverage holds within sampling error.
    draws = torch.exp(torch.randn(4000, n, generator=torch.Generator().manual_seed(n)))
    hits = 0
    for row in draws.tolist():
        low, high, coverage = median_interval(row)
        hits += low <= 1.0 <= high
    stated = median_interval(list(range(n)))[2]
    assert coverage == stated
    assert hits / len(draws) == pytest.approx(stated, abs=4 * math.sqrt(stated * (1 - stated) / 4000))
