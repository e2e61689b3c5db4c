"""Bad input is one line, ``bnlab: error: ...``, before anything is written; bugs still show.

Why: a user who mistypes a flag must learn what was expected from one line, with nothing
half-made on disk, and the numbers bnlab prints must be ones a person can read (issue 19,
items 4, 5 and 10). An internal error, on the other hand, keeps its traceback.
"""

from __future__ import annotations

import re

import pytest
import torch

from bnlab import cli
from bnlab.experiments import executors, runner
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.training import inspection
from bnlab.util.errors import ConfigError

TINY = ["--epochs", "1", "--subset", "100", "--val-size", "200", "--batch-size", "50",
        "--eval-batch-size", "200", "--device", "cpu", "--no-progress"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("bnlab: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


TRAIN_ERRORS = {
    "momentum": (["--momentum", "-1"], "expected momentum >= 0 (got -1.0)"),
    "weight decay": (["--weight-decay", "-1"], "expected weight_decay >= 0 (got -1.0)"),
    "dropout": (["--dropout", "1.5"], "expected dropout in [0, 1) (got 1.5)"),
    "norm slots": (["--norm-slots", "conv9"], "unknown norm slot 'conv9'"),
    "device": (["--device", "tpu9"], "expected device auto, cpu, cuda or cuda:N"),
    "depth": (["--model", "deep-mlp", "--norm", "none", "--depth", "0"], "expected depth >= 2"),
    "width": (["--model", "deep-mlp", "--norm", "none", "--width", "0"], "expected width >= 1"),
    "batch size 1": (["--batch-size", "1"], "batch norm needs batch_size >= 2"),
    "seed": (["--seed", "-1"], "expected seed >= 0 (got -1)"),
    "lr inf": (["--lr", "inf"], "expected a finite lr > 0 (got inf)"),
    "lr nan": (["--lr", "nan"], "expected a finite lr > 0 (got nan)"),
    "eval every": (["--eval-every", "-3"], "expected eval_every >= 0 (got -3)"),
    "subset": (["--subset", "-5"], "expected subset >= 0 (got -5)"),
    "subset too big": (["--subset", "5000"], "subset size must be in 1..2200"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_ERRORS))
def test_bad_train_flags_are_one_line_and_write_nothing(fake_dataset, tmp_path, capsys, case):
    flags, message = TRAIN_ERRORS[case]
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, *flags, "--out", str(out))
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_cuda_without_a_gpu_is_one_line(fake_dataset, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for machines without it")
    code, _, err = run_cli(capsys, "train", *TINY, "--device", "cuda", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "torch sees no CUDA device")
    assert not (tmp_path / "r").exists()


def test_batch_size_1_is_fine_without_batch_norm(fake_dataset, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", "lenet", "--epochs", "1", "--subset", "10",
                           "--val-size", "200", "--batch-size", "1", "--device", "cpu",
                           "--no-progress", "--out",
                           str(tmp_path / "r"))
    assert code == 0, err


def test_out_that_is_a_file_or_under_one(fake_dataset, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run_cli(capsys, "train", *TINY, "--out", str(tmp_path / "file"))
    assert_one_line_error(code, err, f"{tmp_path / 'file'} is a file")
    code, _, err = run_cli(capsys, "train", *TINY, "--out", str(tmp_path / "file" / "run"))
    assert_one_line_error(code, err, str(tmp_path / "file"), "Not a directory")


OTHER_ERRORS = {
    "demo epochs": (["demo", "--epochs", "0"], "expected epochs >= 1 (got 0)"),
    "demo lr": (["demo", "--lr", "inf"], "expected a finite lr > 0 (got inf)"),
    "bench loader batch": (["bench", "loader", "--batch-size", "0"], "expected --batch-size >= 1"),
    "bench loader repeats": (["bench", "loader", "--repeats", "0"], "expected --repeats >= 1"),
    "bench bn repeats": (["bench", "bn", "--repeats", "0"], "expected --repeats >= 1"),
    "bench step steps": (["bench", "step", "--steps", "0"], "expected --steps >= 1"),
    "bench step batch": (["bench", "step", "--batch-size", "1"], "batch norm needs batch_size >= 2"),
    "exp jobs": (["exp", "chapter", "--jobs", "0"], "expected --jobs >= 1"),
    "exp subset": (["exp", "chapter", "--subset", "-1"], "expected subset >= 0 (got -1)"),
    "exp dropout": (["exp", "dropout", "--dropout", "2"], "expected dropout in [0, 1) (got 2.0)"),
    "exp subset too big": (["exp", "chapter", "--subset", "5000"], "subset size must be in 1..2400"),
    "inspect nowhere": (["inspect", "/nonexistent/run"], "/nonexistent/run is not a run folder"),
    "report nowhere": (["report", "--runs", "/nonexistent"], "--runs /nonexistent: no such folder"),
}


@pytest.mark.parametrize("case", sorted(OTHER_ERRORS))
def test_bad_flags_of_other_commands_are_one_line(fake_dataset, tmp_path, capsys, monkeypatch,
                                                  case):
    monkeypatch.chdir(tmp_path)  # anything written by mistake lands here
    argv, message = OTHER_ERRORS[case]
    code, _, err = run_cli(capsys, *argv, *(["--out", str(tmp_path / "out")]
                                           if argv[0] in ("demo", "exp") else []))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_full_disk_is_said_in_words(fake_dataset, tmp_path, capsys, mounts):
    disk = mounts.tmpfs(tmp_path / "disk", "64k")  # room for config.json, not for a checkpoint
    code, _, err = run_cli(capsys, "train", *TINY, "--out", str(disk / "run"))
    assert_one_line_error(code, err, str(disk / "run" / "checkpoint.pt"), "no space left on device")
    assert "unexpected pos" not in err
    assert sorted(p.name for p in (disk / "run").iterdir()) == ["config.json"]  # no stray temp


def test_read_only_out_is_one_line(fake_dataset, tmp_path, capsys, mounts):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounts.read_only(read_only)
    code, _, err = run_cli(capsys, "train", *TINY, "--out", str(read_only / "run"))
    assert_one_line_error(code, err, str(read_only / "run"), "Read-only file system")


def test_an_internal_error_still_shows_its_traceback(fake_dataset, tmp_path, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(inspection, "inspect_run", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["inspect", str(tmp_path)])


# --------------------------------------------------------------------------- item 5: exp plans first


def test_exp_validates_every_config_before_training_any(fake_dataset, tmp_path, monkeypatch):
    def variants(settings):
        return [Variant("fine", {"model": "bn-lenet"}),
                Variant("fine too", {"model": "bn-lenet", "lr": 0.3}),
                Variant("bad", {"model": "bn-lenet", "dropout": 2.0})]

    experiment = Experiment("toy", "toy", "?", variants, lambda rows, out, ds: [], 1, 100)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a run trained before the grid was validated")

    monkeypatch.setattr(executors, "start_run", must_not_train)
    with pytest.raises(ConfigError, match=r"toy: variant 'bad': expected dropout in \[0, 1\)"):
        runner.run_experiment(experiment, ExpSettings(seeds=1), tmp_path, fake_dataset)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- item 10: summary line


def test_train_summary_line_is_rounded(fake_dataset, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", *TINY, "--out", str(tmp_path / "r"))
    assert code == 0
    line = out.strip().splitlines()[-1]
    assert re.fullmatch(r"finished: final val acc \d\.\d{4}, best \d\.\d{4} \(epoch 1\), "
                        rf"\d+\.\d{{2}} s/epoch \(median\); results in {tmp_path / 'r'}", line), line


def test_train_summary_line_of_a_diverged_run_says_where(fake_dataset, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "--model", "lenet", "--lr", "1e38", *TINY, "--out",
                           str(tmp_path / "r"))
    assert code == 0
    line = out.strip().splitlines()[-1]
    assert re.fullmatch(r"diverged at epoch 1, step \d+ \(loss not finite\), after 0 finished "
                        rf"epochs; results in {tmp_path / 'r'}", line), line
    assert "None" not in out
