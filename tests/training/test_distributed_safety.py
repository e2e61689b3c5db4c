"""``bnlab train --nproc``: never silently another run, one line for every user error
(issue 26, items 2, 5 and 9, and the rendezvous bound to localhost).

Most refusals happen before any process is spawned; the tests that spawn are marked slow.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bnlab import cli
from bnlab.training import distributed, runs
from bnlab.training.train import TrainConfig, start_run
from bnlab.util.io import atomic_write_json
from tests.helpers import listening_addresses

TINY_FLAGS = ["--subset", "100", "--val-size", "200", "--batch-size", "50", "--eval-batch-size",
              "200", "--device", "cpu", "--no-progress"]


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
    config = TrainConfig(val_size=200, epochs=2, subset=100, batch_size=50, eval_batch_size=200, device="cpu")
    run = start_run(config, synthetic_fashion, out, progress=False)
    run.train_next_epoch()
    atomic_write_json(out / distributed.DISTRIBUTED,
                      {"world_size": 2, "sync_bn": True, "backend": "gloo"})
    before = (out / runs.METRICS).read_bytes()
    assert cli.main(["train", "--epochs", "2", *TINY_FLAGS, "--out", str(out), "--resume"]) == 2
    assert one_line_error(capsys) == (f"cannot resume {out} in one process: it ran on 2 processes "
                                      f"(distributed.json); resume it with --nproc 2 --sync-bn")
    assert (out / runs.METRICS).read_bytes() == before and not (out / runs.SUMMARY).exists()


@pytest.mark.parametrize("timeout", ["inf", "1e-9", "nan", "0"])
def test_a_dist_timeout_out_of_range_is_one_line(timeout, fake_dataset, tmp_path, capsys):
    """Item 9: inf overflowed a timedelta and 1e-9 timed out at once, both with a traceback."""
    out = tmp_path / "run"
    assert cli.main(["train", "--nproc", "2", "--dist-timeout", timeout, *TINY_FLAGS,
                     "--out", str(out)]) == 2
    assert one_line_error(capsys) == (f"expected dist_timeout from 1 to 1e+09 seconds (got "
                                      f"{float(timeout):g})")
    assert not out.exists()


def test_a_master_port_in_use_is_one_line(fake_dataset, tmp_path, capsys, monkeypatch):
    """Item 9: under torchrun's variables (a world of one, so nothing is spawned) a
    MASTER_PORT someone else listens on was a DistNetworkError traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port)).items():
            monkeypatch.setenv(name, value)
        threads = torch.get_num_threads()  # a rank sets its threads: put this process's back
        try:
            assert cli.main(["train", *TINY_FLAGS, "--epochs", "1", "--out",
                             str(tmp_path / "run")]) == 2
        finally:
            torch.set_num_threads(threads)
    err = one_line_error(capsys)
    assert err.startswith(f"cannot join the process group at 127.0.0.1:{port} (MASTER_ADDR, "
                          "MASTER_PORT) as rank 0 of 1: ") and "address already in use" in err


def test_nproc_on_a_read_only_out_is_one_line(fake_dataset, tmp_path, capsys, mounts):
    """Item 9: ``--nproc 2 --out`` on a read-only file system was rank 0's OSError traceback;
    the folder is now made before any process starts."""
    mounts.read_only(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--nproc", "2", *TINY_FLAGS, "--epochs", "1", "--out", str(out)]) == 2
    assert one_line_error(capsys) == f"{out}: Read-only file system"


@pytest.mark.slow
def test_a_rank_failing_on_the_disk_is_one_line(fake_dataset, tmp_path, capsys, mounts):
    """A rank's OSError (here: rank 0 cannot write config.json in a read-only --out that
    exists) is its one line too, not an internal error's traceback."""
    out = tmp_path / "run"
    out.mkdir()
    mounts.read_only(out)
    assert cli.main(["train", "--nproc", "2", *TINY_FLAGS, "--epochs", "1", "--dist-timeout", "30",
                     "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"rank 0: {out}/") and err.endswith(": Read-only file system"), err


def _report_listening(out: str) -> None:
    """A rank of :func:`distributed.spawn`: joins the world, then writes the addresses it and
    the launcher listen on (the launcher serves the rendezvous store)."""
    distributed.join_world("gloo", 30)
    try:
        dist.barrier()
        rank = dist.get_rank()
        found = {"rank": [str(a) for a in listening_addresses(os.getpid())],
                 "launcher": [str(a) for a in listening_addresses(os.getppid())]}
        atomic_write_json(Path(out) / f"rank{rank}.json", found)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)")
def test_a_world_of_this_machine_listens_on_loopback_only(tmp_path):
    """torch's env:// store listened on every interface, and gloo on the host's address: the
    rendezvous and the collectives of ``--nproc`` were reachable from the network."""
    distributed.spawn(_report_listening, (str(tmp_path),), 2, timeout=120)
    for rank in range(2):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        addresses = [ipaddress.ip_address(a) for a in found["rank"] + found["launcher"]]
        assert found["launcher"] and addresses, found  # the store, and gloo's listener
        assert all(a.is_loopback or (a.version == 6 and a.ipv4_mapped and a.ipv4_mapped.is_loopback)
                   for a in addresses), found
