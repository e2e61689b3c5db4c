"""Data-parallel training: one run on N processes through ``torch.distributed``.

Why: batch norm is where data parallelism bites. With N processes and a global batch B,
each process sees B / N images; its batch norm normalizes with the statistics of those
(DDP's default, "local BN": ghost batch norm with ghost size B / N) unless the layers are
converted to :class:`bnlab.nn.sync.SyncBatchNorm` (``--sync-bn``), which normalizes with the
statistics of all B. This module runs ``bnlab train`` that way, on this machine or, under
``torchrun``, on several.

How a run is split:

* ``torch.distributed`` with the env:// variables (``MASTER_ADDR``, ``MASTER_PORT``,
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, as torchrun sets them); gloo on CPU, nccl on
  CUDA (one GPU per process, ``cuda:LOCAL_RANK``). :func:`launch` spawns the N local
  processes itself and serves their rendezvous store on 127.0.0.1 only (torch's env://
  store would listen on every interface), their collectives on the loopback interface;
  under torchrun each process is already a rank (:func:`launched_by_torchrun`) and the
  rendezvous is torchrun's.
* ``--batch-size`` is the global batch and must split evenly: every process gets B / N.
  Each epoch's seeded permutation is the single-process one (``Loader.order``); global
  batch k is the same B images as in one process, and rank r takes its r-th slice of it
  (:class:`ShardedLoader`): disjoint shards that together are the single-process epoch.
  An epoch's last, shorter batch is cut to a multiple of N (at most N - 1 images unused)
  and dropped when it would leave a process fewer than 2 images.
* The model is built from the same seed on every rank and wrapped in
  ``DistributedDataParallel`` (gradients averaged over ranks, which with equal shards is
  the gradient of the global mean loss). With ``broadcast_buffers`` (DDP's default, kept
  here) rank 0's buffers overwrite the others' before each forward: with local BN the
  running statistics are therefore rank 0's (from its shards only), not an average over
  ranks; with SyncBN they are the same on every rank anyway.
* Each step's loss is averaged over ranks and the logits gathered, so ``steps.jsonl``
  and the training accuracy are those of the global batch, as in one process.
  Rank 0 evaluates on the whole test set (the models are identical on every rank; the
  others evaluate one image, which is not recorded, and wait for rank 0 in the next step).
* Threads: ``cores // N`` per process (at least 1).
* Only rank 0 writes: the run folder (``config.json``, ``distributed.json`` with the world
  size, metrics, checkpoints, summary). ``--resume`` restores every rank from rank 0's
  checkpoint (on one machine, or a folder all nodes share).
* Failure: a process that raises writes its error and exits; the launcher then stops the
  others and reports the first failing rank's error as one line (after its traceback,
  for an internal error; a user error or a disk error is the line alone).
* Signals: the ranks ignore SIGINT and exit when the launcher is gone; a SIGINT or SIGTERM
  to the launcher stops them all (``bnlab.util.stopping``). ``--sync-bn`` with a norm that
  has no synchronized form (ghost, renorm, noisy BN) and a ``--resume`` in another world
  (one process, say) are refused. A process that dies
  (killed, out of memory) is reported by its exit signal. Collectives time out after
  ``--dist-timeout`` seconds, so a rank stuck alive cannot hang the others forever. The
  run folder then holds the last finished epoch's checkpoint and no ``summary.json``.

Several machines: the same command under torchrun, e.g. on each of two nodes::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example:29400 -m bnlab.cli train --sync-bn --batch-size 128 ...

(``--nproc`` is then ignored: the world is torchrun's). Only local processes are tested.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException

from bnlab.data.loader import Loader
from bnlab.nn.sync import SyncBatchNorm, check_convertible
from bnlab.training import runs
from bnlab.training.train import (
    CHECKPOINT_KEYS,
    Loaders,
    TrainingRun,
    build_loaders,
    make_step,
    model_for,
    resolve_device,
)
from bnlab.util.config import check, check_at_least
from bnlab.util.errors import BnlabError, describe_os_error
from bnlab.util.io import atomic_write_json, read_json
from bnlab.util.stopping import children_ignore_sigint, stop_processes, worker_setup

DISTRIBUTED = "distributed.json"  # beside config.json in a run folder of N > 1 processes
MIN_SHARD = 2  # images per process and step: local batch norm needs two values per channel
MIN_DIST_TIMEOUT, MAX_DIST_TIMEOUT = 1.0, 1e9
"""Bounds of ``--dist-timeout``: a second, as torch's timeouts are whole milliseconds and the
processes need some to meet; 1e9 s (about 30 years, "never") fits its millisecond counter."""
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(BnlabError):
    """A distributed run that cannot start, or a rank that failed."""


@dataclass
class DistributedConfig:
    """How one training run is spread over processes (``bnlab train`` flags)."""

    nproc: int = field(default=1, metadata={
        "help": "processes on this machine (data parallel; --batch-size is the global batch)"})
    sync_bn: bool = field(default=False, metadata={
        "help": "synchronize batch norm over the processes (bnlab.nn.SyncBatchNorm)"})
    dist_timeout: float = field(default=120.0, metadata={
        "help": "seconds a collective may wait for the other processes before failing"})

    def __post_init__(self) -> None:
        check_at_least(self, 1, "nproc")
        check(MIN_DIST_TIMEOUT <= self.dist_timeout <= MAX_DIST_TIMEOUT,
              f"expected dist_timeout from {MIN_DIST_TIMEOUT:g} to {MAX_DIST_TIMEOUT:g} seconds "
              f"(got {self.dist_timeout:g})")


def check_split(batch_size: int, n_images: int, world_size: int, local_bn: bool) -> None:
    """Raise if a global batch of ``batch_size`` over ``n_images`` cannot feed the world."""
    if n_images < world_size:
        raise DistributedError(f"more processes ({world_size}) than training images ({n_images})")
    if batch_size % world_size:
        raise DistributedError(f"--batch-size {batch_size} does not split evenly over "
                               f"{world_size} processes")
    if local_bn and batch_size // world_size < MIN_SHARD:
        raise DistributedError(
            f"--batch-size {batch_size} over {world_size} processes leaves "
            f"{batch_size // world_size} image per process, too few for local batch norm "
            "(two values per channel); use --sync-bn or a larger --batch-size")


class ShardedLoader:
    """Rank ``rank``'s share of every global batch of ``loader`` (a ``Loader``).

    Yields ``(x, y)`` with x this rank's (B / N, ...) slice and y the labels of the WHOLE
    global batch (B,): :func:`global_step` trains on its slice and gathers the logits, so
    the training loop counts accuracy over the global batch. Every rank forms the global
    batch (a uint8 gather and a conversion) and keeps its slice.
    """

    def __init__(self, loader, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def shard_size(self, batch: int) -> int:
        """Images per rank from a global batch of ``batch`` (0: the batch is dropped)."""
        share = batch // self.world_size
        return share if share >= MIN_SHARD or batch == self.loader.batch_size else 0

    def __len__(self) -> int:
        n, size = len(self.loader.labels), self.loader.batch_size
        full, rest = divmod(n, size)
        return full + (rest > 0 and not self.loader.drop_last and self.shard_size(rest) > 0)

    def __iter__(self):
        for x, y in self.loader:
            share = self.shard_size(len(y))
            if share:
                mine = slice(self.rank * share, (self.rank + 1) * share)
                yield x[mine], y[: share * self.world_size]  # (B/N, ...), (B,)


def global_step(step, world_size: int):
    """Wrap a step ``(x, y) -> (loss, logits)`` on this rank's slice x of a global batch
    whose labels are y: returns the global batch's mean loss and (B, classes) logits."""

    def step_on_shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        share = x.shape[0]
        rank = dist.get_rank()
        loss, logits = step(x, y[rank * share:(rank + 1) * share])
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        gathered = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(gathered, logits.contiguous())
        return loss / world_size, torch.cat(gathered)  # (B, classes)

    return step_on_shard


