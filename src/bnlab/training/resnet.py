"""CIFAR-style residual networks (He et al. 2016, Sec. 4.2) for 28x28 grayscale images, with
the norm chosen by name and the two normalization-free variants, SkipInit and Fixup.

Why: the chapter credits batch norm with training networks of over 100 layers, but the
networks that made that ordinary are residual. Three questions about BN in ResNets need the
same network with only the normalization changed: why BN lets them train deep (De & Smith
2020: BN biases each residual block towards the identity), what replaces it (SkipInit, Fixup)
and what BN's gamma/beta alone can learn (Frankle et al. 2021). One builder,
:func:`cifar_resnet`, makes all of them, so a comparison changes only what it names.

Why not torchvision's ``BasicBlock``: torchvision cannot be imported beside the pinned torch
build (PyPI's torchvision 0.29.1 fails on import with "operator torchvision::nms does not
exist"; a matching torchvision would need another torch). Its block would fit only the
standard variant anyway: SkipInit and Fixup change the inside of the residual branch.

Layout (6n + 2 weight layers, shapes for a (N, 1, 28, 28) input)::

    stem: conv3x3(16) -> norm -> relu                 # (N, 16, 28, 28)
    stage1: n blocks, 16 channels                     # (N, 16, 28, 28)
    stage2: n blocks, 32 channels, the first stride 2 # (N, 32, 14, 14)
    stage3: n blocks, 64 channels, the first stride 2 # (N, 64, 7, 7)
    head: global average pool -> flatten -> fc(10)    # (N, 64) -> (N, 10) logits

Each block is ``relu(branch(x) + shortcut(x))`` (:class:`ResidualBlock`, He et al.'s
post-activation block), or with ``block="pre"`` (:data:`BLOCKS`) ``branch(x) + shortcut(x)``,
He et al.'s (2016b) pre-activation block, whose branch starts with the norm and the ReLU (see
"Pre-activation" below). The branch, by ``residual`` (:data:`RESIDUALS`):

* ``standard``: conv3x3 -> norm -> relu -> conv3x3 -> norm.
* ``skipinit`` (De & Smith 2020): the standard branch times a learnable scalar alpha,
  initialized at 0, so every block starts as its skip path. De & Smith use it without
  normalization (``norm="none"``); with a norm it is the norm's branch times alpha.
* ``fixup`` (Zhang et al. 2019): no normalization; a scalar bias before each conv and
  activation, a scalar multiplier per branch::

      + bias1a -> conv3x3 -> + bias1b -> relu -> + bias2a -> conv3x3 -> * scale -> + bias2b

  plus a scalar bias after the stem's conv and before the fc. See :func:`fixup_initialize`.

The shortcut, where a block changes the shape (the first block of stages 2 and 3), by
``shortcut`` (:data:`SHORTCUTS`): ``identity`` is He et al.'s option A, parameter-free:
subsample by 2 and append zero channels (:class:`ZeroPadShortcut`); ``projection`` is option B:
a 1x1 conv with stride 2, then the norm (Fixup: a scalar bias, then the 1x1 conv). Elsewhere
the shortcut is the identity.

Pre-activation (``block="pre"``, He et al. 2016b, "Identity Mappings in Deep Residual
Networks"; the layout of De & Smith's analysis): the skip path is a sum with no ReLU on it::

    stem: conv3x3(16) -> norm                         # no ReLU: the first branch starts with one
    block: x + branch(x), branch = norm -> relu -> conv3x3 -> norm -> relu -> conv3x3 [* alpha]
    head: norm -> relu -> global average pool -> flatten -> fc(10)

With batch norm the stem's norm makes the skip path start at unit variance per channel, so
that at initialization block l adds about 1 to it (De & Smith's 1/l); He et al.'s stem is the
conv alone, as it is here with ``norm="none"``. Shortcuts as above, applied to the block's
input. Fixup is defined on post-activation blocks only.

Why both: the post-activation ReLU after the sum cuts part of what each branch adds (at
initialization with batch norm the skip path's variance grows by about 1 - 2/pi per block, a
reflected random walk, instead of 1), so De & Smith's exact 1/l is for pre-activation blocks.

Initialization: every conv He-normal (fan-in, ReLU gain: preserves the forward variance, He et
al. 2015), no conv biases (the norm's beta plays that part; without a norm there is none, so
the norm is the only difference), norm layers torch's defaults (gamma 1, beta 0), the fc
torch's default; Fixup then rescales (:func:`fixup_initialize`). Initialization draws from
torch's global RNG: seed it first for reproducible weights.

Parameter count with an affine norm of 2 parameters per channel (batch norm) and option A,
for a 1-channel input: ``144 + 32`` (stem) ``+ n * 4672`` (stage 1) ``+ 13952 + (n - 1) * 18560``
(stage 2) ``+ 55552 + (n - 1) * 73984`` (stage 3) ``+ 650`` (fc) = ``97216 n - 22214``: 269,434
for ResNet-20 and 1,727,674 for ResNet-110 (He et al.'s 0.27M and 1.7M count 3 input
channels: 288 more stem weights, 269,722 and 1,727,962).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.training.norms import create_norm_layer

STAGE_CHANNELS = (16, 32, 64)
INPUT_CHANNELS = 1
DEPTHS = (20, 32, 56, 110)
"""He et al.'s CIFAR depths (n = 3, 5, 9, 18), registered as models ``resnet20`` ... ``resnet110``;
:func:`cifar_resnet` builds any 6n + 2."""

SHORTCUTS = ("identity", "projection")
"""Shortcuts where a block changes shape: He et al.'s option A (``identity``: subsample and
zero-pad) and option B (``projection``: 1x1 conv and norm)."""

BLOCKS = ("post", "pre")
"""Block layouts: He et al.'s post-activation ``relu(branch(x) + shortcut(x))`` (2016a) and
pre-activation ``branch(x) + shortcut(x)`` with a norm-relu-conv branch (2016b)."""

RESIDUALS = ("standard", "skipinit", "fixup")
"""The residual variants: He et al.'s block, SkipInit (De & Smith 2020), Fixup (Zhang et al. 2019)."""

