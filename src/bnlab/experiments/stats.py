"""Means with 95% confidence intervals over seeds, and the tables that show them.

Why: with 3 seeds a mean alone overstates what is known; a Student-t interval says how
far apart two settings must be before the difference means anything. scipy is not a
dependency, so the few t quantiles needed are tabulated.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30; beyond, the normal 1.96.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"expected df >= 1 (got {df})")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95% t interval); the half-width is None for one value."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


ACCURACY = (0.0, 1.0)
"""Where an accuracy lies: intervals of accuracies are intersected with it."""
UNBOUNDED = (-math.inf, math.inf)


def interval(values: Sequence[float], bounds: tuple[float, float] = UNBOUNDED
             ) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval over ``values`` intersected with ``bounds``.

    Bounded data keep the Student-t interval over seeds, clipped, rather than an interval
    made for proportions: the spread measured here is seed to seed, which a Wilson interval
    (binomial noise of the test images) does not describe, and a bootstrap over 3 seeds
    cannot reach past the extreme seeds and so undercovers. Clipping loses no coverage:
    the true mean lies inside ``bounds``, so whenever the t interval holds it, the clipped
    one does too. One value has no interval: low = high = mean.
    """
    mean, half = mean_ci(values)
    return (mean, *bounded(mean, half, bounds))


def bounded(mean: float, half: float | None, bounds: tuple[float, float] = UNBOUNDED
            ) -> tuple[float, float]:
    """(low, high) of ``mean ± half`` intersected with ``bounds`` (see :func:`interval`)."""
    half = half or 0.0
    return max(bounds[0], mean - half), min(bounds[1], mean + half)


def intervals_apart(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when the 95% intervals of ``a`` and ``b`` do not overlap, |mean_a − mean_b| > h_a + h_b.

    A sample of one value has no interval, so it is never apart from anything: with a
    single seed no difference is resolved. (Counting it as a zero-width interval would
    call every single-seed difference resolved, seed noise included, which is what the
    intervals are there to rule out.)
    """
    (ma, ha), (mb, hb) = mean_ci(a), mean_ci(b)
    if ha is None or hb is None:
        return False
    return abs(ma - mb) > ha + hb


def claim_verdict(claim: str, lower: Sequence[float], higher: Sequence[float], what: str,
                  unit: str = "points", spec: str = ".2f") -> str:
    """One report line on a paper's ``claim`` that ``lower`` is below ``higher``: it *agrees*
    with this grid where their 95% intervals are apart in the claimed direction, *disagrees*
    where they are apart the other way, and is *not resolved* by these seeds where they
    overlap (or one sample is a single seed); ``what`` names the two samples."""
    if not lower or not higher:
        return f"- {claim}: not measured in this grid."
    if not intervals_apart(lower, higher):
        verdict = "not resolved here (the intervals overlap)"
    else:
        verdict = "agrees" if mean_ci(lower)[0] < mean_ci(higher)[0] else "disagrees"
    return (f"- {claim}: {what}: {format_mean_ci(lower, spec)} vs {format_mean_ci(higher, spec)} "
            f"{unit}: **{verdict}**.")


def format_mean_ci(values: Sequence[float], spec: str = ".4f") -> str:
    mean, half = mean_ci(values)
    if math.isnan(mean):
        return "-"
    return format(mean, spec) if half is None else f"{mean:{spec}} ± {half:{spec}}"


def to_csv(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return buffer.getvalue()


def median_interval(values: Sequence[float], level: float = 0.95
                    ) -> tuple[float, float, float] | None:
    """(low, high, coverage): a distribution-free interval for the median of ``values``.

    For n independent values of a continuous distribution, the order statistics
    ``[x_(k), x_(n+1-k)]`` contain the distribution's median with probability
    ``1 - 2 P(B <= k - 1)``, B ~ Binomial(n, 1/2), whatever the distribution (timings are
    skewed, so a t interval would not fit). The narrowest such interval covering at least
    ``level`` is returned; below 6 values none does, and the range (k = 1) is returned with
    the coverage it has (50% for 2 values, 75% for 3). None for fewer than 2 values.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n < 2:
        return None

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = max((k for k in range(1, n // 2 + 1) if coverage(k) >= level), default=1)
    return ordered[k - 1], ordered[n - k], coverage(k)
