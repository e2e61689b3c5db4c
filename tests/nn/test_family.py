"""Ghost BN, batch renormalization and frozen BN, each against an independent reference:
torch's BatchNorm on each chunk in turn, the renorm formula in closed form (float64, stop
gradient by ``detach``), torch's BatchNorm in eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.nn import BatchNorm1d, BatchNorm2d
from bnlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, freeze_batch_norm, unfreeze_batch_norm
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.nn.renorm import PAPER_D_MAX, PAPER_R_MAX, BatchRenorm1d, BatchRenorm2d, Ramp
from tests.helpers import DEVICES

TIGHT = {"rtol": 1e-12, "atol": 1e-12}
G = torch.Generator().manual_seed(0)


def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64) * scale + shift


def set_affine(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)


def buffers_of(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.named_buffers()}


def assert_same_buffers(before: dict[str, torch.Tensor], layer: nn.Module) -> None:
    after = dict(layer.named_buffers())
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


# ---------------------------------------------------------------- ghost batch norm

GHOST_CASES = [  # (ghost class, torch class, input shape, virtual batch size)
    (GhostBatchNorm1d, nn.BatchNorm1d, (10, 3), 4),       # chunks 4, 4, 2
    (GhostBatchNorm1d, nn.BatchNorm1d, (8, 3, 5), 3),     # chunks 3, 3, 2
    (GhostBatchNorm2d, nn.BatchNorm2d, (9, 3, 2, 2), 4),  # chunks 4, 4, 1 (4 values each)
    (GhostBatchNorm2d, nn.BatchNorm2d, (8, 2, 3, 3), 8),  # one chunk: plain batch norm
]


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize(("cls", "torch_cls", "shape", "v"), GHOST_CASES)
def test_ghost_equals_torch_batch_norm_on_each_chunk_in_turn(cls, torch_cls, shape, v, impl) -> None:
    channels = shape[1]
    ghost = cls(channels, v, dtype=torch.float64, impl=impl)
    ref = torch_cls(channels, dtype=torch.float64)
    weight, bias = randn(channels, shift=1.0), randn(channels)
    set_affine(ghost, weight, bias)
    set_affine(ref, weight, bias)
    for _ in range(2):
        x = randn(*shape, scale=2.0, shift=0.5).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        dy = randn(*shape)
        y = ghost(x)
        y_ref = torch.cat([ref(chunk) for chunk in torch.split(x_ref, v)])
        torch.testing.assert_close(y, y_ref, **TIGHT)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x.grad, x_ref.grad, **TIGHT)
        torch.testing.assert_close(ghost.weight.grad, ref.weight.grad, **TIGHT)
        torch.testing.assert_close(ghost.bias.grad, ref.bias.grad, **TIGHT)
    ghost.eval()
    x = randn(*shape)
    expected = F.batch_norm(x, ghost.running_mean, ghost.running_var, weight, bias, False)
    torch.testing.assert_close(ghost(x), expected, **TIGHT)  # prediction: plain batch norm


def _chunk_moments(x: torch.Tensor, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of ghost.py, written out independently: per chunk the mean and the
    unbiased variance of each channel's values, averaged with weights n_k / N."""
    mean, var = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in torch.split(x, v):
        values = chunk.transpose(0, 1).reshape(x.shape[1], -1)  # (C, values of the chunk)
        m = values.shape[1]
        chunk_mean = values.sum(1) / m
        chunk_var = ((values - chunk_mean[:, None]) ** 2).sum(1) / (m - 1)
        mean += chunk_mean * len(chunk) / len(x)
        var += chunk_var * len(chunk) / len(x)
    return mean, var


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize(("cls", "torch_cls", "shape", "v"), GHOST_CASES)
def test_ghost_running_statistics_take_one_update_per_step_from_the_chunks_mean_statistics(
        cls, torch_cls, shape, v, impl, momentum) -> None:
    ghost = cls(shape[1], v, momentum=momentum, dtype=torch.float64, impl=impl)
    batches = [randn(*shape, scale=1.0 + t, shift=t - 1.0) for t in range(3)]
    for x in batches:
        ghost(x)
    steps = [_chunk_moments(x, v) for x in batches]
    # Closed form of the average from (0, 1): sum_t w_t s_t + (1 - momentum)^T * start, with
    # w_t = momentum (1 - momentum)^(T - t); momentum None: the plain mean over steps.
    T = len(steps)
    w = [1 / T] * T if momentum is None else [momentum * (1 - momentum) ** (T - 1 - t) for t in range(T)]
    rest = 0.0 if momentum is None else (1 - momentum) ** T
    expected_mean = sum(wt * s[0] for wt, s in zip(w, steps))
    expected_var = sum(wt * s[1] for wt, s in zip(w, steps)) + rest
    torch.testing.assert_close(ghost.running_mean, expected_mean, **TIGHT)
    torch.testing.assert_close(ghost.running_var, expected_var, **TIGHT)
    assert int(ghost.num_batches_tracked) == T  # one per step, not per chunk
    if v >= shape[0]:  # one chunk: batch norm's own update
        ref = torch_cls(shape[1], momentum=momentum, dtype=torch.float64)
        for x in batches:
            ref(x)
        torch.testing.assert_close(ghost.running_mean, ref.running_mean, **TIGHT)
        torch.testing.assert_close(ghost.running_var, ref.running_var, **TIGHT)


