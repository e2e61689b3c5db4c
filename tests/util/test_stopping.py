"""SIGINT and SIGTERM stop bnlab cleanly (issue 26, item 6): one line, a non-zero exit, no
process left, and the grid or run finishes exactly when started again.

Each end-to-end test starts ``bnlab`` (``tests/synthetic_cli.py``: synthetic data, localhost,
free ports) in a session of its own, sends the signal at a random point of the training (the
delay is printed), waits for the command with a timeout, and checks through /proc that no
process of its group is left; whatever is left is killed at teardown.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bnlab import cli
from bnlab.experiments import get_experiment
from bnlab.experiments.executors import LocalExecutor
from bnlab.experiments.runner import ExpSettings, execute, plan
from bnlab.training import runs
from bnlab.util.stopping import stop_processes
from tests.helpers import (
    REPO,
    bnlab_process,
    kill_group,
    live_processes_in_group,
    wait_until_group_is_gone,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="reads the process table from /proc (Linux)")

TIMING = {"seconds", "train_seconds", "eval_seconds", "images_per_s", "mean_seconds_per_epoch",
          "median_seconds_per_epoch", "median_images_per_s"}
WAIT_S = 120  # the longest any command here may take
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


def python(script: str, tmp_path: Path) -> subprocess.Popen:
    """``script`` in a Python process of its own session, bnlab importable."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    src = Path(cli.__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, str(path)], env={**os.environ, "PYTHONPATH": str(src)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def without_timing(value):
    """A results/metrics value without the clock and the folder it was written to."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING | {"run_dir"}}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def stopped(process: subprocess.Popen, signum: int, to_group: bool, wait_for: Path,
            second: bool = False, work_s: float = 3.0) -> tuple[int, str]:
    """Send ``signum`` to ``process`` (``to_group``: to its whole group, as a terminal's Ctrl-C
    does) at a random point after ``wait_for`` appears (training has begun), within the first
    half of the ``work_s`` seconds the work takes uninterrupted, so that the signal always
    comes while it runs; ``second``: again 0.3 s later. Returns its exit code and stderr, once
    no process of its group is left."""
    deadline = time.monotonic() + WAIT_S
    try:
        while not wait_for.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training never began"
            time.sleep(0.05)
        delay = random.uniform(0.0, min(1.5, work_s / 2))
        print(f"{signal.Signals(signum).name} {'to the group' if to_group else 'to the parent'} "
              f"{delay:.2f} s after {wait_for.name} appeared{', twice' if second else ''}")
        time.sleep(delay)
        send = os.killpg if to_group else os.kill
        send(process.pid, signum)
        if second:
            time.sleep(0.3)
            if process.poll() is None:
                send(process.pid, signum)
        _, err = process.communicate(timeout=WAIT_S)
        left = wait_until_group_is_gone(process.pid)
        assert not left, f"left running after the command ended: {left}"
        return process.returncode, err
    finally:
        kill_group(process.pid)
        process.communicate()


def assert_stopped_in_one_line(code: int, err: str, signum: int) -> None:
    assert code != 0, "finished before the signal: the test checked nothing"
    assert code == CODES[signum], err
    assert err.endswith(f"bnlab: {WORDS[signum]}\n") and "Traceback" not in err, err


# --------------------------------------------------------------------------- the mechanics


def _ignore_signals_and_sleep(ready) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ready.set()
    time.sleep(60)


def test_stop_processes_kills_what_does_not_stop_and_reaps_everything():
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    stubborn = context.Process(target=_ignore_signals_and_sleep, args=(ready,))
    polite = context.Process(target=time.sleep, args=(60,))
    for process in (stubborn, polite):
        process.start()
    assert ready.wait(WAIT_S)
    start = time.monotonic()
    stop_processes([stubborn, polite], grace=0.5)
    assert time.monotonic() - start < 5
    assert stubborn.exitcode == -signal.SIGKILL and polite.exitcode == -signal.SIGTERM


CLEANUP_THAT_HANGS = """
    import multiprocessing, signal, sys, time
    from bnlab.util.stopping import say_stopped, stop_on_signals, stop_processes

    def stubborn():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        time.sleep(60)

    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=stubborn)
        child.start()
        try:
            with stop_on_signals():
                try:
                    print("working", flush=True)
                    time.sleep(60)
                finally:
                    print("cleaning up", flush=True)
                    time.sleep({cleanup})  # a cleanup that hangs, when {cleanup} is long
                    stop_processes([child], grace=0.5)
        except KeyboardInterrupt as exc:
            sys.exit(say_stopped(exc))
"""


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, None), (signal.SIGTERM, signal.SIGINT),
                                           (signal.SIGINT, signal.SIGINT)])
def test_a_signal_unwinds_and_a_second_one_exits_at_once(first, second, tmp_path):
    process = python(CLEANUP_THAT_HANGS.format(cleanup=60 if second else 0), tmp_path)
    try:
        assert process.stdout.readline() == "working\n"
        time.sleep(1.0)  # the child is up
        os.kill(process.pid, first)
        assert process.stdout.readline() == "cleaning up\n"  # first: unwinding, as Ctrl-C does
        start = time.monotonic()
        if second is not None:
            os.kill(process.pid, second)
        _, err = process.communicate(timeout=10)
        assert time.monotonic() - start < 5
        last = second or first
        assert process.returncode == CODES[last] and err == f"bnlab: {WORDS[last]}\n", err
        assert not wait_until_group_is_gone(process.pid, timeout=5)  # the child is gone too
    finally:
        kill_group(process.pid)
        process.communicate()


ORPHAN = """
    import multiprocessing, time
    from bnlab.util.stopping import worker_setup

    def worker():
        worker_setup()
        time.sleep(60)

    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=worker)
        child.start()
        print(child.pid, flush=True)
        time.sleep(60)
