"""Measurements of finished runs' models, beyond what training recorded.

Why: several experiments evaluate a finished model again, in a mode or on images that
training did not use; one definition of "accuracy in train or eval mode" keeps those
numbers comparable between experiments. Such measurements are expensive (a model reload,
attacks, gradients), so experiments keep each one in its run folder with ``runs.cached``,
keyed by the measurement's settings and the :func:`fingerprint` of the images it used.

Two differences of such accuracies feed verdicts: the *mode difference* (train mode minus
eval mode, same images) and the *generalization gap* (training images minus test images,
both in eval mode). Each is read on synthetic models with a known answer
(:func:`calibrate_mode_difference`, :func:`calibrate_generalization_gap`): a one-pixel
classifier whose BN running mean is off by ``c`` loses exactly the fraction ``c`` in eval
mode, dropout ``p`` before its output costs ``p / 2`` in train mode, and labels flipped on a
fraction ``f`` of the "test" images open a gap of ``f``.
"""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from bnlab.experiments.findings import Calibration


def fingerprint(*tensors: torch.Tensor) -> str:
    """A short SHA-256 of the tensors' shapes, dtypes and contents: which images (and labels)
    a measurement was made on, for its cache key."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(f"{tuple(t.shape)} {t.dtype};".encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def accuracy_in_mode(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     training: bool, seed: int = 0, batch_size: int = 1000) -> float:
    """Accuracy of a copy of ``model`` in train or eval mode (the model and its BN buffers
    are untouched; dropout masks are seeded)."""
    probe = copy.deepcopy(model).train(training)
    torch.manual_seed(seed)
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].unsqueeze(1).float().div(255)  # (B, 1, 28, 28)
        correct += (probe(x).argmax(dim=1) == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


def mode_difference(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    batch_size: int = 1000, seed: int = 0) -> float:
    """Accuracy in train mode minus accuracy in eval mode on the same ``images`` (uint8
    ``(N, 28, 28)``), in batches of ``batch_size`` (:func:`accuracy_in_mode`)."""
    return (accuracy_in_mode(model, images, labels, True, seed, batch_size)
            - accuracy_in_mode(model, images, labels, False, seed, batch_size))


def generalization_gap(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                       test: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Eval-mode accuracy on training images minus on test images (each ``(images, labels)``)."""
    return (accuracy_in_mode(model, *train, training=False)
            - accuracy_in_mode(model, *test, training=False))


# --------------------------------------------------------------------------- known answers

CALIBRATION_IMAGES = 1000


def _sign_images(n: int = CALIBRATION_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images whose first pixel alone sets the class: half of them (label 1) at
    pixel values spread over 128..255, the other half (label 0) mirrored to 127..0, so that
    ``x = pixel / 255 - 0.5`` is spread evenly over (0, 0.5] and [-0.5, 0) and every batch of
    the whole set has mean 0."""
    half = n // 2
    pixel = 128 + (torch.arange(half) * 128) // half  # (half,) in 128..255
    values = torch.cat([pixel, 255 - pixel])  # (n,)
    images = torch.zeros(2 * half, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = values.to(torch.uint8)
    labels = torch.cat([torch.ones(half), torch.zeros(half)]).long()  # (n,)
    return images, labels


def sign_classifier(middle: nn.Module | None = None) -> nn.Module:
    """Logits ``(-z, z)`` of ``z = middle(x[0] - 0.5)``, ``x[0]`` the first pixel: perfect on
    :func:`_sign_images` when ``middle`` keeps the sign."""
    read = nn.Linear(784, 1)
    out = nn.Linear(1, 2)
    with torch.no_grad():
        read.weight.zero_()
        read.weight[0, 0] = 1.0
        read.bias.fill_(-0.5)
        out.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        out.bias.zero_()
    return nn.Sequential(nn.Flatten(), read, middle or nn.Identity(), out)


def _shifted_bn(shift: float, images: torch.Tensor) -> nn.BatchNorm1d:
    """A BN whose running mean is ``shift`` above the data's mean (0), its running variance
    the data's."""
    bn = nn.BatchNorm1d(1, affine=False)
    x = images[:, 0, 0].float() / 255 - 0.5  # (N,)
    bn.running_mean.fill_(shift)
    bn.running_var.fill_(x.var().item())
    return bn


MODE_SHIFTS = (0.0, 0.1, 0.3)
DROPOUT_P = 0.5
GAP_FLIPS = (0.0, 0.1, 0.3)
TOLERANCE = 0.01


def calibrate_mode_difference(seed: int = 0) -> list[Calibration]:
    """The mode difference on known answers: a BN whose running mean lies ``c`` off the data
    reads ``+c`` (its positives below ``c`` fall to the other class in eval mode only), for
    ``c`` in :data:`MODE_SHIFTS` (0: none); a net without a norm layer reads 0; dropout
    ``p`` before the output reads ``-p / 2`` in expectation (a dropped unit gives tied logits,
    class 0, so half the images fail with probability ``p``)."""
    images, labels = _sign_images()
    out = []
    for shift in MODE_SHIFTS:
        read = mode_difference(sign_classifier(_shifted_bn(shift, images)), images, labels)
        out.append(Calibration("train-mode minus eval-mode accuracy",
                               f"BN running mean {shift:g} off the data", f"{shift:+.3f}",
                               f"{read:+.4f}", abs(read - shift) <= TOLERANCE))
    read = mode_difference(sign_classifier(), images, labels)
    out.append(Calibration("train-mode minus eval-mode accuracy",
                           "no norm layer (the same function in both modes)", "+0.000",
                           f"{read:+.4f}", read == 0.0))
    read = mode_difference(sign_classifier(nn.Dropout(DROPOUT_P)), images, labels, seed=seed)
    spread = 4 * (DROPOUT_P * (1 - DROPOUT_P) / (len(labels) / 2)) ** 0.5 / 2  # 4 sd of the mean
    out.append(Calibration("train-mode minus eval-mode accuracy",
                           f"dropout {DROPOUT_P:g} before the output", f"{-DROPOUT_P / 2:+.3f}",
                           f"{read:+.4f}", abs(read + DROPOUT_P / 2) <= spread))
    return out


def calibrate_generalization_gap() -> list[Calibration]:
    """The generalization gap on known answers: a perfect classifier of the training images,
    "test" images the same with the labels of a fraction ``f`` flipped, reads ``f``."""
    images, labels = _sign_images()
    model = sign_classifier()
    out = []
    for flip in GAP_FLIPS:
        flipped = labels.clone()
        chosen = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        flipped[chosen[:round(flip * len(labels))]] ^= 1
        read = generalization_gap(model, (images, labels), (images, flipped))
        out.append(Calibration("generalization gap (train minus test accuracy, eval mode)",
                               f"test labels flipped on {flip:.0%}", f"{flip:+.3f}",
                               f"{read:+.4f}", abs(read - flip) <= 1e-9))
    return out
