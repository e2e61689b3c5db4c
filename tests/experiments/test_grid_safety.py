"""A grid's local executor does what it was asked and no more (issue 26, items 6 and 8, and
one run folder trained by one process at a time)."""

from __future__ import annotations

import pytest
import torch

from bnlab.experiments.executors import LocalExecutor
from bnlab.experiments.runner import PlannedRun, Variant, execute
from bnlab.training import runs
from bnlab.training.train import TrainConfig
from tests.helpers import bnlab_process, kill_group

TINY = dict(val_size=200, epochs=1, subset=100, batch_size=50, eval_batch_size=200, device="cpu")


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


@pytest.mark.slow
def test_two_exp_processes_on_one_out_train_each_run_once(tmp_path):
    """Two ``bnlab exp`` on one ``--out`` used to both train every run; now the second waits
    for a run the first is training (its lock) and finds it done."""
    out = tmp_path / "exp"
    argv = ["exp", "chapter", "--seeds", "1", "--epochs", "3", "--subset", "1200", "--threads",
            "1", "--jobs", "1", "--no-progress", "--out", str(out)]
    logs = [tmp_path / f"epochs{i}.log" for i in range(2)]
    processes = [bnlab_process(*argv, env={"BNLAB_TEST_EPOCH_LOG": str(log)}) for log in logs]
    try:
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
    finally:
        for process in processes:
            kill_group(process.pid)
    trained = [line for log in logs if log.exists() for line in log.read_text().splitlines()]
    print({log.name: log.read_text().count("\n") if log.exists() else 0 for log in logs})
    assert len(trained) == len(set(trained)) == 3 * 3, sorted(trained)  # 3 runs, 3 epochs each
    assert len(runs.read_jsonl(out / "chapter" / "results.jsonl")) == 3
