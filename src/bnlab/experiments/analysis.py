"""Reading results rows: curves averaged over seeds, thresholds reached, failures.

Why: every experiment asks the same small questions of its runs ("mean val acc per epoch",
"when did it first reach 0.85?", "did it train at all?"). Answering them in one place keeps
the definitions identical across reports.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from bnlab.experiments.stats import mean_ci

CHANCE = 0.1
FAIL_ACCURACY = 0.2
"""A run *fails* when it diverged (non-finite loss) or ends at chance level: final validation
accuracy at most 0.2 (chance on 10 balanced classes is 0.1)."""


def failed(row: dict[str, Any]) -> bool:
    summary = row["summary"]
    return summary["diverged"] or (summary["final_val_acc"] or 0.0) <= FAIL_ACCURACY


def final(row: dict[str, Any], key: str = "final_val_acc") -> float:
    """A summary number, with diverged runs counted at chance (so means stay honest)."""
    value = row["summary"][key]
    return CHANCE if row["summary"]["diverged"] or value is None else value


Curve = tuple[list[int], list[float], list[float]]  # epochs, means, CI half-widths


def mean_curve(rows: list[dict[str, Any]], key: str = "val_acc") -> Curve:
    """Epochs, mean and 95% CI half-width (0 for one seed) of ``key`` over seeds, per epoch.

    A diverged run contributes chance accuracy (or nothing, for losses) after it diverged.
    """
    epochs = max((len(r["metrics"]) for r in rows), default=0)
    expected = max((r["summary"]["epochs"] for r in rows), default=epochs)
    xs, means, halves = [], [], []
    for e in range(max(epochs, expected)):
        values = []
        for r in rows:
            if e < len(r["metrics"]):
                values.append(r["metrics"][e][key])
            elif r["summary"]["diverged"] and key.endswith("acc"):
                values.append(CHANCE)
        if values:
            mean, half = mean_ci(values)
            xs.append(e + 1)
            means.append(mean)
            halves.append(half or 0.0)
    return xs, means, halves


def epochs_to_reach(row: dict[str, Any], threshold: float, key: str = "val_acc") -> int | None:
    """The first epoch whose ``key`` is at least ``threshold`` (None if never)."""
    return next((m["epoch"] for m in row["metrics"] if m[key] >= threshold), None)


def describe_epochs_to_reach(rows: list[dict[str, Any]], threshold: float) -> str:
    """E.g. ``3.0 (3, 3, 3)`` or ``not reached by 2/3 seeds``."""
    reached = [epochs_to_reach(r, threshold) for r in rows]
    hits = [e for e in reached if e is not None]
    if len(hits) < len(reached):
        return f"not reached by {len(reached) - len(hits)}/{len(reached)} seeds"
    return f"{statistics.fmean(hits):.1f} ({', '.join(map(str, hits))})"


def train_val_gap(row: dict[str, Any]) -> float:
    """Final training accuracy (train mode, mean over the last epoch) minus validation accuracy."""
    if row["summary"]["diverged"] or not row["metrics"]:
        return math.nan
    last = row["metrics"][-1]
    return last["train_acc"] - last["val_acc"]
