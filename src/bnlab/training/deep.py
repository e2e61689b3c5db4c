"""Plain deep networks (no residual connections) for the "more than 100 layers" claim.

Why: the chapter says batch normalization makes networks of over 100 layers trainable.
Modern very deep nets also have residual connections, which by themselves keep gradients
alive, so they cannot show what BN alone changes. These networks are deliberately plain:
a chain of ``weight layer -> norm -> activation`` blocks where the norm (a ``bnlab.training.norms``
name, ``"none"`` included) is the only thing that varies between runs.

Initialization is the standard one for each activation, so the "no norm" baseline is a
fair one rather than a straw man: Xavier (Glorot) uniform for sigmoid/tanh (with torch's
gain for the activation: 1 for sigmoid, 5/3 for tanh), Kaiming (He) normal with fan-in and
ReLU gain for ReLU; biases start at zero; norm layers keep torch's
defaults (gamma = 1, beta = 0). Every weight layer has a bias, even before a BN (where the
bias is redundant), so with and without norm the weight layers are identical.

Widths are small (64 by default) on purpose: the experiment is about depth, and a
110-layer, width-64 MLP takes a few milliseconds per training step on a CPU, so the
claim can be checked on any machine.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from bnlab.training.norms import create_norm_layer

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}

INPUT_FEATURES = 28 * 28
INPUT_CHANNELS = 1


def deep_mlp(depth: int, width: int = 64, activation: str = "sigmoid", norm: str = "none",
             num_classes: int = 10) -> nn.Sequential:
    """A plain MLP with ``depth`` linear layers (``depth - 1`` hidden blocks and a head).

    Layout (shapes for a (N, 1, 28, 28) input)::

        flatten                                      # (N, 1, 28, 28) -> (N, 784)
        block1: linear(784, W) -> norm -> activation  # (N, W)
        block2 .. block{depth-1}: linear(W, W) -> norm -> activation
        head: linear(W, num_classes)                  # (N, num_classes) logits

    Parameters without norm: ``784*W + W + (depth - 2)*(W*W + W) + W*K + K`` for
    ``K = num_classes``; each norm layer with an affine adds ``2*W``.
    """
    check_architecture(depth, width, activation)
    blocks: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    in_features = INPUT_FEATURES
    for index in range(1, depth):
        blocks.append((f"block{index}", _block("linear", nn.Linear(in_features, width),
                                               create_norm_layer(norm, "fc", width), activation)))
        in_features = width
    blocks.append(("head", nn.Linear(width, num_classes)))
    return _initialized(nn.Sequential(OrderedDict(blocks)), activation)


def deep_cnn(depth: int, channels: int = 16, activation: str = "relu", norm: str = "none",
             num_classes: int = 10) -> nn.Sequential:
    """A plain, narrow CNN with ``depth`` weight layers (``depth - 1`` convs and a head).

    Every conv is 3x3 with padding 1 and ``channels`` output channels; the convs that open
    the second and the last third of the stack have stride 2, so a 28x28 input goes
    28 -> 14 -> 7. Then global average pooling and a linear head::

        block1 .. block{depth-1}: conv3x3 -> norm -> activation  # (N, C, 28|14|7, 28|14|7)
        pool: global average                                     # (N, C, 7, 7) -> (N, C, 1, 1)
        flatten                                                  # (N, C)
        head: linear(C, num_classes)                             # (N, num_classes)

    Much slower than :func:`deep_mlp` on a CPU (the first third of the convs run at
    28x28); meant for a GPU, or a CPU with small batches.
    """
    check_architecture(depth, channels, activation)
    num_convs = depth - 1
    downsample_at = {1 + num_convs // 3, 1 + 2 * num_convs // 3} - {1}
    blocks: list[tuple[str, nn.Module]] = []
    in_channels = INPUT_CHANNELS
    for index in range(1, depth):
        stride = 2 if index in downsample_at else 1
        conv = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1)
        blocks.append((f"block{index}", _block("conv", conv,
                                               create_norm_layer(norm, "conv", channels), activation)))
        in_channels = channels
    blocks += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
               ("head", nn.Linear(channels, num_classes))]
    return _initialized(nn.Sequential(OrderedDict(blocks)), activation)


def check_architecture(depth: int, width: int, activation: str) -> None:
    """ValueError unless ``depth``, ``width`` and ``activation`` make a deep net."""
    if depth < 2:
        raise ValueError(f"expected depth >= 2 (one hidden block and a head) (got {depth})")
    if width < 1:
        raise ValueError(f"expected width >= 1 (got {width})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")


def _block(layer_name: str, layer: nn.Module, norm: nn.Module, activation: str) -> nn.Sequential:
    """``layer -> norm -> activation``, with the names ``<layer_name>``, ``norm``, ``act``."""
    return nn.Sequential(OrderedDict([(layer_name, layer), ("norm", norm),
                                      ("act", ACTIVATIONS[activation]())]))


def _initialized(model: nn.Sequential, activation: str) -> nn.Sequential:
    """Xavier-uniform (sigmoid, tanh) or Kaiming-normal fan-in (ReLU) weights, zero biases.

    The head gets the same rule as the hidden layers; this only sets its scale.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if activation == "relu":
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain(activation))
            nn.init.zeros_(module.bias)
    return model


IOFFE_DEPTH = 4
IOFFE_WIDTH = 100
IOFFE_INIT_STD = 0.05
"""Ioffe & Szegedy (2015, Sec. 4.1) initialize their MNIST net with "small random Gaussian
values" without giving sigma; 0.05 is about Xavier's scale for 784 -> 100 (0.048) and half of
it for 100 -> 100, i.e. small but not so small that the plain net cannot start."""


def ioffe_mlp(norm: str = "none", num_classes: int = 10) -> nn.Sequential:
    """Ioffe & Szegedy's Fig. 1 net: 3 hidden layers of 100 sigmoid units, ``norm`` before each
    sigmoid, weights ~ N(0, IOFFE_INIT_STD^2), zero biases (layout of :func:`deep_mlp`)."""
    model = deep_mlp(IOFFE_DEPTH, IOFFE_WIDTH, "sigmoid", norm, num_classes)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=IOFFE_INIT_STD)
            nn.init.zeros_(module.bias)
    return model
