"""Fashion-MNIST: found, verified byte for byte, and batched without a Python loop per sample.

Why: every number bnlab reports (the chapter's accuracies, the BN-vs-no-BN curves)
is only worth something if it was measured on the real dataset. So this module

* looks for the four IDX files in a fixed, documented order (``--data-dir``,
  ``$BNLAB_DATA``, the user cache, Debian's ``dataset-fashion-mnist`` package),
* checks their structure every time (cheap) and the SHA-256 of their *decompressed*
  bytes once per file version (mirrors compress differently; the content is the
  dataset), remembering that check in a small JSON file so later runs skip it,
* fetches the data when it is missing (official mirrors, else ``apt-get`` as root),
  never leaving a partial or unverified file in place, and
* serves batches straight from one uint8 tensor: the whole dataset is 55 MB, and a
  per-sample ``Dataset`` would spend most of an epoch in Python (``bnlab bench loader``).

Labels are converted to int64 when loaded (what ``cross_entropy`` wants); images stay
uint8 until a batch is taken, so the whole training set costs 47 MB.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import shutil
import struct
import subprocess
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from bnlab.errors import DatasetError
from bnlab.io import atomic_write, atomic_write_json, read_json

CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

IMAGE_SIZE = 28

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
_MAGIC_OF = {TRAIN_IMAGES: IMAGES_MAGIC, TRAIN_LABELS: LABELS_MAGIC,
             TEST_IMAGES: IMAGES_MAGIC, TEST_LABELS: LABELS_MAGIC}

# SHA-256 and size of each *decompressed* file of the real Fashion-MNIST.
EXPECTED_FILES: Mapping[str, tuple[str, int]] = {
    TRAIN_IMAGES: ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    TRAIN_LABELS: ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    TEST_IMAGES: ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    TEST_LABELS: ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}

MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
CONNECT_TIMEOUT_S = 5.0
APT_PACKAGE = "dataset-fashion-mnist"

# Where Debian's package puts the files; a tuple so tests can swap in their own folder.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

Download = Callable[[str, IO[bytes]], None]
Install = Callable[[], bool]


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


def search_locations(root: str | os.PathLike | None = None) -> list[Location]:
    """The folders to look in, in order. An explicit ``root`` is the only one looked in."""
    if root is not None:
        return [Location("explicit data dir (--data-dir)", Path(root))]
    locations = []
    if os.environ.get("BNLAB_DATA"):
        locations.append(Location("$BNLAB_DATA", Path(os.environ["BNLAB_DATA"])))
    locations.append(Location("user cache", default_data_dir()))
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
    if root is not None:
        raise DatasetError(_missing_in_root(Path(root)))
    looked = ", ".join(f"{loc.path} ({loc.why})" for loc in search_locations())
    raise DatasetError(f"Fashion-MNIST not found; looked in {looked}. {_how_to_get_data()}")


def _missing_in_root(root: Path) -> str:
    if not root.is_dir():
        return f"data directory {root} does not exist (expected the four Fashion-MNIST files there)"
    missing = sorted(set(FILE_NAMES) - set(files_in(root)))
    return (f"data directory {root} lacks {', '.join(f'{m}[.gz]' for m in missing)}; "
            f"{_how_to_get_data()}")


def _how_to_get_data() -> str:
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
    return _gunzip(path.name, blob) if path.name.endswith(".gz") else blob


def _gunzip(label: str, blob: bytes) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{label}: corrupt gzip data ({exc})") from exc


def _parse_idx(label: str, raw: bytes, magic: int | None = None) -> torch.Tensor:
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
    return _parse_idx(path.name, _read_bytes(path), magic)


# --------------------------------------------------------------------------- verification


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def verification_cache_path() -> Path:
    return cache_dir() / "verified.json"


class _VerificationCache:
    """SHA-256 of files that verified, keyed by resolved path and (size, mtime_ns) on disk.

    Losing it only costs a re-hash, so unreadable or unwritable cache files are ignored.
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
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

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


