"""Distribution-free intervals for a median (the demo's speed ratio uses them).

Why: a speed ratio over a few epochs is a median of skewed timings; its interval must cover
the true median as often as it says, whatever the distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from bnlab.experiments.stats import median_interval


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
