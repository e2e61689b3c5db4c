"""What a batch norm implementation costs in a real training step of BN-LeNet.

Why: ``bench bn`` times the layer alone; a user trains a model, where convolutions and
the optimizer dilute the difference (or a slow BN shows). This benchmark trains one
BN-LeNet per norm (same seed, so the same initial weights) on the same Fashion-MNIST
batches, stepping the models in turn batch by batch with a rotating order, so that a slow
spell of the machine hits every model alike. It reports the median step time, its ratio
to the reference norm's, and each model's last loss: with equal weights and equal
batches, implementations that agree with torch track its loss to many digits.

A step function that compiles on its first call (``torch.compile`` of torch's BN-LeNet,
the peer a user who wants speed would pick) is named in ``compiled``: its first step is
timed and reported apart (compilation), and never among the timed steps; the table then
also gives every norm's ratio to it.

The benchmark is a leaf: it times the step functions it is given (the CLI builds them
with ``bnlab.training.train``) and imports nothing of bnlab's above the timing helpers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from bnlab.bench.timing import sync
from bnlab.util.tables import counted, format_table

DEFAULT_NORMS = ("bnlab", "torch")

Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""A training step ``(x, y) -> (loss, logits)`` (``bnlab.training.train.make_step``)."""


class EpochBatches(Protocol):
    """Training batches whose order is chosen by epoch (``bnlab.data.loader.Loader``)."""

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def run_step_benchmark(step_fns: dict[str, Step], batches: EpochBatches, *, setup: str,
                       steps: int = 300, warmup: int = 10,
                       device: torch.device | str = "cpu", reference: str = "torch",
                       compiled: tuple[str, ...] = ()) -> str:
    """Median seconds per training step of each norm's model; a markdown table.

    ``step_fns`` maps each norm to the step of its own model (models with the same
    initial weights); every step function gets the same ``batches``. ``steps`` batches are
    timed after ``warmup`` untimed ones (more than an epoch wraps around to the next
    epoch). ``setup`` says what was built, e.g. "SGD lr 0.1, batch 128". ``compiled``: the
    names of step functions that compile on their first call (see the module docstring).
    """
    norms = tuple(step_fns)
    if reference not in norms or not set(compiled) <= set(norms):
        raise ValueError(f"reference norm {reference!r} and compiled {compiled} must be among "
                         f"the norms {norms}")
    if steps < 1 or warmup < (1 if compiled else 0):
        raise ValueError(f"expected steps >= 1 and warmup >= {1 if compiled else 0} (got "
                         f"{steps}, {warmup})")
    first_step: dict[str, float] = {}
    samples: dict[str, list[float]] = {n: [] for n in norms}
    losses: dict[str, float] = {}
    done, epoch = 0, 0
    while done < warmup + steps:
        batches.set_epoch(epoch)
        for x, y in batches:
            order = norms[done % len(norms):] + norms[:done % len(norms)]
            for norm in order:
                start = time.perf_counter()
                loss, _ = step_fns[norm](x, y)
                sync(device)
                if done >= warmup:
                    samples[norm].append(time.perf_counter() - start)
                elif done == 0:
                    first_step[norm] = time.perf_counter() - start
                losses[norm] = loss.item()
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    medians = {n: statistics.median(s) for n, s in samples.items()}
    peers = [reference, *compiled]
    rows = [[n, f"{medians[n] * 1e3:.2f}",
             *(f"{medians[n] / medians[peer]:.3f}" for peer in peers), f"{losses[n]:.6f}"]
            for n in norms]
    note = (f"BN-LeNet training steps (forward, cross-entropy, backward, {setup}), "
            f"device {device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {counted(steps, 'step')} per norm after "
            f"{counted(warmup, 'warm-up step')}, the models stepped in turn on the same batches, "
            "from the same weights.")
    if compiled:
        note += (" First step of " + ", ".join(f"{n} {first_step[n]:.1f} s" for n in compiled)
                 + " (compiles; a warm-up step, never timed).")
    headers = ["norm", "ms/step (median)", *(f"vs {peer}" for peer in peers), "last loss"]
    return note + "\n\n" + format_table(headers, rows)
