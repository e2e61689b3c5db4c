"""SyncBatchNorm: exact against one-process torch BatchNorm over the concatenated batch.

Worlds of 2 and 3 gloo processes are spawned on localhost (a TCPStore on a free port held
by the test process, a timeout on the process group and on the join, the processes
killed on failure). Spawning is slow, so each world runs every case it can and returns
max differences, which the test process checks.
"""

from __future__ import annotations

import copy
import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnlab import nn as bnn
from bnlab.nn import SyncBatchNorm

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SPLITS = {
    2: {"equal": (6, 6), "unequal": (9, 3), "empty": (12, 0)},
    3: {"equal": (4, 4, 4), "unequal": (7, 2, 3), "empty": (5, 0, 7)},
}
SHAPES = {"2d": (5,), "3d": (4, 6), "4d": (3, 4, 3)}  # (C, ...) per sample
WORLD_TIMEOUT_S = 180


# ---------------------------------------------------------------- spawning a world


def _entry(rank: int, fn, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(fn(rank, world_size), Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(fn, world_size: int, out: Path, timeout: float = WORLD_TIMEOUT_S) -> list:
    """Run ``fn(rank, world_size)`` in ``world_size`` gloo processes; their return values."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    context = mp.start_processes(_entry, args=(fn, world_size, store.port, str(out)),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"world of {world_size} did not finish in {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


# ---------------------------------------------------------------- what each rank runs


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _slice_bounds(split: tuple[int, ...], rank: int) -> tuple[int, int]:
    start = sum(split[:rank])
    return start, start + split[rank]


def _torch_bn(channels: int, ndim: int, dtype: torch.dtype) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[ndim]
    bn = cls(channels, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _exactness_case(rank, world_size, split, sample_shape, dtype, mean=3.0, group=None,
                    reference_dtype=None):
    """Max differences of one SyncBN step (and an eval pass) against torch's BN."""
    torch.manual_seed(0)
    batch = sum(split)
    ref_dtype = reference_dtype or dtype
    x = (torch.randn(batch, *sample_shape, dtype=torch.float64) * 2 + mean).to(dtype)
    probe = torch.randn(batch, *sample_shape, dtype=torch.float64)  # loss = sum(y * probe)
    ref = _torch_bn(sample_shape[0], x.dim(), ref_dtype)
    ref_copy = copy.deepcopy(ref)  # untouched, for the torch baseline
    sync = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref).to(dtype), group)
    assert isinstance(sync, SyncBatchNorm)

    ref_x = x.to(ref_dtype).detach().requires_grad_()
    ref_y = ref(ref_x)
    (ref_y * probe.to(ref_dtype)).sum().backward()

    start, end = _slice_bounds(split, rank)
    local_x = x[start:end].clone().requires_grad_()
    local_y = sync(local_x)
    (local_y * probe[start:end].to(dtype)).sum().backward()
    param_grads = torch.cat([sync.weight.grad, sync.bias.grad])
    dist.all_reduce(param_grads, group=group)

    baseline = None
    if reference_dtype is not None:  # torch's own kernel in dtype, for scale
        torch_bn = ref_copy.to(dtype)
        torch_x = x.clone().requires_grad_()
        torch_y = torch_bn(torch_x)
        (torch_y * probe.to(dtype)).sum().backward()
        baseline = {
            "output": _max_diff(torch_y, ref_y),
            "input_grad": _max_diff(torch_x.grad, ref_x.grad),
            "param_grad": _max_diff(torch.cat([torch_bn.weight.grad, torch_bn.bias.grad]),
                                    torch.cat([ref.weight.grad, ref.bias.grad])),
            "running_mean": _max_diff(torch_bn.running_mean, ref.running_mean),
            "running_var": _max_diff(torch_bn.running_var, ref.running_var),
        }
    sync.eval()
    ref.eval()
    with torch.no_grad():
        eval_diff = _max_diff(sync(x), ref(x.to(ref_dtype)))
    return {
        "torch": baseline,
        "output": _max_diff(local_y, ref_y[start:end]),
        "input_grad": _max_diff(local_x.grad, ref_x.grad[start:end]),
        "param_grad": _max_diff(param_grads, torch.cat([ref.weight.grad, ref.bias.grad])),
        "running_mean": _max_diff(sync.running_mean, ref.running_mean),
        "running_var": _max_diff(sync.running_var, ref.running_var),
        "eval_output": eval_diff,
        "batches_tracked": int(sync.num_batches_tracked),
        "running": torch.cat([sync.running_mean, sync.running_var]),
    }


