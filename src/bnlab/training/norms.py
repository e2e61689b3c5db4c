"""Normalization layers chosen by name: the lab's names onto ``bnlab.nn`` and ``torch.nn``.

Why: the chapter's questions ("BN everywhere or in some layers?", "layer norm instead?",
"bnlab's BN or torch's?") are all the same model with a different norm layer. One table,
:data:`NORMS`, turns each of them into one string argument, so experiments are data, not
copies of model code.

A norm builds a module from ``(kind, num_features)``, where ``kind`` is ``"conv"`` for
(N, C, H, W) activations and ``"fc"`` for (N, C) activations. Some take a value, written
``NAME:VALUE`` (``ghost:8``, ``noisy-bn:0.5``): then it is built from
``(kind, num_features, value)``.

Norms of your own, without editing this package (a *plug-in*), are named the same way:

- by import path, ``MODULE:ATTR`` (``mypkg.mynorms:ScaleNorm``, or ``...:ScaleNorm:0.5``
  with a value), importable where the runs train (installed, or on ``PYTHONPATH``);
- by the name of an entry point in the group :data:`ENTRY_POINT_GROUP` (``bnlab.norms``) of
  an installed distribution (``[project.entry-points."bnlab.norms"]`` in its pyproject.toml).

The name is the whole registration: a run's config holds it, and every process that builds
the model (``exp --jobs`` workers, ``train --nproc`` ranks) resolves it again by itself, so
nothing registered in one process has to reach another. What a plug-in object must be is
:func:`plugin_norm`'s contract; a plug-in is checked once per process when its name is
first resolved (built for both kinds and run forward once), so a bad one is a one-line
error before anything trains. The built-in names (:data:`NORMS`) come first: a plug-in
cannot take one of them.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.functional import get_implementation
from bnlab.nn.noisy import SCOPES as NOISE_SCOPES

_KINDS = ("conv", "fc")


@dataclass(frozen=True)
class Norm:
    """One named norm: how to build it, what it is, and whether it uses batch statistics."""

    build: Callable[..., nn.Module]  # (kind, num_features[, value]) -> module
    description: str
    batch_statistics: bool  # normalizes over the batch in training: cannot train on batches of one
    parse_value: Callable[[str], Any] | None = None  # the text of NAME:VALUE's VALUE -> the
    # value build gets (ValueError for a bad one); None: takes no value. Without :VALUE,
    # build gets no value and uses its own default.
    revision: int = 0  # raised when the layer behind the name changes its numbers; a nonzero
    # one is part of a run's config hash (experiments.runner.config_key), so runs trained
    # before the change are not taken for runs of the new layer


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


def parse_virtual_batch_size(value: str) -> int:
    """The ``8`` of ``"ghost:8"`` -> 8 (ValueError unless an integer >= 2)."""
    if not value.isdigit() or int(value) < 2:
        raise ValueError(f"expected ghost:SIZE with an integer SIZE >= 2 (got 'ghost:{value}')")
    return int(value)


NOISY_STRENGTH = 1.0
"""Strength of the ``"noisy-bn"`` norm without a value."""


def parse_noise(value: str) -> tuple[float, str]:
    """The ``1.5`` of ``"noisy-bn:1.5"`` -> (1.5, "unit"); ``"1.5:layer"`` -> (1.5, "layer")
    (``bnlab.nn.noisy.SCOPES``); ValueError unless a number >= 0 and a known scope."""
    text, _, scope = value.partition(":")
    try:
        strength = float(text)
    except ValueError:
        strength = -1.0
    if not strength >= 0 or scope not in ("", *NOISE_SCOPES):
        raise ValueError(f"expected noisy-bn:STRENGTH[:SCOPE] with a number >= 0 and SCOPE in "
                         f"{NOISE_SCOPES} (got 'noisy-bn:{value}')")
    return strength, scope or "unit"


def _noisy_bn(kind: str, num_features: int,
              noise: tuple[float, str] = (NOISY_STRENGTH, "unit")) -> nn.Module:
    cls = bnn.NoisyBatchNorm2d if kind == "conv" else bnn.NoisyBatchNorm1d
    return cls(num_features, *noise)


def _by_kind(conv: type[nn.Module], fc: type[nn.Module], *defaults: Any) -> Callable[..., nn.Module]:
    """A builder of ``conv`` for conv activations and ``fc`` for FC ones; a value given is
    passed on after ``num_features``, else ``defaults`` are."""
    def build(kind: str, num_features: int, *args: Any) -> nn.Module:
        return (conv if kind == "conv" else fc)(num_features, *(args or defaults))
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
    "ghost": Norm(_by_kind(bnn.GhostBatchNorm2d, bnn.GhostBatchNorm1d, GHOST_VIRTUAL_BATCH_SIZE),
                  f"ghost batch norm: batch norm on each chunk of {GHOST_VIRTUAL_BATCH_SIZE} "
                  "samples, running statistics updated once per step from the chunks' mean "
                  "statistics; prediction as batch norm (bnlab.nn.ghost); 'ghost:V' sets the "
                  "chunk (virtual batch) size V >= 2",
                  batch_statistics=True, parse_value=parse_virtual_batch_size,
                  revision=1),  # 1: one update per step (0: one per chunk)
    "renorm": Norm(_by_kind(bnn.BatchRenorm2d, bnn.BatchRenorm1d),
                   "batch renormalization: r_max 3, d_max 5 after 100 steps of plain batch "
                   "norm; prediction as batch norm (bnlab.nn.renorm)", batch_statistics=True),
    "frozen": Norm(_by_kind(bnn.FrozenBatchNorm2d, bnn.FrozenBatchNorm1d),
                   "frozen batch norm: fixed statistics and affine, the same in train and eval; "
                   "fresh ones are (0, 1) statistics and the identity affine, so training with "
                   "it is training without normalization: for inference and as a baseline "
                   "(bnlab.nn.frozen)", batch_statistics=False),
    "noisy-bn": Norm(_noisy_bn,
                     "Santurkar et al.'s noisy BN: bnlab's BN, then y*s+m with each unit's mean "
                     "shift and scale re-drawn every step, plus small per-sample noise; its "
                     "expectation in eval mode (bnlab.nn.noisy); 'noisy-bn:S' sets the strength "
                     "S (default 1; 0 = plain BN), 'noisy-bn:S:layer' draws one shift and scale "
                     "per layer instead of per unit", batch_statistics=True,
                     parse_value=parse_noise),
}
"""Every norm the lab knows, by name."""


ENTRY_POINT_GROUP = "bnlab.norms"
"""The entry-point group a distribution registers plug-in norms in (see :func:`plugin_norm`)."""

_IMPORT_PATH = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):"
                          r"(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?::(?P<value>.*))?$")
_PLUGIN_PROBE = {"conv": (2, 4, 3, 3), "fc": (2, 4)}
"""Input shapes a plug-in is run forward on once when first resolved."""


def plugin_norm(obj: Any, name: str) -> Norm:
    """The :class:`Norm` of plug-in object ``obj`` (found under ``name``), or a ValueError
    saying what was expected.

    The contract: ``obj`` is either a :class:`Norm` (full control, as the built-ins), or a
    callable, a class or a factory function, ``obj(kind, num_features)`` -> ``nn.Module``
    (``kind``: ``"conv"`` for (N, C, H, W) activations, ``"fc"`` for (N, C); the module
    keeps the shape) with these attributes:

    - ``batch_statistics`` (required, a bool): True if it normalizes over the batch in
      training (so it cannot train on batches of one), False if each sample by itself;
    - ``parse_value`` (optional): takes the text of ``NAME:VALUE``'s VALUE and returns the
      value (``float`` and ``int`` will do), raising ValueError for a bad one; the norm is then
      built as ``obj(kind, num_features, value)``. Without it the norm takes no value;
    - ``description`` (optional): one line; else the first line of its docstring.
    """
    if isinstance(obj, Norm):
        return obj
    if not callable(obj):
        raise ValueError(f"norm {name!r} is a {type(obj).__name__}; expected a callable "
                         "(kind, num_features[, value]) -> nn.Module, or a "
                         "bnlab.training.norms.Norm")
    batch_statistics = getattr(obj, "batch_statistics", None)
    if not isinstance(batch_statistics, bool):
        raise ValueError(f"norm {name!r} needs an attribute batch_statistics = True (it "
                         "normalizes over the batch in training) or False (each sample by "
                         f"itself) (got {batch_statistics!r})")
    parse_value = getattr(obj, "parse_value", None)
    if parse_value is not None and not callable(parse_value):
        raise ValueError(f"norm {name!r}: parse_value must be callable (got {parse_value!r})")
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    description = getattr(obj, "description", None) or (doc[0] if doc else name)
    return Norm(obj, str(description), batch_statistics, parse_value)


@functools.cache
def _entry_points() -> dict[str, Any]:
    """The installed distributions' plug-in norms: entry-point name -> entry point (read
    once per process)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load(name: str, load: Callable[[], Any], what: str) -> Any:
    """``load()``; whatever the plug-in's code raises becomes a one-line ValueError saying ``what``
    failed."""
    try:
        return load()
    except Exception as exc:  # the user's code: whatever it raises is one line here
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"norm {name!r}: {what} failed: {type(exc).__name__}"
                         + (f": {text}" if text else "")) from None


