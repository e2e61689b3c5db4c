"""The demo's speed line: the warm-up epoch left out, a median with its interval, said in words.

Why: at few epochs the first epoch's one-time costs dominated the ratio bnlab printed
(issue 31, item 4: 2.874x from a 4.9x first epoch and a 0.89x second).
"""

from __future__ import annotations

import pytest

from bnlab.experiments.demo import describe_speed, speed_ratio


def history(seconds: list[float]) -> list[dict]:
    return [{"epoch": e, "train_seconds": s} for e, s in enumerate(seconds, start=1)]


def test_the_first_epoch_is_left_out_of_the_ratio():
    torch_bn = history([1.0, 1.0, 1.0, 1.0])
    ratio = speed_ratio(history([4.9, 0.88, 0.92, 0.90]), torch_bn)
    assert ratio.median == pytest.approx(0.90) and ratio.epochs == (2, 3, 4)
    low, high, coverage = ratio.interval
    assert (low, high, coverage) == (pytest.approx(0.88), pytest.approx(0.92), 0.75)
    text = describe_speed(ratio)
    assert "0.900x" in text and "epochs 2-4" in text and "epoch 1, which includes the warm-up" in text
    assert "0.880x-0.920x is a distribution-free 75% interval" in text
    assert "give a 95% interval" in text  # too few epochs for 95%: says how many would do


def test_two_epochs_give_the_second_alone_and_one_gives_none():
    ratio = speed_ratio(history([4.9, 0.89]), history([1.0, 1.0]))  # the case
    assert ratio.median == pytest.approx(0.89) and ratio.interval is None
    assert "0.890x" in describe_speed(ratio) and "one epoch gives no interval" in describe_speed(ratio)
    assert speed_ratio(history([4.9]), history([1.0])) is None
    assert describe_speed(None).startswith("Speed: not measured: epoch 1")


def test_enough_epochs_give_a_95_percent_interval():
    bnlab = history([5.0, 1.1, 0.9, 1.0, 1.2, 0.95, 1.05, 0.98, 1.02, 1.01])
    text = describe_speed(speed_ratio(bnlab, history([1.0] * 10)))
    assert "epochs 2-10" in text and "96% interval" in text and "give a" not in text
