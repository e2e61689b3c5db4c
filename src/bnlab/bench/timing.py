"""Interleaved timing of competing callables.

Why: on a shared 2-core machine absolute timings drift with load. Running the
candidates round-robin within one process, and comparing medians, makes their
*ratio* trustworthy even when the absolute numbers are not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op elsewhere), so timings cover it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int = 30,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin.

    Each round calls every candidate once, so a slow spell of the machine hits all of
    them alike; the order rotates from round to round, so no candidate always runs right
    after the same neighbour (whose freed memory or evicted cache it would inherit).
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fn = candidates[name]
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}