def _check_content(label: str, raw: bytes, expected: tuple[str, int],
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
    cache = _VerificationCache(verification_cache_path()) if verify else None
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


def _load_file(name: str, path: Path, cache: _VerificationCache | None,
               expected: Mapping[str, tuple[str, int]]) -> tuple[torch.Tensor, DataFile]:
    raw = _read_bytes(path)
    tensor = _parse_idx(path.name, raw, _MAGIC_OF[name])
    if cache is None:
        return tensor, DataFile(path, len(raw), "skipped")
    remembered = cache.lookup(path)
    digest = _check_content(path.name, raw, expected[name], known_digest=remembered)
    if remembered is None:
        cache.remember(path, digest)
    return tensor, DataFile(path, len(raw), "remembered" if remembered else "hashed now")


def _check_split(images_path: Path, labels_path: Path,
                 images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Check one split's images against its labels; return the labels as int64."""
    if images.dim() != 3 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(f"{images_path.name}: expected images of shape "
                           f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
    if labels.dim() != 1:
        raise DatasetError(f"{labels_path.name}: expected a 1-D label vector, "
                           f"got shape {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path.name} has {len(images)} images but {labels_path.name} "
                           f"has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        first_bad = int(torch.nonzero(labels >= len(CLASSES))[0])
        raise DatasetError(f"{labels_path.name}: label {int(labels[first_bad])} outside "
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


# --------------------------------------------------------------------------- fetching


class _Unreachable(Exception):
    """No mirror could be reached (as opposed to a mirror serving wrong content)."""


def download_url(url: str, out: IO[bytes]) -> None:
    """Stream ``url`` into ``out`` with a progress bar; a short timeout makes offline fail fast."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))


def install_with_apt() -> bool:
    """Install Debian's ``dataset-fashion-mnist`` when running as root with apt; False otherwise."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", APT_PACKAGE]):
        result = subprocess.run(command, env=env, check=False)
        if result.returncode != 0:
            raise DatasetError(f"`{' '.join(command)}` failed with exit code {result.returncode}. "
                               f"{_how_to_get_data()}")
    return True


def fetch_fashion_mnist(root: str | os.PathLike | None = None, *,
                        download: Download | None = None, install: Install | None = None,
                        expected: Mapping[str, tuple[str, int]] | None = None) -> Path:
    """Make sure verified Fashion-MNIST is available; return the folder that holds it.

    Found and verified: returns at once. Otherwise the missing files are downloaded into
    ``root`` (default ``default_data_dir()``), each checked in memory before it is written
    (temp file + rename). With no mirror reachable, ``install`` (default: apt-get as root)
    is tried, and the folder it filled (``SYSTEM_DIRS``) is returned, even when ``root``
    was given. ``download(url, fileobj)`` and ``install()`` are parameters so tests can
    stand in for the network and apt.
    """
    download = download or download_url
    install = install or install_with_apt
    try:
        location = locate_fashion_mnist(root)
    except DatasetError:
        location = None
    if location is not None:
        return load_fashion_mnist(location.path, expected=expected).root
    destination = Path(root) if root is not None else default_data_dir()
    try:
        _download_missing(destination, download, expected)
    except _Unreachable as exc:
        return _install_system_package(install, expected, reason=str(exc))
    return load_fashion_mnist(destination, expected=expected).root


def _download_missing(destination: Path, download: Download,
                      expected: Mapping[str, tuple[str, int]] | None) -> None:
    table = EXPECTED_FILES if expected is None else expected
    present = files_in(destination)
    for name in FILE_NAMES:
        if name not in present:
            _download_file(name, destination / f"{name}.gz", download, table[name])


def _download_file(name: str, target: Path, download: Download,
                   expected: tuple[str, int]) -> None:
    """Try each mirror; write ``target`` only once its content checked out."""
    failures, content_was_wrong = [], False
    for mirror in MIRRORS:
        url = f"{mirror}{target.name}"
        buffer = io.BytesIO()
        try:
            download(url, buffer)
            blob = buffer.getvalue()
            raw = _gunzip(url, blob)
            _parse_idx(url, raw, _MAGIC_OF[name])
            digest = _check_content(url, raw, expected)
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{url}: {exc}")
            continue
        except DatasetError as exc:
            failures.append(str(exc))
            content_was_wrong = True
            continue
        atomic_write(target, lambda f, data=blob: f.write(data))
        cache = _VerificationCache(verification_cache_path())
        cache.remember(target, digest)
        cache.save()
        return
    if content_was_wrong:
        raise DatasetError(f"no mirror served a valid {target.name}: {'; '.join(failures)}")
    raise _Unreachable("; ".join(failures))


def _install_system_package(install: Install, expected: Mapping[str, tuple[str, int]] | None,
                            reason: str) -> Path:
    if not install():
        raise DatasetError(f"Fashion-MNIST is missing and could not be downloaded ({reason}); "
                           f"apt is not usable (needs root and apt-get). {_how_to_get_data()}")
    for directory in SYSTEM_DIRS:
        if len(files_in(directory)) == len(FILE_NAMES):
            return load_fashion_mnist(directory, expected=expected).root
    raise DatasetError(f"installed {APT_PACKAGE}, but its files are not in "
                       f"{', '.join(map(str, SYSTEM_DIRS))}")


# --------------------------------------------------------------------------- batching


def stratified_subset(images: torch.Tensor, labels: torch.Tensor,
                      n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples taken class by class (n // 10 each, the remainder to the
    lowest classes), in their original order. Deterministic: no randomness involved."""
    if not 0 < n <= len(labels):
        raise DatasetError(f"subset size must be in 1..{len(labels)}, got {n}")
    per_class = [n // len(CLASSES) + (c < n % len(CLASSES)) for c in range(len(CLASSES))]
    chosen = []
    for c, count in enumerate(per_class):
        members = torch.nonzero(labels == c).flatten()  # (examples of class c,)
        if len(members) < count:
            raise DatasetError(f"subset of {n} needs {count} examples of class {c} "
                               f"({CLASSES[c]}), only {len(members)} exist")
        chosen.append(members[:count])
    index = torch.cat(chosen).sort().values  # (n,)
    return images[index], labels[index]


class Loader:
    """Batches from in-memory uint8 images: x float32 (B, 1, 28, 28) in [0, 1], y int64 (B,).

    The order of an epoch is a pure function of ``(seed, epoch)``: call ``set_epoch``
    before each epoch (iterating does not advance it), and a resumed run replays the
    same batches. Images live on ``device`` as uint8; each batch is gathered with one
    index op and converted to float there.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 device: torch.device | str | None = None) -> None:
        if len(images) != len(labels):
            raise DatasetError(f"Loader: {len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"Loader: batch_size must be at least 1, got {batch_size}")
        self.images = images.to(device)  # (N, 28, 28) uint8
        self.labels = labels.to(device, torch.int64)  # (N,)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self) -> torch.Tensor:
        """The sample indices of the current epoch, shape (N,)."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        mixed = np.random.SeedSequence((self.seed, self.epoch)).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(mixed) & (2**63 - 1))
        return torch.randperm(n, generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order().to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]  # (B,)
            x = self.images[index].unsqueeze(1)  # (B, 28, 28) -> (B, 1, 28, 28) uint8
            yield x.to(torch.float32).div_(255), self.labels[index]
