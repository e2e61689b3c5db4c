"""The arms of a grid compared: table cells and verdicts on claims about their runs.

Why: every claim experiment compares arms of its grid (BN against none, one placement
against another, a model at its best learning rate against another at its own) by a
number per run. One definition keeps those comparisons alike across reports:

* the number reported is TEST accuracy (:data:`REPORTED`); every choice (a best rate, a
  side that "does not train") is made on the validation split (``analysis``);
* samples are ``{seed: value}``, so the shared rule (``findings``) pairs the arms over the
  seeds they share;
* a run that diverged has no value: it is left out of the mean and counted, in the cell
  ("1/3 diverged") and in the verdict's ``failed``, never dropped silently;
* a side that does not train (mean final validation accuracy at most
  ``analysis.FAIL_ACCURACY``, diverged seeds at chance) is not compared: the verdict is
  ``not_measured`` and says why. Its failure may itself be the finding (a rate too large,
  a net too deep); a claim about that is judged against the failure bar
  (:func:`judge_bar`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bnlab.experiments.analysis import CHANCE, FAIL_ACCURACY, Row, failed, mean_final
from bnlab.experiments.findings import Verdict, judge_difference, judge_same, not_measured
from bnlab.experiments.stats import estimate

REPORTED = "final_test_acc"
"""The summary number that tables and verdicts report: test accuracy at the end of a run."""

Value = Callable[[Row], float | None]
Side = tuple[str, list[Row]]  # (name in the report, the side's runs)


def reported(row: Row, key: str = REPORTED) -> float | None:
    """A run's summary number ``key``; None for a run that diverged (it has none)."""
    return None if row.diverged else row.summary.get(key)


def per_seed(rows: list[Row], value: Value = reported) -> dict[int, float]:
    """``{seed: value(row)}``; a run without a value (diverged) is nan, so the rule leaves
    it out and the verdict's ``failed`` counts it."""
    out = {}
    for row in rows:
        v = value(row)
        out[row.seed] = math.nan if v is None else float(v)
    return out


def cell(rows: list[Row], value: Value = reported, spec: str = ".4f") -> str:
    """A table cell: mean ± 95% interval with n over the runs that have a value, and the
    runs that diverged (left out of the mean), e.g. ``0.8512 ± 0.0031 (n=2); 1/3 diverged``."""
    if not rows:
        return "-"
    text = estimate([value(r) for r in rows if not r.diverged]).format(spec)
    diverged = sum(r.diverged for r in rows)
    return text + (f"; {diverged}/{len(rows)} diverged" if diverged else "")


def failure_note(rows: list[Row], prefix: str = "") -> str:
    """``1/3 diverged``, ``2/3 at chance``, both, or "" when every run trained."""
    diverged = sum(r.diverged for r in rows)
    at_chance = sum(failed(r) and not r.diverged for r in rows)
    parts = [f"{k}/{len(rows)} {what}" for k, what in ((diverged, "diverged"),
                                                       (at_chance, "at chance"))
             if k]
    return prefix + ", ".join(parts) if parts else ""


def failures(*sides: Side) -> str:
    """The failed runs of each side, for ``Verdict.failed``: ``no BN: 1/3 diverged``."""
    return "; ".join(f"{name}: {note}" for name, rows in sides if (note := failure_note(rows)))


def does_not_train(rows: list[Row]) -> bool:
    """True when a side has no runs or its mean final validation accuracy (diverged seeds
    at chance) is at most ``FAIL_ACCURACY``: a choice, so made on validation."""
    return not rows or mean_final(rows) <= FAIL_ACCURACY


def _untrained(sides: tuple[Side, ...]) -> str:
    names = [f"{name} ({'no runs' if not rows else f'mean validation accuracy {mean_final(rows):.3f}'})"
             for name, rows in sides if does_not_train(rows)]
    if not names:
        return ""
    return (" and ".join(names) + f" {'does' if len(names) == 1 else 'do'} not train (at or "
            f"below {FAIL_ACCURACY}): no comparison between nets that do not both train")


def _not_measured(claim: str, source: str, measure: str, why: str, failed_runs: str,
                  details: dict[str, str]) -> Verdict:
    """``not_measured``, the setting's note (if any) after the reason."""
    note = details.pop("note", "")
    return not_measured(claim, source, measure, why + (f"; {note}" if note else ""),
                        failed=failed_runs, **details)


def _sides(a: Side, b: Side) -> tuple[Side, ...]:
    """The distinct sides (one, when both name the same runs measured two ways)."""
    return (a,) if a[1] is b[1] else (a, b)


def judge_arms(claim: str, source: str, measure: str, a: Side, b: Side, value: Value = reported,
               direction: int = 1, margin: float = 0.0, value_b: Value | None = None,
               **details: str) -> Verdict:
    """``findings.judge_difference`` of ``value`` between side ``b`` and side ``a`` (of
    ``value_b`` on side ``b`` when given: the same runs measured two ways, say), paired over
    seeds; ``not_measured`` when a side does not train (:func:`does_not_train`)."""
    sides = _sides(a, b)
    if why := _untrained(sides):
        return _not_measured(claim, source, measure, why, failures(*sides), details)
    return judge_difference(claim, source, measure, per_seed(a[1], value),
                            per_seed(b[1], value_b or value), direction, margin,
                            failed=failures(*sides), **details)


def same_arms(claim: str, source: str, measure: str, a: Side, b: Side, margin: float,
              value: Value = reported, value_b: Value | None = None, **details: str) -> Verdict:
    """``findings.judge_same`` of ``value`` between sides ``a`` and ``b`` (``value_b`` on side
    ``b`` when given), paired over seeds, equivalence within ``±margin``; ``not_measured``
    when a side does not train."""
    sides = _sides(a, b)
    if why := _untrained(sides):
        return _not_measured(claim, source, measure, why, failures(*sides), details)
    return judge_same(claim, source, measure, per_seed(a[1], value),
                      per_seed(b[1], value_b or value), margin, failed=failures(*sides), **details)


def judge_bar(claim: str, source: str, measure: str, side: Side, bar: float,
              value: Value = reported, direction: int = 1, **details: str) -> Verdict:
    """A claim that ``value`` of ``side`` lies above ``bar`` (``direction=1``) or below it
    (``-1``): the rule applied to ``value - bar`` per seed (a one-sample t interval). A run
    without a value (diverged) counts at chance accuracy here, since for a claim about
    training at all, diverging is failing."""
    name, rows = side

    def counted(row: Row) -> float:
        v = value(row)
        return CHANCE if v is None else v

    if not rows:
        return _not_measured(claim, source, measure, f"{name}: no runs", "", details)
    return judge_difference(claim, source, measure, {r.seed: bar for r in rows},
                            per_seed(rows, counted), direction, failed=failures(side), **details)
