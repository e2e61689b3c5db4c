"""bnlab.util.plots: the checker of tests/util/figure_checks.py catches each broken figure rule
and passes the figure mended with the style's helpers; the helpers keep the rules where they
are hardest (one epoch, log axes over many or under one decade, symlog steps, eleven lines
ending on one point); a run's figures (curves, norm parameters, comparison) pass."""

from __future__ import annotations

import math

import pytest

from bnlab.util import plots
from bnlab.util.plots import plt
from tests.util.figure_checks import check_saved_figures, data_lines, drawn_ticks, figure_problems


def problems_of(draw, figsize=(5, 3.5)) -> list[str]:
    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    try:
        return figure_problems(fig)
    finally:
        plt.close(fig)


def labelled(ax) -> None:
    ax.set_xlabel("x (units)")
    ax.set_ylabel("y (units)")


def eleven_viridis_lines(ax) -> None:
    labelled(ax)
    for i in range(11):
        ax.plot([0, 1], [0, i], color=plt.get_cmap("viridis")(i / 10), marker="o", linestyle="-")


def seven_labelled_lines(ax) -> None:
    labelled(ax)
    for i in range(7):
        ax.plot([0, 1], [0, i], label=f"line {i}", **plots.style(i))


def crowded_ticks(ax) -> None:
    labelled(ax)
    ax.plot(range(40), range(40))
    ax.set_xticks(range(40), [f"tick {i}" for i in range(40)])


def one_epoch(ax) -> None:
    ax.plot([1], [0.5])
    ax.set_ylabel("accuracy")


# rule: (the broken figure, what the checker says, the figure mended with the style)
RULES = {
    "axis labels": (lambda ax: ax.plot([1, 2], [1, 2]), "y axis has no label",
                    lambda ax: (ax.plot([1, 2], [1, 2]), labelled(ax))),
    "integer epochs": (lambda ax: (one_epoch(ax), ax.set_xlabel("epoch")), "fractional ticks",
                       lambda ax: (one_epoch(ax), plots.epoch_axis(ax))),
    "tick labels apart": (crowded_ticks, "x tick 'tick 0' overlaps",
                          lambda ax: (labelled(ax), ax.plot(range(40), range(40)))),
    "not colour alone": (eleven_viridis_lines, "11 lines, told apart by colour alone",
                         lambda ax: (labelled(ax), [ax.plot([0, 1], [0, i]) for i in range(11)])),
    "lines unlike": (lambda ax: (labelled(ax), ax.plot([0, 1], [0, 1], "C0--", label="a"),
                                 ax.plot([0, 1], [1, 0], "C0--", label="b")),
                     "2 lines look alike (colour, marker, style): a, b",
                     lambda ax: (labelled(ax), ax.plot([0, 1], [0, 1]), ax.plot([0, 1], [1, 0]))),
    "short legends": (lambda ax: (seven_labelled_lines(ax), ax.legend()), "a legend of 7 entries",
                      lambda ax: (seven_labelled_lines(ax), plots.legend(ax))),
    "visible points": (lambda ax: (labelled(ax), ax.plot([1], [1], "-", label="p")),
                       "line 'p' is one point without a marker",
                       lambda ax: (labelled(ax), ax.plot([1], [1], label="p"))),
    "no blank panel": (labelled, "draws nothing",
                       lambda ax: (labelled(ax), plots.note_empty(ax, "nothing measured"))),
}


@pytest.mark.parametrize("rule", RULES)
def test_the_checker_catches_each_broken_rule_and_passes_it_mended(rule):
    broken, message, mended = RULES[rule]
    problems = problems_of(broken)
    assert any(message in p for p in problems), problems
    assert problems_of(mended) == []


def test_the_looks_differ_in_marker_and_style_and_each_colour_comes_with_its_own_marker():
    pairs = {(look["marker"], look["linestyle"]) for look in plots.LOOKS}
    assert len(pairs) == len(plots.LOOKS) == 16
    assert len({(look["color"], look["marker"]) for look in plots.LOOKS}) == 16
    assert plots.style(16) == plots.style(0)  # the cycle turns


@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 10, 50])
def test_an_epoch_axis_ticks_whole_epochs_and_one_epoch_is_an_epoch_wide(epochs):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(1, epochs + 1), [0.5] * epochs)
    plots.epoch_axis(ax)
    ax.set_ylabel("accuracy")
    assert figure_problems(fig) == []
    ticks = [t.get_loc() for t in drawn_ticks(ax.xaxis) if t.label1.get_text()]
    assert ticks and all(t == int(t) for t in ticks)
    if epochs == 1:
        assert ax.get_xlim() == (0.5, 1.5) and ticks == [1]
    plt.close(fig)


@pytest.mark.parametrize(("low", "high", "options"), [
    (0.9, 1.1, {}),  # under a decade: minor labels, as many as fit
    (0.3, 3.0, {}),
    (1e-23, 1e2, {}),  # 25 decades on a short axis
    (0.01, 1000.0, {}),
    (2, 128, {"base": 2, "ticks": (2, 4, 8, 16, 32, 64, 128)}),
    (1, 65536, {"base": 2, "ticks": [2 ** k for k in range(17)]}),  # more ticks than fit
    (0, 8, {"linthresh": 50}),  # the quick grid's steps
    (0, 4690, {"linthresh": 50}),  # ten epochs of 60000 images in batches of 128
], ids=["under-a-decade", "one-decade", "25-decades", "5-decades", "base-2", "crowded-base-2",
        "symlog-8-steps", "symlog-4690-steps"])
