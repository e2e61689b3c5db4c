"""Every CLI command runs end to end on synthetic data (the real dataset is never needed)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from bnlab import cli
from bnlab.training import restore
from tests.helpers import COMPILED_SKIP
from tests.util.figure_checks import check_saved_figures


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "bench", "train", "inspect", "demo", "exp", "report"):
        assert command in out
    description = out.split("\n\n")[1]  # the first paragraph after the usage lines
    assert description.startswith("Start here: `bnlab demo`")


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser, option action) of every flag of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif action.option_strings and action.dest not in ("help", "version"):
            yield path, parser, action


def test_every_flag_says_its_default_and_every_command_what_it_does():
    options = list(_options(cli.build_parser()))
    assert len(options) > 80  # every command's flags were walked
    for path, _, action in options:
        assert "default" in (action.help or ""), (path, action.option_strings, action.help)
        if action.default not in (None, False, True):  # a value: the help names it
            assert str(action.default) in action.help, (path, action.option_strings)
    for path, parser, _ in options:
        assert parser.description, path  # CMD --help says what CMD does, not only its flags


@pytest.mark.slow
def test_train_then_inspect(capsys, fake_dataset, tmp_path, monkeypatch):
    figures = check_saved_figures(monkeypatch)
    out_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--epochs", "2", "--batch-size", "64", "--device",
                           "cpu", "--val-size", "200", "--out", str(out_dir), "--no-progress")
    assert code == 0 and "finished: final val acc" in out
    assert json.loads((out_dir / "config.json").read_text())["epochs"] == 2
    code, out, _ = run_cli(capsys, "inspect", str(out_dir))
    assert code == 0
    assert "first norm layer (conv1), 6 channels" in out and "gamma = [" in out
    assert "running_var" in out and (out_dir / "norm_params.png").exists()
    assert set(figures.problems) == {"run/curves.png", "run/norm_params.png"}
    assert figures.failing == {}


def test_train_lenet_defaults_to_no_norm_and_rejects_bn(capsys, fake_dataset, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--model", "lenet", "--epochs", "1", "--val-size",
                           "200", "--out", str(tmp_path / "a"), "--no-progress")
    assert code == 0 and "lenet lr=0.1" in out
    code, _, err = run_cli(capsys, "train", "--model", "lenet", "--norm", "torch", "--out",
                           str(tmp_path / "b"), "--no-progress")
    assert code == 2 and "model 'lenet' has no norm layers" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("norm", "message"), [
    ("ghost:1", "expected ghost:SIZE with an integer SIZE >= 2"),
    ("layer:3", "norm 'layer' takes no value"),
    ("nope", "unknown norm 'nope'"),
    ("noisy-bn:x", "expected noisy-bn:STRENGTH"),
])
def test_train_refuses_bad_norm_names_in_one_line(capsys, fake_dataset, tmp_path, norm, message):
    code, _, err = run_cli(capsys, "train", "--norm", norm, "--out", str(tmp_path / "x"),
                           "--no-progress")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_train_takes_a_parametrized_norm(capsys, fake_dataset, tmp_path):
    code, _, _ = run_cli(capsys, "train", "--norm", "ghost:16", "--epochs", "1", "--val-size",
                         "200", "--out", str(tmp_path / "g"), "--no-progress")
    assert code == 0
    model, config = restore.load_trained_model(tmp_path / "g")
    assert config.norm == "ghost:16"
    assert {m.virtual_batch_size for m in model.modules() if hasattr(m, "virtual_batch_size")} == {16}


def test_train_refuses_to_overwrite_and_resumes(capsys, fake_dataset, tmp_path):
    args = ["train", "--epochs", "1", "--val-size", "200", "--out", str(tmp_path / "r"),
            "--no-progress"]
    assert run_cli(capsys, *args)[0] == 0
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "already holds a run; pass --resume" in err
    assert run_cli(capsys, *args, "--resume")[0] == 0


@pytest.mark.slow
def test_demo_writes_table_report_and_figures(capsys, fake_dataset, tmp_path, monkeypatch):
    figures = check_saved_figures(monkeypatch)
    code, out, _ = run_cli(capsys, "demo", "--epochs", "2", "--device", "cpu", "--out",
                           str(tmp_path), "--no-progress")
    assert code == 0
    for name in ("lenet", "bn-lenet-bnlab", "bn-lenet-torch"):
        assert name in out
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 2
    assert "train time vs torch BN" in out and "first norm layer" in out
    for path in ("report.md", "comparison.png", "results.json",
                 "bn-lenet-bnlab/norm_params.png"):
        assert (tmp_path / path).exists(), path
    assert {f"{tmp_path.name}/comparison.png", "lenet/curves.png",
            "bn-lenet-bnlab/norm_params.png"} <= set(figures.problems)
    assert figures.failing == {}
    # A second demo reuses the finished runs instead of training again.
    code, again, _ = run_cli(capsys, "demo", "--epochs", "2", "--device", "cpu", "--out",
                             str(tmp_path), "--no-progress")
    assert code == 0 and again.splitlines()[:6] == out.splitlines()[:6]


@pytest.mark.slow
def test_demo_with_other_settings_needs_fresh(capsys, fake_dataset, tmp_path):
    assert run_cli(capsys, "demo", "--epochs", "1", "--out", str(tmp_path), "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "demo", "--epochs", "2", "--out", str(tmp_path), "--no-progress")
    assert code == 2 and "config differs in ['epochs']" in err
    assert run_cli(capsys, "demo", "--epochs", "2", "--out", str(tmp_path), "--fresh",
                   "--no-progress")[0] == 0


def test_unknown_config_key_is_an_error():
    from bnlab.training.train import TrainConfig
    from bnlab.util.config import config_from_dict

    with pytest.raises(ValueError, match=r"unknown TrainConfig key\(s\) \['learning_rate'\]"):
        config_from_dict(TrainConfig, {"learning_rate": 0.1})


def test_bench_step_tracks_torch_and_refuses_bad_norms(capsys, fake_dataset):
    code, out, _ = run_cli(capsys, "bench", "step", "--norms", "bnlab,bnlab-ref,torch",
                           "--steps", "6", "--batch-size", "64", "--device", "cpu",
                           "--no-compiled")
    assert code == 0
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| ") and "norm" not in line}
    assert set(rows) == {"bnlab", "bnlab-ref", "torch"}
    torch_ms = float(rows["torch"][0])
    for cells in rows.values():  # each ratio is its norm's median step time over torch's
        assert float(cells[1]) == pytest.approx(float(cells[0]) / torch_ms, rel=0.01, abs=1e-3)
    # Same seed, same batches: every implementation ends on torch's loss.
    losses = {n: float(cells[2]) for n, cells in rows.items()}
    assert losses["bnlab"] == pytest.approx(losses["torch"], abs=1e-5)
    assert losses["bnlab-ref"] == pytest.approx(losses["torch"], abs=1e-5)
    for bad, message in (("bnlab,nope,torch", "--norms: unknown norm 'nope'"),
                         ("bnlab", "--norms: expected torch among the norms")):
        code, _, err = run_cli(capsys, "bench", "step", "--norms", bad, "--steps", "2")
        assert code == 2 and message in err, err


def test_kernel_build_without_compiler_fails_in_one_line(capsys, monkeypatch, tmp_path):
    """Compiler and ninja hidden from PATH: one `bnlab: error:` line naming both, and
    `kernel info` says the same and that impl='auto' uses the fast path."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    code, out, err = run_cli(capsys, "kernel", "build")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("bnlab: error: building bnlab's C++ "
                                                   "kernel needs a C++ compiler")
    assert "and ninja" in err and "impl='auto' uses the fast path" in err
    code, out, _ = run_cli(capsys, "kernel", "info")
    assert code == 0
    assert "built:" in out and "missing here:" in out and "ninja" in out
    assert str(tmp_path / "ext") in out
    assert "impl='auto' on CPU: fast path" in out


