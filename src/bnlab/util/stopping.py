"""Stopping on SIGINT and SIGTERM: one line, a non-zero exit, and no process left behind.

Why: a grid (``exp --jobs J``) and a data-parallel run (``train --nproc N``) are a parent
with worker processes. Left to Python's defaults, SIGTERM kills the parent at once and its
workers train (and write run folders) on for minutes; a Ctrl-C unwinds the parent, which
then waits for every queued run to finish. The rules here:

* The parent decides. Workers ignore SIGINT (a Ctrl-C at a terminal reaches the whole
  process group; the parent stops them), from their start (:func:`children_ignore_sigint`)
  on, and exit by themselves when their parent is gone (:func:`worker_setup`), so not even
  a SIGKILL of the parent leaves them running.
* In the parent, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) like SIGINT
  raises ``KeyboardInterrupt``, so every ``finally`` runs: atomic writes remove their temp
  files, and executors stop their workers (:func:`stop_processes`: SIGTERM, a grace
  period, SIGKILL, reaped). The command then prints one line and exits with 128 + the
  signal's number.
* A second SIGINT or SIGTERM while that happens exits at once: every child process is
  SIGKILLed, the line printed, and the process ends (:func:`stop_on_signals`); in the last
  moments of the interpreter's exit, when Python has restored the default handlers, the
  process dies of the signal itself.

A run stopped this way resumes exactly (``--resume``, or the grid again): its folder holds
the last finished epoch's checkpoint.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType

__all__ = ["Terminated", "children_ignore_sigint", "exit_status", "say_stopped", "stop_on_signals",
           "stop_processes", "worker_setup"]

PARENT_POLL_S = 0.5
"""How often a worker checks that its parent is still there."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises ``KeyboardInterrupt``."""


def exit_status(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The line's word and the exit code for a stop by ``exc``: 128 + the signal's number."""
    if isinstance(exc, Terminated):
        return "terminated", 128 + signal.SIGTERM
    return "interrupted", 128 + signal.SIGINT


_said = False  # whether this process has printed its line


def say_stopped(exc: KeyboardInterrupt) -> int:
    """Print the one line, ``bnlab: interrupted`` or ``bnlab: terminated``; return the exit code."""
    global _said
    word, code = exit_status(exc)
    print(f"bnlab: {word}", file=sys.stderr, flush=True)
    _said = True
    return code


def _kill_children() -> None:
    for child in multiprocessing.active_children():
        _quietly(child.kill)


def _second_signal(signum: int, frame: FrameType | None) -> None:
    _kill_children()
    stop = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    code = exit_status(stop)[1] if _said else say_stopped(stop)
    # What a normal exit would do for multiprocessing: unlink this process's semaphores (a
    # process pool's queues), else its resource tracker warns of them after the line.
    with suppress(Exception):
        multiprocessing.util._exit_function()
    os._exit(code)


_stopping = False  # a first signal came: the second-signal handlers stay until the exit


def _first_signal(signum: int, frame: FrameType | None) -> None:
    global _stopping
    _stopping = True
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), _second_signal)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block (a command's whole run, in the main thread): the first SIGINT or
    SIGTERM raises ``KeyboardInterrupt`` / :class:`Terminated`; a second one, inside the block
    or after it until the process exits, SIGKILLs every child process and exits at once. The
    handlers before are restored when the block ends without a signal."""
    global _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGINT", "SIGTERM")}
    _stopping = False
    for name in before:
        signal.signal(getattr(signal, name), _first_signal)
    try:
        yield
    finally:
        if not _stopping:
            for name, handler in before.items():
                signal.signal(getattr(signal, name), handler)


@contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Start worker processes inside this block: SIGINT is blocked in this thread meanwhile,
    and a child inherits the mask through ``exec``, so it ignores Ctrl-C from its first
    instruction (:func:`worker_setup` then ignores it for good), not only after its imports.
    A SIGINT to this process meanwhile still arrives (through another thread, or when the
    block ends)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def stop_processes(processes: Iterable[multiprocessing.Process], grace: float = 5.0) -> None:
    """Stop every process of ``processes`` still alive: SIGTERM, up to ``grace`` seconds to
    exit, then SIGKILL; all are reaped before this returns."""
    processes = [p for p in processes if p.exitcode is None]
    for process in processes:
        _quietly(process.terminate)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.exitcode is None:
            _quietly(process.kill)
            process.join()


def _quietly(send: Callable[[], None]) -> None:
    with suppress(OSError, ValueError):  # the process exited meanwhile, or was closed
        send()


def worker_setup() -> None:
    """In a worker process (pool worker, rank): ignore SIGINT, the parent stops the workers;
    exit (status 1) as soon as the parent is gone, whatever killed it; and give tqdm a
    thread lock: its default is a multiprocessing lock, whose semaphore a killed worker
    leaves registered, and the resource tracker then warns of a "leaked semaphore" on stderr
    after the parent's one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tqdm import tqdm  # here, not at the top: the CLI imports this module at start

    tqdm.set_lock(threading.RLock())  # the base class: every tqdm subclass inherits it
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="bnlab-parent-watch", daemon=True).start()
