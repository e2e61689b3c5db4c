"""The lab's models with bnlab's batch norm fused with the activation after it (the default)
and without: the same layer indices, state_dict keys and weights, bit-identical training
and evaluation, the config hash of a default run unchanged, and the probes that hook
activations seeing the same values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab.nn as bnn
from bnlab.probes.gradients import activation_stats
from bnlab.probes.ics import last_activation_input
from bnlab.training.models import build_model
from bnlab.training.train import TrainConfig
from bnlab.util.config import config_from_dict, config_to_dict

MODELS = [("bn-lenet", {}, 64), ("ioffe-mlp", {}, 60),
          ("deep-mlp", {"depth": 4, "width": 24, "activation": "relu"}, 32),
          ("deep-cnn", {"depth": 3, "width": 4, "activation": "sigmoid"}, 10),
          ("deep-mlp", {"depth": 3, "width": 16, "activation": "tanh"}, 32),
          ("relu-lenet", {}, 32), ("small-vgg", {}, 16), ("resnet20", {"block": "pre"}, 8)]
IDS = ["bn-lenet", "ioffe-mlp", "deep-mlp-relu", "deep-cnn-sigmoid", "deep-mlp-tanh", "relu-lenet",
       "small-vgg", "resnet20-pre"]


def _pair(name, options, norm="bnlab"):
    models = []
    for fuse in (True, False):
        torch.manual_seed(0)
        models.append(build_model(name, norm, fuse_activation=fuse, **options))
    return models


def _train(model, batch, steps=3):
    """Losses of a few SGD steps, then the eval-mode logits of a batch of another size."""
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        x, y = torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    with torch.no_grad():
        logits = model.eval()(torch.rand(batch + 7, 1, 28, 28, generator=g))
    return losses, logits


@pytest.mark.parametrize("name,options,batch", MODELS, ids=IDS)
def test_fused_and_unfused_models_are_the_same_model(name, options, batch):
    fused, plain = _pair(name, options)
    assert any(isinstance(m, bnn.BatchNormAct1d | bnn.BatchNormAct2d) for m in fused.modules())
    assert not any(isinstance(m, bnn.BatchNormAct1d | bnn.BatchNormAct2d) for m in plain.modules())
    assert list(fused.state_dict()) == list(plain.state_dict())  # checkpoints load both ways
    for a, b in zip(fused.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # fusing draws nothing from the RNG
    fused.load_state_dict(plain.state_dict())
    losses_f, logits_f = _train(fused, batch)
    losses_p, logits_p = _train(plain, batch)
    assert all(torch.equal(a, b) for a, b in zip(losses_f, losses_p, strict=True))  # bit for bit
    assert torch.equal(logits_f, logits_p)
    for a, b in zip(fused.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_only_bnlabs_plain_batch_norm_is_fused():
    for norm in ("torch", "ghost", "none", "layer"):
        fused, plain = _pair("bn-lenet", {}, norm)
        assert [type(m) for m in fused.modules()] == [type(m) for m in plain.modules()]
    fused, _ = _pair("bn-lenet", {"norm_slots": "conv", "dropout": 0.3, "dropout_order": "before"})
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(bnn.BatchNormAct2d) == 2 and nn.Sigmoid in kinds


def test_fuse_activation_keeps_default_configs_and_their_hashes():
    saved = config_to_dict(TrainConfig())
    assert "fuse_activation" not in saved  # as configs were saved before the field existed
    assert config_from_dict(TrainConfig, saved).fuse_activation is True
    assert config_to_dict(TrainConfig(fuse_activation=False))["fuse_activation"] is False
    with pytest.raises(ValueError, match=r"\['fuse_activation'\] set, but model 'lenet'"):
        TrainConfig(model="lenet", norm="none", fuse_activation=False)


@pytest.mark.parametrize("name,options,batch", MODELS[:2], ids=IDS[:2])
def test_probes_see_the_activations_of_a_fused_model(name, options, batch):
    """activation_stats and the ICS probe hook activation modules: on a fused model they see
    the same values as on the unfused one, and leave the model fused."""
    fused, plain = _pair(name, options)
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    stats_f, stats_p = activation_stats(fused, x), activation_stats(plain, x)
    assert [s[1:] for s in stats_f] == [s[1:] for s in stats_p] and len(stats_f) >= 3
    for train in (False, True):
        assert torch.equal(last_activation_input(fused, x, train), last_activation_input(plain, x, train))
    assert all(m.fused for m in fused.modules() if isinstance(m, bnn.BatchNormAct1d | bnn.BatchNormAct2d))
