"""Shared fixtures and helpers: a small, learnable, synthetic Fashion-MNIST so no test needs the
real one, the CLI reading it instead of the real one, a copy of a model's buffers, and small
tmpfs / read-only mounts for disk-full and read-only tests (``mounts``, root only).

Helpers that are not fixtures are in ``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnlab.data import dataset
from bnlab.data.dataset import FashionMNIST
from tests.helpers import DEVICES, make_synthetic_fashion

# The suite's tensors are tiny: one intra-op thread is faster than two, and keeps the suite's
# time steady on a loaded machine (OpenMP threads spin-waiting on busy cores are very slow).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_fashion() -> FashionMNIST:
    return make_synthetic_fashion()


class Mounts:
    """Small tmpfs and read-only bind mounts for disk-full and read-only tests (root only).

    Root ignores permission bits, so a read-only folder has to be a read-only mount; a full
    disk has to be a small filesystem. Where mounting is not possible the test is skipped,
    saying why. Everything mounted is unmounted at teardown.
    """

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def _mount(self, *args: str) -> None:
        import os
        import subprocess

        if os.geteuid() != 0:
            pytest.skip("needs root to mount a tmpfs / read-only bind mount")
        result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot mount in this sandbox: {result.stderr.strip()}")

    def tmpfs(self, path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
        self.mounted.append(path)
        return path

    def read_only(self, path: Path) -> Path:
        """Make the existing folder ``path`` read-only (a read-only bind mount onto itself)."""
        self._mount("--bind", str(path), str(path))
        self.mounted.append(path)
        self._mount("-o", "remount,ro,bind", str(path))
        return path

    def unmount_all(self) -> None:
        import subprocess

        for path in reversed(self.mounted):
            subprocess.run(["umount", str(path)], check=False)
        self.mounted.clear()


@pytest.fixture
def mounts():
    helper = Mounts()
    yield helper
    helper.unmount_all()


@pytest.fixture
def fake_dataset(monkeypatch, synthetic_fashion) -> FashionMNIST:
    """The synthetic dataset, returned by every ``load_fashion_mnist`` the CLI calls."""
    monkeypatch.setattr(dataset, "load_fashion_mnist", lambda root=None, **kw: synthetic_fashion)
    return synthetic_fashion



@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
