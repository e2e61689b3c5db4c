"""Where a grid's runs train: in this process, in a local process pool, or as Ray tasks.

Why: a grid is a list of independent runs, each owning one run folder (``bnlab.training.runs``);
training one is always ``start_run(config, dataset, run_dir, resume=True).train()``. That
protocol (a finished run has ``summary.json``, a cut-off one resumes exactly from its
``checkpoint.pt``) is all an executor needs, so the executors differ only in where that
call happens:

- :class:`LocalExecutor` (the default): in this process, or ``jobs`` spawned worker
  processes that split the machine's threads between them. A signal or an error in this
  process stops them at once (``bnlab.util.stopping``): no run goes on training or writing
  after it; a stopped run resumes from its last checkpoint next time;
- :class:`RayExecutor`: each run is a Ray task that reserves the CPUs (threads) it trains
  with, on a local Ray instance or a cluster (``address``). Run folders must be on storage
  every node sees; the dataset travels once through Ray's object store. A task whose
  worker dies is retried (``RAY_RETRIES``) and resumes from the run's last checkpoint.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from bnlab.training.distributed import DistributedConfig, launch
from bnlab.training.tensorboard import optional_logger
from bnlab.training.train import TrainConfig, bar_disabled, start_run
from bnlab.util.errors import BnlabError
from bnlab.util.io import folder_lock
from bnlab.util.stopping import children_ignore_sigint, stop_processes, worker_setup

EXECUTORS = ("local", "ray")
RAY_RETRIES = 3
"""Retries of a Ray task whose worker died (each resumes from the run's checkpoint)."""
CONNECT_TIMEOUT_S = 5
"""Seconds a cluster address may take to accept a TCP connection, and then to answer as
Ray's GCS (Ray's own default is about 20 tries a second or more apart)."""


class ExecutorError(BnlabError):
    """An executor that cannot run here: missing package, unreachable cluster, bad option."""


def train_run(config: TrainConfig, dataset, run_dir: str | Path,
              tensorboard: str | Path | None = None,
              world: DistributedConfig | None = None) -> dict[str, Any]:
    """Train (or resume, or finish) one run of a grid; with ``tensorboard``, log it into
    ``<tensorboard>/<run folder name>``; with ``world``, over ``world.nproc`` processes of
    this machine (not logged to TensorBoard). Returns the run's summary.

    The run folder is locked meanwhile (``bnlab.util.io.folder_lock``): another process training
    the same folder (a second ``bnlab exp`` on the same ``--out``) waits, then finds it done."""
    run_dir = Path(run_dir)
    with folder_lock(run_dir, lambda: _note_waiting(run_dir)):
        if world is not None:
            return launch(config, world, dataset, run_dir, resume=True, progress=False)
        logdir = None if tensorboard is None else Path(tensorboard) / run_dir.name
        with optional_logger(logdir) as observer:
            return start_run(config, dataset, run_dir, resume=True, progress=False,
                             observer=observer).train()


def _note_waiting(run_dir: Path) -> None:
    print(f"bnlab: note: {run_dir} is being trained by another process; waiting for it",
          file=sys.stderr, flush=True)


class GridProgress:
    """The grid's progress bar: runs done of all, and the last outcome."""

    def __init__(self, total: int, done: int, progress: bool,
                 left_out: Callable[[Any, BnlabError], None] | None = None) -> None:
        self.bar = tqdm(total=total, initial=done, unit="run", desc="grid",
                        disable=bar_disabled(progress), dynamic_ncols=True)
        self.left_out = left_out

    def report(self, p, result: Callable[[], dict[str, Any]]) -> None:
        """Record ``result()``, the summary of run ``p``; a run that cannot be used (a
        ``BnlabError``) goes to ``left_out`` when given, so the grid goes on without it."""
        try:
            summary = result()
        except BnlabError as exc:
            if self.left_out is None:
                raise
            self.left_out(p, exc)
            return
        self.finished(p, summary)

    def started(self, p) -> None:
        self.bar.set_postfix_str(f"{p.variant.label} seed {p.config.seed}")

    def finished(self, p, summary: dict[str, Any]) -> None:
        self.bar.update(1)
        outcome = "diverged" if summary["diverged"] else f"val acc {summary['final_val_acc']:.4f}"
        self.bar.set_postfix_str(f"last: {p.variant.label} seed {p.config.seed}: {outcome}")

    def close(self) -> None:
        self.bar.close()


class Executor(Protocol):
    def run(self, todo: list, dataset, progress: GridProgress,
            tensorboard: str | Path | None = None) -> None:
        """Train every ``PlannedRun`` of ``todo`` to the end, reporting to ``progress``."""


# --------------------------------------------------------------------------- local

_WORKER_DATASET = None


def _init_worker(dataset, threads: int) -> None:
    global _WORKER_DATASET
    worker_setup()  # the parent stops the pool on a signal; a worker outlives no parent
    _WORKER_DATASET = dataset
    torch.set_num_threads(threads)


def _pool_task(config: TrainConfig, run_dir: str, tensorboard: str | None) -> dict[str, Any]:
    return train_run(config, _WORKER_DATASET, run_dir, tensorboard)


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block (unchanged when None)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LocalExecutor:
    """``jobs == 1``: runs one after another in this process, with ``threads`` torch threads
    when given (else this process's). ``jobs > 1``: a pool of spawned processes, each with
    ``threads`` torch threads (default ``cpu_count // jobs``). A run over several processes
    (``PlannedRun.world``) starts its own processes and uses the whole machine: those run one
    after another, before the pool."""

    def __init__(self, jobs: int = 1, threads: int | None = None) -> None:
        if jobs < 1:
            raise ExecutorError(f"expected --jobs >= 1 (got {jobs})")
        self.jobs = jobs
        self.threads_asked = threads
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)

    def run(self, todo, dataset, progress: GridProgress, tensorboard=None) -> None:
        tensorboard = None if tensorboard is None else str(tensorboard)
        alone = [p for p in todo if self.jobs == 1 or p.world is not None]
        for p in alone:
            progress.started(p)
            with _torch_threads(self.threads_asked if p.world is None else None):
                progress.report(p, lambda p=p: train_run(p.config, dataset, p.run_dir,
                                                         tensorboard, p.world))
        todo = [p for p in todo if p not in alone]
        if not todo:
            return
        before = set(multiprocessing.active_children())
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=get_context("spawn"),
                                 initializer=_init_worker,
                                 initargs=(dataset, self.threads)) as pool:
            try:
                with children_ignore_sigint():  # the pool starts its workers on submit
                    futures = {pool.submit(_pool_task, p.config, str(p.run_dir), tensorboard): p
                               for p in todo}
                for future in as_completed(futures):
                    progress.report(futures[future], future.result)
            except BaseException:  # a signal (KeyboardInterrupt) or an error: nothing goes on
                pool.shutdown(wait=False, cancel_futures=True)
                stop_processes(set(multiprocessing.active_children()) - before)
                raise


