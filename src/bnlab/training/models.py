"""The chapter's models: LeNet, and LeNet with a normalization layer after every conv/linear.

Why: the chapter compares the *same* LeNet with its scratch BN, with torch's BN and with
none. Building them from one function with the norm chosen by name (``bnlab.training.norms``)
guarantees the comparison changes only the normalization.

Layout of BN-LeNet (the chapter's, shapes for a 28x28 input)::

    conv(6, k5)   -> norm -> sigmoid -> avgpool(2)   # (N, 6, 24, 24) -> (N, 6, 12, 12)
    conv(16, k5)  -> norm -> sigmoid -> avgpool(2)   # (N, 16, 8, 8)  -> (N, 16, 4, 4)
    flatten -> linear(120) -> norm -> sigmoid        # (N, 256) -> (N, 120)
    linear(84) -> norm -> sigmoid                    # (N, 84)
    linear(10)                                       # (N, 10) logits

Plain LeNet (the baseline) pads the first conv by 2 and has no norm layers.
Linear and conv layers are lazy, sized by a dry run, then Xavier-uniform initialized,
as in the chapter.

ReLU-LeNet (``relu-lenet``) is BN-LeNet's layout with ReLU for every sigmoid, He-initialized
(``bnlab.training.vgg.he_initialized``), and ``small-vgg`` is ``bnlab.training.vgg``'s small
VGG: the ReLU networks of Santurkar et al.'s landscape claim, each with its norm chosen by
name (``--norm none`` for the plain arm: the same architecture without the norm).

:func:`build_model` fuses each of bnlab's batch norms with the activation after it
(``bnlab.nn.fuse_batch_norm_act``: one pass of the C++ kernel, ``nn.Identity`` in the
activation's place, so layer indices and ``state_dict`` keys are those of the unfused
model) unless ``fuse_activation=False``. On the lab's models this changes no number: the
kernel's relu and sigmoid are torch's (see ``bnlab.kernels.cpp``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bnlab.nn import fuse_batch_norm_act, is_batch_norm
from bnlab.training import deep, resnet, vgg
from bnlab.training.norms import create_norm_layer
from bnlab.util.scoped import in_mode

NORM_SLOTS = ("conv1", "conv2", "fc1", "fc2")
"""Where BN-LeNet can hold a norm layer: after each of its four hidden conv/linear layers."""

INPUT_SHAPE = (1, 28, 28)


def parse_norm_slots(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, ``"none"``, ``"conv"``, ``"fc"`` or a comma list of slot names -> slot tuple."""
    groups = {"all": NORM_SLOTS, "none": (), "conv": NORM_SLOTS[:2], "fc": NORM_SLOTS[2:]}
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    slots: list[str] = []
    for name in (n.strip() for n in names if n.strip()):
        if name in groups:
            slots.extend(groups[name])
        elif name in NORM_SLOTS:
            slots.append(name)
        else:
            raise ValueError(
                f"unknown norm slot {name!r}; expected {sorted(groups)} or a comma list of "
                f"{list(NORM_SLOTS)}"
            )
    return tuple(s for s in NORM_SLOTS if s in slots)


DROPOUT_ORDERS = ("after", "before")
"""Where dropout sits in a hidden FC block: ``after`` the activation (linear -> norm -> sigmoid
-> dropout, the usual place) or ``before`` the norm (linear -> dropout -> norm -> sigmoid)."""


