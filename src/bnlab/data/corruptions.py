"""Common corruptions of 28x28 grayscale images: Hendrycks & Dietterich's, at severities 1-5.

Why: test-time adaptation (``bnlab exp adapt``) is measured on a shifted test set, and the
shift everyone reproduces is Hendrycks & Dietterich's (2019) "common corruptions" (the
-C benchmarks: CIFAR-10-C, ImageNet-C). There is no Fashion-MNIST-C of that family, so it
is made here, from the test set, deterministically from a seed (``bnlab.data.fashion_c``
builds and caches it).

Definitions. Each corruption follows the authors' own code for 32x32 images, the closest
scale to 28x28 (``make_cifar_c.py`` in github.com/hendrycks/robustness, ImageNet-C/create_c),
with its parameters per severity (:data:`SEVERITIES`); a pixel x is in [0, 1]:

* ``gaussian_noise``: ``clip(x + N(0, c^2))``, c = 0.04, 0.06, 0.08, 0.09, 0.10.
* ``shot_noise``: ``clip(Poisson(c x) / c)``, c = 500, 250, 100, 75, 50.
* ``impulse_noise``: salt and pepper (scikit-image's ``random_noise(mode='s&p')``): each
  pixel with probability c becomes 0 or 1 (even odds), c = 0.01, 0.02, 0.03, 0.05, 0.07.
* ``gaussian_blur``: Gaussian filter, sigma = 0.4, 0.6, 0.7, 0.8, 1 pixels (truncated at
  4 sigma, edges repeated: scikit-image's ``gaussian`` defaults).
* ``contrast``: ``(x - m) c + m`` with m the image's mean, c = 0.75, 0.5, 0.4, 0.3, 0.15.
* ``brightness``: ``clip(x + c)``, c = 0.05, 0.1, 0.15, 0.2, 0.3. The original adds c to the
  V channel of HSV; for a gray pixel (R = G = B, saturation 0) V is the pixel, so this is
  the same operation.
* ``pixelate``: box-downsample to ``int(28 c)`` pixels and box-upsample back (Pillow's BOX
  filter, as the original), c = 0.95, 0.9, 0.85, 0.75, 0.65 (26, 25, 23, 21, 18 pixels).
* ``jpeg``: JPEG round trip through Pillow at quality 80, 65, 58, 50, 40.
* ``zoom_blur``: the mean of the image and its centre zoomed by 1.00, 1.01, ... up to
  1.06, 1.11, 1.16, 1.21, 1.26 (bilinear, as ``scipy.ndimage.zoom(order=1)``).
* ``elastic``: a random affine warp of the three points (c, c), (c, -c), (-c, -c) around
  the centre (c = 28 // 3) by up to ``s`` pixels, then a random displacement field
  ``alpha * gaussian_filter(U(-1, 1), sigma)`` per axis, both sampled bilinearly with
  reflected edges; (alpha, sigma, s) = 28 x (0, 0, 0.08), (0.05, 0.2, 0.07),
  (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03) as in the original (whose 32 is
  the image size, replaced by 28). Severity 1 is the affine warp alone. Its severities
  are the authors' for model error, not ordered by pixel change: ``elastic`` is not in
  :data:`DEFAULT_CORRUPTIONS`, and the monotone-severity test leaves it out.

Results are rounded to the nearest integer (the original truncates; rounding leaves an
unchanged pixel unchanged) and returned as uint8 of the input's shape.

Why no library. Checked: ``imagecorruptions`` (bethgelab, Apache-2.0; last release 1.1.2,
2020) and its 2026 fork ``imagecorruptions-imaug`` carry ImageNet's parameters (blur sigma
up to 6 pixels, meant for 224x224: it erases a 28x28 image), draw from numpy's global
random state (no seed per call), and pull in opencv-python, scikit-image and scipy (the
fork numba too); 1.1.2 also calls ``np.float_`` (gone in numpy 2) and scikit-image's
deprecated ``multichannel=``. ``imgaug`` (0.4.0, 2020, unmaintained) wraps
``imagecorruptions``. ``albumentations`` (MIT) is no longer maintained since June 2025 and
its successor AlbumentationsX is AGPL-3.0; its transforms take ranges of strengths, not
H&D's severities (each would be pinned by hand), and it pulls in opencv-python-headless,
pydantic and albucore. The corruptions themselves are a few lines of numpy each, so they are written
here with the 32x32 parameters, a seed per call, and Pillow (already a dependency of
matplotlib) for the JPEG codec and the box resize.

Every function is pure: ``(images, severity, rng) -> images`` on uint8 arrays of shape
(28, 28) or (N, 28, 28), drawing its randomness from the numpy Generator it is given
(:func:`corrupt` makes one from a seed).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
"""``(images float64 (N, H, W) in [0, 1], severity 1..5, rng) -> float64 (N, H, W)``."""

SEVERITY_LEVELS = (1, 2, 3, 4, 5)
IMAGE_SIZE = 28

SEVERITIES: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg": (80, 65, 58, 50, 40),
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # largest zoom factor
    "elastic": tuple((IMAGE_SIZE * a, IMAGE_SIZE * s, IMAGE_SIZE * p) for a, s, p in (
        (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03))),  # (alpha, sigma, affine shift) in pixels
}
"""Each corruption's parameter at severities 1..5 (Hendrycks & Dietterich's 32x32 values)."""

RANDOM = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "elastic"})
"""The corruptions that draw random numbers (the others ignore the seed)."""

DEFAULT_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur",
                       "contrast", "brightness", "pixelate", "jpeg", "zoom_blur")
"""Fashion-MNIST-C as ``bnlab exp adapt`` uses it: noise, blur, digital and zoom, one each
of H&D's families that a grayscale 28x28 image has (no frost, snow, fog or saturation)."""


