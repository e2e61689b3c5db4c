"""Normalization layers chosen by name.

Why: the chapter's questions ("BN everywhere or in some layers?", "layer norm instead?",
"bnlab's BN or torch's?") are all the same model with a different norm layer. A small
registry turns each of them into one string argument, so experiments are data, not
copies of model code.

A factory takes ``(kind, num_features)``, where ``kind`` is ``"conv"`` for (N, C, H, W)
activations and ``"fc"`` for (N, C) activations, and returns a module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from bnlab.functional import IMPLEMENTATIONS

NormFactory = Callable[[str, int], nn.Module]

_KINDS = ("conv", "fc")


def _bnlab_batch_norm(kind: str, num_features: int, impl: str) -> nn.Module:
    from bnlab import nn as bnn

    cls = bnn.BatchNorm2d if kind == "conv" else bnn.BatchNorm1d
    return cls(num_features, impl=impl)


def _torch_batch_norm(kind: str, num_features: int) -> nn.Module:
    return nn.BatchNorm2d(num_features) if kind == "conv" else nn.BatchNorm1d(num_features)


def _no_norm(kind: str, num_features: int) -> nn.Module:
    return nn.Identity()


def _layer_norm(kind: str, num_features: int) -> nn.Module:
    # LayerNorm normalizes each sample over all of its features. For (N, C, H, W) that is
    # the (C, H, W) block of each sample; nn.LayerNorm([C, H, W]) would need H and W when
    # the layer is built and would learn one affine pair per *element*. GroupNorm with a
    # single group computes exactly the same per-sample statistics over (C, H, W), needs
    # only C, and learns one affine pair per channel (the convolutional convention).
    return nn.GroupNorm(1, num_features) if kind == "conv" else nn.LayerNorm(num_features)


MAX_GROUPS = 4
"""Upper bound on the number of groups of the ``"group"`` norm (see :func:`group_count`)."""


def group_count(num_features: int, max_groups: int = MAX_GROUPS) -> int:
    """Groups G of the ``"group"`` norm: the largest divisor of C with G <= 4 and C / G >= 2.

    Why this rule: GroupNorm needs G to divide C, and the "group" layer should sit between
    layer norm (G = 1) and instance norm (G = C). Wu & He's G = 32 does not divide the
    chapter's widths (6, 16, 120, 84); a small fixed G does: 6 -> 3, 16 -> 4, 120 -> 4,
    84 -> 4, and the deep nets' 16/32/64/128 -> 4. Keeping at least two channels per group
    means a group is never a single value on (N, C) activations, where its normalized
    output would always be 0. Widths with no such divisor (1, or a prime > 4) get G = 1,
    i.e. layer norm.
    """
    if num_features < 1:
        raise ValueError(f"expected num_features >= 1 (got {num_features})")
    candidates = [g for g in range(1, max_groups + 1)
                  if num_features % g == 0 and num_features // g >= 2]
    return max(candidates, default=1)


def _group_norm(kind: str, num_features: int) -> nn.Module:
    return nn.GroupNorm(group_count(num_features), num_features)


def _instance_norm(kind: str, num_features: int) -> nn.Module:
    # Instance norm normalizes each (sample, channel) over its spatial positions. An (N, C)
    # activation has ONE value per sample and channel, whose normalized value is always 0,
    # so instance norm is undefined there; "fc" falls back to layer norm (the per-sample
    # normalization that is defined), as NORM_DESCRIPTIONS says.
    if kind == "conv":
        return nn.InstanceNorm2d(num_features, affine=True, track_running_stats=False)
    return nn.LayerNorm(num_features)


# bnlab's batch norm, one entry per implementation (named in bnlab.functional's registry;
# "bnlab" is the default implementation).
NORM_LAYERS: dict[str, NormFactory] = {
    **{impl.norm: functools.partial(_bnlab_batch_norm, impl=impl.name)
       for impl in IMPLEMENTATIONS.values()},
    "torch": _torch_batch_norm,
    "none": _no_norm,
    "layer": _layer_norm,
    "group": _group_norm,
    "instance": _instance_norm,
    "noisy-bn": lambda kind, num_features: _noisy_batch_norm(kind, num_features, 1.0),
}

NORM_DESCRIPTIONS: dict[str, str] = {
    **{impl.norm: f"bnlab's from-scratch batch norm, impl={impl.name!r}: {impl.what}"
       for impl in IMPLEMENTATIONS.values()},
    "torch": "torch.nn.BatchNorm1d/2d",
    "none": "no normalization (identity)",
    "layer": "layer norm: each sample over all its features; conv: GroupNorm(1, C), i.e. over "
             "(C, H, W) with a per-channel affine; fc: nn.LayerNorm(C)",
    "group": "group norm: GroupNorm(G, C), each sample over groups of C/G channels; G = largest "
             "divisor of C that is <= 4 and leaves >= 2 channels per group (see group_count)",
    "instance": "instance norm: conv: InstanceNorm2d(C, affine=True), each (sample, channel) over "
                "(H, W), no running stats; fc: undefined (one value per channel), falls back to "
                "layer norm nn.LayerNorm(C)",
    "noisy-bn": "Santurkar et al.'s noisy BN: bnlab's BN, then per-sample, per-activation noise "
                "y*s+m with a mean and scale re-drawn every step (bnlab.nn.noisy); "
                "'noisy-bn:S' sets the strength S (default 1; 0 = plain BN)",
}

PARAMETRIZED_NORMS = ("noisy-bn", "ghost")
"""Norms that take a parameter as ``NAME:VALUE``: ``noisy-bn:0.5`` (the noise strength),
``ghost:8`` (the virtual batch size, an integer >= 2)."""


def _noisy_batch_norm(kind: str, num_features: int, strength: float) -> nn.Module:
    from bnlab.nn.noisy import noisy_batch_norm

    return noisy_batch_norm(kind, num_features, strength)


GHOST_VIRTUAL_BATCH_SIZE = 32
"""Virtual batch size of the ``"ghost"`` norm: the batch size whose statistics Hoffer et al.
(2017) found to generalize well; the chapter's batch of 128 becomes four ghost batches."""