def bn_lenet(
    norm: str = "bnlab",
    norm_slots: str | Sequence[str] = "all",
    dropout: float = 0.0,
    dropout_order: str = "after",
    num_classes: int = 10,
    activation: str = "sigmoid",
) -> nn.Sequential:
    """The chapter's BN-LeNet with ``norm`` (a ``bnlab.training.norms`` name) in ``norm_slots``.

    ``dropout > 0`` adds dropout with that probability to the two hidden FC blocks, at
    ``dropout_order`` (see :data:`DROPOUT_ORDERS`). ``activation`` (a name of
    ``bnlab.training.deep.ACTIVATIONS``) replaces every sigmoid (``"relu"``: ReLU-LeNet).
    """
    slots = parse_norm_slots(norm_slots)
    if activation not in deep.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(deep.ACTIVATIONS)}")
    act = deep.ACTIVATIONS[activation]
    if dropout_order not in DROPOUT_ORDERS:
        raise ValueError(f"expected dropout_order in {DROPOUT_ORDERS} (got {dropout_order!r})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"expected 0 <= dropout < 1 (got {dropout})")

    slot_layers: dict[str, nn.Module] = {}  # each slot's layer (a norm or an identity)

    def norm_or_identity(slot: str, kind: str, features: int) -> nn.Module:
        layer = create_norm_layer(norm, kind, features) if slot in slots else nn.Identity()
        slot_layers[slot] = layer
        return layer

    def fc_block(slot: str, features: int) -> list[nn.Module]:
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        core = [norm_or_identity(slot, "fc", features), act()]
        return [nn.LazyLinear(features), *(drop + core if dropout_order == "before" else core + drop)]

    model = nn.Sequential(
        nn.LazyConv2d(6, kernel_size=5), norm_or_identity("conv1", "conv", 6),
        act(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.LazyConv2d(16, kernel_size=5), norm_or_identity("conv2", "conv", 16),
        act(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        *fc_block("fc1", 120),
        *fc_block("fc2", 84),
        nn.LazyLinear(num_classes),
    )
    # Named by slot, kept at its index: the state_dict keys stay a plain Sequential's.
    return name_slots(model, {index: slot for index, child in model.named_children()
                              for slot, layer in slot_layers.items() if child is layer})


def lenet(num_classes: int = 10) -> nn.Sequential:
    """The chapter's plain LeNet (first conv padded by 2), the no-BN baseline."""
    return nn.Sequential(
        nn.LazyConv2d(6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.LazyConv2d(16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.LazyLinear(120), nn.Sigmoid(),
        nn.LazyLinear(84), nn.Sigmoid(),
        nn.LazyLinear(num_classes),
    )


def initialize(model: nn.Module, example: torch.Tensor, rule: str = "xavier") -> nn.Module:
    """Size lazy layers with a dry run on ``example``, then Xavier-uniform their weights
    (``rule="xavier"``, the chapter's) or He-normal them with zero biases (``"he"``, for ReLU).

    The dry run is in eval mode under no_grad so it leaves no trace in BN running stats;
    the model's train/eval mode is restored afterwards.
    """
    if rule not in ("xavier", "he"):
        raise ValueError(f"expected rule 'xavier' or 'he' (got {rule!r})")
    with in_mode(model, False), torch.no_grad():
        model(example)
    if rule == "he":
        return vgg.he_initialized(model)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
    return model


MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "bn-lenet": ("norm_slots", "dropout", "dropout_order", "fuse_activation"),
    "lenet": (),
    "relu-lenet": ("fuse_activation",),
    "small-vgg": ("fuse_activation",),
    "deep-mlp": ("depth", "width", "activation", "fuse_activation"),
    "deep-cnn": ("depth", "width", "activation", "fuse_activation"),
    "ioffe-mlp": ("fuse_activation",),
    **{f"resnet{depth}": ("shortcut", "residual", "block", "fuse_activation")
       for depth in resnet.DEPTHS},
}
"""The options (``TrainConfig`` fields) each model takes beyond its norm."""


def has_norm_layers(name: str) -> bool:
    """Whether model ``name`` takes a norm layer: all but plain LeNet, the chapter's no-BN baseline."""
    return name != "lenet"


def check_norm(name: str, norm: str) -> None:
    """ValueError unless ``norm`` suits model ``name`` (a model without norm layers takes only 'none')."""
    if not has_norm_layers(name) and norm != "none":
        raise ValueError(f"model {name!r} has no norm layers (got norm={norm!r}); "
                         "use --norm none, or --model bn-lenet")


def build_model(name: str, norm: str = "bnlab", device: torch.device | str = "cpu",
                **options: Any) -> nn.Module:
    """A named model of :data:`MODEL_OPTIONS`, initialized and on ``device``.

    The LeNets are sized by a dry run and Xavier-initialized (:func:`initialize`; ReLU-LeNet
    He-initialized); the deep nets (``bnlab.training.deep``), the small VGG
    (``bnlab.training.vgg``) and the ResNets (``bnlab.training.resnet``) bring their own
    initialization. Initialization draws from torch's global RNG: seed it first for
    reproducible weights. Then bnlab's batch norms are fused with the activations after them,
    unless ``fuse_activation=False`` (module docstring; fusing draws nothing from the RNG).
    """
    if name not in MODEL_OPTIONS:
        raise ValueError(f"unknown model {name!r}; expected one of {list(MODEL_OPTIONS)}")
    unknown = sorted(set(options) - set(MODEL_OPTIONS[name]))
    if unknown:
        raise ValueError(f"model {name!r} takes options {list(MODEL_OPTIONS[name])} (got {unknown})")
    check_norm(name, norm)
    fuse = options.pop("fuse_activation", True)
    model = _build(name, norm, device, options)
    return fuse_batch_norm_act(model) if fuse else model


def _build(name: str, norm: str, device: torch.device | str, options: dict[str, Any]) -> nn.Module:
    if name == "lenet":
        return initialize(lenet().to(device), torch.zeros(2, *INPUT_SHAPE, device=device))
    if name == "bn-lenet":
        model = bn_lenet(norm, **options).to(device)
        return initialize(model, torch.zeros(2, *INPUT_SHAPE, device=device))
    if name == "relu-lenet":
        model = bn_lenet(norm, activation="relu").to(device)
        return initialize(model, torch.zeros(2, *INPUT_SHAPE, device=device), rule="he")
    if name == "small-vgg":
        return vgg.small_vgg(norm).to(device)
    if name == "deep-mlp":
        return deep.deep_mlp(norm=norm, **options).to(device)
    if name == "ioffe-mlp":
        return deep.ioffe_mlp(norm=norm).to(device)
    if name.startswith("resnet"):
        return resnet.cifar_resnet(int(name.removeprefix("resnet")), norm=norm, **options).to(device)
    width = options.pop("width", 16)
    return deep.deep_cnn(norm=norm, channels=width, **options).to(device)


SLOT_NAMES = "slot_names"
"""Attribute of a container module: its children's names (attribute names, e.g. Sequential
indices) -> the names of the slots they fill, for people (see :func:`layer_name`)."""


def name_slots(container: nn.Module, names: dict[str, str]) -> nn.Module:
    """Give ``container``'s children (by attribute name, e.g. a Sequential index ``"1"``) the
    names of the slots they fill (e.g. ``"conv1"``); returns ``container``.

    The names live on the container, not on the layers: the module tree and state_dict keys
    stay as they are, and a layer swapped in place (``freeze_batch_norm``,
    ``SyncBatchNorm.convert_sync_batchnorm``) is still named after its slot.
    """
    unknown = sorted(set(names) - set(dict(container.named_children())))
    if unknown:
        raise ValueError(f"no children {unknown} to name in {type(container).__name__}")
    setattr(container, SLOT_NAMES, dict(names))
    return container


def layer_name(model: nn.Module, qualified: str) -> str:
    """The name people see for ``model``'s sub-module ``qualified`` (as ``named_modules``
    gives it): each part a slot name where its container names it (:func:`name_slots`),
    else the attribute name itself. BN-LeNet's ``"1"`` is ``"conv1"``; a deep net's
    ``"block3.norm"`` stays ``"block3.norm"``; any model's named modules name themselves."""
    parts, module = [], model
    for part in qualified.split("."):
        parts.append(getattr(module, SLOT_NAMES, {}).get(part, part))
        module = module.get_submodule(part)
    return ".".join(parts)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every batch-norm layer in ``model``, torch's or bnlab's, in module
    order, each named by :func:`layer_name` (BN-LeNet: conv1, conv2, fc1, fc2)."""
    return [(layer_name(model, name), m) for name, m in model.named_modules() if is_batch_norm(m)]
