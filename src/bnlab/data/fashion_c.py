"""Fashion-MNIST-C: the test set under each corruption and severity, built once and cached.

Why a cache: corrupting the 10,000 test images takes seconds per (corruption, severity)
(JPEG and the box resizes go through Pillow one image at a time), and an experiment with
a grid over seeds and methods reads the same corrupted set many times. So each set is
written to bnlab's cache folder (``bnlab.data.dataset.cache_dir()``, i.e. ``$BNLAB_CACHE``
or ``~/.cache/bnlab``) under ``fashion-mnist-c/``, named by a key that hashes everything
the images depend on:

* the clean images (SHA-256 of their bytes and shape),
* the corruption, its severity and the seed,
* :data:`VERSION` of the definitions in ``bnlab.data.corruptions`` (raised whenever a
  definition changes, so an old cache is never read as the new data).

Each set is two files: ``<name>-<severity>-<key>.npy`` (uint8, (N, 28, 28)) and, written
last (it marks the set complete), ``<...>.json`` with the key's parts and the SHA-256 of
the array's bytes. A set is read back only when the JSON is there, its key matches, and
the array's shape, dtype and SHA-256 are the recorded ones; anything else (a file from a
killed write, damaged or edited bytes) is rebuilt. Files are written atomically
(``bnlab.util.io``). Labels are not stored: they are the clean set's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from bnlab.data.corruptions import check_corruption, corrupt
from bnlab.data.dataset import cache_dir, sha256_hex
from bnlab.util.io import atomic_write, atomic_write_json, read_json

VERSION = 1
"""Version of the corruption definitions; part of every cache key."""

FOLDER = "fashion-mnist-c"


def default_cache_folder() -> Path:
    """Where the corrupted sets are kept: ``cache_dir() / "fashion-mnist-c"``."""
    return cache_dir() / FOLDER


def images_digest(images: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of uint8 images' shape and bytes: which clean set a corrupted one came from."""
    array = _as_uint8_array(images)
    return hashlib.sha256(f"{array.shape};".encode() + array.tobytes()).hexdigest()


def cache_key(clean_digest: str, name: str, severity: int, seed: int) -> dict[str, object]:
    """Everything a corrupted set depends on (see the module docstring)."""
    return {"version": VERSION, "clean_sha256": clean_digest, "corruption": name,
            "severity": severity, "seed": seed}


def _key_hash(key: dict[str, object]) -> str:
    text = ";".join(f"{field}={key[field]}" for field in sorted(key))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_paths(folder: Path, key: dict[str, object]) -> tuple[Path, Path]:
    """(array file, JSON record) of the set with ``key`` in ``folder``."""
    stem = f"{key['corruption']}-{key['severity']}-{_key_hash(key)}"
    return folder / f"{stem}.npy", folder / f"{stem}.json"


def corrupted_images(images: torch.Tensor | np.ndarray, name: str, severity: int, seed: int = 0,
                     folder: str | Path | None = None) -> torch.Tensor:
    """``images`` (uint8, (N, 28, 28)) under corruption ``name`` at ``severity`` with
    ``seed`` (``bnlab.data.corruptions.corrupt``), as a uint8 tensor of the same shape:
    read from the cache in ``folder`` (default :func:`default_cache_folder`) when a
    verified copy is there, else computed and stored."""
    check_corruption(name, severity)
    clean = _as_uint8_array(images)
    folder = Path(folder) if folder is not None else default_cache_folder()
    key = cache_key(images_digest(clean), name, severity, seed)
    array_path, record_path = cached_paths(folder, key)
    cached = _read_verified(array_path, record_path, key, clean.shape)
    if cached is not None:
        return torch.from_numpy(cached)
    out = corrupt(clean, name, severity, seed)  # (N, 28, 28) uint8
    atomic_write(array_path, lambda f: np.save(f, out, allow_pickle=False))
    atomic_write_json(record_path, {**key, "sha256": sha256_hex(out.tobytes()),
                                    "shape": list(out.shape)})
    return torch.from_numpy(out)


def build_fashion_mnist_c(images: torch.Tensor | np.ndarray, names: Iterable[str],
                          severities: Iterable[int], seed: int = 0,
                          folder: str | Path | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """:func:`corrupted_images` for every (name, severity), in that order."""
    severities = list(severities)
    return {(name, severity): corrupted_images(images, name, severity, seed, folder)
            for name in names for severity in severities}


def _read_verified(array_path: Path, record_path: Path, key: dict[str, object],
                   shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array when its record matches ``key`` and its bytes their SHA-256."""
    try:
        record = read_json(record_path)
        array = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in key.items()):
        return None
    if array.dtype != np.uint8 or array.shape != shape:
        return None
    return array if record.get("sha256") == sha256_hex(array.tobytes()) else None


def _as_uint8_array(images: torch.Tensor | np.ndarray) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W) "
                         f"(got {array.dtype} {array.shape})")
    return np.ascontiguousarray(array)