# --------------------------------------------------------------------------- ray

def import_ray():
    try:  # the optional extra [ray]: imported only for --executor ray
        import ray
    except ImportError as exc:
        raise ExecutorError(f"--executor ray needs the ray package ({exc}); install it with "
                            "pip install 'bnlab[ray]'") from None
    return ray


HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""An HTTP/2 client's connection preface and an empty SETTINGS frame: any gRPC server (Ray's
GCS is one) answers with a SETTINGS frame of its own (frame type 4)."""


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within about ``2 * timeout`` seconds unless ``HOST:PORT`` accepts a connection
    and answers as a gRPC server: Ray's own connect waits half a minute or more per try on
    a port that is open but silent."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ExecutorError(f"expected --address auto or HOST:PORT of a Ray head node "
                            f"(got {address!r})")
    hint = "is `ray start --head` running there, and is this its GCS port (6379 by default)?"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.sendall(HTTP2_HELLO)
            header = b""
            while len(header) < 9 and (chunk := conn.recv(9 - len(header))):
                header += chunk  # the first frame header: length (3 bytes), type, flags, id
    except TimeoutError:
        raise ExecutorError(f"cannot reach a Ray cluster at {address}: no answer within "
                            f"{timeout} s ({hint})") from None
    except OSError as exc:
        raise ExecutorError(f"cannot reach a Ray cluster at {address}: "
                            f"{exc or type(exc).__name__} ({hint})") from None
    if len(header) < 9 or header[3] != 4:
        raise ExecutorError(f"cannot reach a Ray cluster at {address}: it answers, but not as "
                            f"Ray's GCS (a gRPC server) would ({hint})")


@contextmanager
def _gcs_wait(seconds: int | None) -> Iterator[None]:
    """Bound how long ``ray.init`` tries to reach a cluster's GCS (one try a second) through
    Ray's ``RAY_gcs_server_port_wait_time_s``, unless the user set it."""
    name = "RAY_gcs_server_port_wait_time_s"
    if seconds is None or name in os.environ:
        yield
        return
    os.environ[name] = str(seconds)
    try:
        yield
    finally:
        del os.environ[name]


