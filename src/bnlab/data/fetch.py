"""Fetching Fashion-MNIST where it is missing: the official mirrors, else Debian's package.

Why: a fresh machine should get the real dataset with one command (``bnlab data fetch``,
``make data``), and a failed or wrong download must never leave a partial or unverified
file where ``bnlab.data.dataset`` would find it: each file is checked in memory before
it is written (temp file + rename). Where no mirror answers, ``apt-get`` installs
``dataset-fashion-mnist`` when running as root; a folder the user named (``--data-dir``,
``$BNLAB_DATA``) is then filled from the package's files, so it is usable as asked.
"""

from __future__ import annotations

import http.client
import io
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from tqdm import tqdm

from bnlab.data import dataset
from bnlab.data.dataset import (
    APT_PACKAGE,
    FILE_NAMES,
    MAGIC_OF,
    MIRRORS,
    VerificationCache,
    check_content,
    default_data_dir,
    explicit_location,
    files_in,
    gunzip,
    how_to_get_data,
    load_fashion_mnist,
    locate_fashion_mnist,
    parse_idx,
    verification_cache_path,
)
from bnlab.util.errors import DatasetError
from bnlab.util.io import atomic_write, remove_stray_temps

CONNECT_TIMEOUT_S = 5.0

Download = Callable[[str, IO[bytes]], None]
Install = Callable[[], bool]



class _Unreachable(Exception):
    """No mirror could be reached (as opposed to a mirror serving wrong content)."""


def download_url(url: str, out: IO[bytes]) -> None:
    """Stream ``url`` into ``out`` with a progress bar; a short timeout makes offline fail fast."""
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
                               f"{how_to_get_data()}")
    return True


def fetch_fashion_mnist(root: str | os.PathLike | None = None, *,
                        download: Download | None = None, install: Install | None = None,
                        expected: Mapping[str, tuple[str, int]] | None = None) -> Path:
    """Make sure verified Fashion-MNIST is available; return the folder that holds it.

    Found and verified: returns at once. Otherwise the missing files are downloaded into
    ``root`` (else ``$BNLAB_DATA``, else ``default_data_dir()``), each checked in memory
    before it is written (temp file + rename). With no mirror reachable, ``install``
    (default: apt-get as root) is tried; when the user named a folder, the installed files
    are copied into it and it is returned, else the package's folder (``SYSTEM_DIRS``) is.
    ``download(url, fileobj)`` and ``install()`` are parameters so tests can stand in for
    the network and apt.
    """
    download = download or download_url
    install = install or install_with_apt
    try:
        location = locate_fashion_mnist(root)
    except DatasetError:
        location = None
    if location is not None:
        return load_fashion_mnist(location.path, expected=expected).root
    named = explicit_location(root)
    destination = named.path if named is not None else default_data_dir()
    try:
        _download_missing(destination, download, expected)
    except _Unreachable as exc:
        system = _install_system_package(install, expected, reason=str(exc))
        if named is None:
            return system
        _copy_missing(system, destination)
    return load_fashion_mnist(destination, expected=expected).root


def _download_missing(destination: Path, download: Download,
                      expected: Mapping[str, tuple[str, int]] | None) -> None:
    table = dataset.EXPECTED_FILES if expected is None else expected
    remove_stray_temps(destination)  # of an earlier fetch that was killed mid-write
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
            raw = gunzip(url, blob)
            parse_idx(url, raw, MAGIC_OF[name])
            digest = check_content(url, raw, expected)
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{url}: {exc}")
            continue
        except DatasetError as exc:
            failures.append(str(exc))
            content_was_wrong = True
            continue
        atomic_write(target, lambda f, data=blob: f.write(data))
        cache = VerificationCache(verification_cache_path())
        cache.remember(target, digest)
        cache.save()
        return
    if content_was_wrong:
        raise DatasetError(f"no mirror served a valid {target.name}: {'; '.join(failures)}")
    raise _Unreachable("; ".join(failures))


def _copy_missing(source: Path, destination: Path) -> None:
    """Copy (atomically) each dataset file ``destination`` lacks from ``source``."""
    present = files_in(destination)
    for name, path in files_in(source).items():
        if name not in present:
            atomic_write(destination / path.name, lambda f, src=path: f.write(src.read_bytes()))


def _install_system_package(install: Install, expected: Mapping[str, tuple[str, int]] | None,
                            reason: str) -> Path:
    if not install():
        raise DatasetError(f"Fashion-MNIST is missing and could not be downloaded ({reason}); "
                           f"apt is not usable (needs root and apt-get). {how_to_get_data()}")
    for directory in dataset.SYSTEM_DIRS:
        if len(files_in(directory)) == len(FILE_NAMES):
            return load_fashion_mnist(directory, expected=expected).root
    raise DatasetError(f"installed {APT_PACKAGE}, but its files are not in "
                       f"{', '.join(map(str, dataset.SYSTEM_DIRS))}")
