"""The trainer on synthetic data: learning, exact resume, divergence, determinism, evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bnlab.training import runs, train
from bnlab.training.models import build_model
from bnlab.training.train import TrainConfig, build_loaders, evaluate, start_run
from bnlab.util.config import config_from_dict, config_to_dict
from bnlab.util.denormals import denormals_flushed, flushing_denormals

TIMING_KEYS = {"seconds", "train_seconds", "eval_seconds", "images_per_s"}


def small_config(**changes) -> TrainConfig:
    values = dict(epochs=3, batch_size=32, lr=0.5, eval_batch_size=100, device="cpu", seed=0,
                  val_size=200)
    values.update(changes)
    return TrainConfig(**values)


def without_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_bn_lenet_learns_the_synthetic_task(synthetic_fashion, norm):
    summary = start_run(small_config(norm=norm), synthetic_fashion, progress=False).train()
    assert not summary["diverged"]
    assert summary["final_val_acc"] > 0.9  # chance is 0.1


def test_loss_falls_within_an_epoch(synthetic_fashion, tmp_path):
    start_run(small_config(epochs=1), synthetic_fashion, tmp_path / "run", progress=False).train()
    (steps,) = runs.read_jsonl(tmp_path / "run" / runs.STEPS)
    losses = steps["loss"]
    trained_on = len(synthetic_fashion.train_labels) - small_config().val_size  # the rest of the split
    assert len(losses) == math.ceil(trained_on / 32)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_same_seed_gives_identical_metrics(synthetic_fashion):
    a = start_run(small_config(epochs=2), synthetic_fashion, progress=False)
    b = start_run(small_config(epochs=2), synthetic_fashion, progress=False)
    for run in (a, b):
        while not run.done:
            run.train_next_epoch()
    assert without_timing(a.history) == without_timing(b.history)
    assert a.step_losses == b.step_losses
    c = start_run(small_config(epochs=1, seed=1), synthetic_fashion, progress=False)
    c.train_next_epoch()
    assert c.step_losses[0] != a.step_losses[0]


def test_resume_ends_with_the_metrics_of_an_uninterrupted_run(synthetic_fashion, tmp_path):
    config = small_config(epochs=3)
    start_run(config, synthetic_fashion, tmp_path / "whole", progress=False).train()

    killed = start_run(config, synthetic_fashion, tmp_path / "cut", progress=False)
    killed.train_next_epoch()  # the process "dies" after epoch 1 was checkpointed
    assert not (tmp_path / "cut" / runs.SUMMARY).exists()
    start_run(config, synthetic_fashion, tmp_path / "cut", resume=True, progress=False).train()

    whole, cut = runs.load_run(tmp_path / "whole"), runs.load_run(tmp_path / "cut")
    assert len(cut["metrics"]) == 3
    assert without_timing(cut["metrics"]) == without_timing(whole["metrics"])
    assert runs.read_jsonl(tmp_path / "cut" / runs.STEPS) == runs.read_jsonl(
        tmp_path / "whole" / runs.STEPS)
    state_whole = torch.load(tmp_path / "whole" / runs.CHECKPOINT, weights_only=True)["model"]
    state_cut = torch.load(tmp_path / "cut" / runs.CHECKPOINT, weights_only=True)["model"]
    for key, value in state_whole.items():
        assert torch.equal(value, state_cut[key]), key


def test_a_finished_run_folder_is_not_overwritten(synthetic_fashion, tmp_path):
    start_run(small_config(epochs=1), synthetic_fashion, tmp_path / "r", progress=False).train()
    before = (tmp_path / "r" / runs.METRICS).read_text()
    with pytest.raises(runs.RunFolderError, match="already holds a run; pass --resume"):
        start_run(small_config(epochs=1), synthetic_fashion, tmp_path / "r", progress=False).train()
    with pytest.raises(runs.RunFolderError, match=r"config differs in \['lr'\]"):
        start_run(small_config(epochs=1, lr=0.3), synthetic_fashion, tmp_path / "r",
                  resume=True, progress=False).train()
    assert (tmp_path / "r" / runs.METRICS).read_text() == before


def test_divergence_is_recorded_not_raised(synthetic_fashion, tmp_path):
    config = small_config(model="lenet", norm="none", lr=1e38, epochs=3)  # overflows the logits
    summary = start_run(config, synthetic_fashion, tmp_path / "r", progress=False).train()
    assert summary["diverged"] is True
    assert summary["diverged_at"]["epoch"] == 1 and summary["diverged_at"]["step"] >= 1
    saved = json.loads((tmp_path / "r" / runs.SUMMARY).read_text())
    assert saved["diverged"] is True and saved["epochs_completed"] == 0
    assert (tmp_path / "r" / runs.CURVES).exists()


def test_evaluate_uses_eval_mode_restores_mode_and_keeps_buffers(synthetic_fashion):
    torch.manual_seed(0)
    model = build_model("bn-lenet", "bnlab", "cpu")
    test = build_loaders(small_config(), synthetic_fashion, torch.device("cpu")).test
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    loss, acc = evaluate(model, test)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert 0 <= acc <= 1 and loss > 0
    model.eval()
    evaluate(model, test)
    assert not model.training


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="model 'lenet' has no norm layers"):
        TrainConfig(val_size=200, model="lenet", norm="bnlab")
    with pytest.raises(ValueError, match=r"expected epochs >= 1 \(got 0\)"):
        TrainConfig(val_size=200, epochs=0)


def test_diverged_step_is_written_as_null(synthetic_fashion, tmp_path):
    config = small_config(model="lenet", norm="none", lr=1e38, epochs=1)
    start_run(config, synthetic_fashion, tmp_path / "r", progress=False).train()
    (steps,) = runs.read_jsonl(tmp_path / "r" / runs.STEPS)
    assert steps["loss"][-1] is None and all(x is not None for x in steps["loss"][:-1])


def test_eval_every_records_validation_between_epochs_and_survives_resume(synthetic_fashion,
                                                                           tmp_path):
    config = small_config(epochs=2, eval_every=10)
    steps_per_epoch = math.ceil((len(synthetic_fashion.train_labels) - config.val_size)
                                / config.batch_size)
    start_run(config, synthetic_fashion, tmp_path / "whole", progress=False).train()
    cut = start_run(config, synthetic_fashion, tmp_path / "cut", progress=False)
    cut.train_next_epoch()
    start_run(config, synthetic_fashion, tmp_path / "cut", resume=True, progress=False).train()
    whole = runs.load_run(tmp_path / "whole")["evals"]
    assert [e["step"] for e in whole] == list(range(10, 2 * steps_per_epoch + 1, 10))
    assert all(e["train_seconds"] > 0 and e["eval_seconds"] > 0 for e in whole)
    resumed = runs.load_run(tmp_path / "cut")["evals"]
    strip = lambda evals: [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in evals]  # noqa: E731
    assert strip(resumed) == strip(whole)
    # Periodic evaluation does not change training.
    plain = start_run(small_config(epochs=2), synthetic_fashion, progress=False).train()
    assert plain["final_val_acc"] == runs.load_run(tmp_path / "whole")["summary"]["final_val_acc"]


def test_model_options_must_fit_the_model():
    with pytest.raises(ValueError, match=r"\['depth'\] set, but model 'bn-lenet' takes only"):
        TrainConfig(val_size=200, model="bn-lenet", depth=50)
    with pytest.raises(ValueError, match=r"\['dropout'\] set, but model 'deep-mlp'"):
        TrainConfig(val_size=200, model="deep-mlp", norm="none", dropout=0.5)
    TrainConfig(val_size=200, model="deep-mlp", norm="bnlab", depth=50, activation="relu")


needs_flush = pytest.mark.skipif(not torch.set_flush_denormal(False),
                                 reason="this CPU cannot flush denormals (torch.set_flush_denormal)")


@needs_flush
@pytest.mark.parametrize("before", [False, True])
def test_denormals_flushed_in_the_block_and_the_mode_restored_after(before):
    torch.set_flush_denormal(before)
    try:
        for enabled in (True, False):
            with denormals_flushed(enabled) as in_effect:
                assert in_effect and flushing_denormals() is enabled
            assert flushing_denormals() is before
        with pytest.raises(KeyError), denormals_flushed(not before):
            raise KeyError("the mode is restored on errors too")
        assert flushing_denormals() is before
    finally:
        torch.set_flush_denormal(False)


@needs_flush
@pytest.mark.parametrize("flush", [True, False])
def test_training_and_evaluation_follow_flush_denormal(synthetic_fashion, monkeypatch, flush):
    seen = []

    def recording(real):
        def wrapper(*args, **kwargs):
            seen.append((real.__name__, flushing_denormals()))
            return real(*args, **kwargs)
        return wrapper

    for name in ("train_one_epoch", "evaluate"):
        monkeypatch.setattr(train, name, recording(getattr(train, name)))
    torch.set_flush_denormal(not flush)
    try:
        start_run(small_config(epochs=1, subset=200, flush_denormal=flush), synthetic_fashion,
                  progress=False).train()
        assert seen == [("train_one_epoch", flush), ("evaluate", flush), ("evaluate", flush)]  # val, test
        assert flushing_denormals() is (not flush)  # the caller's mode, untouched
    finally:
        torch.set_flush_denormal(False)


def test_flush_denormal_at_its_default_keeps_earlier_saved_configs_valid():
    saved = config_to_dict(TrainConfig(val_size=200))
    assert "flush_denormal" not in saved  # as configs were saved before the field existed
    assert config_to_dict(config_from_dict(TrainConfig, saved)) == saved
    assert config_to_dict(TrainConfig(val_size=200, flush_denormal=False))["flush_denormal"] is False