def _ray_task(dataset, config: TrainConfig, run_dir: str, tensorboard: str | None,
              threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return train_run(config, dataset, run_dir, tensorboard)


class RayExecutor:
    """Each run a Ray task reserving ``threads`` CPUs, retried when its worker dies.

    ``address``: None uses the Ray this process is already connected to, or starts a new
    local instance (no dashboard) and stops it afterwards; ``auto`` joins the cluster running on
    this machine; ``HOST:PORT`` joins that head node (its GCS port, 6379 by default).
    """

    def __init__(self, address: str | None = None, threads: int | None = None) -> None:
        self.ray = import_ray()
        self.address = address
        self.threads = threads or 1
        if address not in (None, "auto"):
            check_reachable(address)

    def run(self, todo, dataset, progress: GridProgress, tensorboard=None) -> None:
        ray = self.ray
        if any(p.world is not None for p in todo):
            raise ExecutorError("runs over several processes (this grid's) train with "
                                "--executor local")
        tensorboard = None if tensorboard is None else str(Path(tensorboard).resolve())
        with self._connected():
            task = ray.remote(num_cpus=self.threads, max_retries=RAY_RETRIES)(_ray_task)
            data = ray.put(dataset)
            pending = {task.remote(data, p.config, str(Path(p.run_dir).resolve()), tensorboard,
                                   self.threads): p for p in todo}
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    p = pending.pop(done[0])
                    progress.report(p, lambda ref=done[0]: self._result(ref))
            finally:
                for ref in pending:
                    ray.cancel(ref)

    def _result(self, ref) -> dict[str, Any]:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, BnlabError):
                raise exc.cause from None
            raise

    @contextmanager
    def _connected(self) -> Iterator[None]:
        ray = self.ray
        if ray.is_initialized():
            yield
            return
        try:
            with _gcs_wait(None if self.address is None else CONNECT_TIMEOUT_S):
                ray.init(address=self.address or "local", include_dashboard=False,
                         logging_level="warning")
        except ConnectionError as exc:
            raise ExecutorError(
                f"cannot connect to Ray at --address {self.address}: {exc} (a cluster with token "
                "authentication, Ray's default, also needs RAY_AUTH_MODE=token here and its token "
                "in ~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
        try:
            yield
        finally:
            ray.shutdown()


def make_executor(name: str, jobs: int = 1, address: str | None = None,
                  threads: int | None = None) -> Executor:
    """The executor ``--executor name`` asks for, with its options checked."""
    if threads is not None and threads < 1:
        raise ExecutorError(f"expected --threads >= 1 (got {threads})")
    if name == "local":
        if address is not None:
            raise ExecutorError("--address is for --executor ray")
        return LocalExecutor(jobs, threads)
    if name == "ray":
        if jobs != 1:
            raise ExecutorError("--jobs is for --executor local; Ray runs as many runs at once "
                                "as the cluster has CPUs for (--threads each)")
        return RayExecutor(address, threads)
    raise ExecutorError(f"unknown executor {name!r}; expected one of {list(EXECUTORS)}")
