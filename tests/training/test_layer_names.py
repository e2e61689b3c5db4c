"""Norm layers are named as their model names its slots: conv1, conv2, fc1, fc2 in BN-LeNet.

Why: ``--norm-slots`` calls BN-LeNet's layers conv1..fc2, and ``inspect``, ``norm_params.png``
and TensorBoard must call them the same, not by Sequential index (issue 31, item 3). The
names live on the model, so its state_dict keys (checkpoints, fold, to_torch) do not change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnlab.nn import SyncBatchNorm
from bnlab.training import inspection
from bnlab.training.models import NORM_SLOTS, build_model, layer_name, name_slots, norm_layers
from bnlab.training.train import TrainConfig, start_run


def _first_weight_layer_before(model: nn.Sequential, layer: nn.Module) -> tuple[str, int]:
    """(kind, k) of the k-th conv/linear layer of ``model`` that last precedes ``layer``."""
    seen = {"conv": 0, "fc": 0}
    last = None
    for module in model:
        if isinstance(module, nn.Conv2d):
            seen["conv"] += 1
            last = ("conv", seen["conv"])
        elif isinstance(module, nn.Linear):
            seen["fc"] += 1
            last = ("fc", seen["fc"])
        elif module is layer:
            return last
    raise AssertionError("layer not in the model")


@pytest.mark.parametrize("options", [{}, {"norm_slots": "conv2,fc1"},
                                     {"dropout": 0.3, "dropout_order": "before"},
                                     {"dropout": 0.3, "dropout_order": "after"}])
def test_bn_lenet_names_each_norm_after_the_layer_it_follows(options):
    model = build_model("bn-lenet", "bnlab", **options)
    named = norm_layers(model)
    slots = options.get("norm_slots", ",".join(NORM_SLOTS)).split(",")
    assert [name for name, _ in named] == slots
    for name, layer in named:  # "fc1" is the norm after the first linear layer, ...
        kind, k = _first_weight_layer_before(model, layer)
        assert name == f"{kind}{k}"
    # the module tree is a plain Sequential's: state_dict keys are indices, as before
    assert all(key.split(".")[0].isdigit() for key in model.state_dict())


def test_names_survive_copies_and_layers_swapped_in_place():
    model = build_model("bn-lenet", "torch")
    assert [n for n, _ in norm_layers(copy.deepcopy(model))] == list(NORM_SLOTS)
    synced = SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the layers in place
    assert [n for n, _ in norm_layers(synced)] == list(NORM_SLOTS)
    assert all(isinstance(m, SyncBatchNorm) for _, m in norm_layers(synced))


def test_models_that_name_their_modules_keep_those_names():
    assert [n for n, _ in norm_layers(build_model("deep-mlp", "bnlab", depth=3))] == [
        "block1.norm", "block2.norm"]
    inner = name_slots(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), {"1": "bn"})
    outer = nn.Sequential(nn.Identity(), inner)
    name_slots(outer, {"1": "stage"})
    assert layer_name(outer, "1.1") == "stage.bn"
    assert [n for n, _ in norm_layers(nn.Sequential(outer))] == ["0.stage.bn"]
    with pytest.raises(ValueError, match=r"no children \['7'\]"):
        name_slots(inner, {"7": "x"})


def test_inspect_and_its_figure_use_the_slot_names(synthetic_fashion, tmp_path, monkeypatch):
    config = TrainConfig(epochs=1, subset=200, val_size=200, batch_size=50, eval_batch_size=100,
                         norm_slots="conv1,fc2")
    start_run(config, synthetic_fashion, tmp_path / "run", progress=False).train()
    drawn = {}

    def capture(layers, path, title=""):
        drawn.update(layers)
        return path

    monkeypatch.setattr(inspection, "plot_norm_parameters", capture)
    text = inspection.inspect_run(tmp_path / "run")
    assert "first norm layer (conv1), 6 channels:" in text
    table_names = [line.split("|")[1].strip() for line in text.splitlines()
                   if line.startswith("| ") and "channels" not in line]
    assert table_names == ["conv1", "fc2"]
    assert list(drawn) == ["conv1", "fc2"]  # the figure's panels, by name
    assert len(drawn["fc2"]["gamma"]) == 84
    assert torch.tensor(drawn["conv1"]["running_var"]).ne(1).any()  # trained statistics
