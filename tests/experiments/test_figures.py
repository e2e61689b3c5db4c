"""The epoch-curve figures of full-size grids (ten epochs, eleven learning rates, three seeds,
some runs diverged), drawn from synthetic rows: every figure rule of
tests/util/figure_checks.py holds where lines crowd most. (Every experiment's --quick figures
are checked where its quick grid runs end to end: test_experiments.py and the experiments'
own tests.)"""

from __future__ import annotations

import pytest

from bnlab.experiments import dropout, lr, placement
from bnlab.experiments.analysis import Row
from bnlab.experiments.runner import ExpSettings, resolve
from tests.util.figure_checks import check_saved_figures, data_lines

EPOCHS = 10


def curve_row(label: str, tags: dict, seed: int, final_acc: float, diverge_at: int | None = None) -> Row:
    """A run whose validation accuracy rises to ``final_acc`` over ten epochs (or that
    diverges after epoch ``diverge_at``)."""
    epochs = EPOCHS if diverge_at is None else diverge_at
    accs = [0.1 + (final_acc - 0.1) * (1 - 0.6 ** e) + 0.003 * seed for e in range(1, epochs + 1)]
    metrics = [{"epoch": e, "val_acc": a, "train_acc": a + 0.02, "val_loss": 2.3 - 2 * a,
                "train_loss": 2.3 - 2 * a - 0.05, "train_seconds": 1.0}
               for e, a in zip(range(1, epochs + 1), accs)]
    diverged = diverge_at is not None
    summary = {"diverged": diverged, "final_val_acc": None if diverged else accs[-1],
               "final_test_acc": None if diverged else accs[-1] - 0.01,
               "final_train_acc": None if diverged else accs[-1] + 0.02,
               "best_val_acc": max(accs), "epochs": EPOCHS, "median_seconds_per_epoch": 1.0}
    return Row(label=label, tags=tags, seed=seed, config={"epochs": EPOCHS}, metrics=metrics,
               summary=summary, run_dir="")


def lr_rows() -> list[Row]:
    rows = []
    for bn in (False, True):
        for i, rate in enumerate(lr.LEARNING_RATES):
            diverges = rate >= (30 if bn else 3)
            for seed in range(3):
                rows.append(curve_row(f"{lr.MODELS[bn][0]} lr={rate:g}", {"bn": bn, "lr": rate},
                                      seed, 0.6 + 0.02 * i, diverge_at=2 if diverges else None))
    return rows


def variant_rows(module) -> list[Row]:
    return [curve_row(v.label, v.tags, seed, 0.8 + 0.01 * i)
            for i, v in enumerate(module.variants(ExpSettings())) for seed in range(3)]


@pytest.mark.parametrize(("module", "rows", "figures"), [
    (lr, lr_rows, ["val_acc_per_epoch.png", "final_acc_vs_lr.png"]),
    (placement, lambda: variant_rows(placement), ["val_acc_per_epoch.png"]),
    (dropout, lambda: variant_rows(dropout), ["accuracy_per_epoch.png"]),
], ids=["lr", "placement", "dropout"])
def test_full_size_epoch_curves_pass_every_figure_rule(module, rows, figures, tmp_path, monkeypatch):
    seen = check_saved_figures(monkeypatch)
    out = tmp_path / module.EXPERIMENT.name
    out.mkdir()
    module.EXPERIMENT.analyze(rows(), out, None, resolve(ExpSettings(), module.EXPERIMENT))
    assert sorted(seen.problems) == sorted(f"{out.name}/{f}" for f in figures)
    assert seen.failing == {}
    for name, fig in seen.figures.items():
        for ax in fig.axes:
            assert len(data_lines(ax)) > 1, name


def test_eleven_learning_rates_are_labelled_at_their_ends_not_in_a_legend(tmp_path, monkeypatch):
    seen = check_saved_figures(monkeypatch)
    lr.analyze(lr_rows(), tmp_path, None, resolve(ExpSettings(), lr.EXPERIMENT))
    for ax in seen.figures[f"{tmp_path.name}/val_acc_per_epoch.png"].axes:
        assert ax.get_legend() is None
        assert sorted(t.get_text() for t in ax.texts) == sorted(
            f"lr={rate:g}" for rate in lr.LEARNING_RATES)