def test_ghost_running_statistics_are_as_precise_at_v_2_as_batch_norm_at_the_whole_batch() -> None:
    """i.i.d. N(3, 4) batches of 128 with fixed statistics: at V = 2 the running mean is batch
    norm's exactly (equal chunks: the mean of chunk means is the batch mean), and the running
    variance scatters around the true 4 about as little as batch norm's (64 chunks of 1
    degree of freedom against 127: sqrt(127/64) ~ 1.4 times), where one update per chunk
    would scatter ~10 times as much (an average over ~20 chunks of 2 samples)."""
    gen = torch.Generator().manual_seed(1)
    ghost, plain = GhostBatchNorm1d(8, 2, dtype=torch.float64), BatchNorm1d(8, dtype=torch.float64)
    spreads: dict[str, list[torch.Tensor]] = {"ghost": [], "plain": []}
    for step in range(400):
        x = torch.randn(128, 8, generator=gen, dtype=torch.float64) * 2 + 3
        ghost(x)
        plain(x)
        torch.testing.assert_close(ghost.running_mean, plain.running_mean, rtol=1e-12, atol=1e-12)
        if step >= 100:  # after the start (0, 1) has faded
            spreads["ghost"].append(ghost.running_var - 4)
            spreads["plain"].append(plain.running_var - 4)
    rms = {k: torch.stack(v).pow(2).mean().sqrt().item() for k, v in spreads.items()}
    assert rms["plain"] < rms["ghost"] < 2 * rms["plain"], rms


def test_ghost_without_running_stats_uses_chunk_statistics_in_both_modes() -> None:
    ghost = GhostBatchNorm1d(3, 4, track_running_stats=False, dtype=torch.float64)
    x = randn(10, 3)
    expected = torch.cat([F.batch_norm(c, None, None, ghost.weight, ghost.bias, True)
                          for c in torch.split(x, 4)])
    torch.testing.assert_close(ghost(x), expected, **TIGHT)
    torch.testing.assert_close(ghost.eval()(x), expected, **TIGHT)


def test_ghost_chunk_of_one_value_per_channel_is_an_error_and_nothing_moves() -> None:
    ghost = GhostBatchNorm1d(3, 4, dtype=torch.float64)
    before = buffers_of(ghost)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ghost(randn(9, 3))  # chunks 4, 4, 1: the last has one value per channel
    assert_same_buffers(before, ghost)


@pytest.mark.parametrize("bad", [1, 0, -4, 2.5, True])
def test_ghost_virtual_batch_size_below_two_is_an_error(bad) -> None:
    with pytest.raises(ValueError, match="virtual_batch_size must be an integer >= 2"):
        GhostBatchNorm2d(4, bad)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_ghost_gradcheck(impl: str) -> None:
    ghost = GhostBatchNorm2d(2, 3, dtype=torch.float64, impl=impl)
    x = randn(7, 2, 2, 2).requires_grad_()  # chunks 3, 3, 1
    w = randn(2, shift=1.0).requires_grad_()
    b = randn(2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: forward_with_affine(ghost, x, w, b), (x, w, b))


def forward_with_affine(layer: nn.Module, x, w, b):
    """The layer's forward with weight/bias given as plain tensors (for gradcheck)."""
    saved = layer.weight, layer.bias
    del layer.weight, layer.bias
    layer.weight, layer.bias = w, b
    try:
        return layer(x)
    finally:
        del layer.weight, layer.bias
        layer.weight, layer.bias = saved


# ---------------------------------------------------------------- batch renormalization