def _import_attribute(module_name: str, attr: str, name: str) -> Any:
    """``module_name``'s (dotted) attribute ``attr``, or a ValueError saying which part is missing."""
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
            raise ValueError(f"norm {name!r}: importing module {module_name!r} failed: "
                             f"ModuleNotFoundError: {exc}") from None
        raise ValueError(f"norm {name!r}: no module named {module_name!r} here (is it "
                         "installed, or its folder on PYTHONPATH?)") from None
    except Exception as exc:  # the user's module: whatever it raises is one line here
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"norm {name!r}: importing module {module_name!r} failed: "
                         f"{type(exc).__name__}" + (f": {text}" if text else "")) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"norm {name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _plugin(base: str) -> Norm:
    """The :class:`Norm` of plug-in ``base``: an entry-point name or ``MODULE:ATTR``."""
    entry = _entry_points().get(base)
    if entry is not None:
        return plugin_norm(_load(base, entry.load, f"loading entry point {entry.value!r}"), base)
    module_name, _, attr = base.partition(":")
    return plugin_norm(_import_attribute(module_name, attr, base), base)


@functools.cache
def _checked_plugin(base: str, value: str | None) -> tuple[Norm, tuple[Any, ...]]:
    """Plug-in ``base`` with the text of its value (None: no value) -> (its Norm, the
    arguments after ``(kind, num_features)``), checked by :func:`_check_plugin`; once per
    process and name."""
    norm = _plugin(base)
    name = base if value is None else f"{base}:{value}"
    args = () if value is None else _value_args(norm, base, name, value)
    for kind, shape in _PLUGIN_PROBE.items():
        _check_plugin(name, norm, args, kind, shape)
    return norm, args