def parse_virtual_batch_size(spec: str) -> int:
    """``"ghost:8"`` -> 8; ``"ghost"`` -> :data:`GHOST_VIRTUAL_BATCH_SIZE`."""
    _, sep, value = spec.partition(":")
    if not sep:
        return GHOST_VIRTUAL_BATCH_SIZE
    if not value.isdigit() or int(value) < 2:
        raise ValueError(f"expected ghost:SIZE with an integer SIZE >= 2 (got {spec!r})")
    return int(value)


def _family_layer(kind: str, num_features: int, family: str,
                  virtual_batch_size: int = GHOST_VIRTUAL_BATCH_SIZE) -> nn.Module:
    from bnlab.nn import frozen, ghost, renorm

    classes = {"ghost": (ghost.GhostBatchNorm2d, ghost.GhostBatchNorm1d),
               "renorm": (renorm.BatchRenorm2d, renorm.BatchRenorm1d),
               "frozen": (frozen.FrozenBatchNorm2d, frozen.FrozenBatchNorm1d)}[family]
    cls = classes[0] if kind == "conv" else classes[1]
    if family == "ghost":
        return cls(num_features, virtual_batch_size)
    return cls(num_features)


# The batch-norm family (bnlab.nn.ghost, bnlab.nn.renorm, bnlab.nn.frozen), with their defaults.
NORM_LAYERS["ghost"] = functools.partial(_family_layer, family="ghost")
NORM_LAYERS["renorm"] = functools.partial(_family_layer, family="renorm")
NORM_LAYERS["frozen"] = functools.partial(_family_layer, family="frozen")
NORM_DESCRIPTIONS["ghost"] = (
    f"ghost batch norm: batch norm on each chunk of {GHOST_VIRTUAL_BATCH_SIZE} samples, running "
    "statistics updated per chunk; prediction as batch norm (bnlab.nn.ghost); 'ghost:V' sets the "
    "chunk (virtual batch) size V >= 2")
NORM_DESCRIPTIONS["renorm"] = (
    "batch renormalization: r_max 3, d_max 5 after 100 steps of plain batch norm; prediction as "
    "batch norm (bnlab.nn.renorm)")
NORM_DESCRIPTIONS["frozen"] = (
    "frozen batch norm: fixed statistics and affine, the same in train and eval; fresh ones are "
    "(0, 1) statistics and the identity affine, so training with it is training without "
    "normalization: for inference and as a baseline (bnlab.nn.frozen)")

BATCH_NORMS = frozenset({impl.norm for impl in IMPLEMENTATIONS.values()} | {"torch", "ghost", "renorm"})
"""The norms of :data:`NORM_LAYERS` that normalize over the batch in training: they cannot
train on batches of one (an FC layer then has a single value per channel)."""


def is_batch_norm(name: str) -> bool:
    """Whether the norm named ``name`` (``NAME`` or ``NAME:VALUE``) is in :data:`BATCH_NORMS`."""
    return name.partition(":")[0] in BATCH_NORMS


def _parse_norm_name(name: str) -> tuple[str, int | float | None]:
    """``NAME`` -> (NAME, None); ``NAME:VALUE`` -> (NAME, its parsed value), for a norm of
    :data:`PARAMETRIZED_NORMS`. ValueError for anything else, saying what was expected."""
    base, sep, _ = name.partition(":")
    if base not in NORM_LAYERS:
        raise ValueError(f"unknown norm {name!r}; expected one of {sorted(NORM_LAYERS)} (and "
                         f"NAME:VALUE for {', '.join(PARAMETRIZED_NORMS)})")
    if not sep:
        return base, None
    if base not in PARAMETRIZED_NORMS:
        raise ValueError(f"norm {base!r} takes no value (got {name!r}); only "
                         f"{', '.join(PARAMETRIZED_NORMS)} do")
    if base == "ghost":
        return base, parse_virtual_batch_size(name)
    from bnlab.nn.noisy import parse_strength

    return base, parse_strength(name)


def check_norm_name(name: str) -> None:
    """ValueError unless ``name`` is a norm of :data:`NORM_LAYERS`, or ``NAME:VALUE`` for a
    norm of :data:`PARAMETRIZED_NORMS` with a value it accepts."""
    _parse_norm_name(name)


def create_norm_layer(name: str, kind: str, num_features: int) -> nn.Module:
    """The norm layer registered as ``name`` (``NAME`` or ``NAME:VALUE``) for ``kind``
    activations with ``num_features``."""
    if kind not in _KINDS:
        raise ValueError(f"expected kind in {_KINDS} (got {kind!r})")
    base, value = _parse_norm_name(name)
    if value is None:
        return NORM_LAYERS[base](kind, num_features)
    if base == "ghost":
        return _family_layer(kind, num_features, "ghost", value)
    return _noisy_batch_norm(kind, num_features, value)