def check_sync_bn(config, model: nn.Module | None = None) -> None:
    """DistributedError unless ``--sync-bn`` can synchronize every batch norm of ``config``'s
    model (or of ``model``): one with math of its own (ghost, renorm, noisy BN) has no
    synchronized form, and ``SyncBatchNorm`` would silently compute plain batch norm."""
    try:
        check_convertible(model_for(config) if model is None else model)
    except ValueError as exc:
        raise DistributedError(f"--sync-bn with --norm {config.norm}: {exc}; train it without "
                               "--sync-bn or with a plain batch norm") from None


def launched_by_torchrun() -> bool:
    """Whether this process is a rank of a world set up outside bnlab (torchrun)."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def _world_info(dconfig: DistributedConfig, world_size: int, device: torch.device) -> dict:
    return {"world_size": world_size, "sync_bn": dconfig.sync_bn, "backend": _backend(device)}


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _check_world_file(run_dir: Path, info: dict, resume: bool) -> None:
    """A run folder is resumed only by the world it started in."""
    path = run_dir / DISTRIBUTED
    if not resume or not (run_dir / runs.CONFIG).exists():
        return
    saved = read_json(path) if path.exists() else {"world_size": 1}
    if saved != info:
        raise DistributedError(f"cannot resume {run_dir}: it ran as {saved}, asked for {info}")


def check_resumed_alone(run_dir: str | Path, resume: bool) -> None:
    """DistributedError when ``--resume`` in one process would continue ``run_dir``'s run of
    several processes (its ``distributed.json``): it would silently go on as another run."""
    path = Path(run_dir) / DISTRIBUTED
    if not resume or not path.exists():
        return
    saved = read_json(path)
    if saved.get("world_size", 1) != 1:
        flags = f"--nproc {saved['world_size']}{' --sync-bn' if saved.get('sync_bn') else ''}"
        raise DistributedError(f"cannot resume {run_dir} in one process: it ran on "
                               f"{saved['world_size']} processes ({DISTRIBUTED}); resume it "
                               f"with {flags}")


def rank_main(config, dconfig: DistributedConfig, dataset, out: str | None, resume: bool,
              progress: bool) -> dict[str, Any] | None:
    """Train ``config`` as one rank of the env:// world; rank 0 returns the summary."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(max(1, _cores() // local_world))
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    join_world(_backend(device), dconfig.dist_timeout)
    try:
        torch.manual_seed(config.seed)
        model = model_for(config, device)
        if dconfig.sync_bn:
            check_sync_bn(config, model)
            model = SyncBatchNorm.convert_sync_batchnorm(model)
        train, val, test = build_loaders(config, dataset, device)
        if rank != 0:  # only rank 0's evaluations are recorded: the others take one image
            val = test = Loader(test.images[:1], test.labels[:1], 1, shuffle=False, device=device)
        check_split(config.batch_size, len(train.labels), world_size,
                    local_bn=not dconfig.sync_bn)
        shards = ShardedLoader(train, rank, world_size)
        info = _world_info(dconfig, world_size, device)
        run_dir = Path(out) if out is not None and rank == 0 else None
        if run_dir is not None:
            _check_world_file(run_dir, info, resume)
        run = TrainingRun(model, Loaders(shards, val, test), config, run_dir, resume,
                          progress and rank == 0)
        if run_dir is not None:
            atomic_write_json(run_dir / DISTRIBUTED, info)
        dist.barrier()  # rank 0 has prepared the folder (and read its checkpoint)
        checkpoint = Path(out) / runs.CHECKPOINT if out is not None else None
        # The trainer's own restore and step hooks: the other ranks resume from rank 0's
        # checkpoint, and every rank steps through DDP on its shard.
        if rank != 0 and resume and checkpoint is not None and checkpoint.exists():
            run._restore(runs.load_checkpoint(Path(out), CHECKPOINT_KEYS))
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        run._step = global_step(make_step(ddp, run.optimizer), world_size)
        while not run.done:
            run.train_next_epoch()
        summary = run.finish()
        dist.barrier()
        return summary if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_STORE_HOSTED_BY_LAUNCHER = False
