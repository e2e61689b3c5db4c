"""Data-parallel training (bnlab.training.distributed): the same run as one process, and failures.

Each launch spawns 2 gloo processes on localhost (a free port; the process group has a
timeout and the launcher stops every process when one fails), on the synthetic
Fashion-MNIST of conftest, a few steps each.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch

from bnlab.nn import BatchNorm1d, BatchNorm2d, unfuse_batch_norm_act
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.training import distributed, runs
from bnlab.training.distributed import DistributedConfig, DistributedError, launch, spawn
from bnlab.training.train import TrainConfig, TrainingRun, build_loaders, model_for
from bnlab.util.io import read_json
from tests.util.figure_checks import check_saved_figures

# Every test here spawns processes (seconds each): the slow tier.
pytestmark = pytest.mark.slow

CONFIG = TrainConfig(val_size=200, model="bn-lenet", norm="bnlab", batch_size=128, subset=256,
                     epochs=2, lr=0.5, eval_batch_size=200, device="cpu")


def _train_in_one_process(model, config, dataset, out):
    run = TrainingRun(model, build_loaders(config, dataset, "cpu"), config, out, progress=False)
    while not run.done:
        run.train_next_epoch()
    return run.finish()


def _losses(run_dir):
    return torch.tensor([loss for row in runs.read_jsonl(run_dir / runs.STEPS)
                         for loss in row["loss"]])


def _weights(run_dir):
    state = torch.load(run_dir / runs.CHECKPOINT, weights_only=True)["model"]
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def _ghost(model, ghost_size):
    """``model`` with each batch norm replaced by ghost batch norm on the same parameters."""
    for name, child in model.named_children():
        if type(child) in (BatchNorm1d, BatchNorm2d):
            cls = GhostBatchNorm2d if type(child) is BatchNorm2d else GhostBatchNorm1d
            ghost = cls(child.num_features, ghost_size)
            ghost.weight, ghost.bias = child.weight, child.bias
            setattr(model, name, ghost)
        else:
            _ghost(child, ghost_size)
    return model


@pytest.fixture(scope="module")
def single(synthetic_fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    torch.manual_seed(CONFIG.seed)
    _train_in_one_process(model_for(CONFIG), CONFIG, synthetic_fashion, out)
    return out


@pytest.fixture(scope="module")
def synced(synthetic_fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("synced") / "run"
    launch(CONFIG, DistributedConfig(nproc=2, sync_bn=True), synthetic_fashion, out,
           progress=False)
    return out


def test_two_processes_with_sync_bn_train_as_one_process(single, synced):
    losses, reference = _losses(synced), _losses(single)
    assert len(losses) == len(reference) == 4
    print("sync-bn vs one process, step losses max diff", (losses - reference).abs().max().item())
    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-6)
    weights, ref_weights = _weights(synced), _weights(single)
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=1e-4, atol=1e-5)
    assert runs.load_run(synced)["config"] == runs.load_run(single)["config"]
    world = read_json(synced / distributed.DISTRIBUTED)
    assert world["world_size"] == 2 and world["sync_bn"] and world["backend"] == "gloo"
    assert runs.load_run(synced)["summary"]["epochs_completed"] == 2


def test_two_processes_with_local_bn_train_as_ghost_bn_of_half_the_batch(synthetic_fashion,
                                                                          tmp_path):
    torch.manual_seed(CONFIG.seed)
    ghost = tmp_path / "ghost"
    # Unfused: the ghost layers replace the batch norms, the activations stay as they were.
    model = unfuse_batch_norm_act(model_for(CONFIG))
    _train_in_one_process(_ghost(model, 64), CONFIG, synthetic_fashion, ghost)
    local = tmp_path / "local"
    launch(CONFIG, DistributedConfig(nproc=2), synthetic_fashion, local, progress=False)
    losses, reference = _losses(local), _losses(ghost)
    print("local BN vs ghost 64, step losses max diff", (losses - reference).abs().max().item())
    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-6)
    weights, ref_weights = _weights(local), _weights(ghost)
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=1e-4, atol=1e-5)


def _dying_rank(config, dconfig, dataset, out, resume, progress):
    """``rank_main``, except that rank 1 is killed right after the first step of epoch 2:
    that step's all-reduces need rank 0 in epoch 2 too, so epoch 1's checkpoint is written
    (killing rank 1 *before* its step raced rank 0's writing of epoch 1)."""
    wrapped = distributed.global_step
    steps = {"done": 0}

    def global_step(step, world_size):
        inner = wrapped(step, world_size)

        def dying_step(x, y):
            steps["done"] += 1
            result = inner(x, y)
            if steps["done"] == 3 and os.environ["RANK"] == "1":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return dying_step

    distributed.global_step = global_step
    return distributed.rank_main(config, dconfig, dataset, out, resume, progress)


def test_a_dying_rank_stops_the_run_and_resume_finishes_it_exactly(synthetic_fashion, synced,
                                                                   tmp_path):
    out = tmp_path / "run"
    dconfig = DistributedConfig(nproc=2, sync_bn=True, dist_timeout=30)
    with pytest.raises(DistributedError, match=r"^rank 1 died \(SIGKILL\)"):
        spawn(_dying_rank, (CONFIG, dconfig, synthetic_fashion, str(out), False, False), 2,
              timeout=120)
    assert not (out / runs.SUMMARY).exists()
    assert len(runs.read_jsonl(out / runs.METRICS)) == 1  # epoch 1's checkpoint survived
    # A rank's user error comes back as its one line: here rank 0 refuses another world.
    with pytest.raises(DistributedError, match=r"^rank 0: cannot resume .* 'sync_bn': True"):
        launch(CONFIG, DistributedConfig(nproc=2), synthetic_fashion, out, resume=True,
               progress=False)
    launch(CONFIG, dconfig, synthetic_fashion, out, resume=True, progress=False)
    assert runs.read_jsonl(out / runs.METRICS)[-1]["val_acc"] == \
        runs.read_jsonl(synced / runs.METRICS)[-1]["val_acc"]
    torch.testing.assert_close(_losses(out), _losses(synced), rtol=0, atol=0)


def test_bad_requests_fail_before_anything_is_written(synthetic_fashion, tmp_path):
    with pytest.raises(ValueError, match="nproc >= 1"):
        DistributedConfig(nproc=0)
    out = tmp_path / "run"
    few = dataclasses.replace(CONFIG, subset=10, batch_size=10)
    with pytest.raises(DistributedError, match=r"more processes \(16\) than training images"):
        launch(few, DistributedConfig(nproc=16), synthetic_fashion, out)
    with pytest.raises(DistributedError, match="does not split evenly"):
        launch(CONFIG, DistributedConfig(nproc=3), synthetic_fashion, out)
    tiny = dataclasses.replace(CONFIG, batch_size=2)
    with pytest.raises(DistributedError, match="too few for local batch norm"):
        launch(tiny, DistributedConfig(nproc=2), synthetic_fashion, out)
    assert not out.exists()


def test_sharded_loader_splits_each_global_batch_disjointly(synthetic_fashion):
    config = dataclasses.replace(CONFIG, subset=290, batch_size=60)
    train = build_loaders(config, synthetic_fashion, "cpu").train
    train.set_epoch(3)
    whole = list(train)
    shards = [distributed.ShardedLoader(train, rank, 3) for rank in range(3)]
    parts = [list(shard) for shard in shards]
    assert len(shards[0]) == len(parts[0]) == 5  # 4 full batches, and 50 -> 48 images
    for step, (x, y) in enumerate(whole):
        joined = torch.cat([parts[rank][step][0] for rank in range(3)])  # the ranks' slices
        assert torch.equal(joined, x[: len(joined)])
        for rank in range(3):  # every rank sees the labels of the whole (cut) global batch
            assert torch.equal(parts[rank][step][1], y[: len(joined)])
    assert [len(parts[0][s][0]) for s in range(5)] == [20, 20, 20, 20, 16]


def test_exp_sync_quick_writes_a_report_from_its_numbers(synthetic_fashion, tmp_path, monkeypatch,
                                                         capsys):
    """``bnlab exp sync --quick`` end to end, on a grid cut to 2 processes and one batch size
    (the full --quick grid is 12 four-process runs: too slow for the suite)."""
    from bnlab import cli
    from bnlab.experiments import sync

    monkeypatch.setattr(sync, "WORLD", 2)
    monkeypatch.setattr(sync, "QUICK_PER_RANK_BATCHES", (8,))
    monkeypatch.setattr(sync, "QUICK_COST_WORLDS", (2,))
    monkeypatch.setattr("bnlab.data.dataset.load_fashion_mnist", lambda *a: synthetic_fashion)
    figures = check_saved_figures(monkeypatch)
    out = tmp_path / "exp"
    assert cli.main(["exp", "sync", "--quick", "--subset", "200", "--out", str(out),
                     "--no-progress"]) == 0
    report = (out / "sync" / "report.md").read_text()
    rows = runs.read_jsonl(out / "sync" / "results.jsonl")
    assert sorted(r["tags"]["variant"] for r in rows) == ["group", "local", "sync"]
    for row in rows:
        assert read_json(Path(row["run_dir"]) / distributed.DISTRIBUTED)["world_size"] == 2
    cost = read_json(out / "sync" / "cost.json")
    assert cost[0]["world"] == 2 and cost[0]["local"] > 0 and cost[0]["sync"] > 0
    assert f"{cost[0]['sync'] - cost[0]['local']:+.2f}" in report
    assert (out / "sync" / "sync.png").stat().st_size > 0 and "(sync.png)" in report
    assert "sync/sync.png" in figures.problems and figures.failing == {}
    sync_acc = next(r for r in rows if r["tags"]["variant"] == "sync")["summary"]["final_test_acc"]
    assert f"{sync_acc:.4f}" in report
    assert "SyncBN recovers small per-process batches" in report  # a verdict, stated as none
    assert "- b=8: SyncBN − local BN" not in report  # a smoke test states no findings


def test_sync_findings_name_the_step_counts_behind_a_change_across_batch_sizes():
    """The grid holds epochs fixed, so a row across batch sizes compares different step
    counts; the finding says how many each end took (4000 images in global batches of 8
    and 128: 500 and 32 steps an epoch)."""
    from bnlab.experiments import sync
    from bnlab.experiments.analysis import Row

    rows = [Row(label="", tags={"variant": v, "per_rank_batch": b}, seed=0,
                config={"epochs": 2, "subset": 4000, "batch_size": sync.WORLD * b},
                metrics=[], summary={"final_val_acc": acc, "final_test_acc": acc,
                                     "diverged": False}, run_dir="")
            for v in sync.VARIANTS for b, acc in ((2, 0.5), (32, 0.7))]
    lines = [line for line in sync.findings(rows, []) if "moves by" in line]
    assert len(lines) == len(sync.VARIANTS)
    assert all("from b=2 to b=32 moves by +20.00 points" in line for line in lines)
    assert all("b=2 takes 1000 SGD steps and b=32 64" in line for line in lines)


def test_cli_bad_nproc_is_one_line_and_writes_nothing(synthetic_fashion, tmp_path, monkeypatch,
                                                      capsys):
    from bnlab import cli

    monkeypatch.setattr("bnlab.data.dataset.load_fashion_mnist", lambda *a: synthetic_fashion)
    out = tmp_path / "run"
    for flags, message in ((["--nproc", "0"], "expected nproc >= 1 (got 0)"),
                           (["--nproc", "4", "--subset", "3", "--batch-size", "4"],
                            "more processes (4) than training images (3)")):
        assert cli.main(["train", *flags, "--val-size", "200", "--out", str(out),
                         "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == f"bnlab: error: {message}\n"
    assert not out.exists()