def renorm_formula(x, mean, var, gamma, beta, r_max, d_max, eps=1e-5, stop_gradient=True):
    """Ioffe (2017)'s training output, written out in float64; r, d detached when asked."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(var + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b - mean) / sigma, -d_max, d_max)
    if stop_gradient:
        r, d = r.detach(), d.detach()
    x_hat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape)
    return gamma.reshape(shape) * (x_hat * r.reshape(shape) + d.reshape(shape)) + beta.reshape(shape)


RENORM_CASES = [  # running statistics chosen so that r and d are inside or outside the bounds
    ("inactive", 0.5, 4.0),   # batch (mean 0.5, var 4): r = 1, d = 0 exactly inside
    ("r-clipped", 0.5, 100.0),  # sigma_B / sigma = 0.2 < 1/3
    ("d-clipped", 30.0, 4.0),   # (mu_B - mu) / sigma = -14.75 < -5
]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize(("case", "mean", "var"), RENORM_CASES)
@pytest.mark.parametrize(("cls", "shape"), [(BatchRenorm1d, (16, 3)), (BatchRenorm2d, (6, 3, 3, 3))])
def test_renorm_equals_closed_form_with_stop_gradient(cls, shape, case, mean, var, impl,
                                                      affine) -> None:
    channels = shape[1]
    layer = cls(channels, r_max=3.0, d_max=5.0, warmup_steps=0, affine=affine,
                dtype=torch.float64, impl=impl)
    gamma = randn(channels, shift=1.0) if affine else torch.ones(channels, dtype=torch.float64)
    beta = randn(channels) if affine else torch.zeros(channels, dtype=torch.float64)
    if affine:
        set_affine(layer, gamma, beta)
    with torch.no_grad():
        layer.running_mean.fill_(mean)
        layer.running_var.fill_(var)
    x = randn(*shape, scale=2.0, shift=0.5).requires_grad_()
    r, d = layer.corrections(x)
    clipped_r = bool(((r - 3.0).abs() < 1e-12).any() | ((r - 1 / 3).abs() < 1e-12).any())
    clipped_d = bool(((d.abs() - 5.0).abs() < 1e-12).any())
    assert (clipped_r, clipped_d) == {"inactive": (False, False), "r-clipped": (True, False),
                                      "d-clipped": (False, True)}[case]

    x_ref = x.detach().clone().requires_grad_()
    g_ref, b_ref = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    run_mean, run_var = layer.running_mean.clone(), layer.running_var.clone()
    expected = renorm_formula(x_ref, run_mean, run_var, g_ref, b_ref, 3.0, 5.0)
    y = layer(x)
    torch.testing.assert_close(y, expected, **TIGHT)
    dy = randn(*shape)
    y.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **TIGHT)
    if affine:
        torch.testing.assert_close(layer.weight.grad, g_ref.grad, **TIGHT)
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, **TIGHT)
    # The stop-gradient matters: without it the input gradient differs (so the check bites).
    x_free = x.detach().clone().requires_grad_()
    renorm_formula(x_free, run_mean, run_var, gamma, beta, 3.0, 5.0,
                   stop_gradient=False).backward(dy)
    if case == "inactive":
        assert not torch.allclose(x_free.grad, x_ref.grad, rtol=1e-6, atol=1e-8)
    # Running statistics move as batch norm's, from the batch's statistics.
    dims = [0, *range(2, len(shape))]
    n = x.numel() // channels
    torch.testing.assert_close(layer.running_mean, 0.9 * run_mean + 0.1 * x.detach().mean(dims),
                               **TIGHT)
    torch.testing.assert_close(
        layer.running_var, 0.9 * run_var + 0.1 * x.detach().var(dims, unbiased=False) * n / (n - 1),
        **TIGHT)


def test_renorm_is_plain_batch_norm_during_warmup_then_renormalizes() -> None:
    layer = BatchRenorm1d(3, warmup_steps=2, dtype=torch.float64)
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    for step in range(3):
        x = randn(8, 3, scale=3.0, shift=2.0)
        mean, var = layer.running_mean.clone(), layer.running_var.clone()
        y = layer(x)
        if step < 2:
            torch.testing.assert_close(y, ref(x), **TIGHT)
        else:
            expected = renorm_formula(x, mean, var, torch.ones(3, dtype=torch.float64),
                                      torch.zeros(3, dtype=torch.float64), 3.0, 5.0)
            torch.testing.assert_close(y, expected, **TIGHT)
            assert not torch.allclose(y, ref(x), atol=1e-3)
    assert int(layer.num_batches_tracked) == 3


def test_renorm_eval_is_batch_norm_with_running_statistics() -> None:
    layer = BatchRenorm2d(3, warmup_steps=0, dtype=torch.float64)
    set_affine(layer, randn(3), randn(3))
    layer(randn(4, 3, 2, 2, scale=2.0))
    x = randn(4, 3, 2, 2)
    expected = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                            layer.bias, False)
    torch.testing.assert_close(layer.eval()(x), expected, **TIGHT)


def test_renorm_schedules_are_called_with_the_step() -> None:
    assert (PAPER_R_MAX(0), PAPER_R_MAX(5000), PAPER_R_MAX(25000), PAPER_R_MAX(10**6)) == (
        1.0, 1.0, 2.0, 3.0)
    assert (PAPER_D_MAX(5000), PAPER_D_MAX(17500), PAPER_D_MAX(30000)) == (0.0, 2.5, 5.0)
    steps = []
    layer = BatchRenorm1d(3, r_max=lambda s: steps.append(s) or 1.0, d_max=0.0, warmup_steps=0,
                          dtype=torch.float64)
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    for _ in range(2):  # r_max = 1, d_max = 0: batch norm exactly
        x = randn(8, 3, scale=3.0)
        torch.testing.assert_close(layer(x), ref(x), **TIGHT)
    assert steps[-2:] == [0, 1]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"r_max": 0.5}, "r_max must be a finite number >= 1"),
    ({"d_max": -1.0}, "d_max must be a finite number >= 0"),
    ({"r_max": Ramp(1.0, 0.5, 0, 10)}, "r_max .* at the end of the ramp"),
    ({"d_max": Ramp(0.0, -2.0, 0, 10)}, "d_max .* at the end of the ramp"),
    ({"track_running_stats": False}, "needs running statistics"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
])
def test_renorm_bad_bounds_are_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        BatchRenorm1d(3, **kwargs)


def test_renorm_schedule_going_out_of_range_is_an_error_and_nothing_moves() -> None:
    layer = BatchRenorm1d(3, r_max=lambda step: 3.0 if step < 1 else 0.5, warmup_steps=0)
    layer(torch.randn(8, 3))  # step 0: r_max 3
    before = buffers_of(layer)
    with pytest.raises(ValueError, match=r"r_max must be a finite number >= 1 .*got 0.5 at step 1"):
        layer(torch.randn(8, 3))
    assert_same_buffers(before, layer)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_renorm_gradcheck_where_r_and_d_are_clipped(impl: str) -> None:
    # gradcheck's numerical derivative also sees r and d move with x, which the stop-gradient
    # hides on purpose; with every r and d at its bound they are constant near x, so there
    # the analytic backward must equal the true derivative (unclipped: the closed-form test).
    layer = BatchRenorm2d(2, r_max=1.5, d_max=0.5, warmup_steps=0, dtype=torch.float64,
                          impl=impl, momentum=0.0)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([10.0, -20.0]))
        layer.running_var.copy_(torch.tensor([0.5, 100.0]))
    x = randn(4, 2, 2, 2, scale=2.0).requires_grad_()
    r, d = layer.corrections(x)
    assert torch.equal(r, torch.tensor([1.5, 1 / 1.5], dtype=torch.float64))
    assert torch.equal(d, torch.tensor([-0.5, 0.5], dtype=torch.float64))
    w = randn(2, shift=1.0).requires_grad_()
    b = randn(2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: forward_with_affine(layer, x, w, b), (x, w, b))


# ---------------------------------------------------------------- frozen batch norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("cls", "torch_cls", "shape"), [
    (FrozenBatchNorm1d, nn.BatchNorm1d, (6, 4)), (FrozenBatchNorm2d, nn.BatchNorm2d, (3, 4, 2, 2))])
def test_frozen_is_torch_batch_norm_in_eval_in_every_mode_and_changes_nothing(
        cls, torch_cls, shape, device) -> None:
    ref = torch_cls(4, dtype=torch.float64, device=device)
    ref(randn(8, *shape[1:], scale=2.0, shift=1.0).to(device))  # non-trivial statistics
    set_affine(ref, randn(4), randn(4))
    frozen = cls(4, dtype=torch.float64, device=device)
    frozen.load_state_dict(ref.state_dict())
    ref.eval()
    assert list(frozen.parameters()) == []
    for mode in (True, False):
        frozen.train(mode)
        before = buffers_of(frozen)
        x = randn(*shape).to(device).requires_grad_()
        y = frozen(x)
        torch.testing.assert_close(y, ref(x), **TIGHT)
        assert_same_buffers(before, frozen)
        y.sum().backward()
        assert x.grad is not None


def test_frozen_state_dict_loads_both_ways_with_batch_norm() -> None:
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    frozen = FrozenBatchNorm2d(3)
    result = frozen.load_state_dict(bn.state_dict())  # num_batches_tracked accepted
    assert not result.missing_keys and not result.unexpected_keys
    assert set(frozen.state_dict()) == set(bn.state_dict()) - {"num_batches_tracked"}
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, bn.state_dict()[key])
    for target in (nn.BatchNorm2d(3), BatchNorm2d(3)):
        target.load_state_dict(frozen.state_dict())  # strict
        for key, value in frozen.state_dict().items():
            assert torch.equal(target.state_dict()[key], value)
    no_affine = nn.BatchNorm1d(3, affine=False)
    FrozenBatchNorm1d(3, affine=False).load_state_dict(no_affine.state_dict())
    nn.BatchNorm1d(3, affine=False).load_state_dict(FrozenBatchNorm1d(3, affine=False).state_dict())


def make_mixed_model(dtype=torch.float64, device="cpu") -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), BatchNorm2d(3, impl="reference"),
                          nn.Flatten(), nn.Linear(12, 5), GhostBatchNorm1d(5, 4),
                          BatchRenorm1d(5, r_max=2.0, warmup_steps=1)).to(device, dtype)
    model(torch.randn(8, 2, 4, 4, dtype=dtype, device=device))
    model(torch.randn(8, 2, 4, 4, dtype=dtype, device=device))
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_freeze_then_unfreeze_keeps_state_device_dtype_and_classes(device) -> None:
    model = make_mixed_model(device=device)
    bns = [1, 2, 5, 6]
    originals = {i: (type(model[i]), {k: v.clone() for k, v in model[i].state_dict().items()})
                 for i in bns}
    model[2].eval()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64, device=device)
    expected = model.eval()(x)
    model.train()
    model[2].eval()
    freeze_batch_norm(model)
    for i in bns:
        assert isinstance(model[i], FrozenBatchNorm2d if i < 3 else FrozenBatchNorm1d)
        assert model[i].running_mean.dtype == torch.float64
        assert model[i].running_mean.device.type == device
    assert [m.training for m in model] == [True, True, False, True, True, True, True]
    torch.testing.assert_close(model(x), expected, **TIGHT)  # frozen: eval output in train mode
    unfreeze_batch_norm(model)
    for i in bns:
        cls, state = originals[i]
        assert type(model[i]) is cls
        for key, value in state.items():
            assert torch.equal(model[i].state_dict()[key], value), (i, key)
        assert all(p.requires_grad and p.device.type == device for p in model[i].parameters())
    assert model[2].impl == "reference" and not model[2].training
    assert model[5].virtual_batch_size == 4
    assert (model[6].r_max, model[6].warmup_steps) == (2.0, 1)


def test_freeze_refuses_batch_norm_without_running_statistics_and_changes_nothing() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics"):
        freeze_batch_norm(model)
    assert isinstance(model[0], nn.BatchNorm1d)


def test_freeze_a_lone_batch_norm_returns_the_frozen_root() -> None:
    frozen = freeze_batch_norm(BatchNorm1d(3))
    assert isinstance(frozen, FrozenBatchNorm1d)
    assert isinstance(unfreeze_batch_norm(frozen), BatchNorm1d)


# ---------------------------------------------------------------- the norm registry


@pytest.mark.parametrize(("norm", "epochs", "accuracy"), [("ghost", 1, 0.5), ("renorm", 3, 0.5),
                                                          ("frozen", 1, None)])
def test_train_with_the_family_norms(synthetic_fashion, norm, epochs, accuracy) -> None:
    from bnlab.cli import build_parser
    from bnlab.training.train import TrainConfig, start_run

    assert build_parser().parse_args(["train", "--norm", norm]).norm == norm
    config = TrainConfig(val_size=200, norm=norm, epochs=epochs, batch_size=32, lr=0.5, eval_batch_size=100,
                         device="cpu", seed=0)
    summary = start_run(config, synthetic_fashion, progress=False).train()
    assert not summary["diverged"]
    if accuracy is not None:  # frozen fresh layers: training without normalization
        assert summary["final_val_acc"] > accuracy


def test_frozen_registry_layers_stay_fixed_through_a_training_step() -> None:
    from bnlab.training.models import build_model

    model = build_model("bn-lenet", "frozen").train()
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm1d | FrozenBatchNorm2d)]
    assert len(frozen) == 4
    before = [buffers_of(m) for m in frozen]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.functional.cross_entropy(model(torch.rand(8, 1, 28, 28)), torch.arange(8)).backward()
    optimizer.step()
    for state, m in zip(before, frozen):
        assert_same_buffers(state, m)