"""Set in a process :func:`spawn` started: the launcher serves the rendezvous store."""


def join_world(backend: str, timeout_s: float = DistributedConfig.dist_timeout) -> None:
    """``init_process_group`` of this rank from the env:// variables (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``): as a client of the launcher's store in a process
    :func:`spawn` started, else by torch's env:// rendezvous (torchrun's world). A failure
    (the address in use or unreachable, a timeout) is a one-line DistributedError."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if _STORE_HOSTED_BY_LAUNCHER:
            store = dist.TCPStore(address, int(port), world_size, is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=rank,
                                    world_size=world_size, timeout=timeout)
    except (RuntimeError, ValueError) as exc:  # torch's DistNetworkError, DistStoreError, ...
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"cannot join the process group at {address}:{port} (MASTER_ADDR, "
                               f"MASTER_PORT) as rank {rank} of {world_size}: {message}") from None


@contextmanager
def _local_store(world_size: int, timeout_s: float) -> Iterator[int]:
    """The rendezvous store of a world on this machine, served by this process on 127.0.0.1
    only (torch's own listens on every interface); yields its port, held from the bind on,
    so no other program can take it between choosing and listening."""
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
    except BaseException:
        listener.close()
        raise
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=listener.detach())  # the store owns (closes) it now
    try:
        yield port
    finally:
        del store


def _loopback_interface() -> str | None:
    """This machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS), if it has one."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((name for name in ("lo", "lo0") if name in names), None)