# --------------------------------------------------------------------------- helpers


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """Normalized 1-D Gaussian, radius ``int(truncate * sigma + 0.5)`` (scipy's rule)."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_filter(images: np.ndarray, sigma: float, mode: str, truncate: float = 4.0) -> np.ndarray:
    """Separable Gaussian filter over the last two axes of (N, H, W); ``mode`` is numpy's
    pad mode (``"edge"`` = scipy's ``nearest``, ``"symmetric"`` = scipy's ``reflect``)."""
    if sigma <= 0:
        return images.copy()
    kernel = _gaussian_kernel(sigma, truncate)
    radius = len(kernel) // 2
    out = images
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode=mode)  # (N, H + 2r, W) or (N, H, W + 2r)
        size = out.shape[axis]
        out = sum(weight * np.take(padded, np.arange(i, i + size), axis=axis)
                  for i, weight in enumerate(kernel))
    return out


def _fold(index: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Integer indices outside 0..size-1 mapped back inside: ``"reflect"`` mirrors about the
    edge pixel (dcb|abcd|cba, OpenCV's BORDER_REFLECT_101), ``"symmetric"`` about the edge
    (dcba|abcd|dcba, scipy's ``reflect``)."""
    if size == 1:
        return np.zeros_like(index)
    if mode == "reflect":
        period = 2 * size - 2
        index = np.mod(index, period)
        return np.where(index >= size, period - index, index)
    period = 2 * size
    index = np.mod(index, period)
    return np.where(index >= size, period - 1 - index, index)


