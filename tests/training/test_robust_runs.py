"""Run folders that survive any kill, corrupt files named in one line, modes, read-only folders.

Why: a run folder is a user's result; a kill, a corrupt file, a shared machine or a read-only
copy must never lose it or mislead about it (issue 19). Kills are injected at exact points:
a forked child SIGKILLs itself from a hook on ``os.replace`` (every atomic write ends in
one) or from inside a write, never by luck of timing.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bnlab import cli
from bnlab.experiments import get_experiment
from bnlab.experiments.runner import ExpSettings, plan, resolve
from bnlab.training import runs
from bnlab.training.train import TrainConfig, start_run
from bnlab.util import io
from bnlab.util.config import config_to_dict

TIMING_KEYS = {"seconds", "train_seconds", "eval_seconds", "images_per_s",
               "mean_seconds_per_epoch", "median_seconds_per_epoch", "median_images_per_s"}
TINY = ["--subset", "100", "--val-size", "200", "--batch-size", "50", "--eval-batch-size", "200",
        "--device", "cpu", "--no-progress"]


def tiny_config(**changes) -> TrainConfig:
    values = dict(epochs=2, subset=100, val_size=200, batch_size=50, eval_batch_size=200,
                  device="cpu", eval_every=2)
    return TrainConfig(**{**values, **changes})


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    assert err.startswith("bnlab: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def die_in_child(body: Callable[[], None]) -> None:
    """Run ``body`` in a forked child that is expected to SIGKILL itself from a hook."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            body()
        finally:
            os._exit(3)  # only reached when the hook did not fire
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def kill_at_replace(number: int, when: str) -> None:
    """Make this process SIGKILL itself just before or just after its ``number``-th os.replace."""
    real, count = os.replace, [0]

    def replace(src, dst):
        count[0] += 1
        if count[0] == number and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
        if count[0] == number and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


def folder_state(run_dir: Path) -> dict[str, object]:
    """Every file of a run folder, with timings taken out (they differ between processes)."""
    state: dict[str, object] = {}
    for path in sorted(run_dir.iterdir()):
        if path.suffix == ".jsonl":
            state[path.name] = [{k: v for k, v in row.items() if k not in TIMING_KEYS}
                                for row in runs.read_jsonl(path)]
        elif path.suffix == ".json":
            state[path.name] = {k: v for k, v in json.loads(path.read_text()).items()
                                if k not in TIMING_KEYS}
        elif path.name == runs.CHECKPOINT:
            checkpoint = torch.load(path, weights_only=True)
            state[path.name] = ({k: v.tolist() for k, v in checkpoint["model"].items()},
                                [{k: v for k, v in row.items() if k not in TIMING_KEYS}
                                 for row in checkpoint["history"]], checkpoint["step_losses"])
        else:
            state[path.name] = path.read_bytes()
    return state


# --------------------------------------------------------------------------- item 1: kills


def replace_targets(config: TrainConfig, dataset_, run_dir: Path) -> list[str]:
    """The file each os.replace of an uninterrupted run wrote, in order."""
    targets, real = [], os.replace

    def recording(src, dst):
        targets.append(Path(dst).name)
        real(src, dst)

    os.replace = recording
    try:
        start_run(config, dataset_, run_dir, progress=False).train()
    finally:
        os.replace = real
    return targets


