"""What an experiment cost, added up from what its runs and its analysis recorded.

Why: the lab may be run over several sittings (finished runs are kept and skipped, cut-off
ones resumed), so the wall time of one call says little about what an experiment costs.
Every part records its own seconds where it happens: each epoch of a run (``metrics.jsonl``:
its steps and its end-of-epoch evaluations), each periodic evaluation (``evals.jsonl``), each
measurement of a finished model kept in its run folder (``analysis/<name>.json``, written by
``runs.cached``: replays, probes, attacks), and each analysis (``findings.json``'s timing).
Added up they give an experiment's cost, whatever sittings it took::

    cost = training      its runs' epochs and evaluations
         + measurements  the cached measurements its last analysis read
         + analysis      its last analysis, less the measurements computed during it

Each part counts its own wall time: runs trained side by side (``--jobs``) count in full
each, so a cost is machine time, not the wall time of a call. A run or a measurement
shared between experiments counts in each one's cost, and once in a lab's total
(:func:`total_cost`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.training import runs
from bnlab.util.errors import BnlabError
from bnlab.util.io import read_json

FINDINGS = "findings.json"
RESULTS = "results.jsonl"


TIMES_EXPLAINED = (
    "'this call' (on the site: 'last lab call') is the wall time of a `bnlab lab` call (it "
    "trains only what is not finished yet). 'cost' adds up what was recorded, whichever "
    "calls did the work: training (each run's epochs and evaluations), measurements (the "
    "cached replays, probes and attacks its analysis read) and analysis (the last one, less "
    "those measurements); runs trained side by side count in full each. A run or measurement "
    "shared between experiments counts in each experiment's cost, and once in the total. "
    "What runs record leaves out each run's start, checkpoints and curves.png, a second or "
    "so a run: a call that trains everything shows it.")
"""What the lab's and the site's tables of times mean, said once."""


class CostUnknown(BnlabError):
    """An experiment folder whose cost cannot be read (no findings, a damaged file)."""


@dataclass(frozen=True)
class Cost:
    """Seconds recorded by an experiment's parts (see the module docstring)."""

    runs: dict[str, float] = field(default_factory=dict)  # run folder name -> training seconds
    measurements: dict[str, float] = field(default_factory=dict)  # "<run>/<name>" -> seconds
    untimed_measurements: int = 0  # caches written before bnlab recorded their time
    analysis_s: float = 0.0  # analyses, less the measurements computed during them

    @property
    def training_s(self) -> float:
        return sum(self.runs.values())

    @property
    def measurements_s(self) -> float:
        return sum(self.measurements.values())

    @property
    def total_s(self) -> float:
        return self.training_s + self.measurements_s + self.analysis_s

    def to_json(self) -> dict[str, Any]:
        return {"training_s": self.training_s, "runs": len(self.runs),
                "measurements_s": self.measurements_s, "measurements": len(self.measurements),
                "untimed_measurements": self.untimed_measurements,
                "analysis_s": self.analysis_s, "total_s": self.total_s}


def run_training_seconds(metrics: list[dict[str, Any]], evals: list[dict[str, Any]]) -> float:
    """A run's recorded training time: every epoch's ``seconds`` (its steps and end-of-epoch
    evaluations) and every periodic evaluation's ``eval_seconds``."""
    return (sum(m.get("seconds") or 0.0 for m in metrics)
            + sum(e.get("eval_seconds") or 0.0 for e in evals))


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, and bytes that are not UTF-8
        raise CostUnknown(f"{path}: {exc}") from None


def _results(exp_dir: Path) -> list[dict[str, Any]]:
    path = exp_dir / RESULTS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise CostUnknown(f"{path}: {exc}") from None
    if not all(isinstance(r, dict) and isinstance(r.get("run_dir"), str) for r in rows):
        raise CostUnknown(f"{path}: expected one JSON object with a run_dir a line")
    return rows


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return runs.read_jsonl(run_dir / runs.EVALS) if (run_dir / runs.EVALS).is_file() else []
    except (OSError, runs.RunFolderError):
        return []  # counted as no periodic evaluations; the run's epochs still count


def experiment_cost(exp_dir: str | Path, runs_root: str | Path | None = None) -> Cost:
    """The cost of the experiment whose folder is ``exp_dir`` (its runs under ``runs_root``,
    by default the ``runs/`` beside it), from its ``findings.json`` and ``results.jsonl`` and
    its runs' folders. ``CostUnknown`` when the experiment has not been analysed or a file
    of its own cannot be read; a run folder that is gone counts its epochs from
    ``results.jsonl`` (which holds them) without its periodic evaluations."""
    exp_dir = Path(exp_dir)
    runs_root = exp_dir.parent / "runs" if runs_root is None else Path(runs_root)
    if not (exp_dir / FINDINGS).is_file():
        raise CostUnknown(f"{exp_dir} has no {FINDINGS}: not analysed yet")
    findings = _read(exp_dir / FINDINGS)
    timing = findings.get("timing") if isinstance(findings, dict) else None
    if not isinstance(timing, dict):
        raise CostUnknown(f"{exp_dir / FINDINGS}: no timing (written by a bnlab from before "
                          "times were recorded; run the experiment again to re-analyse it)")
    training: dict[str, float] = {}
    for row in _results(exp_dir):
        name = Path(row["run_dir"]).name
        training[name] = run_training_seconds(row.get("metrics") or [], _evals(runs_root / name))
    measurements, untimed, during = {}, 0, 0.0
    for run in training:
        for name in timing.get("measurements", []):
            path = runs_root / run / runs.ANALYSIS / f"{name}.json"
            if not path.is_file():
                continue
            try:
                stored = _read(path)
            except CostUnknown:
                untimed += 1
                continue
            seconds = stored.get("seconds") if isinstance(stored, dict) else None
            if not isinstance(seconds, int | float):
                untimed += 1
                continue
            measurements[f"{run}/{name}"] = float(seconds)
            if stored.get("computed_at", 0) >= timing.get("analysis_started_at", float("inf")):
                during += seconds
    analysis = max(0.0, float(timing.get("analysis_s", 0.0)) - during)
    return Cost(training, measurements, untimed, analysis)


def total_cost(costs: list[Cost]) -> Cost:
    """The cost of several experiments together: each run and measurement once (experiments
    share them), every analysis."""
    return Cost({k: v for c in costs for k, v in c.runs.items()},
                {k: v for c in costs for k, v in c.measurements.items()},
                sum(c.untimed_measurements for c in costs), sum(c.analysis_s for c in costs))
