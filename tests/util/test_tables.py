"""Counts in words agree with their numbers ("1 epoch", not "1 epochs" or "1 seed(s)")."""

from __future__ import annotations

from pathlib import Path

from bnlab.experiments import get_experiment
from bnlab.experiments.runner import ExpSettings, describe_settings, plan
from bnlab.util.tables import counted


def test_counted_agrees_with_its_number():
    assert counted(1, "epoch") == "1 epoch" and counted(0, "epoch") == "0 epochs"
    assert counted(3, "seed") == "3 seeds" and counted(2, "process", "processes") == "2 processes"


def test_an_experiment_report_counts_in_words():
    one = ExpSettings(seeds=1, epochs=1, subset=1000)
    text = describe_settings(one, plan(get_experiment("chapter"), one, Path("runs")))
    assert text.startswith("3 variants x 1 seed = 3 runs; 1 epoch on a class-balanced subset of "
                           "1000 training images,")
    three = ExpSettings(seeds=3, epochs=3, subset=0)
    assert "3 epochs" in describe_settings(three, plan(get_experiment("chapter"), three, Path("r")))
