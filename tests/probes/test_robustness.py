"""Noise/FGSM/PGD accuracy: zero size is clean accuracy, attacks hurt, no side effects."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnlab.data.loader import Loader
from bnlab.probes.robustness import (
    STATISTICS,
    fgsm_accuracy,
    gaussian_noise,
    input_gradient,
    noise_accuracy,
    noise_accuracy_by_statistics,
    perturbed_accuracy,
    pgd_accuracy,
)
from bnlab.training.models import build_model
from bnlab.training.train import evaluate, make_step
from tests.helpers import buffers

EPSILONS = [0.0, 0.02, 0.05, 0.1]


@pytest.fixture(scope="module")
def trained(synthetic_fashion) -> tuple[nn.Module, Loader]:
    """BN-LeNet (bnlab BN) after 20 SGD steps on the synthetic data, and a test loader."""
    torch.manual_seed(0)
    model = build_model("bn-lenet", norm="bnlab").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train = Loader(synthetic_fashion.train_images, synthetic_fashion.train_labels, 64, seed=0)
    step = make_step(model, optimizer)
    for epoch in range(2):
        train.set_epoch(epoch)
        for x, y in train:
            step(x, y)
    optimizer.zero_grad(set_to_none=True)
    test = Loader(synthetic_fashion.test_images, synthetic_fashion.test_labels, 100, shuffle=False)
    return model, test


def test_the_fixture_model_learned(trained) -> None:
    model, test = trained
    assert evaluate(model, test)[1] > 0.8


def test_zero_perturbation_is_clean_accuracy(trained) -> None:
    model, test = trained
    clean = evaluate(model, test)[1]
    assert noise_accuracy(model, test, [0.0]) == [(0.0, clean)]
    assert fgsm_accuracy(model, test, [0.0]) == [(0.0, clean)]
    assert pgd_accuracy(model, test, [0.0], steps=2) == [(0.0, clean)]


def test_fgsm_accuracy_falls_and_pgd_is_at_least_as_strong(trained) -> None:
    model, test = trained
    fgsm = fgsm_accuracy(model, test, EPSILONS)
    pgd = pgd_accuracy(model, test, EPSILONS, steps=5, seed=0)
    assert [eps for eps, _ in fgsm] == EPSILONS
    fgsm_acc = [acc for _, acc in fgsm]
    assert all(later <= earlier + 0.02 for earlier, later in zip(fgsm_acc, fgsm_acc[1:]))
    assert fgsm_acc[-1] < fgsm_acc[0] - 0.3
    for (_, f), (_, p) in zip(fgsm, pgd):
        assert p <= f + 0.02


def test_noise_is_deterministic_per_seed_and_hurts_when_large(trained) -> None:
    model, test = trained
    sigmas = [0.0, 0.3, 1.0]
    first = noise_accuracy(model, test, sigmas, seed=3)
    assert noise_accuracy(model, test, sigmas, seed=3) == first
    assert first[-1][1] < first[0][1]


@pytest.mark.parametrize("mode", [True, False])
def test_mode_buffers_and_grads_are_left_as_they_were(trained, mode: bool) -> None:
    model, test = trained
    model.train(mode)
    before = buffers(model)
    noise_accuracy(model, test, [0.1], max_batches=1)
    fgsm_accuracy(model, test, [0.1], max_batches=1)
    pgd_accuracy(model, test, [0.1], steps=2, max_batches=1)
    assert model.training is mode
    assert all(torch.equal(old, new) for old, new in zip(before, model.buffers()))
    assert all(p.grad is None for p in model.parameters())


def test_input_gradient_through_bnlab_bn_in_eval_mode(trained) -> None:
    """The chapter's scratch BN chooses statistics by grad mode; bnlab's follows
    module.training, so eval mode with autograd on is still the evaluated function."""
    model, test = trained
    model.eval()
    x, y = next(iter(test))
    before = buffers(model)
    with torch.no_grad():
        gradient = input_gradient(model, x, y)  # works under an outer no_grad too
        no_grad_logits = model(x)
    assert gradient.shape == x.shape and gradient.abs().sum() > 0
    with torch.enable_grad():
        torch.testing.assert_close(model(x.requires_grad_(True)).detach(), no_grad_logits)
    assert all(torch.equal(old, new) for old, new in zip(before, model.buffers()))


def test_max_batches_caps_the_work(trained) -> None:
    model, test = trained
    calls = []
    original_forward = model.forward
    model.forward = lambda x: calls.append(len(x)) or original_forward(x)
    try:
        fgsm_accuracy(model, test, [0.1], max_batches=1)
    finally:
        del model.forward
    assert calls == [100, 100]  # one gradient and one scoring forward of one batch


def test_negative_sizes_are_refused(trained) -> None:
    model, test = trained
    with pytest.raises(ValueError, match=r"expected epsilon >= 0 \(got -0.1\)"):
        fgsm_accuracy(model, test, [-0.1])
    with pytest.raises(ValueError, match=r"expected steps >= 1 \(got 0\)"):
        pgd_accuracy(model, test, [0.1], steps=0)


def test_adaptive_bn_on_unshifted_data_is_population_statistics_evaluation() -> None:
    """Re-estimating the statistics on clean images (sigma 0) that are the population the
    'precise' statistics come from is the same function: 'adapted' equals 'precise', and,
    for a model whose running statistics are those population statistics, 'running' too."""
    from bnlab.nn.precise import update_bn_stats

    torch.manual_seed(0)
    model = build_model("bn-lenet", norm="bnlab")
    data = batches(4, batch_size=50)
    update_bn_stats(model, data, num_batches=4, progress=False)
    model.eval()
    before = buffers(model)
    (sigma, accuracies), = noise_accuracy_by_statistics(model, data, [0.0], clean=data)
    assert sigma == 0.0 and set(accuracies) == set(STATISTICS)
    assert accuracies["adapted"] == accuracies["precise"] == accuracies["running"]
    assert accuracies["running"] == perturbed_accuracy(model, data, lambda x, y: x)
    assert not model.training
    for old, new in zip(before, model.buffers()):
        assert torch.equal(old, new)


def test_each_statistics_source_is_the_model_it_names() -> None:
    """Running statistics of another domain (all-zero images); 'precise' is the model
    re-estimated on the clean images, 'adapted' the one re-estimated on exactly the noisy
    images it is evaluated on (the draws of gaussian_noise), 'running' the model as it is."""
    from bnlab.nn.precise import update_bn_stats

    torch.manual_seed(0)
    model = build_model("bn-lenet", norm="bnlab")
    data, clean = batches(4, batch_size=50), batches(3, batch_size=40, seed=2)
    update_bn_stats(model, [torch.zeros(50, 1, 28, 28)], num_batches=1, progress=False)
    (_, accuracies), = noise_accuracy_by_statistics(model, data, [0.1], clean=clean)
    noise = gaussian_noise(0.1, 0)  # one generator for all batches, as in the measurement
    noisy = [(noise(x, y), y) for x, y in data]

    def reestimated(on):
        return update_bn_stats(copy.deepcopy(model), on, num_batches=len(on), progress=False)

    identity = lambda x, y: x  # noqa: E731
    assert accuracies["adapted"] == perturbed_accuracy(reestimated(noisy), noisy, identity)
    assert accuracies["precise"] == perturbed_accuracy(reestimated(clean), noisy, identity)
    assert accuracies["running"] == perturbed_accuracy(model, noisy, identity)


def test_without_batch_norm_the_statistics_sources_agree() -> None:
    torch.manual_seed(0)
    model = build_model("bn-lenet", norm="none")
    data = batches(2, batch_size=50)
    for sigma, accuracies in noise_accuracy_by_statistics(model, data, [0.0, 0.3], clean=data):
        assert len(set(accuracies.values())) == 1
        assert accuracies["running"] == dict(noise_accuracy(model, data, [sigma]))[sigma]


def batches(n: int, batch_size: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed batches of uniform images in [0, 1] with class-cycling labels."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch_size, 1, 28, 28, generator=g), torch.arange(batch_size) % 10)
            for _ in range(n)]
