"""update_bn_stats and population_statistics: the running statistics become the whole
dataset's statistics of each BN input (computed here by hand, all batches at once, in
float64); nothing else changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.nn import BatchNorm2d
from bnlab.nn.precise import population_statistics, update_bn_stats

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


class Counter(nn.Module):
    """A non-BN module with a buffer that its forward changes (must be restored)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5), Counter(),
        nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)).double()
    model.train()
    for _ in range(3):  # running statistics far from the population's
        model(torch.randn(6, 2, 4, 4, dtype=torch.float64) * 3 + 1)
    return model


def population_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel of all of ``x`` at once."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=True)


def expected_stats(model: nn.Sequential, batches: list[torch.Tensor]):
    """Both BN inputs over the whole dataset; the second BN's input as the first BN (batch
    statistics) and the rest of the model compute it per batch, dropout off."""
    with torch.no_grad():
        conv = [model[0](x) for x in batches]
        second = [model[6](torch.flatten(F.relu(F.batch_norm(
            c, None, None, model[1].weight, model[1].bias, True)), 1)) for c in conv]
    return population_stats(torch.cat(conv)), population_stats(torch.cat(second))


@pytest.mark.parametrize("sizes", [[8, 8, 8], [5, 11, 2, 7]])
def test_update_bn_stats_equals_whole_dataset_statistics(sizes: list[int]) -> None:
    model = make_model()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1 for n in sizes]
    labelled = [(x, torch.zeros(len(x))) for x in batches]  # (input, label) batches work
    (mean1, var1), (mean2, var2) = expected_stats(model, batches)

    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    tracked = (model[1].num_batches_tracked.clone(), model[7].num_batches_tracked.clone())
    model[3].eval()  # a mixed set of modes, to be restored as it was
    modes = [m.training for m in model.modules()]

    assert update_bn_stats(model, iter(labelled), progress=False) is model
    torch.testing.assert_close(model[1].running_mean, mean1, **TIGHT)
    torch.testing.assert_close(model[1].running_var, var1, **TIGHT)
    torch.testing.assert_close(model[7].running_mean, mean2, **TIGHT)
    torch.testing.assert_close(model[7].running_var, var2, **TIGHT)
    assert [m.training for m in model.modules()] == modes
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]) and torch.equal(p.grad, grads[k]), k
    assert float(model[4].calls) == 3.0  # other buffers restored
    assert (model[1].num_batches_tracked, model[7].num_batches_tracked) == tracked


def test_update_bn_stats_uses_the_first_num_batches() -> None:
    model = make_model()
    batches = [torch.randn(4, 2, 4, 4, dtype=torch.float64) for _ in range(5)]
    (mean1, var1), _ = expected_stats(model, batches[:2])
    update_bn_stats(model, batches, num_batches=2, progress=False)
    torch.testing.assert_close(model[1].running_mean, mean1, **TIGHT)
    torch.testing.assert_close(model[1].running_var, var1, **TIGHT)


def test_update_bn_stats_is_exact_for_a_large_mean() -> None:
    bn = nn.BatchNorm1d(2, dtype=torch.float64)
    data = torch.randn(300, 2, dtype=torch.float64) * 1e-3 + 1e4
    update_bn_stats(bn, list(data.split(7)), progress=False)
    torch.testing.assert_close(bn.running_mean, data.mean(0), **TIGHT)
    torch.testing.assert_close(bn.running_var, data.var(0), rtol=1e-9, atol=0)


def test_update_bn_stats_with_no_batches_is_an_error_and_changes_nothing() -> None:
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    with pytest.raises(ValueError, match="got no batches"):
        update_bn_stats(model, [], progress=False)
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1"):
        update_bn_stats(model, [torch.randn(4, 2, 4, 4)], num_batches=0, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes


def test_update_bn_stats_without_batch_norm_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="no batch-norm layer with running statistics"):
        update_bn_stats(model, [torch.randn(4, 3)], progress=False)


def test_population_statistics_give_each_prefix_of_one_pass_and_leave_the_model_alone() -> None:
    model = make_model()
    batches = [torch.randn(n, 2, 4, 4, dtype=torch.float64) * 2 - 1 for n in (4, 7, 3, 6)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = []
    hook = model[0].register_forward_hook(lambda *_: forwards.append(1))
    per_count = population_statistics(model, batches, [3, 1, 9])
    hook.remove()
    assert len(forwards) == len(batches)  # one pass, up to the largest count (past the end: all)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for count, stats in zip([3, 1, len(batches)], per_count):
        (mean1, var1), (mean2, var2) = expected_stats(model, batches[:count])
        assert set(stats) == {"1", "7"}
        torch.testing.assert_close(stats["1"][0], mean1, **TIGHT)
        torch.testing.assert_close(stats["1"][1], var1, **TIGHT)
        torch.testing.assert_close(stats["7"][0], mean2, **TIGHT)
        torch.testing.assert_close(stats["7"][1], var2, **TIGHT)
    for bad in ([], [0], [2, True]):
        with pytest.raises(ValueError, match="integers >= 1"):
            population_statistics(model, batches, bad)
