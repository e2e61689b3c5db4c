"""Santurkar et al.'s landscape probes: closed forms on quadratics along both paths, relative
measures blind to a plateau's scale, nothing disturbed; the experiment's quick grid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.probes.landscape import MEASURES, QuadraticLoss, probe, smoothness
from bnlab.training.norms import create_norm_layer
from tests.util.figure_checks import check_saved_figures

ETAS = (0.05, 0.1, 0.3)
DISTANCES = (0.1, 0.5)


class Quadratic(nn.Module):
    """L(w) = w^T A w / 2 + c, with gradient A w (any symmetric A, not only diagonal)."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor, c: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.c = c
        self.w = nn.Parameter(w.clone())

    def forward(self) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w + self.c


def _read(model, etas=ETAS, distances=DISTANCES):
    out = probe(model, lambda m: m(), etas, distances)
    return out, {path: smoothness(out["loss0"], out["grad_norm"], out[path])
                 for path in ("gradient", "normalized")}


def _general_quadratic(scale: float = 1.0):
    torch.manual_seed(0)
    m = torch.randn(4, 4, dtype=torch.float64)
    a = scale * (m @ m.T + torch.eye(4, dtype=torch.float64))
    return Quadratic(a, torch.randn(4, dtype=torch.float64), c=3.0 * scale), a


def test_beta_of_a_quadratic_is_its_curvature_along_g_on_both_paths():
    a = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    model = Quadratic(a, torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))  # g = (2, 0, 0)
    out, read = _read(model)
    assert out["grad_norm"] == pytest.approx(2.0)
    assert read["gradient"]["beta"] == pytest.approx(4.0)  # the eigenvalue, not 4 * ||g||
    assert read["normalized"]["beta"] == pytest.approx(4.0)
    g = a @ model.w.detach()
    # grad L(w - s u) - g = -s A u exactly (u = g/||g||, s the distance moved)
    for path, distances in (("gradient", [eta * 2.0 for eta in ETAS]), ("normalized", DISTANCES)):
        assert out[path]["moved"] == pytest.approx(distances)
        for s, change, loss in zip(distances, out[path]["grad_change"], out[path]["loss"]):
            assert change == pytest.approx(s * 4.0)
            w = model.w.detach() - s * g / g.norm()
            assert loss == pytest.approx((0.5 * w @ a @ w).item())
    assert read["gradient"]["grad_change"] == pytest.approx(max(ETAS) * 2.0 * 4.0)
    assert read["normalized"]["relative_grad_change"] == pytest.approx(max(DISTANCES) * 4.0 / 2.0)
    losses = [out["loss0"], *out["gradient"]["loss"]]
    assert read["gradient"]["loss_range"] == pytest.approx(max(losses) - min(losses))
    assert read["gradient"]["relative_loss_range"] == pytest.approx(
        (max(losses) - min(losses)) / out["loss0"])


def test_beta_of_a_general_quadratic_is_norm_of_a_g_over_norm_of_g():
    model, a = _general_quadratic()
    g = a @ model.w.detach()
    _, read = _read(model)
    for path in ("gradient", "normalized"):
        assert read[path]["beta"] == pytest.approx(((a @ g).norm() / g.norm()).item())


def test_relative_measures_of_the_normalized_path_do_not_see_a_plateaus_scale():
    """Scale the loss by s (a plateau): along W - d g/||g|| the relative measures stay, the
    absolute ones scale by s; along W - eta g the steps shrink, and everything reads smaller."""
    s = 1e-3
    _, big = _read(_general_quadratic()[0])
    _, flat = _read(_general_quadratic(s)[0])
    for key in ("relative_grad_change", "relative_loss_range"):
        assert flat["normalized"][key] == pytest.approx(big["normalized"][key], rel=1e-9)
    for key in ("grad_change", "loss_range", "beta"):
        assert flat["normalized"][key] == pytest.approx(s * big["normalized"][key], rel=1e-9)
    assert flat["gradient"]["grad_change"] == pytest.approx(s * s * big["gradient"]["grad_change"],
                                                            rel=1e-9)
    assert flat["gradient"]["relative_grad_change"] < 0.01 * big["gradient"]["relative_grad_change"]


