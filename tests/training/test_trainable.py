"""Training only some entries (bnlab.training.trainable, TrainConfig.train_only): the choice,
that frozen entries never move (momentum and weight decay on), and exact resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bnlab.training import runs
from bnlab.training.distributed import DistributedConfig, launch
from bnlab.training.train import TrainConfig, model_for, optimizer_for, start_run
from bnlab.training.trainable import (
    batch_norm_parameters,
    restrict_training,
    trainable_count,
    trainable_masks,
)
from bnlab.util.config import config_to_dict
from bnlab.util.errors import ConfigError

CONFIG = TrainConfig(val_size=200, model="resnet20", norm="bnlab", subset=96, batch_size=32, epochs=2, lr=0.1,
                     momentum=0.9, weight_decay=5e-3, eval_batch_size=200, device="cpu")
RESNET20_BN_ENTRIES = 2 * (16 + 3 * 2 * (16 + 32 + 64))  # gamma and beta of its 19 BNs: 1376


def test_bn_selects_every_batch_norm_gamma_and_beta_and_nothing_else() -> None:
    model = model_for(CONFIG)
    masks = trainable_masks(model, "bn")
    names = batch_norm_parameters(model)
    assert len(names) == 2 * 19 and "stem.norm.weight" in names
    assert "stage2.block3.branch.norm2.bias" in names
    for name, mask in masks.items():
        assert bool(mask.all()) if name in names else not bool(mask.any()), name
    assert trainable_count(masks) == RESNET20_BN_ENTRIES


def test_random_selects_as_many_other_entries_seeded() -> None:
    model = model_for(CONFIG)
    masks = trainable_masks(model, "random", seed=3)
    names = batch_norm_parameters(model)
    assert trainable_count(masks) == RESNET20_BN_ENTRIES
    assert not any(bool(masks[name].any()) for name in names)
    again, other = trainable_masks(model, "random", seed=3), trainable_masks(model, "random", seed=4)
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    assert not all(torch.equal(masks[n], other[n]) for n in masks)
    # Uniform over the 268058 other entries: the biggest convs hold most of the chosen ones.
    others = sum(p.numel() for n, p in model.named_parameters() if n not in names)
    stage3 = sum(int(m.sum()) for n, m in masks.items() if n.startswith("stage3"))
    stage3_share = sum(p.numel() for n, p in model.named_parameters()
                       if n.startswith("stage3") and n not in names) / others
    assert abs(stage3 / RESNET20_BN_ENTRIES - stage3_share) < 0.05
    assert trainable_count(trainable_masks(model, "all")) == sum(p.numel() for p in model.parameters())


def test_a_model_without_batch_norm_has_nothing_to_select() -> None:
    model = model_for(dataclasses.replace(CONFIG, norm="none"))
    with pytest.raises(ValueError, match="needs a model with batch-norm parameters"):
        trainable_masks(model, "bn")


def _initial_and_final_weights(config: TrainConfig, synthetic_fashion, run_dir):
    torch.manual_seed(config.seed)
    initial = {n: p.detach().clone() for n, p in model_for(config).named_parameters()}
    start_run(config, synthetic_fashion, run_dir, progress=False).train()
    final = torch.load(run_dir / runs.CHECKPOINT, weights_only=False)["model"]
    return initial, final


@pytest.mark.parametrize("train_only", ["bn", "random"])
def test_only_the_chosen_entries_change(synthetic_fashion, tmp_path, train_only: str) -> None:
    """Six steps of SGD with momentum 0.9 and weight decay: every frozen entry is bitwise its
    initial value, and (nearly) every trainable one has moved."""
    config = dataclasses.replace(CONFIG, train_only=train_only)
    initial, final = _initial_and_final_weights(config, synthetic_fashion, tmp_path / "run")
    masks = trainable_masks(model_for(config), train_only, config.seed)
    moved = kept = 0
    for name, before in initial.items():
        after, mask = final[name], masks[name]
        assert torch.equal(after[~mask], before[~mask]), name
        moved += int((after[mask] != before[mask]).sum())
        kept += int((~mask).sum())
    assert moved >= 0.95 * RESNET20_BN_ENTRIES  # a zero-init beta may move by decay alone
    assert kept == sum(p.numel() for p in initial.values()) - RESNET20_BN_ENTRIES


def test_all_trains_everything_and_keeps_its_saved_config(synthetic_fashion, tmp_path) -> None:
    assert "train_only" not in config_to_dict(CONFIG)  # earlier runs' config hashes stay valid
    initial, final = _initial_and_final_weights(dataclasses.replace(CONFIG, epochs=1),
                                                synthetic_fashion, tmp_path / "run")
    assert all(not torch.equal(final[n], initial[n]) for n in initial)


def test_masked_update_is_sgd_on_the_trainable_entries() -> None:
    """A partly trainable weight: its trainable entries move exactly as plain SGD with momentum
    and weight decay moves them when the frozen entries are put back (and their momentum
    cleared) after every step; frozen ones stay, even under an infinite gradient."""
    torch.manual_seed(0)
    layer, reference = nn.Linear(4, 3), nn.Linear(4, 3)
    reference.load_state_dict(layer.state_dict())
    mask = torch.rand(3, 4) < 0.5
    masks = {"weight": mask, "bias": torch.zeros(3, dtype=torch.bool)}
    groups = [{"params": list(layer.parameters()), "weight_decay": 0.1}]
    opt = torch.optim.SGD(restrict_training(layer, groups, masks), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    start = {n: p.detach().clone() for n, p in layer.named_parameters()}
    assert not layer.bias.requires_grad and layer.weight.requires_grad
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, optimizer in ((layer, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
        with torch.no_grad():  # the reference, put back by hand
            reference.weight[~mask] = start["weight"][~mask]
            reference.bias.copy_(start["bias"])
            ref_opt.state[reference.weight]["momentum_buffer"][~mask] = 0
            ref_opt.state[reference.bias]["momentum_buffer"].zero_()
    torch.testing.assert_close(layer.weight, reference.weight)
    assert torch.equal(layer.weight[~mask], start["weight"][~mask])
    assert torch.equal(layer.bias, start["bias"])
    assert not torch.equal(layer.weight[mask], start["weight"][mask])
    opt.zero_grad()
    (layer(x) * float("inf")).sum().backward()
    assert torch.equal(layer.weight.grad[~mask], torch.zeros(int((~mask).sum())))


def test_resume_stays_exact(synthetic_fashion, tmp_path) -> None:
    config = dataclasses.replace(CONFIG, train_only="random", epochs=3)
    start_run(config, synthetic_fashion, tmp_path / "whole", progress=False).train()
    cut = start_run(config, synthetic_fashion, tmp_path / "cut", progress=False)
    cut.train_next_epoch()
    start_run(config, synthetic_fashion, tmp_path / "cut", resume=True, progress=False).train()
    assert runs.read_jsonl(tmp_path / "cut" / runs.STEPS) == runs.read_jsonl(
        tmp_path / "whole" / runs.STEPS)
    whole = torch.load(tmp_path / "whole" / runs.CHECKPOINT, weights_only=False)
    resumed = torch.load(tmp_path / "cut" / runs.CHECKPOINT, weights_only=False)
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    # every chosen entry lies in a partly trained parameter: one group, its decay in the hooks
    assert [g["weight_decay"] for g in resumed["optimizer"]["param_groups"]] == [0.0]


def test_config_rejects_train_only_where_it_cannot_apply() -> None:
    with pytest.raises(ConfigError, match="train_only 'bn' needs a model with batch norms"):
        dataclasses.replace(CONFIG, norm="none", train_only="bn")
    with pytest.raises(ConfigError, match="expected train_only in"):
        dataclasses.replace(CONFIG, train_only="gamma")
    with pytest.raises(ConfigError, match="train_only and freeze_bn_epochs do not go together"):
        dataclasses.replace(CONFIG, train_only="bn", freeze_bn_epochs=1)
    model = model_for(CONFIG)
    optimizer_for(model, dataclasses.replace(CONFIG, train_only="bn"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        batch_norm_parameters(model)


@pytest.mark.slow
def test_two_processes_with_sync_bn_freeze_the_same_entries(synthetic_fashion, tmp_path) -> None:
    """Under DDP the hook masks each rank's gradient before the all-reduce: two processes with
    synchronized BN take the steps of one, and leave the frozen entries where they were.
    (A small lr: ResNet-20 at lr 0.1 with momentum amplifies the all-reduce's rounding to
    1e-4 within four steps, with or without train_only.)"""
    config = dataclasses.replace(CONFIG, train_only="random", subset=64, lr=0.02)
    initial, one = _initial_and_final_weights(config, synthetic_fashion, tmp_path / "one")
    launch(config, DistributedConfig(nproc=2, sync_bn=True), synthetic_fashion, tmp_path / "two",
           progress=False)
    two = torch.load(tmp_path / "two" / runs.CHECKPOINT, weights_only=False)["model"]
    masks = trainable_masks(model_for(config), "random", config.seed)
    for name, before in initial.items():
        assert torch.equal(two[name][~masks[name]], before[~masks[name]]), name
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    assert sum(int((two[n] != initial[n]).sum()) for n in initial) >= 0.95 * RESNET20_BN_ENTRIES
