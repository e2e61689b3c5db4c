"""Fashion-MNIST on disk: where it is looked for, how its IDX files are read, how it is verified.

Why: every number bnlab reports (the chapter's accuracies, the BN-vs-no-BN curves)
is only worth something if it was measured on the real dataset. So this module

* looks for the four IDX files in a fixed, documented order (``--data-dir``,
  ``$BNLAB_DATA``, the user cache, Debian's ``dataset-fashion-mnist`` package),
* checks their structure every time (cheap) and the SHA-256 of their *decompressed*
  bytes once per file version (mirrors compress differently; the content is the
  dataset), remembering that check in a small JSON file so later runs skip it.

Getting the files when they are missing is ``bnlab.data.fetch``; batching them is
``bnlab.data.loader``. Labels are converted to int64 when loaded (what ``cross_entropy``
wants); images stay uint8 until a batch is taken, so the whole training set costs 47 MB.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bnlab.util.errors import DatasetError
from bnlab.util.io import atomic_write_json, read_json

CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

IMAGE_SIZE = 28
# Images in each split of the real dataset.
TRAIN_SIZE = 60000
TEST_SIZE = 10000

# The four files, by the role they play. Names are the decompressed ones; on disk each
# may also carry a ``.gz`` suffix.
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_NAMES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

LABELS_MAGIC = 2049
IMAGES_MAGIC = 2051
_MAGIC_KIND = {LABELS_MAGIC: "labels", IMAGES_MAGIC: "images"}
MAGIC_OF = {TRAIN_IMAGES: IMAGES_MAGIC, TRAIN_LABELS: LABELS_MAGIC,
             TEST_IMAGES: IMAGES_MAGIC, TEST_LABELS: LABELS_MAGIC}

# SHA-256 and size of each *decompressed* file of the real Fashion-MNIST.
EXPECTED_FILES: Mapping[str, tuple[str, int]] = {
    TRAIN_IMAGES: ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    TRAIN_LABELS: ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    TEST_IMAGES: ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    TEST_LABELS: ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}

# Where the official files are published, and Debian's package of them: named in every
# "not found" message, fetched from by ``bnlab.data.fetch``.
MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
APT_PACKAGE = "dataset-fashion-mnist"

# Where Debian's package puts the files; a tuple so tests can swap in their own folder.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)


# --------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class Location:
    """A folder that may hold Fashion-MNIST, and why bnlab looks there."""

    why: str
    path: Path


def cache_dir() -> Path:
    """bnlab's cache folder: ``$BNLAB_CACHE``, else ``~/.cache/bnlab``."""
    return Path(os.environ.get("BNLAB_CACHE") or Path.home() / ".cache" / "bnlab")


def default_data_dir() -> Path:
    """Where ``fetch_fashion_mnist`` downloads to when given no folder."""
    return cache_dir() / "fashion-mnist"


ENV_WHY = "$BNLAB_DATA"


def explicit_location(root: str | os.PathLike | None = None) -> Location | None:
    """The folder the user named (``root``, else ``$BNLAB_DATA``), or None when they named none."""
    if root is not None:
        return Location("explicit data dir (--data-dir)", Path(root))
    if os.environ.get("BNLAB_DATA"):
        return Location(ENV_WHY, Path(os.environ["BNLAB_DATA"]))
    return None


def search_locations(root: str | os.PathLike | None = None) -> list[Location]:
    """The folders to look in, in order. A folder the user named (``root`` or
    ``$BNLAB_DATA``) is the only one looked in: when it fails, that is an error."""
    explicit = explicit_location(root)
    if explicit is not None:
        return [explicit]
    locations = [Location("user cache", default_data_dir())]
    locations += [Location(f"Debian package {APT_PACKAGE}", d) for d in SYSTEM_DIRS]
    return locations


def files_in(directory: Path) -> dict[str, Path]:
    """The dataset files present in ``directory``, by decompressed name (raw preferred to .gz)."""
    found = {}
    for name in FILE_NAMES:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
    return found


def locate_fashion_mnist(root: str | os.PathLike | None = None) -> Location:
    """The first search location that holds all four files; DatasetError when none does."""
    for location in search_locations(root):
        if len(files_in(location.path)) == len(FILE_NAMES):
            return location
    explicit = explicit_location(root)
    if explicit is not None:
        raise DatasetError(_missing_in_root(explicit))
    looked = ", ".join(f"{loc.path} ({loc.why})" for loc in search_locations())
    raise DatasetError(f"Fashion-MNIST not found; looked in {looked}. {how_to_get_data()}")


def _missing_in_root(location: Location) -> str:
    root = location.path
    where = f"$BNLAB_DATA={root}: data directory" if location.why == ENV_WHY else f"data directory {root}"
    if not root.is_dir():
        return f"{where} does not exist (expected the four Fashion-MNIST files there)"
    missing = sorted(set(FILE_NAMES) - set(files_in(root)))
    return f"{where} lacks {', '.join(f'{m}[.gz]' for m in missing)}; {how_to_get_data()}"


