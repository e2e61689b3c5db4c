"""A grid's local executor does what it was asked and no more (issue 26, items 6 and 8, and
one run folder trained by one process at a time)."""

from __future__ import annotations

import torch

from bnlab.experiments.executors import LocalExecutor
from bnlab.experiments.runner import PlannedRun, Variant, execute
from bnlab.training import runs
from bnlab.training.train import TrainConfig

TINY = dict(epochs=1, subset=100, batch_size=50, eval_batch_size=200, device="cpu")


def planned(tmp_path, seeds=(0,), **changes) -> list[PlannedRun]:
    return [PlannedRun(Variant("v", {}), TrainConfig(**{**TINY, **changes, "seed": seed}),
                       tmp_path / f"run{seed}") for seed in seeds]


def test_threads_are_kept_at_one_job_and_restored_after(synthetic_fashion, tmp_path):
    """Item 8: ``exp --threads T --jobs 1`` used to train with this process's thread count."""
    before = torch.get_num_threads()
    asked = before + 1
    grid = planned(tmp_path)
    execute(grid, synthetic_fashion, progress=False, executor=LocalExecutor(1, threads=asked))
    assert [row["threads"] for row in runs.read_jsonl(grid[0].run_dir / runs.METRICS)] == [asked]
    assert torch.get_num_threads() == before
