"""Means with 95% confidence intervals over seeds, differences between settings, and the
tables that show them.

Why: with 3 seeds a mean alone overstates what is known; a Student-t interval says how far
apart two settings must be before the difference means anything. Where two settings were
trained from the same seeds (same initial weights and data order), the per-seed differences
cancel what the seeds share, so their interval is narrower for the same runs: a paired t
interval. Elsewhere the difference of the means gets Welch's t interval. Quantiles come from
``scipy.stats``. A bootstrap is not used: over 3 seeds it cannot reach past the extreme
values and undercovers.

Nothing is dropped silently: a value that is not finite (a diverged run's loss, say) is left
out of a mean, and the cell says how many were, with its n (``Estimate.format``).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

CONFIDENCE = 0.95

ACCURACY = (0.0, 1.0)
"""Where an accuracy lies: intervals of accuracies are intersected with it."""
UNBOUNDED = (-math.inf, math.inf)


def t_quantile_975(df: int) -> float:
    """The two-sided 95% Student-t quantile for ``df`` degrees of freedom (may be fractional,
    as Welch's are)."""
    if not df > 0:
        raise ValueError(f"expected df > 0 (got {df})")
    return float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


@dataclass(frozen=True)
class Estimate:
    """A cell: the mean of its finite values with the 95% interval, and how many went in.

    ``low == high == mean`` with one value (no interval); ``mean`` is nan with none.
    """

    mean: float
    low: float
    high: float
    n: int          # finite values in the mean
    total: int      # values given, finite or not

    @property
    def half(self) -> float | None:
        """Half-width of the interval before bounds; None without an interval (n < 2)."""
        return None if self.n < 2 else (self.high - self.low) / 2

    @property
    def excluded(self) -> int:
        return self.total - self.n

    def format(self, spec: str = ".4f") -> str:
        """``0.8512 ± 0.0031 (n=3)``; ``(n=2; 1 of 3 not finite)`` when some were left out."""
        count = f"n={self.n}" + (f"; {self.excluded} of {self.total} not finite"
                                 if self.excluded else "")
        if not self.n:
            return f"- ({count})"
        if self.n < 2:
            return f"{self.mean:{spec}} ({count})"
        half = max(self.mean - self.low, self.high - self.mean)
        return f"{self.mean:{spec}} ± {half:{spec}} ({count})"


def estimate(values: Sequence[float | None], bounds: tuple[float, float] = UNBOUNDED) -> Estimate:
    """The mean and 95% Student-t interval of the finite ``values``, intersected with
    ``bounds``.

    Bounded data keep the Student-t interval over seeds, clipped, rather than an interval
    made for proportions: the spread measured here is seed to seed, which a Wilson interval
    (binomial noise of the test images) does not describe. Clipping loses no coverage: the
    true mean lies inside ``bounds``, so whenever the t interval holds it, the clipped one
    does too.
    """
    finite = _finite(values)
    if not finite:
        return Estimate(math.nan, math.nan, math.nan, 0, len(values))
    mean = statistics.fmean(finite)
    half = (t_quantile_975(len(finite) - 1) * statistics.stdev(finite) / math.sqrt(len(finite))
            if len(finite) > 1 else 0.0)
    return Estimate(mean, *bounded(mean, half, bounds), len(finite), len(values))


def mean_ci(values: Sequence[float | None]) -> tuple[float, float | None]:
    """(mean, half-width of the 95% t interval) of the finite values; the half-width is None
    for fewer than two. Cells that show it use :func:`format_mean_ci`, which says how many
    values were not finite."""
    cell = estimate(values)
    return cell.mean, cell.half


def interval(values: Sequence[float | None], bounds: tuple[float, float] = UNBOUNDED
             ) -> tuple[float, float, float]:
    """(mean, low, high): :func:`estimate`'s interval as a tuple."""
    cell = estimate(values, bounds)
    return cell.mean, cell.low, cell.high


def bounded(mean: float, half: float | None, bounds: tuple[float, float] = UNBOUNDED
            ) -> tuple[float, float]:
    """(low, high) of ``mean ± half`` intersected with ``bounds``."""
    half = half or 0.0
    return max(bounds[0], mean - half), min(bounds[1], mean + half)


def format_mean_ci(values: Sequence[float | None], spec: str = ".4f") -> str:
    """A table cell: ``mean ± half (n=k)``, see :meth:`Estimate.format`."""
    return estimate(values).format(spec)


# --------------------------------------------------------------------------- differences

Sample = Mapping[int, float] | Sequence[float]
"""Values of one setting: by seed (a mapping), which allows pairing, or a plain sequence."""


@dataclass(frozen=True)
class Difference:
    """``b - a``: the effect, its 95% interval and how it was computed."""

    effect: float
    low: float
    high: float
    n: int          # pairs (paired) or the smaller sample (unpaired) used
    paired: bool

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low > 0 or self.high < 0

    @property
    def method(self) -> str:
        return "paired t over seeds" if self.paired else "Welch t"


def difference(a: Sample, b: Sample) -> Difference:
    """The difference ``b - a`` with its 95% interval, over the finite values.

    When both samples are keyed by seed and share at least two seeds with finite values in
    both, the interval is the paired t interval of the per-seed differences; otherwise
    Welch's t interval of the difference of means. Fewer than two values on a side give the
    point difference with no interval (low = high = effect): never resolved, see
    :func:`apart`.
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        shared = sorted(s for s in set(a) & set(b)
                        if _finite([a[s]]) and _finite([b[s]]))
        if len(shared) >= 2:
            diffs = [b[s] - a[s] for s in shared]
            cell = estimate(diffs)
            return Difference(cell.mean, cell.low, cell.high, len(shared), True)
    xs = _finite(list(a.values()) if isinstance(a, Mapping) else a)
    ys = _finite(list(b.values()) if isinstance(b, Mapping) else b)
    if not xs or not ys:
        return Difference(math.nan, math.nan, math.nan, 0, False)
    effect = statistics.fmean(ys) - statistics.fmean(xs)
    if len(xs) < 2 or len(ys) < 2:
        return Difference(effect, effect, effect, min(len(xs), len(ys)), False)
    va, vb = statistics.variance(xs) / len(xs), statistics.variance(ys) / len(ys)
    if va + vb == 0:
        return Difference(effect, effect, effect, min(len(xs), len(ys)), False)
    df = (va + vb) ** 2 / (va**2 / (len(xs) - 1) + vb**2 / (len(ys) - 1))  # Welch-Satterthwaite
    half = t_quantile_975(df) * math.sqrt(va + vb)
    return Difference(effect, effect - half, effect + half, min(len(xs), len(ys)), False)


def apart(a: Sample, b: Sample) -> bool:
    """Whether the 95% interval of ``b - a`` excludes 0 (:func:`difference`). With fewer than
    two values on a side there is no interval, and nothing is resolved."""
    d = difference(a, b)
    return d.n >= 2 and d.resolved


def intervals_apart(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when the 95% intervals of ``a`` and ``b`` do not overlap (a stricter test than
    :func:`apart`, kept for plots that draw the two intervals). A single value has no
    interval, so it is never apart from anything."""
    ea, eb = estimate(a), estimate(b)
    if ea.n < 2 or eb.n < 2:
        return False
    return ea.high < eb.low or eb.high < ea.low


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
