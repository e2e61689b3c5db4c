"""Helpers the tests share (fixtures are in conftest.py): the implementations to test, the
synthetic Fashion-MNIST, and ``bnlab`` in a process group of its own with ways to see what
of it is left (for tests that signal or race whole processes).

The implementations the tests run are read from bnlab.functional's registry. One that
compiles once (the C++ kernel) runs where a compiler and ninja are present and
is reported as skipped, saying what is missing, elsewhere; one that compiles each new
shape (torch.compile) is left out of the parity grids and tested on its own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bnlab
from bnlab.data.dataset import FashionMNIST
from bnlab.functional import IMPLEMENTATIONS
from bnlab.kernels.cpp import build_requirements_missing, has_cxx_compiler
from bnlab.training.norms import BNLAB_NORMS

CPP_MISSING = build_requirements_missing()
CPP_SKIP = pytest.mark.skipif(bool(CPP_MISSING),
                              reason="bnlab's C++ kernel cannot build here: lacks "
                              + " and ".join(CPP_MISSING))
# torch.compile's CPU backend (Inductor) writes and compiles C++: impl="compiled" needs a compiler.
COMPILED_SKIP = pytest.mark.skipif(not has_cxx_compiler(),
                                   reason="impl='compiled' (Inductor on CPU) needs a C++ compiler "
                                   "on PATH")
_GRID = [impl for impl in IMPLEMENTATIONS.values() if impl.compiles != "each shape"]
# Parametrize with these; iterate over RUNNABLE.
IMPL_PARAMS = [pytest.param(impl.name, marks=CPP_SKIP) if impl.compiles == "once" else impl.name
               for impl in _GRID]
RUNNABLE = [impl.name for impl in _GRID if impl.compiles == "no" or not CPP_MISSING]
# Compiling each new shape takes seconds: tests of it are in the slow tier.
COMPILED_MARKS = [COMPILED_SKIP, pytest.mark.slow]
# The norm names (bnlab.training.norms) of implementations that need a compiler, with their marks.
NORM_SKIPS = {norm: CPP_SKIP if IMPLEMENTATIONS[impl].compiles == "once" else COMPILED_MARKS
              for norm, impl in BNLAB_NORMS.items() if IMPLEMENTATIONS[impl].compiles != "no"}


# Devices the parity tests run on: CUDA where there is one, reported as skipped elsewhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


def buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of ``model``'s buffers (running statistics), to check they were left alone."""
    return [b.clone() for b in model.buffers()]


def without_provenance(report: str) -> str:
    """A report without its provenance line (the date and command of the analysis), for
    comparing two analyses of the same runs."""
    return "\n".join(line for line in report.splitlines() if not line.startswith("**Provenance.**"))


def make_synthetic_fashion(n_train: int = 2400, n_test: int = 200, seed: int = 0) -> FashionMNIST:
    """Ten classes, each a fixed random 28x28 template plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 28, 28, generator=g)  # (10, 28, 28)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 10  # balanced classes
        noise = torch.rand(n, 28, 28, generator=g)
        images = (0.6 * templates[labels] + 0.4 * noise) * 255  # (n, 28, 28)
        return images.to(torch.uint8), labels

    train_images, train_labels = split(n_train)
    test_images, test_labels = split(n_test)
    return FashionMNIST(train_images, train_labels, test_images, test_labels,
                        root=Path("synthetic"), found_via="synthetic")


REPO = Path(__file__).resolve().parents[1]


def bnlab_process(*argv: str, cwd: Path | None = None,
                  env: dict[str, str] | None = None) -> subprocess.Popen:
    """``bnlab ARGV`` on the synthetic data (``tests/synthetic_cli.py``) in a new session, so
    the process and everything it starts form one process group (id: its pid); stdout and
    stderr are pipes (text); ``env``: variables to add."""
    src = Path(bnlab.__file__).resolve().parents[1]  # the bnlab under test, in children too
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(src), str(REPO)])}
    return subprocess.Popen([sys.executable, "-m", "tests.synthetic_cli", *argv], cwd=cwd or REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def live_processes_in_group(pgid: int) -> list[str]:
    """The command lines of the processes of group ``pgid`` that are alive (not zombies), from
    /proc (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def wait_until_group_is_gone(pgid: int, timeout: float = 15.0) -> list[str]:
    """Wait up to ``timeout`` seconds for group ``pgid`` to have no live process; return what
    is left (empty when it is gone)."""
    deadline = time.monotonic() + timeout
    while (left := live_processes_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of group ``pgid`` (a test's cleanup): the group, and each
    process found in it (a group whose leader is gone is not always reachable as one)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for entry in live_processes_in_group(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(entry.split(":")[0]), signal.SIGKILL)


def listening_addresses(pid: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses process ``pid`` listens on for TCP, from /proc (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words, host byte order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.append(ipaddress.ip_address(words))
    return addresses
