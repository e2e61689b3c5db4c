"""bnlab.util.scoped: each temporary change is undone on exit, also when the block raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.util.scoped import in_mode, removing, restored_values


class Boom(Exception):
    pass


@pytest.mark.parametrize("start", [True, False])
@pytest.mark.parametrize("inside", [True, False])
def test_in_mode_sets_then_restores_every_submodule(start, inside):
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train(start)
    with pytest.raises(Boom), in_mode(model, inside):
        assert all(m.training == inside for m in model.modules())
        raise Boom
    assert all(m.training == start for m in model.modules())


def test_removing_removes_the_hooks_even_on_error():
    layer, calls = nn.Linear(2, 2), []
    handles = [layer.register_forward_hook(lambda *a: calls.append(1)),
               layer.register_forward_pre_hook(lambda *a: calls.append(2))]
    with pytest.raises(Boom), removing(handles):
        layer(torch.ones(1, 2))
        raise Boom
    layer(torch.ones(1, 2))
    assert calls == [2, 1]


def test_restored_values_yields_copies_and_puts_them_back():
    layer = nn.Linear(3, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    with pytest.raises(Boom), restored_values(layer.parameters()) as saved:
        for s, b in zip(saved, before):
            assert torch.equal(s, b)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(1.0)
        assert not torch.equal(saved[0], layer.weight)  # copies, not the live tensors
        raise Boom
    for p, b in zip(layer.parameters(), before):
        assert torch.equal(p, b)
