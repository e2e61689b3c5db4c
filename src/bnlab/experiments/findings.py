"""What an experiment's analysis finds: verdicts on claims, from one rule, and calibrations.

Why one rule: people quote the lab's verdicts, so every verdict in every report is made the
same way, from intervals, never from the sign of a mean:

* **supported**: the 95% interval of the effect lies entirely on the claimed side (beyond
  ``margin``, when the claim names a size);
* **contradicted**: it lies entirely on the other side (for a non-inferiority claim, "not
  worse by more than a margin", entirely beyond that margin);
* **unresolved**: it straddles, or there is no interval (fewer than two seeds on a side);
* **no verdict (smoke test)**: the grid was a smoke test (``--quick``, or a single seed),
  so no verdict is stated at all (:meth:`Analysis.as_smoke_test`).

The effect is ``b - a`` (``stats.difference``): a paired t interval over the seeds both
settings share, else Welch's. A claim that two things are the same is judged against an
equivalence margin: supported when the interval lies within ``±margin``, contradicted when
it lies outside it, unresolved otherwise.

A measure that feeds a verdict is checked on synthetic inputs with a known answer; each
report prints those checks (:class:`Calibration`) so a reader sees what the measure can see.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bnlab.experiments.stats import Difference, Sample, difference
from bnlab.util.tables import format_table

SUPPORTED, CONTRADICTED, UNRESOLVED = "supported", "contradicted", "unresolved"
SMOKE_TEST = "no verdict (smoke test)"
OUTCOMES = (SUPPORTED, CONTRADICTED, UNRESOLVED, SMOKE_TEST)


@dataclass(frozen=True)
class Verdict:
    """One claim judged against a grid's numbers (see the module docstring for the rule)."""

    claim: str                 # the claim, in words
    source: str                # where it comes from: "the chapter", "Santurkar et al. 2018", ...
    outcome: str               # one of OUTCOMES
    measure: str               # what the effect is, with its unit ("final test accuracy, BN − none")
    effect: float | None = None
    low: float | None = None
    high: float | None = None
    n: int = 0                 # seeds (pairs) behind the effect
    method: str = ""           # "paired t over seeds", "Welch t", ...
    failed: str = ""           # runs left out or failed, e.g. "1/3 diverged"
    paper: str = ""            # the paper's number or statement beside ours
    note: str = ""             # what differs in our setting, or why unresolved
    evidence: str = ""         # a figure or section of the report

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}

    def effect_text(self, spec: str = "+.4f") -> str:
        if self.effect is None or not math.isfinite(self.effect):
            return "-"
        if self.low is None or self.n < 2:
            return f"{self.effect:{spec}} (no interval)"
        return f"{self.effect:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _outcome(d: Difference, direction: int, margin: float) -> str:
    """The rule for "``b - a`` has the sign of ``direction``" (by more than ``margin``). A
    negative margin makes it a non-inferiority claim ("``b`` is not worse than ``a`` by more
    than ``-margin``"): contradicted only where the interval lies below the margin."""
    if d.n < 2 or not math.isfinite(d.effect):
        return UNRESOLVED
    low, high = (d.low, d.high) if direction > 0 else (-d.high, -d.low)
    if low > margin:
        return SUPPORTED
    if high < min(0.0, margin):
        return CONTRADICTED
    return UNRESOLVED


def judge_difference(claim: str, source: str, measure: str, a: Sample, b: Sample,
                     direction: int = 1, margin: float = 0.0, **details: str) -> Verdict:
    """A claim that ``b`` exceeds ``a`` (``direction=1``) or falls below it (``-1``), by more
    than ``margin`` when given (a negative ``margin``: ``b`` is at least as good as ``a`` up to
    ``-margin``, a non-inferiority claim); ``details`` fill :class:`Verdict`'s text fields."""
    if direction not in (1, -1):
        raise ValueError(f"expected direction 1 or -1 (got {direction})")
    d = difference(a, b)
    return Verdict(claim, source, _outcome(d, direction, margin), measure, d.effect, d.low,
                   d.high, d.n, d.method if d.n >= 2 else "", **details)


def judge_same(claim: str, source: str, measure: str, a: Sample, b: Sample, margin: float,
               **details: str) -> Verdict:
    """A claim that ``a`` and ``b`` are the same up to ``margin``: supported when the interval
    of ``b - a`` lies within ``±margin``, contradicted when it lies outside it."""
    d = difference(a, b)
    if d.n < 2 or not math.isfinite(d.effect):
        outcome = UNRESOLVED
    elif -margin < d.low and d.high < margin:
        outcome = SUPPORTED
    elif d.low > margin or d.high < -margin:
        outcome = CONTRADICTED
    else:
        outcome = UNRESOLVED
    return Verdict(claim, source, outcome, measure, d.effect, d.low, d.high, d.n,
                   d.method if d.n >= 2 else "", **details)


def not_measured(claim: str, source: str, measure: str, why: str, **details: str) -> Verdict:
    """A claim the grid could not judge (no runs of a side, nets that did not train): the
    reason goes into the note."""
    return Verdict(claim, source, UNRESOLVED, measure, note=why, **details)


@dataclass(frozen=True)
class Calibration:
    """A measure read on a synthetic case with a known answer."""

    measure: str
    case: str
    expected: str
    read: str
    ok: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Analysis:
    """What ``Experiment.analyze`` returns: report sections (tables, figures), findings (lines
    that state conclusions), verdicts and calibrations. A smoke test keeps the sections and
    drops the findings and verdicts (:meth:`as_smoke_test`)."""

    sections: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    calibration: list[Calibration] = field(default_factory=list)

    def as_smoke_test(self) -> Analysis:
        return Analysis(self.sections, [], [replace(v, outcome=SMOKE_TEST) for v in self.verdicts],
                        self.calibration)


def verdict_table(verdicts: list[Verdict]) -> str:
    """The report's table of verdicts: one row per claim."""
    return format_table(
        ["claim", "source", "verdict", "effect [95% CI]", "n", "measure", "paper", "note"],
        [[v.claim, v.source, f"**{v.outcome}**", v.effect_text(), v.n or "-",
          v.measure + (f" ({v.failed})" if v.failed else ""), v.paper or "-", v.note or "-"]
         for v in verdicts])


def calibration_table(calibration: list[Calibration]) -> str:
    return format_table(["measure", "synthetic case", "expected", "read", "ok"],
                        [[c.measure, c.case, c.expected, c.read, "yes" if c.ok else "**NO**"]
                         for c in calibration])