def test_kernel_info_names_this_machines_build(capsys):
    from bnlab.kernels import cpp as _cpp

    code, out, _ = run_cli(capsys, "kernel", "info")
    assert code == 0 and str(_cpp.kernel_build().library) in out
    if _cpp.kernel_build().built:  # a loading build says how many threads its loops use
        assert f"threads per loop:   {_cpp.load_extension().parallel_chunks()} of torch's" in out


def test_bench_bn_rejects_unknown_impls(capsys):
    code, _, err = run_cli(capsys, "bench", "bn", "--impls", "fast,nope")
    assert code == 2 and "--impls: expected names from auto, fast" in err


def test_bench_writes_its_section_of_the_performance_page(capsys, fake_dataset, tmp_path):
    page = tmp_path / "docs" / "performance.md"
    code, out, _ = run_cli(capsys, "bench", "step", "--norms", "bnlab,torch", "--steps", "2",
                           "--device", "cpu", "--no-compiled", "--write-docs", str(page))
    assert code == 0 and f"wrote {page}" in out
    first = page.read_text()
    assert "<!-- begin step -->" in first and "torch " in first and "UTC" in first
    assert "`bnlab bench step --norms bnlab,torch --steps 2 --device cpu --no-compiled" in first
    # A second write replaces the section and keeps one copy of it.
    assert run_cli(capsys, "bench", "step", "--norms", "bnlab,torch", "--steps", "2",
                   "--device", "cpu", "--no-compiled", "--write-docs", str(page))[0] == 0
    assert page.read_text().count("<!-- begin step -->") == 1


