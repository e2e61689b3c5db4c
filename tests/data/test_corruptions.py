"""Fashion-MNIST-C: each corruption grows with its severity, is deterministic for a seed,
keeps shape, dtype and range; the cache is read back the second time and rebuilt when its
key changes or its bytes are damaged. Synthetic images only (``synthetic_fashion``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bnlab.data import corruptions, fashion_c
from bnlab.data.corruptions import (
    CORRUPTIONS,
    DEFAULT_CORRUPTIONS,
    RANDOM,
    SEVERITY_LEVELS,
    bilinear_sample,
    clipped_zoom,
    corrupt,
    gaussian_filter,
)
from bnlab.data.fashion_c import build_fashion_mnist_c, cached_paths, corrupted_images


@pytest.fixture(scope="module")
def images(synthetic_fashion) -> np.ndarray:
    return synthetic_fashion.test_images[:40].numpy()  # (40, 28, 28) uint8


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("name", DEFAULT_CORRUPTIONS)
def test_the_difference_from_the_clean_image_grows_with_severity(images, name) -> None:
    differences = [mean_abs_difference(corrupt(images, name, s, seed=0), images)
                   for s in SEVERITY_LEVELS]
    assert differences[0] > 0.5, f"{name} at severity 1 barely changes the images: {differences}"
    assert all(b > a for a, b in zip(differences, differences[1:])), differences


def test_elastic_is_left_out_of_the_defaults_because_its_severities_are_not_ordered(images) -> None:
    """H&D's elastic severities shrink the affine warp while the local one grows: the pixel
    change falls with severity, which is why it is not in DEFAULT_CORRUPTIONS."""
    differences = [mean_abs_difference(corrupt(images, "elastic", s), images) for s in SEVERITY_LEVELS]
    assert differences[0] > differences[-1] > 0
    assert "elastic" not in DEFAULT_CORRUPTIONS


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_shape_dtype_and_range_are_kept(images, name) -> None:
    for batch in (images, images[0]):  # (N, 28, 28) and a single (28, 28) image
        out = corrupt(batch, name, 5, seed=3)
        assert out.shape == batch.shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_deterministic_for_a_seed_and_random_ones_differ_between_seeds(images, name) -> None:
    first = corrupt(images, name, 3, seed=7)
    assert np.array_equal(first, corrupt(images, name, 3, seed=7))
    other = corrupt(images, name, 3, seed=8)
    assert np.array_equal(first, other) == (name not in RANDOM)


def test_the_seed_stream_differs_between_corruptions_and_severities(images) -> None:
    a = corrupt(images, "gaussian_noise", 2, seed=0).astype(int) - images
    b = corrupt(images, "gaussian_noise", 3, seed=0).astype(int) - images
    # Not the same draws scaled: the noise patterns are not proportional.
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.5


def test_closed_forms_of_the_deterministic_corruptions() -> None:
    x = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    mean = x.mean()
    assert np.array_equal(corrupt(x, "brightness", 5), np.rint(np.clip(x / 255 + 0.3, 0, 1) * 255))
    assert np.array_equal(corrupt(x, "contrast", 2), np.rint((x - mean) * 0.5 + mean))
    flat = np.full((28, 28), 77, dtype=np.uint8)
    for name in ("gaussian_blur", "pixelate", "zoom_blur", "contrast"):
        assert np.array_equal(corrupt(flat, name, 5), flat), name  # nothing to change


def test_the_gaussian_filter_is_normalized_and_matches_a_direct_sum() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((2, 9, 9))
    blurred = gaussian_filter(x, 0.8, mode="edge")
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4)), mode="edge")  # radius int(4 * 0.8 + 0.5) = 3
    taps = np.exp(-0.5 * (np.arange(-3, 4) / 0.8) ** 2)
    taps /= taps.sum()
    kernel = np.outer(taps, taps)  # (7, 7)
    direct = np.array([[[np.sum(kernel * padded[n, 1 + i:8 + i, 1 + j:8 + j]) for j in range(9)]
                        for i in range(9)] for n in range(2)])
    np.testing.assert_allclose(blurred, direct, rtol=1e-12)


def test_bilinear_sampling_at_grid_points_and_midpoints() -> None:
    x = np.arange(12, dtype=np.float64).reshape(1, 3, 4)
    rows, cols = np.meshgrid(np.arange(3.0), np.arange(4.0), indexing="ij")
    np.testing.assert_array_equal(bilinear_sample(x, rows[None], cols[None], "reflect"), x)
    mid = bilinear_sample(x, np.array([[[0.5]]]), np.array([[[1.5]]]), "reflect")
    assert mid.item() == pytest.approx((1 + 2 + 5 + 6) / 4)
    # Outside the image: OpenCV's reflect-101 mirrors about the edge pixel, scipy's
    # reflect about the edge.
    assert bilinear_sample(x, np.array([[[0.0]]]), np.array([[[-1.0]]]), "reflect").item() == 1
    assert bilinear_sample(x, np.array([[[0.0]]]), np.array([[[-1.0]]]), "symmetric").item() == 0


def test_a_zoom_by_one_is_the_identity_and_a_zoom_magnifies_the_centre() -> None:
    x = np.random.default_rng(1).random((2, 28, 28))
    np.testing.assert_allclose(clipped_zoom(x, 1.0), x, atol=1e-12)
    square = np.zeros((1, 28, 28))
    square[0, 10:18, 10:18] = 1.0
    assert clipped_zoom(square, 1.25).sum() > square.sum() * 1.3  # area grows by ~1.25^2


def test_bad_arguments_are_refused(images) -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "jpeg", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.astype(np.float32), "jpeg", 1)


# --------------------------------------------------------------------------- the cache


def test_the_cache_is_read_the_second_time(images, tmp_path, monkeypatch) -> None:
    calls = []
    real = corruptions.corrupt
    monkeypatch.setattr(fashion_c, "corrupt", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    first = corrupted_images(torch.from_numpy(images), "jpeg", 2, seed=0, folder=tmp_path)
    second = corrupted_images(images, "jpeg", 2, seed=0, folder=tmp_path)
    assert calls == [("jpeg", 2, 0)]
    assert first.dtype == torch.uint8 and torch.equal(first, second)
    assert torch.equal(first, torch.from_numpy(corrupt(images, "jpeg", 2, seed=0)))


def test_the_default_folder_is_in_bnlab_s_cache(images, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path))
    corrupted_images(images, "contrast", 1)
    assert len(list((tmp_path / "fashion-mnist-c").glob("contrast-1-*.npy"))) == 1


@pytest.mark.parametrize("change", ["seed", "severity", "clean images"])
def test_a_changed_key_builds_a_new_set(images, tmp_path, monkeypatch, change) -> None:
    corrupted_images(images, "gaussian_noise", 1, seed=0, folder=tmp_path)
    calls = []
    real = corruptions.corrupt
    monkeypatch.setattr(fashion_c, "corrupt", lambda *a, **k: calls.append(1) or real(*a, **k))
    other = images.copy()
    other[0, 0, 0] ^= 1
    arguments = {"seed": (images, 1, 1), "severity": (images, 2, 0),
                 "clean images": (other, 1, 0)}[change]
    clean, severity, seed = arguments
    out = corrupted_images(clean, "gaussian_noise", severity, seed=seed, folder=tmp_path)
    assert calls == [1]
    assert torch.equal(out, torch.from_numpy(corrupt(clean, "gaussian_noise", severity, seed)))
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_a_version_change_builds_a_new_set(images, tmp_path, monkeypatch) -> None:
    corrupted_images(images, "contrast", 1, folder=tmp_path)
    monkeypatch.setattr(fashion_c, "VERSION", fashion_c.VERSION + 1)
    corrupted_images(images, "contrast", 1, folder=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2


@pytest.mark.parametrize("damage", ["bytes", "record", "missing record"])
def test_a_damaged_set_is_rebuilt(images, tmp_path, damage) -> None:
    expected = corrupted_images(images, "shot_noise", 4, seed=2, folder=tmp_path)
    key = fashion_c.cache_key(fashion_c.images_digest(images), "shot_noise", 4, 2)
    array_path, record_path = cached_paths(tmp_path, key)
    if damage == "bytes":
        array = np.load(array_path)
        array[0, 0, 0] ^= 0xFF
        np.save(array_path, array)
    elif damage == "record":
        record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "seed": 99}))
    else:
        record_path.unlink()
    again = corrupted_images(images, "shot_noise", 4, seed=2, folder=tmp_path)
    assert torch.equal(again, expected)
    assert torch.equal(torch.from_numpy(np.load(array_path)), expected)  # repaired on disk


def test_build_returns_every_corruption_and_severity(images, tmp_path) -> None:
    sets = build_fashion_mnist_c(images[:5], ["contrast", "jpeg"], [1, 5], folder=tmp_path)
    assert sorted(sets) == [("contrast", 1), ("contrast", 5), ("jpeg", 1), ("jpeg", 5)]
    assert all(s.shape == (5, 28, 28) for s in sets.values())
