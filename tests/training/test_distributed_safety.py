"""``bnlab train --nproc``: never silently another run, one line for every user error
(issue 26, items 2, 5 and 9, and the rendezvous bound to localhost).

Most refusals happen before any process is spawned; the tests that spawn are marked slow.
"""

from __future__ import annotations

import pytest

from bnlab import cli
from bnlab.training import distributed, runs
from bnlab.training.train import TrainConfig, start_run
from bnlab.util.io import atomic_write_json

TINY_FLAGS = ["--subset", "100", "--batch-size", "50", "--eval-batch-size", "200",
              "--device", "cpu", "--no-progress"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error: ") and err.count("\n") == 1, err
    return err.removeprefix("bnlab: error: ").rstrip("\n")


@pytest.mark.parametrize("norm", ["ghost:4", "renorm", "noisy-bn"])
def test_sync_bn_with_a_norm_of_its_own_is_refused_before_anything_is_written(
        norm, fake_dataset, tmp_path, capsys):
    """Item 2: SyncBatchNorm is plain batch norm; ``--sync-bn`` used to replace ghost BN,
    renorm and noisy BN by it while config.json kept the norm's name."""
    out = tmp_path / "run"
    assert cli.main(["train", "--nproc", "2", "--sync-bn", "--norm", norm, *TINY_FLAGS,
                     "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"--sync-bn with --norm {norm}: layer ") and "no synchronized form" in err
    assert not out.exists()


def test_a_run_of_two_processes_is_not_resumed_in_one(fake_dataset, synthetic_fashion,
                                                      tmp_path, capsys):
    """Item 5: ``--resume`` without ``--nproc`` used to continue a two-process run in one
    process (another run) while distributed.json kept saying two."""
    out = tmp_path / "run"
    config = TrainConfig(epochs=2, subset=100, batch_size=50, eval_batch_size=200, device="cpu")
    run = start_run(config, synthetic_fashion, out, progress=False)
    run.train_next_epoch()
    atomic_write_json(out / distributed.DISTRIBUTED,
                      {"world_size": 2, "sync_bn": True, "backend": "gloo"})
    before = (out / runs.METRICS).read_bytes()
    assert cli.main(["train", "--epochs", "2", *TINY_FLAGS, "--out", str(out), "--resume"]) == 2
    assert one_line_error(capsys) == (f"cannot resume {out} in one process: it ran on 2 processes "
                                      f"(distributed.json); resume it with --nproc 2 --sync-bn")
    assert (out / runs.METRICS).read_bytes() == before and not (out / runs.SUMMARY).exists()