@pytest.mark.parametrize("module", ["bn", "bn_act", "fold", "grid", "loader", "step"])
def test_every_bench_module_imports(module):
    """The CLI imports a benchmark's module only when it runs; a broken import would only show
    then, so each is imported here."""
    import importlib

    importlib.import_module(f"bnlab.bench.{module}")


def test_subset_means_the_same_for_every_command():
    from bnlab.data.dataset import TRAIN_SIZE
    from bnlab.experiments import get_experiment
    from bnlab.experiments.runner import QUICK, ExpSettings, resolve
    from bnlab.training.train import TrainConfig, training_images
    from bnlab.util.config import config_from_args

    parser = cli.build_parser()
    norms = get_experiment("norms")

    def exp_subset(*flags: str, base=None) -> int:
        args = parser.parse_args(["exp", "norms", *flags])
        return resolve(config_from_args(ExpSettings, args, base), norms).subset

    assert exp_subset() == norms.default_subset == 10000  # not given: the experiment's own
    assert exp_subset(base=QUICK) == 1000
    for base in (None, QUICK):  # 0 is all the images, as for train and demo
        assert exp_subset("--subset", "0", base=base) == 0
    train = config_from_args(TrainConfig, parser.parse_args(["train", "--subset", "0"]))
    assert train.subset == 0
    # all of them: every training image the validation split leaves
    assert training_images(0, train.val_size) == TRAIN_SIZE - train.val_size


@pytest.mark.slow
@COMPILED_SKIP
def test_bench_step_steps_torch_compiled_bn_lenet_beside(capsys, fake_dataset):
    """The compiled peer starts from the same weights and takes the same batches (its loss
    tracks torch's); its first step, which compiles, is reported apart and not timed."""
    code, out, _ = run_cli(capsys, "bench", "step", "--norms", "bnlab,torch", "--steps", "4",
                           "--batch-size", "64", "--device", "cpu")
    assert code == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "norm" not in line}
    assert set(rows) == {"bnlab", "torch", "torch.compile"}
    assert "| vs torch | vs torch.compile |" in out.replace("  ", "")
    assert rows["torch.compile"][2] == "1.000" and rows["torch"][1] == "1.000"
    assert float(rows["torch.compile"][3]) == pytest.approx(float(rows["torch"][3]), abs=1e-4)
    assert re.search(r"First step of torch\.compile \d+\.\d s \(compiles", out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("bench", ["bn", "fold"])
def test_bench_on_cuda_without_cuda_is_one_line(bench, capsys):
    """Issue 26, item 9: torch's "not compiled with CUDA" traceback before."""
    code, out, err = run_cli(capsys, "bench", bench, "--device", "cuda", "--repeats", "1")
    assert code == 2 and out == ""
    assert err == "bnlab: error: device 'cuda' asked for, but torch sees no CUDA device\n"