def _exactness_cases(rank: int, world_size: int) -> dict:
    results = {}
    for split_name, split in SPLITS[world_size].items():
        for shape_name, shape in SHAPES.items():
            for dtype in TOL:
                key = (split_name, shape_name, str(dtype).removeprefix("torch."))
                results[key] = _exactness_case(rank, world_size, split, shape, dtype)
    # float32 data with mean 1e4 and std 2, against float64 math on the same values.
    for shape_name in ("2d", "4d"):
        results[("large-mean", shape_name, "float32")] = _exactness_case(
            rank, world_size, SPLITS[world_size]["unequal"], SHAPES[shape_name],
            torch.float32, mean=1e4, reference_dtype=torch.float64)
    return results


def _subset_group_cases(rank: int, world_size: int) -> dict:
    pair = dist.new_group([0, 1])
    if rank == 2:
        with pytest.raises(ValueError, match="not a member") as error:
            SyncBatchNorm(3, process_group=pair)
        return {"error": str(error.value)}
    return _exactness_case(rank, 2, (5, 3), SHAPES["4d"], torch.float64, group=pair)


def _small_net(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 6), bnn.BatchNorm1d(6), nn.ReLU(),
                         nn.Linear(6, 3)).to(dtype)


def _ddp_cases(rank: int, world_size: int) -> dict:
    results = {}
    for broadcast_buffers in (True, False):
        torch.manual_seed(1)
        ref = _small_net(torch.float64)
        sync = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
        ddp = nn.parallel.DistributedDataParallel(sync, broadcast_buffers=broadcast_buffers)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        loss_diffs = []
        for _ in range(3):
            x = torch.randn(16, 1, 6, 6, dtype=torch.float64) + 1
            y = torch.randint(0, 3, (16,))
            ref_opt.zero_grad()
            ref_loss = nn.functional.cross_entropy(ref(x), y)
            ref_loss.backward()
            ref_opt.step()
            local = slice(8 * rank, 8 * rank + 8)  # equal halves: DDP's mean of means is exact
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x[local]), y[local])
            loss.backward()
            opt.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            loss_diffs.append(abs(mean_loss.item() / world_size - ref_loss.item()))
        ref_state, state = ref.state_dict(), sync.state_dict()
        results[broadcast_buffers] = {
            "loss": max(loss_diffs),
            "state": max(_max_diff(state[k], ref_state[k]) for k in ref_state),
        }
    return results


def _world_of_two(rank: int, world_size: int) -> dict:
    return {"exact": _exactness_cases(rank, world_size), "ddp": _ddp_cases(rank, world_size)}


def _world_of_three(rank: int, world_size: int) -> dict:
    return {"exact": _exactness_cases(rank, world_size),
            "subset": _subset_group_cases(rank, world_size)}


# ---------------------------------------------------------------- the tests


_COMPARED = ("output", "input_grad", "param_grad", "running_mean", "running_var")


def _check_exactness(results: list[dict]) -> None:
    for key in results[0]["exact"]:
        dtype = getattr(torch, key[2])
        for rank, result in enumerate(results):
            case = result["exact"][key]
            if case["torch"] is None:
                worst = max(case[k] for k in _COMPARED + ("eval_output",))
                print(f"{key} rank {rank}: max diff {worst:.2e}")
                assert worst <= TOL[dtype], (key, rank, case)
            else:  # float32 with mean 1e4, against float64 math on the same values
                for name in _COMPARED:
                    print(f"{key} rank {rank} {name}: max diff to float64 {case[name]:.2e} "
                          f"(torch float32: {case['torch'][name]:.2e})")
                    # The running mean holds ~1e4 in float32: its rounding is torch's too.
                    bound = 2 * case["torch"][name] if name == "running_mean" else TOL[dtype]
                    assert case[name] <= bound, (key, name, case[name])
            assert case["batches_tracked"] == 1
            # Identical running statistics on every rank, bit for bit.
            assert torch.equal(case["running"], results[0]["exact"][key]["running"]), key


