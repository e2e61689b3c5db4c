"""Normalization layers chosen by name: the lab's names onto ``bnlab.nn`` and ``torch.nn``.

Why: the chapter's questions ("BN everywhere or in some layers?", "layer norm instead?",
"bnlab's BN or torch's?") are all the same model with a different norm layer. One table,
:data:`NORMS`, turns each of them into one string argument, so experiments are data, not
copies of model code.

A norm builds a module from ``(kind, num_features)``, where ``kind`` is ``"conv"`` for
(N, C, H, W) activations and ``"fc"`` for (N, C) activations. Some take a value, written
``NAME:VALUE`` (``ghost:8``, ``noisy-bn:0.5``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from bnlab import nn as bnn
from bnlab.functional import get_implementation

_KINDS = ("conv", "fc")


@dataclass(frozen=True)
class Norm:
    """One named norm: how to build it, what it is, and whether it uses batch statistics."""

    build: Callable[..., nn.Module]  # (kind, num_features[, value]) -> module
    description: str
    batch_statistics: bool  # normalizes over the batch in training: cannot train on batches of one
    parse_value: Callable[[str], Any] | None = None  # NAME:VALUE -> VALUE; None: takes no value


def _bnlab_batch_norm(kind: str, num_features: int, impl: str) -> nn.Module:
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
    # normalization that is defined), as its description says.
    if kind == "conv":
        return nn.InstanceNorm2d(num_features, affine=True, track_running_stats=False)
    return nn.LayerNorm(num_features)


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


def parse_strength(spec: str) -> float:
    """``"noisy-bn:1.5"`` -> 1.5; ``"noisy-bn"`` -> the default strength 1."""
    _, _, value = spec.partition(":")
    if not value:
        return 1.0
    try:
        strength = float(value)
    except ValueError:
        raise ValueError(f"expected noisy-bn:STRENGTH with a number >= 0 (got {spec!r})") from None
    if not strength >= 0:
        raise ValueError(f"expected noisy-bn:STRENGTH with a number >= 0 (got {spec!r})")
    return strength


def _by_kind(conv: type[nn.Module], fc: type[nn.Module]) -> Callable[..., nn.Module]:
    """A builder of ``conv`` for conv activations and ``fc`` for FC ones (extra args passed on)."""
    def build(kind: str, num_features: int, *args: Any) -> nn.Module:
        return (conv if kind == "conv" else fc)(num_features, *args)
    return build


BNLAB_NORMS = {"bnlab": "auto", "bnlab-fast": "fast", "bnlab-ref": "reference",
                    "bnlab-cpp": "cpp", "bnlab-compiled": "compiled"}
"""The lab's names of bnlab's batch norm, one per implementation of ``bnlab.functional``
(``bnlab`` is the default, ``impl="auto"``)."""


def _bnlab_norm(impl: str) -> Norm:
    return Norm(functools.partial(_bnlab_batch_norm, impl=impl),
                f"bnlab's from-scratch batch norm, impl={impl!r}: {get_implementation(impl).what}",
                batch_statistics=True)


NORMS: dict[str, Norm] = {
    **{name: _bnlab_norm(impl) for name, impl in BNLAB_NORMS.items()},
    "torch": Norm(_torch_batch_norm, "torch.nn.BatchNorm1d/2d", batch_statistics=True),
    "none": Norm(_no_norm, "no normalization (identity)", batch_statistics=False),
    "layer": Norm(_layer_norm, "layer norm: each sample over all its features; conv: "
                  "GroupNorm(1, C), i.e. over (C, H, W) with a per-channel affine; fc: "
                  "nn.LayerNorm(C)", batch_statistics=False),
    "group": Norm(_group_norm, "group norm: GroupNorm(G, C), each sample over groups of C/G "
                  "channels; G = largest divisor of C that is <= 4 and leaves >= 2 channels "
                  "per group (see group_count)", batch_statistics=False),
    "instance": Norm(_instance_norm, "instance norm: conv: InstanceNorm2d(C, affine=True), each "
                     "(sample, channel) over (H, W), no running stats; fc: undefined (one value "
                     "per channel), falls back to layer norm nn.LayerNorm(C)",
                     batch_statistics=False),
    "ghost": Norm(_by_kind(bnn.GhostBatchNorm2d, bnn.GhostBatchNorm1d),
                  f"ghost batch norm: batch norm on each chunk of {GHOST_VIRTUAL_BATCH_SIZE} "
                  "samples, running statistics updated per chunk; prediction as batch norm "
                  "(bnlab.nn.ghost); 'ghost:V' sets the chunk (virtual batch) size V >= 2",
                  batch_statistics=True, parse_value=parse_virtual_batch_size),
    "renorm": Norm(_by_kind(bnn.BatchRenorm2d, bnn.BatchRenorm1d),
                   "batch renormalization: r_max 3, d_max 5 after 100 steps of plain batch "
                   "norm; prediction as batch norm (bnlab.nn.renorm)", batch_statistics=True),
    "frozen": Norm(_by_kind(bnn.FrozenBatchNorm2d, bnn.FrozenBatchNorm1d),
                   "frozen batch norm: fixed statistics and affine, the same in train and eval; "
                   "fresh ones are (0, 1) statistics and the identity affine, so training with "
                   "it is training without normalization: for inference and as a baseline "
                   "(bnlab.nn.frozen)", batch_statistics=False),
    "noisy-bn": Norm(_by_kind(bnn.NoisyBatchNorm2d, bnn.NoisyBatchNorm1d),
                     "Santurkar et al.'s noisy BN: bnlab's BN, then per-sample, per-activation "
                     "noise y*s+m with a mean and scale re-drawn every step (bnlab.nn.noisy); "
                     "'noisy-bn:S' sets the strength S (default 1; 0 = plain BN)",
                     batch_statistics=True, parse_value=parse_strength),
}
"""Every norm the lab knows, by name."""


def _parse_norm_name(name: str) -> tuple[Norm, Any]:
    """``NAME`` -> (its Norm, its default value or None); ``NAME:VALUE`` -> (Norm, parsed
    VALUE). ValueError for anything else, saying what was expected."""
    base, sep, _ = name.partition(":")
    norm = NORMS.get(base)
    takes_value = [n for n, spec in NORMS.items() if spec.parse_value is not None]
    if norm is None:
        raise ValueError(f"unknown norm {name!r}; expected one of {sorted(NORMS)} (and "
                         f"NAME:VALUE for {', '.join(takes_value)})")
    if norm.parse_value is None:
        if sep:
            raise ValueError(f"norm {base!r} takes no value (got {name!r}); only "
                             f"{', '.join(takes_value)} do")
        return norm, None
    return norm, norm.parse_value(name)


def check_norm_name(name: str) -> None:
    """ValueError unless ``name`` is a norm of :data:`NORMS`, or ``NAME:VALUE`` for a norm
    that takes a value, with a value it accepts."""
    _parse_norm_name(name)


def uses_batch_statistics(name: str) -> bool:
    """Whether the norm named ``name`` (``NAME`` or ``NAME:VALUE``) normalizes over the batch
    in training, so cannot train on batches of one."""
    return _parse_norm_name(name)[0].batch_statistics


def describe_norm(name: str) -> str:
    """The description of the norm named ``name`` (``NAME`` or ``NAME:VALUE``)."""
    return _parse_norm_name(name)[0].description


def create_norm_layer(name: str, kind: str, num_features: int) -> nn.Module:
    """The norm layer named ``name`` (``NAME`` or ``NAME:VALUE``) for ``kind`` activations
    with ``num_features``."""
    if kind not in _KINDS:
        raise ValueError(f"expected kind in {_KINDS} (got {kind!r})")
    norm, value = _parse_norm_name(name)
    if value is None:
        return norm.build(kind, num_features)
    return norm.build(kind, num_features, value)
