"""Which parameter entries a run trains: all, only batch norm's gamma/beta, or as many random others.

Why: Frankle, Schwab & Morcos (ICLR 2021) train only BN's gamma and beta of deep ResNets,
every other weight frozen at its random initialization, and compare with training the same
number of randomly chosen other parameters. A frozen entry must stay *exactly* at its
initial value through every update, weight decay and momentum included, and the choice must
be the same again on resume. The choice is a pure function of the model's structure and a
seed (:func:`trainable_masks`); :func:`restrict_training` applies it.

How a frozen entry is kept still with plain SGD: a parameter with no trainable entry gets
``requires_grad = False``, so it gets no gradient and SGD skips it (no decay, no momentum).
A parameter with some trainable entries gets a gradient hook that adds the weight decay itself
and then zeroes the frozen entries (``torch.where``, so even a non-finite gradient leaves them
0); its SGD group has ``weight_decay = 0``. The momentum buffer of a frozen entry is then 0
forever, and each update adds exactly zero to it. The hook acts before the gradient is
accumulated, so data-parallel training (DDP) averages the masked gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnlab.nn import is_batch_norm

TRAIN_ONLY = ("all", "bn", "random")
"""``all``: every parameter; ``bn``: only every batch norm's gamma and beta; ``random``: as many
entries as ``bn`` trains, drawn uniformly (seeded) from the other parameters."""


def batch_norm_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters (gamma and beta) of every batch norm of ``model``."""
    return {f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules() if is_batch_norm(module)
            for name, _ in module.named_parameters(recurse=False)}


def trainable_masks(model: nn.Module, train_only: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per parameter name of ``model``, a bool tensor of its shape: True where the entry trains.

    ``random`` draws from a generator seeded with ``seed`` (torch's global RNG is left alone),
    over the non-batch-norm entries in ``named_parameters`` order. ValueError for ``bn`` and
    ``random`` on a model without batch-norm parameters.
    """
    if train_only not in TRAIN_ONLY:
        raise ValueError(f"unknown train_only {train_only!r}; expected one of {list(TRAIN_ONLY)}")
    params = dict(model.named_parameters())
    if train_only == "all":
        return {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}
    norm_names = batch_norm_parameters(model)
    if not norm_names:
        raise ValueError(f"train_only {train_only!r} needs a model with batch-norm parameters "
                         "(got none)")
    masks = {name: torch.full_like(p, name in norm_names and train_only == "bn", dtype=torch.bool)
             for name, p in params.items()}
    if train_only == "random":
        others = [name for name in params if name not in norm_names]
        count = sum(params[name].numel() for name in norm_names)
        total = sum(params[name].numel() for name in others)
        if count > total:
            raise ValueError(f"train_only 'random' needs at least {count} non-batch-norm "
                             f"parameters (got {total})")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.randperm(total, generator=generator)[:count]] = True
        for name, flat in zip(others, chosen.split([params[n].numel() for n in others])):
            masks[name] = flat.view_as(params[name]).to(params[name].device)
    return masks


def restrict_training(model: nn.Module, groups: list[dict[str, Any]],
                      masks: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Freeze the entries of ``model`` that ``masks`` marks False (in place) and return
    ``groups`` (SGD parameter groups, each with its ``weight_decay``) restricted to them.

    A wholly trainable parameter stays in its group; a partly trainable one moves to a group of
    its own with ``weight_decay`` 0 (its hook applies its old group's decay); a parameter with
    nothing to train leaves the groups. With every entry trainable, ``groups`` come back as
    they were.
    """
    names = {id(param): name for name, param in model.named_parameters()}
    restricted = []
    for group in groups:
        whole, partial = [], []
        for param in group["params"]:
            mask = masks[names[id(param)]]
            if bool(mask.all()):
                whole.append(param)
            elif not bool(mask.any()):
                param.requires_grad_(False)
            else:
                param.register_hook(_masked_gradient(param, mask, group["weight_decay"]))
                partial.append(param)
        if whole:
            restricted.append({**group, "params": whole})
        if partial:
            restricted.append({**group, "params": partial, "weight_decay": 0.0})
    return restricted


def _masked_gradient(param: nn.Parameter, mask: torch.Tensor, weight_decay: float):
    """The gradient hook of a partly trainable ``param``: decay, then zero the frozen entries."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if weight_decay:
            grad = grad.add(param.detach(), alpha=weight_decay)
        return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return hook


def trainable_count(masks: dict[str, torch.Tensor]) -> int:
    """How many entries ``masks`` trains."""
    return sum(int(mask.sum()) for mask in masks.values())
