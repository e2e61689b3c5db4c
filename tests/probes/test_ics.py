"""Noisy BN, percentile tracking and gradient ICS (Santurkar et al. Def. 2.1) on tiny models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.experiments import probed
from bnlab.probes.ics import drift, gradient_ics, percentile_record, unit_percentiles
from bnlab.training import runs
from bnlab.training.norms import create_norm_layer
from bnlab.training.runs import CHECKPOINT
from bnlab.training.train import TrainConfig, start_run
from bnlab.util.scoped import preserved_buffers
from tests.util.figure_checks import check_saved_figures


def tiny_net(norm: str = "bnlab", seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), create_norm_layer(norm, "fc", 7), nn.Sigmoid(),
                         nn.Linear(7, 6), create_norm_layer(norm, "fc", 6), nn.Sigmoid(),
                         nn.Linear(6, 3)).double()


def batch(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def snapshot(model: nn.Module):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [b.clone() for b in model.buffers()])


def assert_unchanged(model: nn.Module, before) -> None:
    params, grads, buffers = before
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    for b, c in zip(model.buffers(), buffers):
        assert torch.equal(b, c)


# --------------------------------------------------------------------------- percentiles

def test_unit_percentiles_match_sorting():
    values = torch.arange(101, dtype=torch.float64).unsqueeze(1).repeat(1, 3)  # (101, 3)
    values[:, 1] *= 2
    p = unit_percentiles(values)
    assert p.shape == (3, 3)
    assert p[:, 0].tolist() == [15.0, 50.0, 85.0] and p[:, 1].tolist() == [30.0, 100.0, 170.0]


def test_percentile_record_is_of_the_last_sigmoid_input_and_leaves_model_alone():
    model = tiny_net("noisy-bn:1")
    x, _ = batch()
    model.train()
    before = snapshot(model)
    rng = torch.get_rng_state()
    record = percentile_record(model, x, unit=2)
    with torch.no_grad():
        model.eval()
        pre = model[:5](x)  # (16, 6) the input of the last sigmoid
        model.train()
    expected = unit_percentiles(pre)
    assert record["unit"] == pytest.approx(expected[:, 2].tolist())
    assert record["median"] == pytest.approx(expected.median(dim=1).values.tolist())
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert_unchanged(model, before)
    noisy = percentile_record(model, x, train=True, seed=3)
    assert noisy == percentile_record(model, x, train=True, seed=3) != record


# --------------------------------------------------------------------------- calibration
# Issue 25: the stability measure must see the shift that noisy BN injects. The synthetic case
# is issue 25's: a fixed N(0, 1) batch of 500 samples, 25 probes, and at every probe the
# distortion of that issue's noisy BN (per step mu_t ~ U(-S, S), sigma_t ~ U(1, 1 + S); per
# sample m ~ N(mu_t, S^2), s ~ N(sigma_t, (S/2)^2); y * s + m). Its known answer: the unit's
# mean at probe t is mu_t + sigma_t * mean(x) (up to the per-sample noise's sampling error),
# so over training it travels range_t(mu_t + sigma_t * mean(x)) in units of the noise-free
# output's spread std(x).

CALIBRATION_STRENGTHS = (0.5, 1.0, 2.0, 5.0, 20.0)


def issue25_distortion(strength: float, probes: int = 25, n: int = 500, seed: int = 0):
    """``(outputs (probes, n, 1), clean (n, 1), known shift over training in clean spreads)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)  # (n, 1) the fixed batch
    outputs, centres = [], []
    for _ in range(probes):
        mu = (torch.rand((), generator=g, dtype=torch.float64) * 2 - 1) * strength
        sigma = 1 + torch.rand((), generator=g, dtype=torch.float64) * strength
        m = mu + strength * torch.randn(n, 1, generator=g, dtype=torch.float64)
        s = sigma + strength / 2 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        outputs.append(x * s + m)
        centres.append((mu + sigma * x.mean()).item())
    return torch.stack(outputs), x, (max(centres) - min(centres)) / x.std().item()


def measured_shift(outputs: torch.Tensor, clean: torch.Tensor) -> float:
    """The measure under calibration: how far the unit's distribution travelled over
    training, in units of its spread (today: ``drift``'s location of unit 0's percentiles)."""
    trajectory = [unit_percentiles(o)[:, 0].tolist() for o in outputs]
    return drift(trajectory)["location"]


def test_the_stability_measure_sees_the_injected_shift_growing_with_strength_and_zero_without():
    for strength in CALIBRATION_STRENGTHS:
        outputs, clean, known = issue25_distortion(strength)
        read = measured_shift(outputs, clean)
        assert 0.8 * known <= read <= 1.25 * known, (strength, read, known)
    still, clean, known = issue25_distortion(0.0)
    assert known == 0.0 and measured_shift(still, clean) < 0.05


def test_drift_is_scale_free_and_zero_for_a_still_distribution():
    still = [[-1.0, 0.0, 1.0]] * 4
    assert drift(still) == {"location": 0.0, "scale": 0.0}
    moving = [[-1.0, 0.0, 1.0], [0.0, 1.0, 2.0], [0.0, 1.0, 4.0]]
    d = drift(moving)
    assert d["location"] == pytest.approx(1.0 / (8 / 3))
    assert drift([[10 * v for v in r] for r in moving]) == pytest.approx(d)


# --------------------------------------------------------------------------- gradient ICS