def bilinear_sample(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """``images`` (N, H, W) read at real coordinates ``rows``, ``cols`` (N, H', W') by
    bilinear interpolation; coordinates outside the image fold back by ``mode``
    (see :func:`_fold`)."""
    n, height, width = images.shape
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = rows - r0, cols - c0  # (N, H', W') fractional parts
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    batch = np.arange(n).reshape(n, 1, 1)

    def at(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return images[batch, _fold(r, height, mode), _fold(c, width, mode)]

    top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
    bottom = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
    return top * (1 - fr) + bottom * fr


def _affine_from_points(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 affine map taking three (x, y) points ``source`` to ``target`` (OpenCV's
    ``getAffineTransform``)."""
    ones = np.ones((3, 1))
    return np.linalg.solve(np.hstack([source, ones]), target).T  # (2, 3)


# --------------------------------------------------------------------------- corruptions


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITIES["gaussian_noise"][severity - 1]
    return np.clip(x + rng.normal(scale=c, size=x.shape), 0, 1)


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITIES["shot_noise"][severity - 1]
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITIES["impulse_noise"][severity - 1]
    flipped = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(flipped, salt.astype(np.float64), x)


def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return gaussian_filter(x, SEVERITIES["gaussian_blur"][severity - 1], mode="edge")


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITIES["contrast"][severity - 1]
    means = x.mean(axis=(1, 2), keepdims=True)  # (N, 1, 1)
    return np.clip((x - means) * c + means, 0, 1)


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + SEVERITIES["brightness"][severity - 1], 0, 1)


def _through_pillow(x: np.ndarray, transform: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Each (H, W) image of ``x`` as an 8-bit Pillow image, transformed, back to [0, 1]."""
    out = np.empty_like(x)
    for i, image in enumerate(_to_uint8(x)):
        out[i] = np.asarray(transform(Image.fromarray(image, mode="L")), dtype=np.float64) / 255
    return out


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITIES["pixelate"][severity - 1]
    height, width = x.shape[1:]
    small = (int(width * c), int(height * c))
    return _through_pillow(x, lambda image: image.resize(small, Image.Resampling.BOX)
                           .resize((width, height), Image.Resampling.BOX))


def jpeg(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = SEVERITIES["jpeg"][severity - 1]

    def round_trip(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))

    return _through_pillow(x, round_trip)


def _interpolation_matrix(grid: np.ndarray, size: int) -> np.ndarray:
    """(len(grid), size): row i holds the linear-interpolation weights that read a length-
    ``size`` signal at the real position ``grid[i]`` (inside 0..size-1)."""
    lower = np.clip(np.floor(grid).astype(np.int64), 0, size - 2)
    fraction = grid - lower
    matrix = np.zeros((len(grid), size))
    matrix[np.arange(len(grid)), lower] = 1 - fraction
    matrix[np.arange(len(grid)), lower + 1] = fraction
    return matrix


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """The centre of each (H, H) image zoomed by ``factor`` back to (H, H): the central
    ``ceil(H / factor)`` square resized bilinearly to ``round(ceil(H / factor) * factor)``
    with corners on corners (``scipy.ndimage.zoom(order=1)``), then centre-cropped. The
    resize is separable, so it is ``R @ x @ R^T`` with one interpolation matrix R."""
    size = x.shape[1]
    crop = int(math.ceil(size / factor))
    top = (size - crop) // 2
    zoomed = int(round(crop * factor))
    trim = (zoomed - size) // 2
    grid = top + np.arange(trim, trim + size) * (crop - 1) / (zoomed - 1)  # (H,) source rows
    resize = _interpolation_matrix(grid, size)  # (H, H)
    return resize @ x @ resize.T  # (N, H, H)


def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    largest = SEVERITIES["zoom_blur"][severity - 1]
    factors = np.arange(1, largest, 0.01)  # 1.00, 1.01, ..., as np.arange(1, 1.06, 0.01)
    total = x + sum(clipped_zoom(x, factor) for factor in factors)
    return np.clip(total / (len(factors) + 1), 0, 1)


def elastic(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    alpha, sigma, shift = SEVERITIES["elastic"][severity - 1]
    n, height, width = x.shape
    centre = np.array([height // 2, width // 2], dtype=np.float64)
    half = min(height, width) // 3
    source = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                             np.arange(width, dtype=np.float64), indexing="ij")  # (H, W)
    warped = np.empty_like(x)
    for i in range(n):
        target = source + rng.uniform(-shift, shift, size=source.shape)
        # OpenCV's warpAffine(M) reads the source at M^-1 (x, y): invert by swapping roles.
        inverse = _affine_from_points(target, source)  # (2, 3) on (x, y) = (col, row)
        src_cols = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
        src_rows = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
        warped[i] = bilinear_sample(x[i:i + 1], src_rows[None], src_cols[None], mode="reflect")[0]
    dx = gaussian_filter(rng.uniform(-1, 1, size=x.shape), sigma, mode="symmetric", truncate=3) * alpha
    dy = gaussian_filter(rng.uniform(-1, 1, size=x.shape), sigma, mode="symmetric", truncate=3) * alpha
    return np.clip(bilinear_sample(warped, rows + dy, cols + dx, mode="symmetric"), 0, 1)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur, "contrast": contrast, "brightness": brightness,
    "pixelate": pixelate, "jpeg": jpeg, "zoom_blur": zoom_blur, "elastic": elastic,
}
"""Every corruption, by name (the keys of :data:`SEVERITIES`)."""


# --------------------------------------------------------------------------- entry point


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


def check_corruption(name: str, severity: int) -> None:
    """ValueError unless ``name`` is in :data:`CORRUPTIONS` and ``severity`` in 1..5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {sorted(CORRUPTIONS)}")
    if severity not in SEVERITY_LEVELS:
        raise ValueError(f"expected severity in {SEVERITY_LEVELS} (got {severity!r})")


def corruption_rng(name: str, severity: int, seed: int) -> np.random.Generator:
    """The generator :func:`corrupt` draws from: a pure function of (seed, name, severity),
    so each corruption and severity has its own stream and one seed fixes them all."""
    return np.random.default_rng([seed, sorted(CORRUPTIONS).index(name), severity])


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (uint8, (28, 28) or (N, 28, 28)) with corruption ``name`` at ``severity``
    (1..5), uint8 of the same shape. Deterministic for ``seed``; random corruptions
    (:data:`RANDOM`) differ between seeds, the others do not depend on it."""
    check_corruption(name, severity)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (2, 3):
        raise ValueError(f"expected uint8 images of shape (H, W) or (N, H, W) "
                         f"(got {images.dtype} {images.shape})")
    batch = images.reshape(-1, *images.shape[-2:]).astype(np.float64) / 255  # (N, H, W)
    out = CORRUPTIONS[name](batch, severity, corruption_rng(name, severity, seed))
    return _to_uint8(out).reshape(images.shape)