"""


def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    process = python(ORPHAN, tmp_path)
    try:
        child = int(process.stdout.readline())
        time.sleep(1.5)  # the child has called worker_setup
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)
        left = wait_until_group_is_gone(process.pid, timeout=10)
        assert not left, f"the worker {child} outlived its parent: {left}"
    finally:
        kill_group(process.pid)


# --------------------------------------------------------------------------- a grid, --jobs 2

GRID = ["exp", "chapter", "--seeds", "1", "--epochs", "4", "--subset", "1200", "--threads", "1",
        "--no-progress"]
GRID_SETTINGS = ExpSettings(seeds=1, epochs=4, subset=1200)


def finish_grid(out: Path, dataset) -> dict[str, list[dict]]:
    """Train what is left of the GRID in ``out`` (one job, one thread: what ``bnlab exp`` with
    GRID runs); every run's metrics by folder name."""
    planned = plan(get_experiment("chapter"), GRID_SETTINGS, out / "runs")
    execute(planned, dataset, progress=False, executor=LocalExecutor(1, threads=1))
    return {p.run_dir.name: runs.read_jsonl(p.run_dir / runs.METRICS) for p in planned}


def epoch_seconds(metrics: list[dict]) -> float:
    """The seconds a run's epochs took (training and evaluation), as its metrics recorded."""
    return sum(row["seconds"] for row in metrics)


@pytest.fixture(scope="module")
def whole_grid(tmp_path_factory, synthetic_fashion):
    """The grid's runs trained without interruption."""
    return finish_grid(tmp_path_factory.mktemp("whole"), synthetic_fashion)


@pytest.mark.slow
@pytest.mark.parametrize("signum, to_group, second", [
    (signal.SIGINT, True, True),    # Ctrl-C at a terminal (the whole group), and again
    (signal.SIGINT, False, False),  # SIGINT to the parent alone
    (signal.SIGTERM, False, False),  # SIGTERM to the parent alone (kill, systemd, a scheduler)
], ids=["ctrl-c-twice", "sigint-parent", "sigterm-parent"])
def test_a_signal_stops_a_grid_of_two_jobs_and_the_grid_then_finishes_exactly(
        signum, to_group, second, whole_grid, synthetic_fashion, tmp_path):
    out = tmp_path / "exp"
    process = bnlab_process(*GRID, "--jobs", "2", "--out", str(out))
    # The runs' epochs, two at a time: the work left once the runs folder appears.
    work_s = sum(epoch_seconds(metrics) for metrics in whole_grid.values()) / 2
    code, err = stopped(process, signum, to_group, out / "runs", second, work_s)
    if second and code == -signum:  # the second came in the exit's last moments (signal
        code = CODES[signum]        # handlers restored): the process died of it, as it should
    assert_stopped_in_one_line(code, err, signum)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    time.sleep(0.5)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before, "written after the end"
    assert (without_timing(finish_grid(out, synthetic_fashion))
            == without_timing(whole_grid))


# --------------------------------------------------------------------------- a run, --nproc 2

NPROC = ["train", "--nproc", "2", "--epochs", "4", "--subset", "1000", "--val-size", "200",
         "--batch-size", "100", "--eval-batch-size", "200", "--device", "cpu", "--dist-timeout", "60",
         "--no-progress"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, synthetic_fashion):
    """The two-process run's metrics, trained without interruption."""
    import bnlab.data.dataset as dataset_module

    out = tmp_path_factory.mktemp("whole") / "run"
    real = dataset_module.load_fashion_mnist
    dataset_module.load_fashion_mnist = lambda root=None, **kw: synthetic_fashion
    try:
        assert cli.main([*NPROC, "--out", str(out)]) == 0
    finally:
        dataset_module.load_fashion_mnist = real
    return runs.read_jsonl(out / runs.METRICS)


@pytest.mark.slow
@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c", "sigterm-parent"])
def test_a_signal_stops_a_run_of_two_processes_and_resume_finishes_it_exactly(
        signum, to_group, whole_run, fake_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    process = bnlab_process(*NPROC, "--out", str(out))
    # The epochs are the work left once config.json appears (the processes have started).
    code, err = stopped(process, signum, to_group, out / runs.CONFIG,
                        work_s=epoch_seconds(whole_run))
    assert_stopped_in_one_line(code, err, signum)
    assert cli.main([*NPROC, "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    assert without_timing(runs.read_jsonl(out / runs.METRICS)) == without_timing(whole_run)
    assert json.loads((out / "distributed.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_sigterm_to_a_single_process_run_says_so(tmp_path):
    """``bnlab train`` used to die silently on SIGTERM; now it unwinds and prints one line."""
    out = tmp_path / "run"
    process = bnlab_process("train", "--epochs", "50", "--subset", "1000", "--val-size", "200",
                            "--batch-size", "100", "--device", "cpu", "--no-progress", "--out",
                            str(out), cwd=REPO)
    code, err = stopped(process, signal.SIGTERM, False, out / runs.CONFIG)
    assert code == 143 and err.endswith("bnlab: terminated\n") and "Traceback" not in err, err
    assert live_processes_in_group(process.pid) == []