FIXUP_LAYERS_PER_BRANCH = 2  # m of Zhang et al.: weight layers in each residual branch


def blocks_per_stage(depth: int) -> int:
    """n of a 6n + 2 layer CIFAR ResNet; ValueError unless ``depth`` is 6n + 2 with n >= 1."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"expected a CIFAR ResNet depth 6n + 2 with n >= 1, e.g. {list(DEPTHS)} "
                         f"(got {depth})")
    return (depth - 2) // 6


def check_resnet(shortcut: str, residual: str, norm: str, block: str = "post") -> None:
    """ValueError unless ``shortcut``, ``residual`` and ``block`` are known and ``residual`` suits
    ``norm`` and ``block``."""
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; expected one of {list(BLOCKS)}")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; expected one of {list(SHORTCUTS)}")
    if residual not in RESIDUALS:
        raise ValueError(f"unknown residual variant {residual!r}; expected one of {list(RESIDUALS)}")
    if residual == "fixup" and norm != "none":
        raise ValueError(f"Fixup replaces normalization: residual 'fixup' takes only norm 'none' "
                         f"(got norm {norm!r}); use --norm none")
    if residual == "fixup" and block != "post":
        raise ValueError(f"Fixup is defined on post-activation blocks: residual 'fixup' takes only "
                         f"block 'post' (got block {block!r})")


class Scale(nn.Module):
    """``x * weight`` with one learnable scalar ``weight`` (SkipInit's alpha, Fixup's multiplier)."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Bias(nn.Module):
    """``x + bias`` with one learnable scalar ``bias``, initialized at 0 (Fixup's biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: keep every ``stride``-th pixel, append zero channels.

    (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)); the new channels
    C_in .. C_out - 1 are zeros. No parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"expected out_channels >= in_channels (got {in_channels} -> "
                             f"{out_channels})")
        self.extra_channels, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        subsampled = x[:, :, ::self.stride, ::self.stride]  # (N, C_in, H', W')
        return F.pad(subsampled, (0, 0, 0, 0, 0, self.extra_channels))  # (N, C_out, H', W')


class ResidualBlock(nn.Module):
    """``relu(branch(x) + shortcut(x))``: He et al.'s post-activation residual block; with
    ``post_activation=False`` the sum alone (a pre-activation block: its ``relu`` is the identity).

    ``branch`` and ``shortcut`` are its submodules by those names (probes find residual
    blocks by them, ``bnlab.probes.residual``).
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module, post_activation: bool = True) -> None:
        super().__init__()
        self.branch, self.shortcut = branch, shortcut
        self.relu = nn.ReLU() if post_activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))  # (N, C_out, H', W')


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _branch(in_channels: int, out_channels: int, stride: int, norm: str,
            residual: str, block: str) -> nn.Sequential:
    """The residual branch of ``residual`` and ``block`` (see the module docstring), named by layer."""
    if residual == "fixup":
        return nn.Sequential(OrderedDict([
            ("bias1a", Bias()), ("conv1", _conv3x3(in_channels, out_channels, stride)),
            ("bias1b", Bias()), ("relu1", nn.ReLU()),
            ("bias2a", Bias()), ("conv2", _conv3x3(out_channels, out_channels)),
            ("scale", Scale(1.0)), ("bias2b", Bias()),
        ]))
    if block == "pre":
        layers = [
            ("norm1", create_norm_layer(norm, "conv", in_channels)), ("relu1", nn.ReLU()),
            ("conv1", _conv3x3(in_channels, out_channels, stride)),
            ("norm2", create_norm_layer(norm, "conv", out_channels)), ("relu2", nn.ReLU()),
            ("conv2", _conv3x3(out_channels, out_channels)),
        ]
    else:
        layers = [
            ("conv1", _conv3x3(in_channels, out_channels, stride)),
            ("norm1", create_norm_layer(norm, "conv", out_channels)), ("relu1", nn.ReLU()),
            ("conv2", _conv3x3(out_channels, out_channels)),
            ("norm2", create_norm_layer(norm, "conv", out_channels)),
        ]
    if residual == "skipinit":
        layers.append(("alpha", Scale(0.0)))
    return nn.Sequential(OrderedDict(layers))


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: str, shortcut: str,
              residual: str) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if shortcut == "identity":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
    if residual == "fixup":
        return nn.Sequential(OrderedDict([("bias", Bias()), ("conv", conv)]))
    return nn.Sequential(OrderedDict([("conv", conv),
                                      ("norm", create_norm_layer(norm, "conv", out_channels))]))


