"""A small VGG-style ReLU network for 28x28 grayscale images, with the norm chosen by name.

Why: Santurkar et al. (2018) make their landscape claim (BN makes the loss and its gradient
better behaved along the step, their Fig. 4) on VGG networks on CIFAR-10: stacks of 3x3
convolutions with ReLU, max pooling between stages, fully connected layers on top, and BN
after every weight layer but the last. The chapter's LeNet is a sigmoid net with 5x5 convs
and average pooling, so it cannot stand for what they measured. This is the same kind of
network, narrow enough to train on a CPU in minutes, with the norm (a
``bnlab.training.norms`` name, ``"none"`` included) the only thing that changes between
the two arms of a comparison.

Layout (shapes for a (N, 1, 28, 28) input; ``C`` = :data:`CHANNELS`)::

    conv1: conv3x3(C)   -> norm -> relu       # (N, C, 28, 28)
    pool1: maxpool(2)                         # (N, C, 14, 14)
    conv2: conv3x3(2C)  -> norm -> relu       # (N, 2C, 14, 14)
    conv3: conv3x3(2C)  -> norm -> relu       # (N, 2C, 14, 14)
    pool2: maxpool(2)                         # (N, 2C, 7, 7)
    conv4: conv3x3(4C)  -> norm -> relu       # (N, 4C, 7, 7)
    pool3: maxpool(2)                         # (N, 4C, 3, 3)
    flatten                                   # (N, 36C)
    fc1: linear(FC)     -> norm -> relu       # (N, FC)
    head: linear(num_classes)                 # (N, num_classes) logits

Initialization: every conv and linear He-normal (fan-in, ReLU gain: the forward variance
is kept through the ReLUs, He et al. 2015), zero biases; norm layers keep torch's defaults
(gamma 1, beta 0). Every weight layer has a bias, also before a norm (where it is
redundant), so the weight layers are the same with and without the norm. Initialization
draws from torch's global RNG: seed it first for reproducible weights.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from bnlab.training.norms import create_norm_layer

CHANNELS = 16
FC = 128
INPUT_CHANNELS = 1
STAGES = ((1,), (2, 2), (4,))
"""Per stage (a max pool after each), the convs' widths in units of :data:`CHANNELS`."""
POOLED_SIZE = 3  # 28 -> 14 -> 7 -> 3 after the three max pools


def small_vgg(norm: str = "none", num_classes: int = 10) -> nn.Sequential:
    """The small VGG of the module docstring with ``norm`` after every hidden weight layer."""
    layers: list[tuple[str, nn.Module]] = []
    in_channels, index = INPUT_CHANNELS, 0
    for stage, widths in enumerate(STAGES, start=1):
        for width in widths:
            index += 1
            out_channels = width * CHANNELS
            layers.append((f"conv{index}", _block(
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                create_norm_layer(norm, "conv", out_channels))))
            in_channels = out_channels
        layers.append((f"pool{stage}", nn.MaxPool2d(kernel_size=2, stride=2)))
    layers += [("flatten", nn.Flatten()),
               ("fc1", _block(nn.Linear(in_channels * POOLED_SIZE**2, FC),
                              create_norm_layer(norm, "fc", FC))),
               ("head", nn.Linear(FC, num_classes))]
    return he_initialized(nn.Sequential(OrderedDict(layers)))


def _block(layer: nn.Module, norm: nn.Module) -> nn.Sequential:
    """``layer -> norm -> relu``, named ``layer``, ``norm``, ``act``."""
    return nn.Sequential(OrderedDict([("layer", layer), ("norm", norm), ("act", nn.ReLU())]))


def he_initialized(model: nn.Module) -> nn.Module:
    """Every conv and linear of ``model`` He-normal (fan-in, ReLU gain), its bias zero."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model
