"""Denormal floats flushed to zero while a run trains and evaluates.

Why: a saturated network (plain LeNet at a learning rate of hundreds: sigmoids pinned at
0 or 1) produces activations and gradients below float32's smallest normal number,
about 1.2e-38. Many x86 CPUs handle such denormal numbers in microcode, many times
slower than normal ones, so there a run whose values are all but zero can train an order
of magnitude slower per step for no difference in what it learns; other CPUs compute them
at full speed and gain nothing. Flushing them to zero (FTZ/DAZ,
``torch.set_flush_denormal``) keeps those steps at normal speed; numbers that stay
normal are computed exactly as before.

torch offers a setter but no getter, and the mode belongs to a CPU thread: torch sets it
on the calling thread only. Intra-op worker threads that already exist keep their own
mode; threads started while it is on inherit it. GPUs are not affected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_DENORMAL = 1e-39  # below float32's smallest normal number (about 1.18e-38)


def flushing_denormals() -> bool:
    """Whether the calling thread flushes float32 denormals to zero now."""
    tiny = torch.tensor([_DENORMAL], dtype=torch.float32)  # (1,); 0 if flushed on conversion
    return bool((tiny * 2)[0] == 0)


@contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[bool]:
    """Inside the block the calling thread flushes denormals to zero (``enabled``) or keeps
    them (IEEE arithmetic); its previous mode is restored afterwards. Yields whether the
    mode asked for is in effect (False where the CPU cannot flush denormals)."""
    previous = flushing_denormals()
    in_effect = torch.set_flush_denormal(enabled) or not enabled
    try:
        yield in_effect
    finally:
        torch.set_flush_denormal(previous)