def _stage(blocks: int, in_channels: int, out_channels: int, stride: int, norm: str,
           shortcut: str, residual: str, block: str) -> nn.Sequential:
    """``blocks`` residual blocks named block1 .. blockN; the first has ``stride``."""
    layers = []
    for index in range(1, blocks + 1):
        block_stride = stride if index == 1 else 1
        layers.append((f"block{index}", ResidualBlock(
            _branch(in_channels, out_channels, block_stride, norm, residual, block),
            _shortcut(in_channels, out_channels, block_stride, norm, shortcut, residual),
            post_activation=block == "post")))
        in_channels = out_channels
    return nn.Sequential(OrderedDict(layers))


def cifar_resnet(depth: int, norm: str = "bnlab", shortcut: str = "identity",
                 residual: str = "standard", num_classes: int = 10,
                 in_channels: int = INPUT_CHANNELS, block: str = "post") -> nn.Sequential:
    """The CIFAR ResNet of ``depth`` = 6n + 2 layers (see the module docstring), initialized.

    ``norm`` is a ``bnlab.training.norms`` name; ``shortcut`` one of :data:`SHORTCUTS`;
    ``residual`` one of :data:`RESIDUALS` (``fixup`` takes only ``norm="none"`` and
    ``block="post"``); ``block`` one of :data:`BLOCKS`. Modules are named ``stem.conv``,
    ``stage2.block1.branch.norm1``, ``stage3.block2.shortcut``, ``head.fc``.
    """
    n = blocks_per_stage(depth)
    check_resnet(shortcut, residual, norm, block)
    fixup, pre = residual == "fixup", block == "pre"
    first, *_ = STAGE_CHANNELS
    stem_norm = ("bias", Bias()) if fixup else ("norm", create_norm_layer(norm, "conv", first))
    stages, channels = [], first
    for index, out_channels in enumerate(STAGE_CHANNELS, start=1):
        stride = 1 if index == 1 else 2
        stages.append((f"stage{index}", _stage(n, channels, out_channels, stride, norm, shortcut,
                                               residual, block)))
        channels = out_channels
    # pre-activation: the last block's sum is normalized and activated before the pool
    head = [("norm", create_norm_layer(norm, "conv", channels)), ("relu", nn.ReLU())] if pre else []
    head += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]  # (N, C, 1, 1) -> (N, C)
    head += [("bias", Bias())] if fixup else []
    head.append(("fc", nn.Linear(channels, num_classes)))
    stem = [("conv", _conv3x3(in_channels, first)), stem_norm] + ([] if pre else [("relu", nn.ReLU())])
    model = nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(OrderedDict(stem))),
        *stages,
        ("head", nn.Sequential(OrderedDict(head))),
    ]))
    he_initialize(model)
    if fixup:
        fixup_initialize(model)
    return model


def he_initialize(model: nn.Module) -> None:
    """Every conv of ``model`` He-normal with fan-in and ReLU gain (std sqrt(2 / fan_in)), in
    module order; norm layers and the fc keep torch's initialization."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """The residual blocks of ``model``, in module (forward) order."""
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


def fixup_scale(num_branches: int, layers_per_branch: int = FIXUP_LAYERS_PER_BRANCH) -> float:
    """Zhang et al.'s rescaling of a branch's weight layers, ``L^(-1 / (2m - 2))`` for L residual
    branches of m layers each (L^(-1/2) for the basic block's m = 2)."""
    if num_branches < 1 or layers_per_branch < 2:
        raise ValueError(f"expected num_branches >= 1 and layers_per_branch >= 2 (got "
                         f"{num_branches}, {layers_per_branch})")
    return num_branches ** (-1.0 / (2 * layers_per_branch - 2))


@torch.no_grad()
def fixup_initialize(model: nn.Module) -> None:
    """Zhang et al.'s Fixup rule on a He-initialized Fixup ResNet (Sec. 3, "Fixup initialization"):

    1. the fc (the classification layer) and the last layer of each residual branch (conv2)
       are zero;
    2. every other weight layer inside a branch (conv1) is rescaled by :func:`fixup_scale` of
       the number of branches L;
    3. scalar biases start at 0 and the multipliers at 1 (as :class:`Bias` and :class:`Scale`
       are built).

    The stem, the projection shortcuts and the fc's input keep the standard initialization.
    """
    blocks = residual_blocks(model)
    scale = fixup_scale(len(blocks))
    for block in blocks:
        block.branch.conv1.weight.mul_(scale)
        nn.init.zeros_(block.branch.conv2.weight)
    fc = model.head.fc
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)