@pytest.mark.parametrize("which", ["x", "y"])
def test_log_axes_keep_at_least_two_labels_and_none_overlap(low, high, options, which):
    fig, ax = plt.subplots(figsize=(2.6, 2.2))
    points = [low, high] if "linthresh" in options else [low, math.sqrt(low * high), high]
    ax.plot(points, points)
    label = "training step" if "linthresh" in options else "size (units)"
    plots.log_axis(ax, which, label=label, **options)
    (ax.set_ylabel if which == "x" else ax.set_xlabel)("other (units)")
    assert figure_problems(fig) == []
    axis = ax.xaxis if which == "x" else ax.yaxis
    shown = [t for t in drawn_ticks(axis) if t.label1.get_visible() and t.label1.get_text()]
    assert len(shown) >= 2
    plt.close(fig)


def test_direct_labels_replace_a_crowded_legend_apart_and_in_their_lines_colours():
    fig, ax = plt.subplots(figsize=(5, 3))
    for i in range(11):  # all end on one point: the labels must spread
        ax.plot([1, 2, 3], [0.1, 0.1 + i / 100, 0.1], label=f"lr={10 ** (i - 2):g}")
    plots.epoch_axis(ax)
    ax.set_ylabel("validation accuracy")
    plots.legend(ax)
    assert ax.get_legend() is None and len(ax.texts) == 11
    assert [t.get_color() for t in ax.texts] == [line.get_color() for line in data_lines(ax)]
    assert figure_problems(fig) == []
    plt.close(fig)


@pytest.mark.parametrize("heights", [[0.5] * 6, [0.97, 0.98, 0.99], [0.02, 0.01, 0.0],
                                     [0.3, 0.9, 0.31, 0.1], [0.5] * 30])
def test_spread_labels_keep_their_order_and_a_gap(heights):
    gap = 0.05
    placed = plots._spread(heights, gap)
    order = sorted(range(len(heights)), key=lambda i: heights[i])
    ys = [placed[i] for i in order]
    assert all(b - a >= gap - 1e-12 for a, b in zip(ys, ys[1:]))
    if (len(heights) - 1) * gap <= 1:  # they fit: inside the axes
        assert min(ys) >= 0 and max(ys) <= 1


# --------------------------------------------------------------------------- a run's figures

def history(epochs: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "train_acc": 0.5 + e / 30,
             "val_acc": 0.48 + e / 30} for e in range(1, epochs + 1)]


def test_curves_of_a_run_that_diverged_in_its_first_epoch_say_so(tmp_path, monkeypatch):
    seen = check_saved_figures(monkeypatch)
    plots.plot_curves([], tmp_path / "run" / "curves.png", diverged={"epoch": 1, "step": 5})
    assert seen.failing == {}
    for ax in seen.figures["run/curves.png"].axes:
        assert [t.get_text() for t in ax.texts] == ["no epoch finished (diverged at epoch 1, "
                                                    "step 5)"]


@pytest.mark.parametrize("epochs", [1, 10])
def test_curves_give_loss_and_accuracy_their_own_labelled_axes(epochs, tmp_path, monkeypatch):
    seen = check_saved_figures(monkeypatch)
    plots.plot_curves(history(epochs), tmp_path / "run" / "curves.png", title="a run",
                      diverged={"epoch": epochs, "step": 3} if epochs == 1 else None)
    assert seen.failing == {}
    loss_ax, acc_ax = seen.figures["run/curves.png"].axes
    assert "loss" in loss_ax.get_ylabel() and "accuracy" in acc_ax.get_ylabel()
    assert {line.get_label() for line in data_lines(loss_ax)} == {"train loss", "val loss"}
    assert {line.get_label() for line in data_lines(acc_ax)} == {"train accuracy",
                                                                 "val accuracy"}
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_norm_parameters_show_gamma_around_one_as_deviations(tmp_path, monkeypatch):
    seen = check_saved_figures(monkeypatch)
    wide = 120  # points, not stems
    layers = {
        "conv1": {"gamma": [1.0 + 0.01 * k for k in range(-3, 3)], "beta": [0.001] * 6,
                  "running_mean": [0.2] * 6, "running_var": [0.9] * 6},
        "fc1": {"gamma": [1.0 + 0.001 * (k % 7) for k in range(wide)], "beta": None,
                "running_mean": [0.0] * wide, "running_var": [1.1] * wide},
    }
    plots.plot_norm_parameters(layers, tmp_path / "run" / "norm_params.png", "BN-LeNet")
    assert seen.failing == {}
    axes = seen.figures["run/norm_params.png"].axes
    gamma_conv1, gamma_fc1 = axes[0], axes[4]
    for ax, gammas in ((gamma_conv1, layers["conv1"]["gamma"]), (gamma_fc1, layers["fc1"]["gamma"])):
        low, high = ax.get_ylim()
        assert low > 0.5 and low <= min(gammas) and max(gammas) <= high  # not a bar from 0
        assert high - low < 0.2
        assert ax.get_xlabel() == "channel" and "γ" in ax.get_ylabel()
    assert gamma_conv1.get_title().startswith("conv1") and gamma_fc1.get_title().startswith("fc1")
    assert not axes[5].axison  # fc1 has no beta here


def test_comparison_keeps_each_runs_look_across_its_panels(tmp_path, monkeypatch):
    seen = check_saved_figures(monkeypatch)
    runs = {name: history(3) for name in ("lenet", "bn-lenet-bnlab", "bn-lenet-torch")}
    plots.plot_comparison(runs, tmp_path / "demo" / "comparison.png", "demo")
    assert seen.failing == {}
    looks = [[(line.get_color(), line.get_marker(), line.get_linestyle()) for line in data_lines(ax)]
             for ax in seen.figures["demo/comparison.png"].axes]
    assert looks[0] == looks[1] == looks[2] and len(set(looks[0])) == 3