@pytest.fixture(scope="module")
def reference_run(synthetic_fashion, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    targets = replace_targets(tiny_config(), synthetic_fashion, run_dir)
    return run_dir, targets


def test_an_uninterrupted_run_writes_history_and_summary_last(reference_run):
    _, targets = reference_run
    last_epoch = targets[len(targets) // 2:]
    assert targets[0] == runs.CONFIG and targets[-1] == runs.SUMMARY
    assert {runs.CHECKPOINT, runs.METRICS, runs.STEPS, runs.EVALS, runs.CURVES} <= set(last_epoch)


def last_epoch_write_points() -> list[tuple[int, str]]:
    # config.json, then per epoch checkpoint, metrics, evals, steps; then curves and summary.
    first_of_last_epoch, total = 1 + 4 + 1, 1 + 2 * 4 + 2
    return [(n, when) for n in range(first_of_last_epoch, total + 1) for when in ("before", "after")]


@pytest.mark.slow
@pytest.mark.parametrize(("number", "when"), last_epoch_write_points())
def test_kill_at_any_write_of_the_last_epoch_then_resume_gives_the_uninterrupted_files(
        synthetic_fashion, tmp_path, reference_run, number, when):
    reference_dir, targets = reference_run
    assert len(targets) == last_epoch_write_points()[-1][0]  # the points cover every write
    run_dir = tmp_path / "run"

    def killed_run() -> None:
        kill_at_replace(number, when)
        start_run(tiny_config(), synthetic_fashion, run_dir, progress=False).train()

    die_in_child(killed_run)
    start_run(tiny_config(), synthetic_fashion, run_dir, resume=True, progress=False).train()
    assert folder_state(run_dir) == folder_state(reference_dir), f"killed {when} {targets[number - 1]}"


def test_kill_after_the_last_checkpoint_is_repaired_by_resume_via_the_cli(
        fake_dataset, tmp_path, capsys):
    """The issue's case: checkpoint.pt of epoch 2 written, metrics.jsonl still of epoch 1."""
    out = tmp_path / "run"
    argv = ["train", "--epochs", "2", *TINY, "--out", str(out)]
    checkpoint_of_last_epoch = 1 + 3 + 1  # config, epoch 1 (checkpoint, metrics, steps), checkpoint

    def killed() -> None:
        kill_at_replace(checkpoint_of_last_epoch, "after")
        cli.main(argv)

    die_in_child(killed)
    assert len(runs.read_jsonl(out / runs.METRICS)) == 1
    assert run_cli(capsys, *argv, "--resume")[0] == 0
    metrics = runs.read_jsonl(out / runs.METRICS)
    assert [row["epoch"] for row in metrics] == [1, 2]
    assert len(runs.read_jsonl(out / runs.STEPS)) == 2
    code, text, _ = run_cli(capsys, "inspect", str(out), "--no-figure")
    assert code == 0 and f"2/2 epochs, val acc {metrics[-1]['val_acc']:.4f}" in text


def test_resume_of_a_finished_run_writes_nothing(fake_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", *TINY, "--out", str(out)]
    assert run_cli(capsys, *argv)[0] == 0
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    code, text, _ = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "finished" in text
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_resume_of_a_finished_read_only_run(fake_dataset, tmp_path, capsys, mounts):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", *TINY, "--out", str(out)]
    assert run_cli(capsys, *argv)[0] == 0
    mounts.read_only(out)
    code, text, err = run_cli(capsys, *argv, "--resume")
    assert (code, err) == (0, "") and "finished" in text


# --------------------------------------------------------------------------- item 3: corrupt files


def finished_run(capsys, out: Path) -> list[str]:
    argv = ["train", "--epochs", "1", *TINY, "--out", str(out)]
    assert run_cli(capsys, *argv)[0] == 0
    return argv


CORRUPT_CHECKPOINTS = {
    "empty": lambda raw: b"",
    "garbage": lambda raw: b"this is not a checkpoint",
    "truncated": lambda raw: raw[: len(raw) // 2],
}


@pytest.mark.parametrize("damage", sorted(CORRUPT_CHECKPOINTS))
def test_corrupt_checkpoint_is_one_line_naming_it(fake_dataset, tmp_path, capsys, damage):
    out = tmp_path / "run"
    argv = finished_run(capsys, out)
    path = out / runs.CHECKPOINT
    path.write_bytes(CORRUPT_CHECKPOINTS[damage](path.read_bytes()))
    for command in (argv + ["--resume"], ["inspect", str(out)]):
        code, _, err = run_cli(capsys, *command)
        one_line_error(err)
        assert code == 2 and f"{path}: " in err and "checkpoint" in err and "delete" in err, err


CORRUPT_CONFIGS = {"not JSON": "{\"model\": ", "not an object": "[1, 2]",
                   "unknown key": json.dumps({"learning_rate": 0.1})}


@pytest.mark.parametrize("damage", sorted(CORRUPT_CONFIGS))
def test_corrupt_config_is_one_line_naming_it(fake_dataset, tmp_path, capsys, damage):
    out = tmp_path / "run"
    argv = finished_run(capsys, out)
    (out / runs.CONFIG).write_text(CORRUPT_CONFIGS[damage])
    for command in (argv + ["--resume"], ["inspect", str(out)]):
        code, _, err = run_cli(capsys, *command)
        one_line_error(err)
        assert code == 2 and f"{out / runs.CONFIG}: " in err and "delete" in err, err


def test_corrupt_metrics_is_named_by_inspect_and_rewritten_by_resume(fake_dataset, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    argv = finished_run(capsys, out)
    good = (out / runs.METRICS).read_text()
    (out / runs.METRICS).write_text(good[:-20] + "\n")
    code, _, err = run_cli(capsys, "inspect", str(out))
    one_line_error(err)
    assert code == 2 and f"{out / runs.METRICS}: line 1" in err and "--resume" in err
    assert run_cli(capsys, *argv, "--resume")[0] == 0
    assert (out / runs.METRICS).read_text() == good


@pytest.mark.slow
def test_an_exp_grid_reports_bad_runs_and_goes_on(fake_dataset, tmp_path, capsys):
    argv = ["exp", "chapter", "--seeds", "2", "--epochs", "1", "--subset", "100", "--out",
            str(tmp_path), "--no-progress"]
    assert run_cli(capsys, *argv)[0] == 0
    experiment = get_experiment("chapter")
    planned = plan(experiment, resolve(ExpSettings(seeds=2, epochs=1, subset=100), experiment),
                   tmp_path / "runs")
    finished_bad, unfinished_bad, retrained = (p.run_dir for p in planned[:3])
    (finished_bad / runs.CONFIG).write_text("{")
    (unfinished_bad / runs.SUMMARY).unlink()
    (unfinished_bad / runs.CHECKPOINT).write_bytes(b"")
    (retrained / runs.SUMMARY).unlink()
    (retrained / runs.CHECKPOINT).unlink()
    (retrained / runs.METRICS).unlink()

    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert f"{finished_bad / runs.CONFIG}: " in err and f"{unfinished_bad / runs.CHECKPOINT}: " in err
    assert err.splitlines()[-1].startswith("bnlab: error: 2 of 6 runs could not be used")
    assert (retrained / runs.SUMMARY).exists()  # the grid went on past the bad runs
    rows = (tmp_path / "chapter" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 4
    report = (tmp_path / "chapter" / "report.md").read_text()
    assert "2 of 6 runs left out" in report and str(finished_bad.name) in report


# --------------------------------------------------------------------------- item 6: no epoch yet


def test_a_folder_with_no_finished_epoch_may_take_a_new_config(fake_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    runs.prepare(out, {**config_to_dict(tiny_config()), "lr": 7.0}, resume=False)  # died before epoch 1
    code, _, err = run_cli(capsys, "train", "--epochs", "1", *TINY, "--out", str(out))
    assert code == 0
    assert "no finished epoch" in err and "replacing" in err and "['epochs', 'eval_every', 'lr']" in err
    assert json.loads((out / runs.CONFIG).read_text())["lr"] == 0.1
    assert len(runs.read_jsonl(out / runs.METRICS)) == 1


def test_same_config_in_a_folder_with_no_finished_epoch_starts_over(fake_dataset, tmp_path,
                                                                    capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", *TINY, "--out", str(out)]
    assert run_cli(capsys, *argv)[0] == 0
    for name in (runs.CHECKPOINT, runs.SUMMARY, runs.METRICS, runs.STEPS, runs.CURVES):
        (out / name).unlink()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "no finished epoch" in err
    assert (out / runs.SUMMARY).exists()


def test_a_folder_with_a_finished_epoch_still_refuses_a_new_config(fake_dataset, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--epochs", "1", *TINY, "--out", str(out))[0] == 0
    (out / runs.SUMMARY).unlink()  # cut off after epoch 1 of a longer run, say
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--lr", "0.3", *TINY, "--out", str(out))
    assert code == 2 and "already holds a run" in one_line_error(err)


# --------------------------------------------------------------------------- item 7: umask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        io.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode


def test_a_run_folder_is_readable_by_others_under_umask_022(fake_dataset, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, "train", "--epochs", "1", *TINY, "--out", str(tmp_path / "r"))[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "r").iterdir()}
    assert set(modes.values()) == {0o644}, modes


# --------------------------------------------------------------------------- item 9: stray temps


def test_a_kill_inside_a_write_leaves_a_temp_file_that_the_next_open_removes(tmp_path):
    run_dir = tmp_path / "run"
    runs.prepare(run_dir, config_to_dict(tiny_config()), resume=False)

    def dies_halfway(f) -> None:
        f.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)

    die_in_child(lambda: io.atomic_write(run_dir / runs.CHECKPOINT, dies_halfway))
    strays = [p.name for p in run_dir.iterdir() if p.name != runs.CONFIG]
    assert len(strays) == 1 and strays[0].startswith(".checkpoint.pt.") and strays[0].endswith(".tmp")
    (run_dir / "notes.tmp").write_text("a user's file")  # not one of bnlab's temp names
    runs.prepare(run_dir, config_to_dict(tiny_config()), resume=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [runs.CONFIG, "notes.tmp"]


@pytest.mark.slow
def test_stray_temps_in_an_experiment_folder_are_removed_on_the_next_run(fake_dataset, tmp_path,
                                                                          capsys):
    folder = tmp_path / "chapter"
    folder.mkdir()
    stray = folder / ".report.md.abcd1234.tmp"
    stray.write_text("half")
    argv = ["exp", "chapter", "--seeds", "1", "--epochs", "1", "--subset", "100", "--out",
            str(tmp_path), "--no-progress"]
    assert run_cli(capsys, *argv)[0] == 0
    assert not stray.exists()


# --------------------------------------------------------------------------- item 11: read-only


def test_inspect_of_a_read_only_run_prints_then_says_the_figure_failed(fake_dataset, tmp_path,
                                                                       capsys, mounts):
    out = tmp_path / "run"
    finished_run(capsys, out)
    mounts.read_only(out)
    code, text, err = run_cli(capsys, "inspect", str(out))
    assert code == 0 and "first norm layer (conv1), 6 channels" in text and "running_var" in text
    assert "norm_params.png" in err and "could not write" in err and "Read-only file system" in err
    assert "Traceback" not in err and not (out / "norm_params.png").exists()



def grid_rows(folder: Path) -> list[dict[str, object]]:
    rows = runs.read_jsonl(folder / "chapter" / "results.jsonl")
    return [{**{k: v for k, v in row.items() if k not in ("run_dir", "provenance")},
             "metrics": [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in row["metrics"]],
             "summary": {k: v for k, v in row["summary"].items() if k not in TIMING_KEYS}}
            for row in rows]


@pytest.mark.slow
def test_a_grid_killed_after_a_runs_last_checkpoint_is_repaired_by_a_rerun(fake_dataset, tmp_path,
                                                                           capsys):
    argv = ["exp", "chapter", "--seeds", "1", "--epochs", "1", "--subset", "100", "--no-progress"]
    assert run_cli(capsys, *argv, "--out", str(tmp_path / "whole"))[0] == 0
    first_runs_checkpoint = 3  # settings.json, the first run's config.json, its checkpoint.pt

    def killed() -> None:
        kill_at_replace(first_runs_checkpoint, "after")
        cli.main([*argv, "--out", str(tmp_path / "cut")])

    die_in_child(killed)
    assert run_cli(capsys, *argv, "--out", str(tmp_path / "cut"))[0] == 0
    assert grid_rows(tmp_path / "cut") == grid_rows(tmp_path / "whole")
    assert all(len(row["metrics"]) == 1 for row in grid_rows(tmp_path / "cut"))
