"""Executors: a grid through Ray gives the local executor's results row for row; a Ray
worker killed mid-run is retried and the run resumes from its checkpoint; bad executor
options are one-line errors within seconds.

The Ray tests start their own local Ray (2 CPUs, no dashboard) and shut it down after."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from bnlab import cli
from bnlab.data import dataset
from bnlab.experiments.executors import ExecutorError, RayExecutor, make_executor
from bnlab.experiments.runner import PlannedRun, Variant, execute, is_finished
from bnlab.training import runs
from bnlab.training.train import TrainConfig, start_run

TIMING = {"seconds", "train_seconds", "eval_seconds", "images_per_s"}


@pytest.fixture
def fake_dataset(monkeypatch, synthetic_fashion):
    monkeypatch.setattr(dataset, "load_fashion_mnist", lambda root=None, **kw: synthetic_fashion)
    return synthetic_fashion


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             logging_level="warning")
    yield ray
    ray.shutdown()


def without_timing(row: dict) -> dict:
    """A results.jsonl row without what differs between two trainings of one config: the
    clock and the folder it was written to."""
    return {
        **{k: v for k, v in row.items() if k not in ("run_dir", "provenance")},
        "metrics": [{k: v for k, v in m.items() if k not in TIMING} for m in row["metrics"]],
        "summary": {k: v for k, v in row["summary"].items()
                    if "seconds" not in k and "images" not in k},
    }


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str, float]:
    start = time.monotonic()
    code = cli.main(argv)
    return code, capsys.readouterr().err, time.monotonic() - start


def test_an_unreachable_ray_address_is_a_quick_clear_error(fake_dataset, tmp_path, capsys):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    code, err, seconds = run_cli(["exp", "chapter", "--quick", "--executor", "ray", "--address",
                                  address, "--out", str(tmp_path)], capsys)
    assert code == 2 and seconds < 10
    assert err.startswith(f"bnlab: error: cannot reach a Ray cluster at {address}")
    assert not any(tmp_path.iterdir())


def serve(server: socket.socket, answer: bytes | None) -> None:
    """Accept one connection and answer ``answer`` (None: say nothing until it closes)."""
    conn, _ = server.accept()
    with conn:
        if answer is None:
            conn.recv(1024)
            conn.recv(1024)  # returns when the client gives up
        else:
            conn.sendall(answer)


@pytest.mark.slow
@pytest.mark.parametrize("answer, message", [
    (None, "no answer within"),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "it answers, but not as Ray's GCS"),
])
def test_a_port_that_is_not_ray_is_a_quick_clear_error(answer, message, fake_dataset, tmp_path,
                                                        capsys):
    pytest.importorskip("ray")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        thread = threading.Thread(target=serve, args=(server, answer))
        thread.start()
        code, err, seconds = run_cli(["exp", "chapter", "--quick", "--executor", "ray",
                                      "--address", address, "--out", str(tmp_path)], capsys)
        thread.join(timeout=10)
    assert code == 2 and seconds < 15
    assert err.startswith(f"bnlab: error: cannot reach a Ray cluster at {address}: {message}")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--executor", "local", "--address", "auto"], "--address is for --executor ray"),
    (["--executor", "ray", "--jobs", "2"], "--jobs is for --executor local"),
    (["--executor", "ray", "--address", "nohost"], "expected --address auto or HOST:PORT"),
    (["--threads", "0"], "expected --threads >= 1 (got 0)"),
    (["--jobs", "0"], "expected --jobs >= 1 (got 0)"),
])
def test_bad_executor_options_are_one_line_errors(argv, message, fake_dataset, tmp_path, capsys):
    if "ray" in argv:
        pytest.importorskip("ray")
    code, err, _ = run_cli(["exp", "chapter", "--quick", "--out", str(tmp_path), *argv], capsys)
    assert code == 2 and err.startswith("bnlab: error: ") and message in err
    assert err.count("\n") == 1


def test_an_unknown_executor_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["exp", "chapter", "--executor", "dask"])
    assert exit_.value.code == 2
    assert "invalid choice: 'dask' (choose from 'local', 'ray')" in capsys.readouterr().err


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails
    with pytest.raises(ExecutorError, match=r"pip install 'bnlab\[ray\]'"):
        make_executor("ray")


# ---------------------------------------------------- with a local Ray (started once, last)

@pytest.mark.slow
def test_a_ray_grid_gives_the_local_results_row_for_row(local_ray, fake_dataset, tmp_path, capsys):
    base = ["exp", "chapter", "--quick", "--no-progress"]
    assert cli.main([*base, "--out", str(tmp_path / "local")]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    local, on_ray = results(tmp_path / "local" / "chapter"), results(tmp_path / "ray" / "chapter")
    assert len(local) == 3
    assert [without_timing(r) for r in on_ray] == [without_timing(r) for r in local]
    assert [Path(r["run_dir"]).name for r in on_ray] == [Path(r["run_dir"]).name for r in local]


def ray_task_pids() -> list[int]:
    """Processes of this test's Ray (descendants of this process) running a grid task."""

    def parent(pid: int) -> int:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parent(pid)
            if pid == os.getpid():
                return True
        return False

    found = []
    for entry in os.listdir("/proc"):
        try:
            if (entry.isdigit() and Path(f"/proc/{entry}/cmdline").read_bytes().startswith(
                    b"ray::_ray_task") and ours(int(entry))):
                found.append(int(entry))
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's worker in /proc")
def test_a_killed_ray_worker_is_retried_and_resumes_from_its_checkpoint(local_ray, synthetic_fashion,
                                                                       tmp_path):
    config = TrainConfig(val_size=200, epochs=5, subset=1000, batch_size=32, eval_batch_size=200)
    run = PlannedRun(Variant("bn-lenet", {}), config, tmp_path / "run")
    metrics = run.run_dir / runs.METRICS
    seen: dict = {}

    def kill_after_the_first_epoch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not seen:
            pids = ray_task_pids()
            if pids and metrics.exists() and runs.read_jsonl(metrics):
                seen["rows"] = runs.read_jsonl(metrics)
                seen["finished"] = is_finished(run.run_dir)
                os.kill(pids[0], signal.SIGKILL)
                seen["pid"] = pids[0]
            time.sleep(0.005)

    killer = threading.Thread(target=kill_after_the_first_epoch)
    killer.start()
    try:
        execute([run], synthetic_fashion, progress=False, executor=RayExecutor())
    finally:
        killer.join()
    assert "pid" in seen, "the run's worker was never found"
    assert not seen["finished"] and len(seen["rows"]) < config.epochs  # killed mid-run
    after = runs.read_jsonl(metrics)
    assert len(after) == config.epochs and is_finished(run.run_dir)
    # Resumed, not restarted: the epochs before the kill are kept verbatim, timings included.
    assert after[:len(seen["rows"])] == seen["rows"]
    # ... and the run ends with exactly the numbers of one that was never killed.
    start_run(config, synthetic_fashion, tmp_path / "uninterrupted", progress=False).train()
    uninterrupted = runs.read_jsonl(tmp_path / "uninterrupted" / runs.METRICS)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(after) == strip(uninterrupted)
