"""Test-time adaptation with known answers: BN-adapt removes a mean shift of the input
exactly; Schneider's prior is the source at N = inf and BN-adapt at N = 0; TENT lowers
the entropy of the batch it steps on and touches only gamma and beta; models without
batch norm are the source model under every method; the given model is never changed."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.probes.adaptation import (
    AdaptiveBatchNorm,
    TentSettings,
    TestTimeAdapter,
    evaluate_stream,
    mixed_statistics,
    softmax_entropy,
    tent_optimizer,
    tent_parameters,
    tent_step,
    with_adaptive_batch_norms,
)
from bnlab.training.models import build_model

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def linear_bn_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), bnn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()


def set_source_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics := the biased statistics of ``x`` at the BN's input, so that the
    source model on ``x`` computes exactly what batch norm in training mode computes."""
    with torch.no_grad():
        h = model[0](x)  # (N, C) or (N, C, H, W)
        dims = [0, *range(2, h.dim())]
        var, mean = torch.var_mean(h, dim=dims, correction=0)
        model[1].running_mean.copy_(mean)
        model[1].running_var.copy_(var)


def shifted_case(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear + BN model whose source statistics are those of ``x``; the shift is constant."""
    model = linear_bn_model(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64) * 2 + 1  # (64, 5)
    set_source_statistics(model, x)
    shift = torch.randn(5, generator=g, dtype=torch.float64) * 3  # the same for every image
    return model.eval(), x, shift


def test_bn_adapt_removes_a_mean_shift_of_the_input_exactly() -> None:
    model, x, shift = shifted_case()
    with torch.no_grad():
        clean = model(x)
        shifted_source = model(x + shift)
    adapted = TestTimeAdapter(model, "bn-adapt")(x + shift)
    torch.testing.assert_close(adapted, clean, **TIGHT)
    assert (shifted_source - clean).abs().max() > 0.1  # the shift does matter to the source


def test_without_a_shift_bn_adapt_is_the_source_model() -> None:
    model, x, _ = shifted_case(1)
    with torch.no_grad():
        clean = model(x)
    torch.testing.assert_close(TestTimeAdapter(model, "bn-adapt")(x), clean, **TIGHT)


def test_bn_adapt_removes_a_per_channel_shift_after_a_convolution() -> None:
    """An unpadded conv turns a constant input shift into a per-channel constant: removed."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), bnn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 4)).double()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    set_source_statistics(model, x)
    model.eval()
    with torch.no_grad():
        clean = model(x)
    torch.testing.assert_close(TestTimeAdapter(model, "bn-adapt")(x + 0.7), clean, **TIGHT)


def test_bn_adapt_at_prior_zero_is_batch_norm_in_training_mode() -> None:
    model = build_model("bn-lenet", norm="bnlab").double()
    x = torch.rand(32, 1, 28, 28, dtype=torch.float64)
    train_mode = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = train_mode(x)
    torch.testing.assert_close(TestTimeAdapter(model, "bn-adapt", prior=0.0)(x), expected, **TIGHT)


def test_the_prior_mix_at_its_limits_and_in_between() -> None:
    model, x, shift = shifted_case(3)
    batch = x + shift
    with torch.no_grad():
        source = model(batch)
    adapt = TestTimeAdapter(model, "bn-adapt", prior=0.0)(batch)
    torch.testing.assert_close(TestTimeAdapter(model, "bn-adapt", prior=math.inf)(batch), source, **TIGHT)
    huge = TestTimeAdapter(model, "bn-adapt", prior=1e15)(batch)
    torch.testing.assert_close(huge, source, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(TestTimeAdapter(model, "bn-adapt", prior=1e-15)(batch), adapt,
                               rtol=1e-9, atol=1e-9)
    middle = TestTimeAdapter(model, "bn-adapt", prior=64.0)(batch)  # N = n: halfway
    assert (middle - source).abs().max() > 1e-3 and (middle - adapt).abs().max() > 1e-3


def test_mixed_statistics_weights_source_by_n_over_n_plus_batch() -> None:
    source_mean, source_var = torch.tensor([1.0]), torch.tensor([4.0])
    batch_mean, batch_var = torch.tensor([3.0]), torch.tensor([2.0])
    mean, var = mixed_statistics(source_mean, source_var, batch_mean, batch_var, n=8, prior=24)
    assert mean.item() == pytest.approx(0.75 * 1 + 0.25 * 3)
    assert var.item() == pytest.approx(0.75 * 4 + 0.25 * 2)
    with pytest.raises(ValueError, match="prior"):
        mixed_statistics(source_mean, source_var, batch_mean, batch_var, n=8, prior=-1)


def test_only_layers_with_running_statistics_are_replaced() -> None:
    model = build_model("bn-lenet", norm="bnlab")
    adapted, count = with_adaptive_batch_norms(model)
    assert count == 4
    assert sum(isinstance(m, AdaptiveBatchNorm) for m in adapted.modules()) == 4
    assert not any(isinstance(m, bnn.BatchNorm2d) for m in adapted.modules())
    torch_bn = build_model("bn-lenet", norm="torch")
    assert with_adaptive_batch_norms(torch_bn)[1] == 4


def test_softmax_entropy_closed_forms() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(softmax_entropy(logits), torch.tensor([math.log(4), 0.0]))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_tent_lowers_the_entropy_of_its_batch_and_touches_only_gamma_and_beta(optimizer) -> None:
    torch.manual_seed(4)
    model = build_model("bn-lenet", norm="bnlab").double()
    x = torch.rand(32, 1, 28, 28, dtype=torch.float64)
    adapted, _ = with_adaptive_batch_norms(model)
    params = tent_parameters(adapted)
    before = {name: p.detach().clone() for name, p in adapted.named_parameters()}
    buffers = {name: b.clone() for name, b in adapted.named_buffers()}
    settings = TentSettings(optimizer=optimizer, lr=1e-2)
    logits = tent_step(adapted, tent_optimizer(params, settings), x)
    with torch.no_grad():
        entropy_before = softmax_entropy(logits).mean()
        entropy_after = softmax_entropy(adapted(x)).mean()
    assert entropy_after < entropy_before
    changed = {name for name, p in adapted.named_parameters() if not torch.equal(p, before[name])}
    affine = {name for name, m in adapted.named_modules() if isinstance(m, AdaptiveBatchNorm)
              for name in (f"{name}.weight", f"{name}.bias")}
    assert changed and changed <= affine
    assert all(torch.equal(b, buffers[name]) for name, b in adapted.named_buffers())


def test_tent_predicts_with_the_forward_before_its_update() -> None:
    model = build_model("bn-lenet", norm="bnlab")
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        bn_adapt = TestTimeAdapter(model, "bn-adapt")(x)
    tent = TestTimeAdapter(model, "tent", tent=TentSettings(lr=0.1))
    torch.testing.assert_close(tent(x), bn_adapt)  # first batch: nothing learned yet
    assert not torch.allclose(tent(x), bn_adapt)  # the second sees the update


def test_reset_returns_tent_to_the_source_model_and_never_keeps_adapting() -> None:
    torch.manual_seed(5)
    model = build_model("bn-lenet", norm="bnlab")
    batches = [(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(3)]
    domains = [("a", batches), ("b", batches)]
    settings = TentSettings(lr=0.05)
    per_domain = evaluate_stream(model, domains, "tent", tent=settings, reset="domain")
    continual = evaluate_stream(model, domains, "tent", tent=settings, reset="never")
    assert per_domain.domains[0].correct == per_domain.domains[1].correct  # the same run twice
    assert per_domain.domains[0].correct == continual.domains[0].correct
    adapter = TestTimeAdapter(model, "tent", tent=settings)
    first = adapter(batches[0][0])
    adapter(batches[1][0])
    adapter.reset()
    torch.testing.assert_close(adapter(batches[0][0]), first)


@pytest.mark.parametrize("norm", ["group", "layer", "none"])
def test_models_without_batch_norm_are_the_source_model_under_every_method(norm) -> None:
    torch.manual_seed(6)
    model = build_model("bn-lenet", norm=norm)
    batches = [(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    with torch.no_grad():
        expected = [model.eval()(x) for x, _ in batches]
    for method in ("source", "bn-adapt", "tent"):
        adapter = TestTimeAdapter(model, method)
        assert adapter.adapted_layers == 0 and adapter.optimizer is None
        for (x, _), logits in zip(batches, expected):
            torch.testing.assert_close(adapter(x), logits)


def test_the_given_model_is_never_changed() -> None:
    torch.manual_seed(7)
    model = build_model("bn-lenet", norm="bnlab").train()
    state = copy.deepcopy(model.state_dict())
    batches = [(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    for method in ("source", "bn-adapt", "tent"):
        evaluate_stream(model, [("a", batches)], method, tent=TentSettings(lr=0.1))
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_source_is_the_model_in_eval_mode_and_results_count_images() -> None:
    torch.manual_seed(8)
    model = build_model("bn-lenet", norm="bnlab")
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    with torch.no_grad():
        correct = (model.eval()(x).argmax(1) == y).sum().item()
    result = evaluate_stream(model, [("clean", [(x[:6], y[:6]), (x[6:], y[6:])])], "source")
    assert (result.domains[0].images, result.domains[0].correct) == (10, correct)
    assert result.accuracy == pytest.approx(correct / 10) and result.error == pytest.approx(1 - correct / 10)


def test_bad_settings_are_refused() -> None:
    model = build_model("bn-lenet", norm="bnlab")
    with pytest.raises(ValueError, match="method"):
        TestTimeAdapter(model, "norm")
    with pytest.raises(ValueError, match="optimizer"):
        TentSettings(optimizer="rmsprop")
    with pytest.raises(ValueError, match="reset"):
        evaluate_stream(model, [], "source", reset="batch")
