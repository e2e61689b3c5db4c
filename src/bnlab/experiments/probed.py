"""Measurements during training, by replaying a finished run with probes at chosen steps.

Why: the ICS and landscape experiments measure the network *while it trains* (percentiles,
gradient ICS, loss along the gradient), but the trainer is shared and has no per-step
hooks. Training is deterministic (weights from the seed, data order a pure function of
(seed, epoch), noise from the seeded global RNG), so a run can be re-played here with the
trainer's own pieces (``model_for``, ``build_loaders``, ``optimizer_for``, ``step_for``,
``denormals_flushed``) and probed before
chosen steps; probes fork the RNG and restore every buffer, so they do not change the
trajectory. The replay checks that it ends on exactly the run's checkpointed weights and
says so (``reproduces_run``). Results are cached in the run folder (``runs.cached``:
``analysis/<name>.json``), keyed by the probe settings and the data, so a second report
measures nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bnlab.experiments.measure import fingerprint
from bnlab.training import runs
from bnlab.training.train import (
    TrainConfig,
    bar_disabled,
    build_loaders,
    model_for,
    optimizer_for,
    resolve_device,
    step_for,
)
from bnlab.util.config import config_from_dict
from bnlab.util.denormals import denormals_flushed

Probe = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], dict[str, Any]]


def probe_steps(total: int, count: int) -> list[int]:
    """``count`` steps spread evenly over ``[0, total - 1]`` (0 = before any update)."""
    if total < 1:
        return []
    count = min(count, total)
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


PROBES = 25
"""Probe steps per run; runs shorter than 250 steps get one per 10 steps, at least 5."""


def default_probe_steps(total: int) -> list[int]:
    """:func:`probe_steps` with :data:`PROBES` (fewer for short runs, see there)."""
    return probe_steps(total, min(PROBES, max(5, total // 10)))


def total_steps(config: TrainConfig, dataset) -> int:
    train = build_loaders(config, dataset, torch.device("cpu")).train
    return len(train) * config.epochs


def replay(config: TrainConfig, dataset, steps: list[int], probe: Probe,
           checkpoint: Path | None = None, progress: bool = True,
           setup: Callable[[torch.nn.Module], None] | None = None,
           threads: dict[int, int] | None = None) -> dict[str, Any]:
    """Train ``config`` again from its seed, calling ``probe(model, x, y, step)`` before the
    update of each step in ``steps`` on that step's batch ``(x, y)`` (step 0: the initial
    weights; the run's last step count, ``total_steps``, probes the final weights on the
    last batch). ``setup(model)``, when given, is called once before the first step (to
    attach observers of every training step, e.g. forward hooks). ``threads``: epoch -> the
    torch thread count it trained with (``metrics.jsonl``), set for that epoch of the
    replay and restored afterwards (on CPU a different count rounds reductions differently,
    so the replay would leave the run's trajectory). Stops at a non-finite loss. Returns
    ``{"records": [{"step", **probe}], "reproduces_run": bool | None}`` (None without a
    ``checkpoint`` to compare with)."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = model_for(config, device)
    train = build_loaders(config, dataset, device).train
    step_fn = step_for(model, optimizer_for(model, config), config)
    if setup is not None:
        setup(model)
    wanted, records, step, finite = set(steps), [], 0, True
    bar = tqdm(total=len(train) * config.epochs, unit="step", desc="probed replay", leave=False,
               disable=bar_disabled(progress), dynamic_ncols=True)
    caller_threads = torch.get_num_threads()
    with bar, denormals_flushed(config.flush_denormal), _restored_threads(caller_threads):
        for epoch in range(1, config.epochs + 1):
            if threads and epoch in threads:
                torch.set_num_threads(threads[epoch])
            train.set_epoch(epoch)
            model.train()
            for x, y in train:
                if step in wanted:
                    records.append({"step": step, **probe(model, x, y, step)})
                    model.train()
                loss, _ = step_fn(x, y)
                step += 1
                bar.update(1)
                if not math.isfinite(loss.item()):
                    finite = False
                    break
            if not finite:
                break
        if finite and step in wanted:  # after the last update
            records.append({"step": step, **probe(model, x, y, step)})
    return {"records": records, "reproduces_run": _same_weights(model, checkpoint)}


@contextmanager
def _restored_threads(count: int) -> Iterator[None]:
    try:
        yield
    finally:
        torch.set_num_threads(count)


def _same_weights(model: torch.nn.Module, checkpoint: Path | None) -> bool | None:
    if checkpoint is None or not checkpoint.exists():
        return None
    saved = runs.load_checkpoint(checkpoint.parent, required=("model",))["model"]
    mine = model.state_dict()
    return saved.keys() == mine.keys() and all(
        torch.equal(saved[k].cpu(), mine[k].cpu()) for k in saved)


def cached_replay(run_dir: str | Path, name: str, key: dict[str, Any], dataset,
                  steps_for: Callable[[TrainConfig], list[int]],
                  probe_for: Callable[[TrainConfig], Probe],
                  setup_for: Callable[[TrainConfig], Callable[[torch.nn.Module], None]] | None = None,
                  reduce: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                  ) -> dict[str, Any]:
    """The replay of the run in ``run_dir`` with ``probe_for(config)`` at ``steps_for(config)``
    (and ``setup_for(config)`` as its ``setup``), measured once per ``key`` (plus the steps
    and a fingerprint of the dataset) and kept in the run folder (``runs.cached``). With
    ``reduce``, what is kept is ``reduce(replay's result)`` (probes too big to keep whole)."""
    run = runs.load_run(run_dir)
    config = config_from_dict(TrainConfig, run["config"])
    steps = steps_for(config)
    # Runs trained before metrics recorded threads replay with the caller's count.
    threads = {row["epoch"]: row["threads"] for row in run["metrics"] if "threads" in row}
    key = {**key, "steps": steps, **({"threads": sorted(threads.items())} if threads else {}),
           "data": fingerprint(dataset.train_images, dataset.train_labels,
                               dataset.test_images, dataset.test_labels)}

    def measure() -> dict[str, Any]:
        result = replay(config, dataset, steps, probe_for(config), Path(run_dir) / runs.CHECKPOINT,
                        progress=False, setup=setup_for(config) if setup_for else None,
                        threads=threads)
        return reduce(result) if reduce else result

    return runs.cached(run_dir, name, key, measure)