def _check_plugin(name: str, norm: Norm, args: tuple[Any, ...], kind: str,
                  shape: tuple[int, ...]) -> None:
    """Build ``norm`` for ``kind`` and run it forward once in train mode on a ``shape`` batch
    (under a forked RNG, so the check draws nothing from a run's random numbers): a plug-in
    that cannot do what the models will ask of it fails here, in one line."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        layer = _load(name, lambda: norm.build(kind, shape[1], *args),
                      f"building it for kind {kind!r} with {shape[1]} features")
        if not isinstance(layer, nn.Module):
            raise ValueError(f"norm {name!r}: building it for kind {kind!r} returned a "
                             f"{type(layer).__name__}; expected an nn.Module")
        x = torch.randn(shape)
        y = _load(name, lambda: layer.train()(x), f"a forward of a {shape} batch")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"norm {name!r}: kind {kind!r} maps a {shape} batch to {got}; "
                         "expected the same shape")


def _value_args(norm: Norm, base: str, name: str, value: str) -> tuple[Any]:
    """``(parsed value,)`` of ``name`` = ``base:value``, or a ValueError."""
    if norm.parse_value is None:
        takes_value = [n for n, spec in NORMS.items() if spec.parse_value is not None]
        raise ValueError(f"norm {base!r} takes no value (got {name!r}); of the built-in norms "
                         f"only {', '.join(takes_value)} do, and a plug-in with parse_value")
    if base in NORMS:
        return (norm.parse_value(value),)
    return (_load(name, lambda: norm.parse_value(value), f"parse_value({value!r})"),)


def _unknown(name: str) -> ValueError:
    takes_value = [n for n, spec in NORMS.items() if spec.parse_value is not None]
    plugins = sorted(_entry_points())
    return ValueError(f"unknown norm {name!r}; expected one of {sorted(NORMS)} (NAME:VALUE for "
                      f"{', '.join(takes_value)})"
                      + (f", a plug-in of {ENTRY_POINT_GROUP} {plugins}" if plugins else "")
                      + " or a plug-in's import path MODULE:ATTR[:VALUE]")


def _parse_norm_name(name: str) -> tuple[Norm, tuple[Any, ...]]:
    """``NAME`` -> (its Norm, ()); ``NAME:VALUE`` -> (its Norm, (parsed VALUE,)): the
    arguments ``build`` takes after ``(kind, num_features)``. Names are looked up as built-in
    names, then entry points of :data:`ENTRY_POINT_GROUP`, then import paths ``MODULE:ATTR``.
    ValueError for anything else, saying what was expected."""
    base, sep, value = name.partition(":")
    if base in NORMS:
        norm = NORMS[base]
        return norm, (_value_args(norm, base, name, value) if sep else ())
    if base in _entry_points():
        return _checked_plugin(base, value if sep else None)
    if match := _IMPORT_PATH.match(name):
        return _checked_plugin(f"{match['module']}:{match['attr']}", match["value"])
    raise _unknown(name)


def check_norm_name(name: str) -> None:
    """ValueError unless ``name`` is a norm of :data:`NORMS` or a plug-in that passes its
    checks, or ``NAME:VALUE`` for a norm that takes a value, with a value it accepts."""
    _parse_norm_name(name)


def uses_batch_statistics(name: str) -> bool:
    """Whether the norm named ``name`` (``NAME`` or ``NAME:VALUE``) normalizes over the batch
    in training, so cannot train on batches of one."""
    return _parse_norm_name(name)[0].batch_statistics


def norm_revision(name: str) -> int:
    """The :attr:`Norm.revision` of the norm named ``name`` (``NAME`` or ``NAME:VALUE``)."""
    return _parse_norm_name(name)[0].revision


def describe_norm(name: str) -> str:
    """The description of the norm named ``name`` (``NAME`` or ``NAME:VALUE``)."""
    return _parse_norm_name(name)[0].description


def create_norm_layer(name: str, kind: str, num_features: int) -> nn.Module:
    """The norm layer named ``name`` (``NAME`` or ``NAME:VALUE``) for ``kind`` activations
    with ``num_features``."""
    if kind not in _KINDS:
        raise ValueError(f"expected kind in {_KINDS} (got {kind!r})")
    norm, args = _parse_norm_name(name)
    return norm.build(kind, num_features, *args)
