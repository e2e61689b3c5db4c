"""Santurkar et al.'s landscape probes: closed forms on a quadratic, nothing disturbed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.probes.landscape import probe
from bnlab.training.norms import create_norm_layer
from tests.util.figure_checks import check_saved_figures


class Quadratic(nn.Module):
    """L(w) = w^T A w / 2, with gradient A w."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def loss(self) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w


def test_beta_of_a_quadratic_is_its_curvature_along_g():
    a = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    model = Quadratic(a, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))  # g = (4, 0, 0)
    out = probe(model, lambda m: m.loss(), [0.01, 0.1, 0.3])
    g = a @ model.w.detach()
    assert out["grad_norm"] == pytest.approx(4.0)
    assert out["beta"] == pytest.approx((g @ a @ g / (g @ g)).item())  # = 4, the eigenvalue
    # grad L(w - eta g) - g = -eta A g exactly, and the loss along the line is closed-form.
    for eta, change, loss in zip(out["etas"], out["grad_change"], out["loss"]):
        assert change == pytest.approx(eta * (a @ g).norm().item())
        w = model.w.detach() - eta * g
        assert loss == pytest.approx((0.5 * w @ a @ w).item())
    assert out["loss_range"] == pytest.approx(max([out["loss0"], *out["loss"]])
                                              - min([out["loss0"], *out["loss"]]))


def test_beta_of_a_general_quadratic_is_norm_of_a_g_over_norm_of_g():
    torch.manual_seed(0)
    m = torch.randn(4, 4, dtype=torch.float64)
    a = m @ m.T + torch.eye(4, dtype=torch.float64)
    model = Quadratic(a, torch.randn(4, dtype=torch.float64))
    g = a @ model.w.detach()
    out = probe(model, lambda mod: mod.loss(), [0.05, 0.2])
    assert out["beta"] == pytest.approx(((a @ g).norm() / g.norm()).item())


def test_probe_leaves_parameters_grads_buffers_and_mode_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), create_norm_layer("bnlab", "fc", 6), nn.Sigmoid(),
                          nn.Linear(6, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    F.cross_entropy(model(x), y).backward()
    model.eval()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    out = probe(model, lambda m: F.cross_entropy(m(x), y), [0.1, 1.0, 10.0])
    assert not model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert out["loss_range"] > 0 and math.isfinite(out["beta"]) and out["beta"] > 0


@pytest.mark.slow
def test_landscape_experiment_quick_grid_runs(synthetic_fashion, tmp_path, monkeypatch):
    from bnlab.experiments import get_experiment
    from bnlab.experiments.runner import QUICK, run_experiment

    figures = check_saved_figures(monkeypatch)
    report = run_experiment(get_experiment("landscape"), QUICK, tmp_path, synthetic_fashion,
                            progress=False)
    assert "## Smoothness along the gradient" in report and "lr 0.1, early steps" in report
    assert len(sorted(tmp_path.glob("runs/*/analysis/landscape-probes.json"))) == 4
    assert (tmp_path / "landscape" / "landscape.png").exists()
    assert "landscape/landscape.png" in figures.problems and figures.failing == {}