@pytest.mark.parametrize("norm", ["none", "bnlab", "noisy-bn:1"])
def test_gradient_ics_is_zero_when_the_previous_layers_do_not_move(norm):
    model = tiny_net(norm)
    x, y = batch()
    results = gradient_ics(model, x, y, lr=0.0)
    assert len(results) == 3
    for r in results:
        assert r["diff"] == 0.0 and r["relative"] == 0.0 and r["cosine"] == pytest.approx(1.0)


def test_gradient_ics_matches_a_by_hand_update_of_the_previous_layers():
    model = tiny_net("bnlab")
    x, y = batch()
    lr = 0.5
    results = gradient_ics(model, x, y, lr)
    assert results[0]["diff"] == 0.0  # nothing before the first layer
    # Layer 2 (index 3): step layer 1 and its BN by hand, recompute dL/dW_2.
    ref = copy.deepcopy(model).train()
    loss = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    g = grads[4]  # weight of ref[3]
    with torch.no_grad():
        for p, gp in list(zip(ref.parameters(), grads))[:4]:  # linear1 w, b; bn1 w, b
            p.sub_(lr * gp)
    (g_prime,) = torch.autograd.grad(F.cross_entropy(ref(x), y), [ref[3].weight])
    assert results[1]["norm"] == pytest.approx(g.norm().item(), rel=1e-12)
    assert results[1]["diff"] == pytest.approx((g - g_prime).norm().item(), rel=1e-9)
    assert results[1]["cosine"] == pytest.approx(
        F.cosine_similarity(g.flatten(), g_prime.flatten(), dim=0).item(), rel=1e-9)
    assert results[1]["diff"] > 0


def test_gradient_ics_leaves_parameters_grads_buffers_and_rng_alone():
    model = tiny_net("noisy-bn:1")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()  # some existing .grad
    model.eval()
    before = snapshot(model)
    rng = torch.get_rng_state()
    gradient_ics(model, x, y, lr=1.0)
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert_unchanged(model, before)


@pytest.mark.slow
def test_ics_experiment_quick_grid_runs_and_probes_are_cached(synthetic_fashion, tmp_path,
                                                             monkeypatch):
    from bnlab.experiments import get_experiment
    from bnlab.experiments.runner import QUICK, run_experiment

    figures = check_saved_figures(monkeypatch)
    report = run_experiment(get_experiment("ics"), QUICK, tmp_path, synthetic_fashion,
                            progress=False)
    assert "Every probed replay ended on exactly its run's weights." in report
    assert "noisy BN 1" in report and "Gradient ICS, LeNet vs BN-LeNet at lr 0.1" in report
    caches = sorted(tmp_path.glob("runs/*/analysis/ics-probes.json"))
    assert len(caches) == len(get_experiment("ics").variants(QUICK))
    assert {"ics/ioffe_fig1.png", "ics/gradient_ics.png"} <= set(figures.problems)
    assert figures.failing == {}
    stamp = [c.stat().st_mtime_ns for c in caches]
    run_experiment(get_experiment("ics"), QUICK, tmp_path, synthetic_fashion, progress=False)
    assert [c.stat().st_mtime_ns for c in caches] == stamp  # nothing measured again


def test_a_probed_replay_ends_on_exactly_the_run_s_weights(synthetic_fashion, tmp_path):
    config = TrainConfig(val_size=200, model="bn-lenet", norm="noisy-bn:1", lr=0.1, batch_size=32, epochs=1,
                         subset=200, device="cpu")
    start_run(config, synthetic_fashion, tmp_path, progress=False).train()
    batches = []

    def probe(model, x, y, step):  # probes keep the trajectory: RNG forked, buffers restored
        with torch.random.fork_rng(), preserved_buffers(model):
            torch.rand(3)
            model.train()(x)
        batches.append(len(y))
        return {"n": len(y)}

    total = probed.total_steps(config, synthetic_fashion)
    assert total == 7  # 200 images in batches of 32
    replayed = probed.replay(config, synthetic_fashion, [0, 3, 6], probe, tmp_path / CHECKPOINT,
                             progress=False)
    assert [r["step"] for r in replayed["records"]] == [0, 3, 6] and batches == [32, 32, 8]
    assert replayed["reproduces_run"] is True
    other = dataclasses.replace(config, lr=0.2)
    assert probed.replay(other, synthetic_fashion, [], probe, tmp_path / CHECKPOINT,
                         progress=False)["reproduces_run"] is False


def test_a_cached_replay_trains_with_the_thread_count_each_epoch_recorded(synthetic_fashion,
                                                                          tmp_path):
    """On CPU the thread count changes how reductions round, so a replay run in a process
    with another count (an analysis after a --jobs 2 grid) must use the run's own."""
    config = TrainConfig(val_size=200, model="bn-lenet", norm="bnlab", lr=0.1, batch_size=32, epochs=2,
                         subset=100, device="cpu")
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        start_run(config, synthetic_fashion, tmp_path, progress=False).train()
        torch.set_num_threads(2)
        seen = []
        out = probed.cached_replay(tmp_path, "threads-probe", {}, synthetic_fashion,
                                   lambda c: [0, 5], lambda c: lambda m, x, y, s: seen.append(
                                       torch.get_num_threads()) or {})
        assert seen == [1, 1] and out["reproduces_run"] is True
        assert torch.get_num_threads() == 2  # the caller's count is back
        assert [row["threads"] for row in runs.load_run(tmp_path)["metrics"]] == [1, 1]
    finally:
        torch.set_num_threads(caller)
