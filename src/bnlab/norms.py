"""Normalization layers chosen by name.

Why: the chapter's questions ("BN everywhere or in some layers?", "layer norm instead?",
"bnlab's BN or torch's?") are all the same model with a different norm layer. A small
registry turns each of them into one string argument, so experiments are data, not
copies of model code.

A factory takes ``(kind, num_features)``, where ``kind`` is ``"conv"`` for (N, C, H, W)
activations and ``"fc"`` for (N, C) activations, and returns a module.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

NormFactory = Callable[[str, int], nn.Module]

_KINDS = ("conv", "fc")


def _bnlab_batch_norm(kind: str, num_features: int) -> nn.Module:
    from bnlab import nn as bnn

    return bnn.BatchNorm2d(num_features) if kind == "conv" else bnn.BatchNorm1d(num_features)


def _bnlab_reference_batch_norm(kind: str, num_features: int) -> nn.Module:
    from bnlab import nn as bnn

    cls = bnn.BatchNorm2d if kind == "conv" else bnn.BatchNorm1d
    return cls(num_features, impl="reference")


def _torch_batch_norm(kind: str, num_features: int) -> nn.Module:
    return nn.BatchNorm2d(num_features) if kind == "conv" else nn.BatchNorm1d(num_features)


def _no_norm(kind: str, num_features: int) -> nn.Module:
    return nn.Identity()


NORM_LAYERS: dict[str, NormFactory] = {
    "bnlab": _bnlab_batch_norm,
    "bnlab-ref": _bnlab_reference_batch_norm,
    "torch": _torch_batch_norm,
    "none": _no_norm,
}

NORM_DESCRIPTIONS: dict[str, str] = {
    "bnlab": "bnlab's from-scratch batch norm (fast path)",
    "bnlab-ref": "bnlab's reference batch norm (plain tensor ops through autograd)",
    "torch": "torch.nn.BatchNorm1d/2d",
    "none": "no normalization (identity)",
}


def create_norm_layer(name: str, kind: str, num_features: int) -> nn.Module:
    """The norm layer registered as ``name`` for ``kind`` activations with ``num_features``."""
    if kind not in _KINDS:
        raise ValueError(f"expected kind in {_KINDS} (got {kind!r})")
    try:
        factory = NORM_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; expected one of {sorted(NORM_LAYERS)}") from None
    return factory(kind, num_features)
