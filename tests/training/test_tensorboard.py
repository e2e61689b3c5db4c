"""TensorBoard: the event files, read back with tensorboard's own reader, hold the run's
numbers (metrics.jsonl, steps.jsonl) and a histogram of every BN layer's statistics and
inputs per epoch; logging changes no result and no run's config hash."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from bnlab import cli
from bnlab.data import dataset
from bnlab.experiments import get_experiment
from bnlab.experiments.runner import QUICK, plan, resolve
from bnlab.training import runs
from bnlab.training.models import NORM_SLOTS, norm_layers
from bnlab.training.tensorboard import BN_STATISTICS, EPOCH_SCALARS, optional_logger
from bnlab.training.train import TrainConfig, model_for, start_run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["--subset", "300", "--val-size", "200", "--batch-size", "50", "--eval-batch-size", "100"]
TIMING = {"seconds", "train_seconds", "eval_seconds", "images_per_s"}


@pytest.fixture
def fake_dataset(monkeypatch, synthetic_fashion):
    monkeypatch.setattr(dataset, "load_fashion_mnist", lambda root=None, **kw: synthetic_fashion)
    return synthetic_fashion


def read_events(logdir) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def as_float32(values) -> list[float]:
    return np.asarray(values, dtype=np.float32).tolist()  # event files store float32


@pytest.mark.slow
def test_event_files_hold_the_run_and_every_bn_layer(fake_dataset, tmp_path, capsys):
    out, logdir = tmp_path / "run", tmp_path / "tb"
    argv = ["train", "--epochs", "2", *TINY, "--out", str(out), "--tensorboard", str(logdir),
            "--no-progress"]
    assert cli.main(argv) == 0
    events = read_events(logdir)
    metrics = runs.read_jsonl(out / runs.METRICS)
    assert len(metrics) == 2
    for key in EPOCH_SCALARS:
        logged = events.Scalars(f"epoch/{key}")
        assert [e.step for e in logged] == [1, 2]
        assert [e.value for e in logged] == as_float32([row[key] for row in metrics]), key
    steps = [loss for row in runs.read_jsonl(out / runs.STEPS) for loss in row["loss"]]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == list(range(1, len(steps) + 1))
    assert [e.value for e in logged] == as_float32(steps)

    config = TrainConfig(**json.loads((out / runs.CONFIG).read_text()))
    model = model_for(config)
    layers = [name for name, _ in norm_layers(model)]
    assert layers == list(NORM_SLOTS)  # tagged as BN-LeNet names its slots, not by index
    index = {module: name for name, module in model.named_modules()}  # Sequential index
    histograms = set(events.Tags()["histograms"])
    assert histograms == {f"bn/{layer}/{key}" for layer in layers
                          for key in (*BN_STATISTICS, "input")}
    for tag in histograms:
        assert [e.step for e in events.Histograms(tag)] == [1, 2], tag
    # The last epoch's histograms describe the checkpointed model.
    state = torch.load(out / runs.CHECKPOINT, weights_only=True)["model"]
    for layer, module in norm_layers(model):
        for key, attribute in [("gamma", "weight"), ("running_var", "running_var")]:
            value = state[f"{index[module]}.{attribute}"]
            histogram = events.Histograms(f"bn/{layer}/{key}")[-1].histogram_value
            assert histogram.num == value.numel()
            assert histogram.min == pytest.approx(value.min().item())
            assert histogram.max == pytest.approx(value.max().item())
    # conv1's BN sees conv1's output on the fixed batch: the first eval batch (100 test images).
    model.load_state_dict(state)
    x = fake_dataset.test_images[:100].unsqueeze(1).float() / 255  # (100, 1, 28, 28)
    with torch.no_grad():
        conv1 = model[0](x)  # (100, 6, 24, 24)
    first_input = events.Histograms(f"bn/{layers[0]}/input")[-1].histogram_value
    assert first_input.num == conv1.numel()
    assert first_input.sum == pytest.approx(conv1.sum().item(), rel=1e-4)
    assert first_input.min == pytest.approx(conv1.min().item(), rel=1e-5)


def test_logging_changes_no_result(synthetic_fashion, tmp_path):
    config = TrainConfig(val_size=200, epochs=1, subset=300, batch_size=50, eval_batch_size=100)
    plain = start_run(config, synthetic_fashion, tmp_path / "plain", progress=False).train()
    with optional_logger(tmp_path / "tb") as observer:
        logged = start_run(config, synthetic_fashion, tmp_path / "logged", progress=False,
                              observer=observer).train()
    drop = lambda s: {k: v for k, v in s.items() if "seconds" not in k and "images" not in k}  # noqa: E731
    assert drop(plain) == drop(logged)
    rows = [[{k: v for k, v in row.items() if k not in TIMING}
             for row in runs.read_jsonl(tmp_path / name / runs.METRICS)] for name in ("plain", "logged")]
    assert rows[0] == rows[1]


@pytest.mark.slow
def test_experiment_logs_each_run_in_its_own_folder_under_an_unchanged_hash(fake_dataset, tmp_path,
                                                                           capsys):
    logdir = tmp_path / "tb"
    argv = ["exp", "chapter", "--quick", "--out", str(tmp_path / "exp"), "--tensorboard",
            str(logdir), "--no-progress"]
    assert cli.main(argv) == 0
    experiment = get_experiment("chapter")
    planned = plan(experiment, resolve(QUICK, experiment), tmp_path / "exp" / "runs")
    # The same folders as a run without --tensorboard gets: logging is not in the config.
    assert sorted(p.run_dir.name for p in planned) == sorted(
        d.name for d in (tmp_path / "exp" / "runs").iterdir())
    assert sorted(d.name for d in logdir.iterdir()) == sorted(p.run_dir.name for p in planned)
    for p in planned:
        events = read_events(logdir / p.run_dir.name)
        val_acc = runs.read_jsonl(p.run_dir / runs.METRICS)[0]["val_acc"]
        assert [e.value for e in events.Scalars("epoch/val_acc")] == as_float32([val_acc])
        bn_layers = norm_layers(model_for(p.config))
        assert len(events.Tags()["histograms"]) == 5 * len(bn_layers)


def test_missing_tensorboard_names_the_extra(fake_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    for argv in (["train", "--epochs", "1", *TINY, "--out", str(tmp_path / "run")],
                 ["exp", "chapter", "--quick", "--out", str(tmp_path / "exp")]):
        assert cli.main([*argv, "--tensorboard", str(tmp_path / "tb"), "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("bnlab: error: --tensorboard needs the tensorboard package")
        assert "pip install 'bnlab[tensorboard]'" in error
    assert not (tmp_path / "run").exists() and not (tmp_path / "exp").exists()
