"""An experiment's cost is the sum of what its runs, measurements and analysis recorded:
checked on hand-written folders whose every second is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnlab.experiments.costs import CostUnknown, experiment_cost, total_cost
from bnlab.training import runs

ANALYSIS_START = 1_000_000.0


def _run(root: Path, name: str, epoch_seconds: list[float], eval_seconds: list[float] = (),
         caches: dict[str, dict] | None = None) -> dict:
    """A run folder with its periodic evaluations and caches; its results.jsonl row."""
    folder = root / "runs" / name
    (folder / runs.ANALYSIS).mkdir(parents=True)
    runs.write_jsonl(folder / runs.EVALS, [{"step": i, "eval_seconds": s}
                                           for i, s in enumerate(eval_seconds)])
    for cache, stored in (caches or {}).items():
        (folder / runs.ANALYSIS / f"{cache}.json").write_text(json.dumps(stored))
    return {"run_dir": f"/elsewhere/{name}",  # results name the folder as it was then
            "metrics": [{"epoch": i + 1, "seconds": s} for i, s in enumerate(epoch_seconds)]}


def _experiment(root: Path, name: str, rows: list[dict], analysis_s: float,
                measurements: list[str]) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "findings.json").write_text(json.dumps({"timing": {
        "training_s": 0.0, "analysis_s": analysis_s, "analysis_started_at": ANALYSIS_START,
        "measurements": measurements}}))
    return folder


def test_cost_adds_training_measurements_and_the_rest_of_the_analysis(tmp_path):
    a = _run(tmp_path, "a", [10.0, 20.0], eval_seconds=[1.0, 2.0], caches={
        "probe": {"key": {}, "value": 1, "seconds": 5.0, "computed_at": ANALYSIS_START - 100},
        "other": {"key": {}, "value": 1, "seconds": 99.0, "computed_at": ANALYSIS_START}})
    b = _run(tmp_path, "b", [4.0], caches={
        "probe": {"key": {}, "value": 1, "seconds": 3.0, "computed_at": ANALYSIS_START + 1},
        "old": {"key": {}, "value": 1}})  # written before times were recorded
    folder = _experiment(tmp_path, "exp", [a, b, a], analysis_s=10.0,  # two variants share run a
                         measurements=["probe", "old"])
    cost = experiment_cost(folder)
    assert cost.runs == {"a": 33.0, "b": 4.0}  # epochs and periodic evaluations; "a" once
    assert cost.measurements == {"a/probe": 5.0, "b/probe": 3.0}  # "other" is not its own
    assert cost.untimed_measurements == 1
    assert cost.analysis_s == 7.0  # b's probe was computed during the last analysis
    assert cost.total_s == 33.0 + 4.0 + 8.0 + 7.0


def test_nothing_measured_no_evaluations(tmp_path):
    folder = _experiment(tmp_path, "exp", [_run(tmp_path, "a", [2.0])], 1.5, [])
    cost = experiment_cost(folder)
    assert (cost.training_s, cost.measurements_s, cost.analysis_s) == (2.0, 0.0, 1.5)


def test_a_run_folder_gone_still_counts_its_epochs(tmp_path):
    row = _run(tmp_path, "a", [2.0, 3.0], eval_seconds=[1.0])
    folder = _experiment(tmp_path, "exp", [row], 0.0, [])
    (tmp_path / "runs" / "a" / runs.EVALS).unlink()
    assert experiment_cost(folder).runs == {"a": 5.0}


def test_the_total_counts_shared_runs_and_measurements_once(tmp_path):
    a = _run(tmp_path, "a", [10.0], caches={"m": {"key": {}, "value": 0, "seconds": 2.0}})
    first = experiment_cost(_experiment(tmp_path, "one", [a], 1.0, ["m"]))
    second = experiment_cost(_experiment(tmp_path, "two", [a, _run(tmp_path, "b", [5.0])], 1.0,
                                         ["m"]))
    assert first.total_s + second.total_s == 12.0 + 1.0 + 17.0 + 1.0
    total = total_cost([first, second])
    assert (total.training_s, total.measurements_s, total.analysis_s) == (15.0, 2.0, 2.0)


def test_an_experiment_without_its_files_has_no_cost(tmp_path):
    with pytest.raises(CostUnknown, match="not analysed yet"):
        experiment_cost(tmp_path / "exp")
    folder = _experiment(tmp_path, "exp", [], 0.0, [])
    (folder / "findings.json").write_text(json.dumps({"verdicts": []}))
    with pytest.raises(CostUnknown, match="no timing"):
        experiment_cost(folder)
    (folder / "findings.json").write_bytes(b"\xff not json")
    with pytest.raises(CostUnknown, match="findings.json"):
        experiment_cost(folder)
