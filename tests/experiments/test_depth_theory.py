"""depth's theory beside measurement: which layers the growth fit uses, the predictions per
activation, and the verdict against the prediction."""

from __future__ import annotations

import math

import pytest

from bnlab.experiments import depth


def test_fitted_growth_leaves_out_the_input_layer_and_the_head() -> None:
    hidden = [1.3 ** (8 - layer) for layer in range(8)]  # grows 1.3x per layer towards the input
    profile = [1e6, *hidden, 1e-6]  # the image-side layer and the head far off the line
    assert depth.fitted_growth(profile) == pytest.approx(1.3, rel=1e-12)
    assert math.isnan(depth.fitted_growth([1.0, 2.0, 3.0]))  # one hidden layer: no line


def test_predictions_per_activation() -> None:
    relu, tanh, sigmoid = (depth.predicted_growth(a) for a in ("relu", "tanh", "sigmoid"))
    assert relu == pytest.approx(math.sqrt(math.pi / (math.pi - 1)), rel=1e-7)  # 1.2112
    assert relu > tanh > sigmoid > 1.0
    assert set(depth.ACTIVATIONS) == {"relu", "tanh", "sigmoid"}


def test_agreement_is_judged_by_the_interval_over_seeds() -> None:
    assert depth.agreement([1.20, 1.21, 1.22], 1.21).startswith("agrees")
    assert depth.agreement([1.10, 1.11, 1.12], 1.21).startswith("**disagrees**")
    assert "-8.3% from the prediction" in depth.agreement([1.10, 1.11, 1.12], 1.21)
    assert "one seed" in depth.agreement([1.2], 1.21)


def test_growth_findings_quote_measured_and_predicted_orders_of_magnitude() -> None:
    rate = depth.predicted_growth("relu")
    growth = {("relu", "bnlab", 110): [rate * 0.99, rate, rate * 1.01]}
    (line, *_) = depth.growth_findings(growth, None)
    predicted_decades = 107 * math.log10(rate)
    assert line.startswith("- relu, BN, depth 110") and "agrees" in line
    assert f"{predicted_decades:.1f} predicted" in line
