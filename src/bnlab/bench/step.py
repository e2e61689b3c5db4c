"""What a batch norm implementation costs in a real training step of BN-LeNet.

Why: ``bench bn`` times the layer alone; a user trains a model, where convolutions and
the optimizer dilute the difference (or a slow BN shows). This benchmark trains one
BN-LeNet per norm (same seed, so the same initial weights) on the same Fashion-MNIST
batches, stepping the models in turn batch by batch with a rotating order, so that a slow
spell of the machine hits every model alike. It reports the median step time, its ratio
to the reference norm's, and each model's last loss: with equal weights and equal
batches, implementations that agree with torch track its loss to many digits.
"""

from __future__ import annotations

import statistics
import time

import torch

from bnlab.bench.timing import sync
from bnlab.tables import format_table
from bnlab.train import TrainConfig, build_loaders, make_step, model_for, resolve_device

DEFAULT_NORMS = ("bnlab", "torch")


def run_step_benchmark(dataset, norms: tuple[str, ...] = DEFAULT_NORMS, steps: int = 300,
                       batch_size: int = 128, lr: float = 0.1, warmup: int = 10,
                       device: str = "auto", reference: str = "torch") -> str:
    """Median seconds per training step of BN-LeNet with each norm; a markdown table.

    ``dataset`` is a ``bnlab.data.dataset.FashionMNIST``; ``steps`` batches are timed after
    ``warmup`` untimed ones (more than an epoch wraps around to the next epoch).
    """
    if reference not in norms:
        raise ValueError(f"reference norm {reference!r} must be one of the norms {norms}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"expected steps >= 1 and warmup >= 0 (got {steps}, {warmup})")
    dev = resolve_device(device)
    configs = {n: TrainConfig(model="bn-lenet", norm=n, lr=lr, batch_size=batch_size, seed=0)
               for n in norms}
    train, _ = build_loaders(configs[reference], dataset, dev)
    models, step_fns = {}, {}
    for norm, config in configs.items():
        torch.manual_seed(config.seed)
        models[norm] = model_for(config, dev)
        models[norm].train()
        step_fns[norm] = make_step(models[norm], torch.optim.SGD(models[norm].parameters(),
                                                                   lr=lr))
    samples: dict[str, list[float]] = {n: [] for n in norms}
    losses: dict[str, float] = {}
    done, epoch = 0, 0
    while done < warmup + steps:
        train.set_epoch(epoch)
        for x, y in train:
            order = norms[done % len(norms):] + norms[:done % len(norms)]
            for norm in order:
                start = time.perf_counter()
                loss, _ = step_fns[norm](x, y)
                sync(dev)
                if done >= warmup:
                    samples[norm].append(time.perf_counter() - start)
                losses[norm] = loss.item()
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    medians = {n: statistics.median(s) for n, s in samples.items()}
    rows = [[n, f"{medians[n] * 1e3:.2f}", f"{medians[n] / medians[reference]:.3f}",
             f"{losses[n]:.6f}"] for n in norms]
    note = (f"BN-LeNet training steps (forward, cross-entropy, backward, SGD lr {lr}), batch "
            f"{batch_size}, device {dev}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {steps} steps per norm after {warmup} "
            "warm-up steps, the models stepped in turn on the same batches.")
    headers = ["norm", "ms/step (median)", f"vs {reference}", "last loss"]
    return note + "\n\n" + format_table(headers, rows)