@pytest.fixture(scope="module")
def world_of_two(tmp_path_factory):
    return run_world(_world_of_two, 2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world_of_three(tmp_path_factory):
    return run_world(_world_of_three, 3, tmp_path_factory.mktemp("world3"))


@pytest.mark.slow
def test_sync_bn_equals_one_process_bn_over_two_ranks(world_of_two):
    _check_exactness(world_of_two)


@pytest.mark.slow
def test_sync_bn_equals_one_process_bn_over_three_ranks(world_of_three):
    _check_exactness(world_of_three)


@pytest.mark.slow
def test_ddp_with_sync_bn_trains_as_one_process(world_of_two):
    for rank, result in enumerate(world_of_two):
        for broadcast_buffers, diffs in result["ddp"].items():
            print(f"DDP broadcast_buffers={broadcast_buffers} rank {rank}: {diffs}")
            assert diffs["loss"] <= 1e-10 and diffs["state"] <= 1e-10, (broadcast_buffers, diffs)


@pytest.mark.slow
def test_subset_group_syncs_only_within_it(world_of_three):
    for rank in (0, 1):
        case = world_of_three[rank]["subset"]
        assert max(case[k] for k in _COMPARED) <= 1e-10, case
    assert "global rank 2" in world_of_three[2]["subset"]["error"]


# ---------------------------------------------------------------- one process, no group


def test_without_process_group_is_exactly_batch_norm():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    plain = bnn.BatchNorm2d(3, dtype=torch.float64)
    sync = SyncBatchNorm(3, dtype=torch.float64)
    sync.load_state_dict(plain.state_dict())
    for module in (plain, sync):
        for _ in range(2):
            x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            x.requires_grad_()
            module(x).pow(2).sum().backward()
            module.grad_x = x.grad
    assert torch.equal(plain.grad_x, sync.grad_x)
    for a, b in zip(plain.state_dict().values(), sync.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(plain.weight.grad, sync.weight.grad)


def test_convert_sync_batchnorm_keeps_state_device_dtype_and_mode():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(),
                          bnn.BatchNorm1d(12, impl="reference", momentum=None),
                          nn.Sequential(nn.BatchNorm1d(12, affine=False))).double()
    model(torch.randn(4, 1, 4, 4, dtype=torch.float64))
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [model[1].weight, model[3].bias]
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    for index in (1, 3):
        assert type(model[index]) is SyncBatchNorm
    assert type(model[4][0]) is SyncBatchNorm and model[4][0].weight is None
    assert model[1].weight is params[0] and model[3].bias is params[1]
    assert not model[1].training and model[3].training
    assert model[3].impl == "reference" and model[3].momentum is None
    assert all(t.dtype == before[k].dtype and torch.equal(t, before[k])
               for k, t in model.state_dict().items())
    lone = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(3))
    assert type(lone) is SyncBatchNorm


def test_lazy_uninitialized_batch_norm_is_not_converted():
    with pytest.raises(ValueError, match="uninitialized"):
        SyncBatchNorm.convert_sync_batchnorm(nn.LazyBatchNorm2d())


class _ScaledBatchNorm2d(nn.BatchNorm2d):
    """A user's batch norm with math of its own, on torch's class."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("layer", [
    lambda: bnn.GhostBatchNorm2d(3, virtual_batch_size=2),
    lambda: bnn.BatchRenorm2d(3),
    lambda: bnn.NoisyBatchNorm2d(3),
    lambda: _ScaledBatchNorm2d(3),
], ids=["ghost", "renorm", "noisy", "torch-subclass"])
def test_a_batch_norm_with_math_of_its_own_is_refused_and_nothing_converted(layer):
    """SyncBatchNorm computes plain batch norm: replacing ghost BN, renorm or noisy BN by it
    would train another model under the same name (issue 26, item 2)."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3),
                          nn.Sequential(nn.Identity(), layer()))
    kept = type(model[2][1])
    with pytest.raises(ValueError, match=rf"^layer '2\.1' is a {kept.__name__}, which has no "
                                         "synchronized form"):
        SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][1]) is kept  # nothing converted
