"""Per residual block, the variance of what the residual branch adds and of what the skip path
carries: the measure behind "batch norm biases residual blocks towards the identity".

Why: De & Smith (2020) explain why normalized residual networks train at depths where plain
ones do not by one number per block l: the variance of the residual branch's output over the
variance of the skip path's. With batch norm at the end of each branch the branch adds about
1 per block, so the skip path's variance grows about linearly and the ratio of block l is
about 1/l: a deep block is close to the identity and the network behaves like a shallower
one. Without normalization (He initialization preserves the variance through a branch) each
block about doubles the variance, which grows as 2^l, and the ratio stays near 1. SkipInit
and Fixup make the branch output 0 at initialization (ratio 0).

The measure: one forward of a fixed batch through a float64 copy of the model, in the model's
current mode (train mode: batch norm normalizes with the batch's statistics, as at the start
of training); the model itself is not touched. Float64 because without normalization the
variance overflows float32 after about 128 blocks (2^128) and the probe is meant for 1000+
layers. A residual block is any module with submodules ``branch`` and ``shortcut`` whose
outputs its forward adds (``bnlab.training.resnet.ResidualBlock``); forward hooks on them read
both summands. The variance of an (N, C, ...) output is the per-channel variance over every
other dimension (batch and space, population variance), averaged over the channels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bnlab.util.scoped import removing


@dataclass(frozen=True)
class BlockVariance:
    """One residual block's two summands: the branch's output and the skip path's (the
    shortcut's output, which is the block's input where the shortcut is the identity)."""

    index: int  # 1-based, in the order the forward runs the blocks
    name: str  # the block's module name
    branch: float  # mean channel variance of the residual branch's output
    skip: float  # mean channel variance of the skip path's output

    @property
    def ratio(self) -> float:
        """branch / skip; inf where only the skip path is 0, nan where both are."""
        if self.skip > 0:
            return self.branch / self.skip
        return math.inf if self.branch > 0 else math.nan


def channel_variance(x: torch.Tensor) -> float:
    """The population variance of each channel (dim 1) of ``x`` over all other dimensions,
    averaged over the channels, in float64."""
    if x.dim() < 2:
        raise ValueError(f"expected an (N, C, ...) tensor (got shape {tuple(x.shape)})")
    per_channel = x.double().transpose(0, 1).flatten(1)  # (C, N * ...)
    return per_channel.var(dim=1, unbiased=False).mean().item()


def is_residual_block(module: nn.Module) -> bool:
    """Whether ``module`` has the submodules ``branch`` and ``shortcut`` of a residual block."""
    return all(isinstance(getattr(module, part, None), nn.Module) for part in ("branch", "shortcut"))


@torch.no_grad()
def residual_variances(model: nn.Module, x: torch.Tensor,
                       dtype: torch.dtype = torch.float64) -> list[BlockVariance]:
    """:class:`BlockVariance` of every residual block of ``model`` in one forward of ``x``
    (see the module docstring), computed on a ``dtype`` copy of the model. ValueError if the
    forward runs no residual block; a block run twice is reported at its first run."""
    probe = copy.deepcopy(model).to(dtype)
    names = {id(m): name for name, m in probe.named_modules()}
    outputs: dict[int, dict[str, torch.Tensor]] = {}
    order: list[nn.Module] = []

    def record(block: nn.Module, part: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen = outputs.setdefault(id(block), {})
            if part not in seen:
                seen[part] = output
                if block not in order:
                    order.append(block)
        return hook

    blocks = [m for m in probe.modules() if is_residual_block(m)]
    handles = [getattr(block, part).register_forward_hook(record(block, part))
               for block in blocks for part in ("branch", "shortcut")]
    with removing(handles):
        probe(x.to(dtype))
    if not order:
        raise ValueError(f"expected a model with residual blocks (modules with a 'branch' and a "
                         f"'shortcut'); none ran in the forward of {type(model).__name__}")
    return [BlockVariance(index, names[id(block)], channel_variance(outputs[id(block)]["branch"]),
                          channel_variance(outputs[id(block)]["shortcut"]))
            for index, block in enumerate(order, start=1)]