def _spawned_rank(rank: int, world_size: int, port: int, error_dir: str, fn, args) -> None:
    """Entry of a spawned process: the env:// variables torchrun would set, then ``fn``.
    Its collectives' own connections stay on the loopback interface too (unless the user
    set ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``); SIGINT is the launcher's to act on,
    and the process exits when the launcher is gone (``bnlab.util.stopping``)."""
    global _STORE_HOSTED_BY_LAUNCHER
    worker_setup()
    _STORE_HOSTED_BY_LAUNCHER = True
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    loopback = _loopback_interface()
    if loopback is not None:
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(name, loopback)
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 -- reported to the launcher, then exit
        # The launcher prints the traceback of the rank that failed first only: the others'
        # errors are usually their collectives failing because of it. A user error, or one
        # of the disk (a read-only --out), is its one line.
        user_error = isinstance(exc, BnlabError | OSError)
        message = (describe_os_error(exc) if isinstance(exc, OSError)
                   else str(exc) if user_error else f"{type(exc).__name__}: {exc}")
        atomic_write_json(Path(error_dir) / f"rank{rank}.json", {
            "user_error": user_error, "traceback": traceback.format_exc(), "message": message})
        os._exit(1)
    # The rank's work is written and its process group destroyed; the interpreter's own
    # teardown can still abort in gloo's threads ("terminate called without an active
    # exception", seen once under load in CI, cf. pytorch#179291), which the launcher would
    # report as a failed rank. Nothing is left to do that teardown would do: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, args: tuple, nproc: int, timeout: float | None = None,
          rendezvous_timeout: float = 300.0) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes of one env:// world; wait for them.

    The world's rendezvous store is served by this process on 127.0.0.1 (``MASTER_ADDR``
    and ``MASTER_PORT`` point at it; store operations wait up to ``rendezvous_timeout``
    seconds). A failure of any process stops the others and raises
    :class:`DistributedError` with the first failing rank's error (or its exit signal); so
    does ``timeout`` (seconds). Stopped by a signal (``KeyboardInterrupt``) or an error,
    every process is stopped before this returns (``bnlab.util.stopping.stop_processes``).
    """
    with tempfile.TemporaryDirectory(prefix="bnlab-dist-") as error_dir, \
            _local_store(nproc, rendezvous_timeout) as port:
        with children_ignore_sigint():
            context = mp.start_processes(
                _spawned_rank, args=(nproc, port, error_dir, fn, args), nprocs=nproc,
                join=False, start_method="spawn")
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise DistributedError(f"the {nproc} processes did not finish within "
                                           f"{timeout:g} s")
        except ProcessException as failure:  # torch's join has terminated the others
            raise DistributedError(_describe_failure(failure.error_index, context.processes,
                                                     Path(error_dir))) from None
        finally:
            stop_processes(context.processes)


def _describe_failure(rank: int, processes, error_dir: Path) -> str:
    """One line on the first process that failed: its report, or how it died."""
    report = error_dir / f"rank{rank}.json"
    if report.exists():
        report = read_json(report)
        if report["user_error"]:
            return f"rank {rank}: {report['message']}"
        print(f"rank {rank}: {report['traceback']}", file=sys.stderr, end="")
        return f"rank {rank} failed: {report['message']}"
    code = processes[rank].exitcode
    if code is not None and code < 0:
        return f"rank {rank} died ({signal.Signals(-code).name}); the others were stopped"
    return f"rank {rank} exited with code {code}; the others were stopped"


def train_distributed(config, dconfig: DistributedConfig, dataset, out: str | Path,
                      resume: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """``bnlab train`` over processes: as one rank of torchrun's world when launched by it
    (the summary on rank 0, None elsewhere), else :func:`launch` of ``dconfig.nproc``."""
    if launched_by_torchrun():
        return rank_main(config, dconfig, dataset, str(out), resume, progress)
    return launch(config, dconfig, dataset, out, resume, progress)


def launch(config, dconfig: DistributedConfig, dataset, out: str | Path, resume: bool = False,
           progress: bool = True) -> dict[str, Any]:
    """Train ``config`` on ``dconfig.nproc`` local processes; return rank 0's summary.

    Checks the split before anything is written, so a bad request leaves no folder.
    """
    train = build_loaders(config, dataset, "cpu").train
    check_split(config.batch_size, len(train.labels), dconfig.nproc,
                local_bn=not dconfig.sync_bn)
    if config.compile:
        raise DistributedError("--compile is not supported with --nproc > 1")
    if dconfig.sync_bn:
        check_sync_bn(config)
    if config.freeze_bn_epochs:  # the frozen phase rebuilds the step without DDP's
        raise DistributedError("--freeze-bn-epochs is not supported with --nproc > 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # a disk error (read-only, say) before any process
    spawn(rank_main, (config, dconfig, dataset, str(out), resume, progress), dconfig.nproc)
    return read_json(out / runs.SUMMARY)