def how_to_get_data() -> str:
    urls = " or ".join(f"{m}<name>.gz" for m in MIRRORS)
    return (f"Get it with internet access by running `bnlab data fetch` (downloads {urls}), "
            f"or as root with `apt-get install {APT_PACKAGE}` "
            f"(installs to {', '.join(map(str, SYSTEM_DIRS))}); "
            "existing files elsewhere can be used with --data-dir DIR or BNLAB_DATA=DIR")


# --------------------------------------------------------------------------- IDX reading


def _read_bytes(path: Path) -> bytes:
    """The decompressed content of ``path`` (gunzipped when its name ends in .gz)."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return gunzip(str(path), blob) if path.name.endswith(".gz") else blob


def gunzip(label: str, blob: bytes) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{label}: corrupt gzip data ({exc})") from exc


def parse_idx(label: str, raw: bytes, magic: int | None = None) -> torch.Tensor:
    """Check an unsigned-byte IDX file's header against its length; return its uint8 tensor."""
    if len(raw) < 4:
        raise DatasetError(f"{label}: truncated: {len(raw)} bytes, an IDX header needs at least 4")
    found_magic = int.from_bytes(raw[:4], "big")
    if magic is not None and found_magic != magic:
        raise DatasetError(
            f"{label}: expected magic {magic} ({_MAGIC_KIND.get(magic, 'IDX')}), got {found_magic}"
            + (f" ({_MAGIC_KIND[found_magic]})" if found_magic in _MAGIC_KIND else ""))
    if raw[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{label}: not an unsigned-byte IDX file (first bytes {raw[:4].hex()})")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DatasetError(f"{label}: truncated: header of {ndim} dims needs {header_size} bytes, "
                           f"file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    item_size = math.prod(dims[1:])
    data_size = len(raw) - header_size
    if data_size != dims[0] * item_size:
        what = "truncated" if data_size < dims[0] * item_size else "too long"
        raise DatasetError(f"{label}: {what}: header says {dims[0]} items of {item_size} bytes, "
                           f"file has {data_size} bytes of data")
    flat = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    return torch.from_numpy(flat.reshape(dims).copy())  # (dims[0], *dims[1:]) uint8


def read_idx(path: str | os.PathLike, magic: int | None = None) -> torch.Tensor:
    """Read one unsigned-byte IDX file (gzipped or not) into a uint8 tensor, checking its structure.

    ``magic`` (2049 labels, 2051 images) is checked when given. This says nothing about
    whether the file is the real Fashion-MNIST; see ``load_fashion_mnist``.
    """
    path = Path(path)
    return parse_idx(str(path), _read_bytes(path), magic)


# --------------------------------------------------------------------------- verification


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def verification_cache_path() -> Path:
    return cache_dir() / "verified.json"


class VerificationCache:
    """SHA-256 of files that verified, keyed by resolved path and the file's stamp on disk.

    The stamp is size, mtime, inode, device and ctime. Size and mtime alone can be faked by
    accident (``touch -d``, ``cp -p``, ``rsync -t``, tar restore the mtime of a changed or
    replaced file); a rewrite in place changes the ctime, a replacement the inode, and no
    user tool can set either back. Losing the cache only costs a re-hash, so unreadable or
    unwritable cache files are ignored; old entries without the full stamp never match.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = self._read(path)
        self.changed = False

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            entries = read_json(path)
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    @staticmethod
    def _stamp(file: Path) -> dict:
        stat = file.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
                "device": stat.st_dev, "ctime_ns": stat.st_ctime_ns}

    def lookup(self, file: Path) -> str | None:
        entry = self.entries.get(str(file.resolve()))
        if not isinstance(entry, dict):
            return None
        stamp = self._stamp(file)
        unchanged = all(entry.get(key) == value for key, value in stamp.items())
        return entry.get("sha256") if unchanged else None

    def remember(self, file: Path, digest: str) -> None:
        self.entries[str(file.resolve())] = {**self._stamp(file), "sha256": digest}
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        try:
            atomic_write_json(self.path, self.entries)
        except OSError:
            return
        self.changed = False


def check_content(label: str, raw: bytes, expected: tuple[str, int],
                   known_digest: str | None = None) -> str:
    """Compare decompressed bytes with the expected (sha256, size); return the digest."""
    want_digest, want_size = expected
    if len(raw) != want_size:
        raise DatasetError(f"{label}: {len(raw)} bytes decompressed, expected {want_size}; "
                           "not the real Fashion-MNIST")
    digest = known_digest or sha256_hex(raw)
    if digest != want_digest:
        raise DatasetError(f"{label}: SHA-256 mismatch: expected {want_digest}, got {digest}; "
                           "not the real Fashion-MNIST")
    return digest


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class DataFile:
    """One file as loaded: where, how big once decompressed, how its SHA-256 was checked."""

    path: Path
    decompressed_bytes: int
    sha256_check: str  # "hashed now", "remembered" (verification cache) or "skipped"


@dataclass(frozen=True, eq=False)
class FashionMNIST:
    """The whole dataset in memory. Images uint8 (N, 28, 28); labels int64 (N,) in 0..9."""

    train_images: torch.Tensor  # (60000, 28, 28) uint8
    train_labels: torch.Tensor  # (60000,) int64
    test_images: torch.Tensor  # (10000, 28, 28) uint8
    test_labels: torch.Tensor  # (10000,) int64
    root: Path
    found_via: str = ""  # which search location held it, e.g. "$BNLAB_DATA"
    files: tuple[DataFile, ...] = ()


def load_fashion_mnist(root: str | os.PathLike | None = None, verify: bool = True, *,
                       expected: Mapping[str, tuple[str, int]] | None = None) -> FashionMNIST:
    """Find, check and load Fashion-MNIST.

    Structure (magic, dims, lengths, label range, image/label counts) is always checked.
    With ``verify``, each decompressed file's size and SHA-256 must match ``expected``
    (default: the real dataset, ``EXPECTED_FILES``); a passing hash is remembered in
    ``verification_cache_path()`` so the next load of the same unchanged file skips it.
    """
    location = locate_fashion_mnist(root)
    paths = files_in(location.path)
    cache = VerificationCache(verification_cache_path()) if verify else None
    table = EXPECTED_FILES if expected is None else expected
    tensors, reports = {}, []
    for name in FILE_NAMES:
        tensors[name], report = _load_file(name, paths[name], cache, table)
        reports.append(report)
    if cache is not None:
        cache.save()
    train_labels = _check_split(paths[TRAIN_IMAGES], paths[TRAIN_LABELS],
                                tensors[TRAIN_IMAGES], tensors[TRAIN_LABELS])
    test_labels = _check_split(paths[TEST_IMAGES], paths[TEST_LABELS],
                               tensors[TEST_IMAGES], tensors[TEST_LABELS])
    return FashionMNIST(tensors[TRAIN_IMAGES], train_labels, tensors[TEST_IMAGES], test_labels,
                        root=location.path, found_via=location.why, files=tuple(reports))


def _load_file(name: str, path: Path, cache: VerificationCache | None,
               expected: Mapping[str, tuple[str, int]]) -> tuple[torch.Tensor, DataFile]:
    raw = _read_bytes(path)
    tensor = parse_idx(str(path), raw, MAGIC_OF[name])
    if cache is None:
        return tensor, DataFile(path, len(raw), "skipped")
    remembered = cache.lookup(path)
    digest = check_content(str(path), raw, expected[name], known_digest=remembered)
    if remembered is None:
        cache.remember(path, digest)
    return tensor, DataFile(path, len(raw), "remembered" if remembered else "hashed now")


def _check_split(images_path: Path, labels_path: Path,
                 images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Check one split's images against its labels; return the labels as int64."""
    if images.dim() != 3 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(f"{images_path}: expected images of shape "
                           f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
    if labels.dim() != 1:
        raise DatasetError(f"{labels_path}: expected a 1-D label vector, "
                           f"got shape {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} "
                           f"has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        first_bad = int(torch.nonzero(labels >= len(CLASSES))[0])
        raise DatasetError(f"{labels_path}: label {int(labels[first_bad])} outside "
                           f"0..{len(CLASSES) - 1} (at index {first_bad})")
    return labels.to(torch.int64)


def class_counts(labels: torch.Tensor) -> list[int]:
    """How many examples of each class, in ``CLASSES`` order."""
    return torch.bincount(labels, minlength=len(CLASSES)).tolist()


def dataset_info(root: str | os.PathLike | None = None, *,
                 expected: Mapping[str, tuple[str, int]] | None = None) -> str:
    """A report for ``bnlab data info``: location, verification, file sizes, shapes, classes."""
    ds = load_fashion_mnist(root, expected=expected)
    checks = [f.sha256_check for f in ds.files]
    lines = [
        f"Fashion-MNIST found at {ds.root} (via {ds.found_via})",
        "verified: IDX structure, label range, sizes and SHA-256 of the decompressed files "
        f"({checks.count('hashed now')} hashed now, {checks.count('remembered')} remembered in "
        f"{verification_cache_path()})",
        "files:",
    ]
    width = max(len(f.path.name) for f in ds.files)
    for f in ds.files:
        lines.append(f"  {f.path.name:<{width}}  {f.path.stat().st_size:>10,} bytes on disk  "
                     f"{f.decompressed_bytes:>10,} decompressed  ({f.sha256_check})")
    lines.append(f"train: images {tuple(ds.train_images.shape)} uint8, "
                 f"labels {tuple(ds.train_labels.shape)} int64")
    lines.append(f"test:  images {tuple(ds.test_images.shape)} uint8, "
                 f"labels {tuple(ds.test_labels.shape)} int64")
    lines.append(f"  {'class':<15} {'train':>6} {'test':>6}")
    train_counts, test_counts = class_counts(ds.train_labels), class_counts(ds.test_labels)
    for index, name in enumerate(CLASSES):
        lines.append(f"  {index} {name:<13} {train_counts[index]:>6} {test_counts[index]:>6}")
    return "\n".join(lines)
