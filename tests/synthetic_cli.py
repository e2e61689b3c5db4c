"""``python -m tests.synthetic_cli ARGS``: the ``bnlab`` command in a process of its own, reading
the synthetic Fashion-MNIST of ``tests.helpers`` instead of the real one.

For tests that signal, kill or race whole processes (``tests.helpers.bnlab_process`` starts it).
Spawned workers receive the dataset from this process, so they need no patch of their own.
With ``BNLAB_TEST_EPOCH_LOG=PATH``, every epoch this process trains appends a line
``<run folder name> <epoch>`` to PATH (runs trained in this process: ``--jobs 1``).
"""

from __future__ import annotations

import os
import sys

from bnlab import cli
from bnlab.data import dataset
from bnlab.training.train import TrainingRun
from tests.helpers import make_synthetic_fashion


def log_epochs(path: str) -> None:
    train_next_epoch = TrainingRun.train_next_epoch

    def logged(run: TrainingRun):
        with open(path, "a") as log:
            log.write(f"{run.run_dir.name} {len(run.history) + 1}\n")
        return train_next_epoch(run)

    TrainingRun.train_next_epoch = logged


if __name__ == "__main__":
    data = make_synthetic_fashion()
    dataset.load_fashion_mnist = lambda root=None, **kw: data
    if "BNLAB_TEST_EPOCH_LOG" in os.environ:
        log_epochs(os.environ["BNLAB_TEST_EPOCH_LOG"])
    sys.exit(cli.main(sys.argv[1:]))