@pytest.mark.parametrize("slope", [0.5, 2.0])
def test_a_linear_loss_has_no_gradient_change_and_its_loss_range_grows_with_the_slope(slope):
    _, read = _read(QuadraticLoss([slope, 0.0], [0.0, 0.0], c=1.0))
    for path in ("gradient", "normalized"):
        assert read[path]["grad_change"] == 0 and read[path]["beta"] == 0
        assert read[path]["relative_grad_change"] == 0
    assert read["gradient"]["loss_range"] == pytest.approx(max(ETAS) * slope**2)
    assert read["normalized"]["loss_range"] == pytest.approx(max(DISTANCES) * slope)


def test_quadratic_loss_reads_its_closed_forms():
    model = QuadraticLoss([3.0, 0.0], [5.0, 7.0], c=2.0)
    out, read = _read(model)
    assert out["loss0"] == 2.0 and out["grad_norm"] == pytest.approx(3.0)
    for d, loss in zip(DISTANCES, out["normalized"]["loss"]):
        assert loss == pytest.approx(2.0 - 3.0 * d + 5.0 * d * d / 2)
    assert read["normalized"]["beta"] == pytest.approx(5.0)  # the other axis's 7 never moves
    with pytest.raises(ValueError, match="one length"):
        QuadraticLoss([1.0], [1.0, 2.0])


def test_a_flat_region_reads_zero_and_takes_no_normalized_step():
    out, read = _read(QuadraticLoss([0.0], [0.0], c=1.0))
    assert out["grad_norm"] == 0 and out["normalized"]["sizes"] == []
    assert read["gradient"]["loss_range"] == 0 and read["gradient"]["grad_change"] == 0
    assert math.isnan(read["gradient"]["beta"])  # no distance moved: no change per distance
    assert all(math.isnan(read["normalized"][k]) for k in MEASURES)


def test_a_step_that_leaves_the_finite_region_reads_as_infinite():
    path = {"sizes": [0.1, 0.2], "moved": [0.1, 0.2], "loss": [1.0, math.inf],
            "grad_change": [0.5, math.nan]}
    read = smoothness(2.0, 1.0, path)
    assert read["loss_range"] == math.inf and read["grad_change"] == math.inf
    assert read["beta"] == math.inf


def test_probe_leaves_parameters_grads_buffers_and_mode_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), create_norm_layer("bnlab", "fc", 6), nn.ReLU(),
                          nn.Linear(6, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    F.cross_entropy(model(x), y).backward()
    model.eval()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    out = probe(model, lambda m: F.cross_entropy(m(x), y), [0.1, 1.0, 10.0], [0.1, 1.0])
    assert not model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    read = smoothness(out["loss0"], out["grad_norm"], out["normalized"])
    assert read["loss_range"] > 0 and math.isfinite(read["beta"]) and read["beta"] > 0
    assert out["normalized"]["moved"] == pytest.approx([0.1, 1.0])


@pytest.mark.slow
def test_landscape_experiment_quick_grid_runs(synthetic_fashion, tmp_path, monkeypatch):
    from bnlab.experiments import get_experiment, landscape
    from bnlab.experiments.runner import QUICK, run_experiment

    figures = check_saved_figures(monkeypatch)
    report = run_experiment(get_experiment("landscape"), QUICK, tmp_path, synthetic_fashion,
                            progress=False)
    for section in ("## Learning rates (chosen on validation)", "## Smoothness at equal steps",
                    "## Smoothness at matched training loss", "## Calibration"):
        assert section in report
    assert "no verdict (smoke test)" in report and "**supported**" not in report
    assert "**NO**" not in report  # every calibration reads its known answer
    # a "|" inside a cell (||g||) would split its row into more columns than its header has
    table: list[str] = []
    for line in [*report.splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        assert all(row.count("|") == table[0].count("|") for row in table), table
        table = []
    rows = len(landscape.ARCHITECTURES) * 2 * len(landscape.QUICK_RATES)
    assert len((tmp_path / "landscape" / "results.jsonl").read_text().splitlines()) == rows
    # only the runs at each architecture's chosen rate are probed: both arms, one seed
    probed = sorted(tmp_path.glob("runs/*/analysis/landscape-probes.json"))
    assert 0 < len(probed) <= 2 * len(landscape.ARCHITECTURES)
    for name in ("landscape.png", "landscape_matched.png"):
        assert (tmp_path / "landscape" / name).exists()
        assert f"landscape/{name}" in figures.problems
    assert figures.failing == {}
