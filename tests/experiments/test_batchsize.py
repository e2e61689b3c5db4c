"""bnlab exp batchsize: Ghost BN's virtual batch by name, the three ways of measuring accuracy,
the frozen-BN remedy in training (TrainConfig.freeze_bn_epochs), and the quick grid end to end
(cached, re-analysed without training or reloading)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bnlab.data.loader import Loader
from bnlab.experiments import batchsize
from bnlab.experiments.measure import accuracy_in_mode
from bnlab.experiments.runner import QUICK, ExpSettings, resolve
from bnlab.nn.frozen import _FrozenBatchNorm
from bnlab.nn.ghost import _GhostBatchNorm
from bnlab.nn.precise import update_bn_stats
from bnlab.training import restore
from bnlab.training.norms import create_norm_layer, uses_batch_statistics
from bnlab.training.train import TrainConfig, model_for, start_run
from bnlab.util.config import config_to_dict
from bnlab.util.errors import ConfigError
from tests.helpers import without_provenance
from tests.util.figure_checks import check_saved_figures


def test_ghost_v_names_the_virtual_batch_size():
    assert create_norm_layer("ghost:8", "conv", 6).virtual_batch_size == 8
    assert create_norm_layer("ghost", "fc", 6).virtual_batch_size == 32
    for bad in ("ghost:1", "ghost:x", "ghost:2.5", "ghost:"):
        with pytest.raises(ValueError, match="ghost:SIZE"):
            create_norm_layer(bad, "fc", 4)
    assert uses_batch_statistics("ghost:4") and not uses_batch_statistics("group")
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        TrainConfig(val_size=200, norm="ghost:4", batch_size=1)


def test_ghost_runs_hash_the_revision_of_their_running_statistics():
    """Ghost BN's running statistics changed definition (one update per step): its runs get
    new folders, every other norm's keep theirs."""
    import hashlib

    from bnlab.experiments.runner import config_key
    from bnlab.training.norms import norm_revision

    def plain_hash(config: TrainConfig) -> str:  # the hash before revisions were hashed
        blob = json.dumps(config_to_dict(config), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    assert norm_revision("ghost:4") == norm_revision("ghost") == 1
    ghost, plain = TrainConfig(val_size=200, norm="ghost:4"), TrainConfig(val_size=200)
    assert config_key(ghost) != plain_hash(ghost)
    assert config_key(plain) == plain_hash(plain) and norm_revision("bnlab") == 0


def _models(*norms: str) -> list[torch.nn.Module]:
    out = []
    for norm in norms:
        torch.manual_seed(0)
        out.append(model_for(TrainConfig(val_size=200, norm=norm)))
    return out


def test_ghost_of_the_whole_batch_measures_exactly_as_plain_batch_norm(synthetic_fashion):
    ds = synthetic_fashion
    ghost, plain, small = _models("ghost:128", "bnlab", "ghost:2")
    for m in (ghost, small):  # the same weights and (initial) running statistics
        m.load_state_dict(plain.state_dict())
    args = (ds.train_images[:512], ds.train_labels[:512], ds.test_images, ds.test_labels, 128)
    before = copy.deepcopy(plain.state_dict())
    ways = batchsize.three_ways(plain, *args)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())  # untouched
    assert batchsize.three_ways(ghost, *args) == ways
    assert batchsize.three_ways(small, *args) != ways
    # train, mini-batch: train mode over whole batches of 128 of a fixed shuffle
    images, labels = batchsize._shuffled(ds.train_images[:512], ds.train_labels[:512], 128)
    assert ways["train_minibatch"] == accuracy_in_mode(plain, images, labels, True, batch_size=128)
    population = update_bn_stats(copy.deepcopy(plain), Loader(*args[:2], 128, seed=0), 4,
                                 progress=False)
    assert ways["test_population"] == accuracy_in_mode(population, ds.test_images,
                                                       ds.test_labels, False)


def test_shuffled_keeps_whole_batches_of_a_fixed_shuffle():
    images, labels = torch.arange(10).repeat_interleave(4).view(10, 2, 2), torch.arange(10)
    a = batchsize._shuffled(images, labels, 4)
    b = batchsize._shuffled(images, labels, 4)
    assert len(a[1]) == 8 and torch.equal(a[1], b[1]) and len(set(a[1].tolist())) == 8
    assert torch.equal(a[0][:, 0, 0], a[1])  # images stay with their labels


def test_freeze_bn_epochs_is_validated():
    with pytest.raises(ConfigError, match="freeze_bn_epochs < epochs"):
        TrainConfig(val_size=200, epochs=2, freeze_bn_epochs=2)
    with pytest.raises(ConfigError, match="needs a model with batch norms"):
        TrainConfig(val_size=200, model="lenet", norm="none", epochs=3, freeze_bn_epochs=1)
    with pytest.raises(ConfigError, match="needs a model with batch norms"):
        TrainConfig(val_size=200, norm="group", epochs=3, freeze_bn_epochs=1)
    # at its default the field is left out of saved configs, so existing run hashes hold
    assert "freeze_bn_epochs" not in config_to_dict(TrainConfig(val_size=200))
    assert config_to_dict(TrainConfig(val_size=200, epochs=3, freeze_bn_epochs=1))["freeze_bn_epochs"] == 1


def test_the_frozen_phase_uses_the_population_statistics_of_the_weights_when_it_starts(
        synthetic_fashion, tmp_path):
    ds = synthetic_fashion
    config = TrainConfig(val_size=200, norm="ghost:4", epochs=2, freeze_bn_epochs=1, subset=300, device="cpu")
    run = start_run(config, ds, tmp_path / "frozen", progress=False)
    run.train()
    frozen = [m for m in run.model.modules() if isinstance(m, _FrozenBatchNorm)]
    assert len(frozen) == 4 and not any(isinstance(m, _GhostBatchNorm) for m in run.model.modules())
    # The same run's first epoch, then update_bn_stats over epoch 2's batches: the statistics
    # the frozen layers hold (they never change while frozen).
    first = start_run(TrainConfig(val_size=200, norm="ghost:4", epochs=1, subset=300, device="cpu"), ds,
                      progress=False)
    first.train()
    first.train_loader.set_epoch(2)
    update_bn_stats(first.model, first.train_loader, len(first.train_loader), progress=False)
    expected = [m for m in first.model.modules() if isinstance(m, _GhostBatchNorm)]
    for f, e in zip(frozen, expected):
        torch.testing.assert_close(f.running_mean, e.running_mean)
        torch.testing.assert_close(f.running_var, e.running_var)
    # Frozen layers compute the same in train and eval mode.
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(run.model.train()(x), run.model.eval()(x))


def test_a_run_resumed_in_or_before_its_frozen_phase_ends_as_an_uninterrupted_one(
        synthetic_fashion, tmp_path):
    ds = synthetic_fashion
    config = TrainConfig(val_size=200, norm="ghost:4", epochs=3, freeze_bn_epochs=2, subset=300, device="cpu")
    whole = start_run(config, ds, tmp_path / "whole", progress=False)
    whole.train()
    for cut in (1, 2):
        part = start_run(config, ds, tmp_path / f"cut{cut}", progress=False)
        for _ in range(cut):
            part.train_next_epoch()
        resumed = start_run(config, ds, tmp_path / f"cut{cut}", resume=True, progress=False)
        assert resumed.bn_frozen == (cut == 2)
        resumed.train()
        losses = [[round(v, 6) for v in epoch] for epoch in resumed.step_losses]
        assert losses == [[round(v, 6) for v in epoch] for epoch in whole.step_losses]
        assert all(torch.equal(v, whole.model.state_dict()[k])
                   for k, v in resumed.model.state_dict().items())


def test_variants_remedy_small_batch_rates_and_quick_grid():
    full = batchsize.variants(resolve(ExpSettings(epochs=10), batchsize.EXPERIMENT))
    remedy = [v for v in full if v.tags.get("frozen")]
    assert len(remedy) == len(batchsize.GHOST_SIZES)
    assert {v.params["freeze_bn_epochs"] for v in remedy} == {2}
    small = [v for v in full if v.tags["part"] == "small"]
    assert {(v.params["batch_size"], v.params["lr"]) for v in small} == {
        (2, 0.1 / 64), (4, 0.1 / 32), (8, 0.1 / 16)}
    assert not [v for v in batchsize.variants(resolve(QUICK, batchsize.EXPERIMENT))
                if v.tags.get("frozen")]
    assert batchsize.frozen_epochs(1) == 0 and batchsize.frozen_epochs(3) == 1


def test_freeze_loss_jump_reads_the_epochs_either_side_of_the_freeze():
    from bnlab.experiments.analysis import Row

    def row(epochs_run: int) -> Row:
        return Row(label="", tags={}, seed=0, config={"epochs": 10, "freeze_bn_epochs": 2},
                   metrics=[{"epoch": e, "train_loss": float(e)} for e in range(1, epochs_run + 1)],
                   summary={}, run_dir="")

    assert batchsize.freeze_loss_jump(row(10)) == (8.0, 9.0)  # epoch 8 batch stats, 9 frozen
    assert batchsize.freeze_loss_jump(row(8)) is None  # stopped before freezing


def test_the_gaps_read_their_known_answers_on_the_one_hot_model():
    """Each measure registers its effect (growing with it) and reads 0 where it is absent; a
    measure that could not see it (or saw the other's) would fail here."""
    records = batchsize.calibration()
    assert all(c.ok for c in records), [c for c in records if not c.ok]
    read = {(c.measure, c.case): c.read for c in records}
    gap, inconsistency = "generalization gap (points)", "train-test inconsistency (points)"
    assert read[(gap, "one-hot model, 10% of the test labels wrong")] == "+10.0"
    assert read[(gap, "one-hot model, 30% of the test labels wrong")] == "+30.0"
    assert read[(inconsistency, "one-hot model, 30% of the test labels wrong")] == "+0.0"
    assert read[(inconsistency, "one-hot model, test images shifted on 5 of 10 channels")] == "+50.0"
    assert read[(gap, "one-hot model, test images shifted on 5 of 10 channels")] == "+0.0"
    assert read[(inconsistency, "one-hot model, test images like the training images")] == "+0.0"


def test_ghost_running_variance_scatters_like_batch_norms():
    assert 1.0 < batchsize.ghost_ema_scatter() < 2.0


def _ghost_rows(gen_gap: dict[int, list[float]], inconsistency: dict[int, list[float]],
                frozen_gain: list[float], fail: int | None = None):
    """Plain Ghost BN runs at V = 2 and 128 (three seeds) with the given gaps (points), and
    remedy runs at V = 2 whose test accuracy beats the population's by ``frozen_gain``."""
    from bnlab.experiments.analysis import Row

    rows, ways = [], {}
    for v in (2, 128):
        for seed in range(3):
            run = f"ghost{v}-{seed}"
            test_pop = 0.80
            test_mini = test_pop + inconsistency[v][seed] / 100
            ways[run] = {"train_minibatch": test_mini + gen_gap[v][seed] / 100,
                         "test_minibatch": test_mini, "test_population": test_pop,
                         "test_ema": test_pop}
            val = 0.1 if v == fail else 0.8
            rows.append(Row(f"ghost {v}", {"part": "ghost", "v": v, "frozen": False}, seed, {},
                            [], {"final_val_acc": val, "final_test_acc": test_pop,
                                 "diverged": False}, run))
    for seed in range(3):
        rows.append(Row("ghost 2, frozen", {"part": "ghost", "v": 2, "frozen": True}, seed,
                        {"epochs": 10, "freeze_bn_epochs": 2}, [],
                        {"final_val_acc": 0.8, "final_test_acc": 0.80 + frozen_gain[seed] / 100,
                         "diverged": False}, f"frozen-{seed}"))
    return rows, ways


def test_paper_verdicts_pair_the_seeds_and_leave_nets_that_do_not_train_unjudged():
    rows, ways = _ghost_rows({2: [1.0, 2.0, 1.5], 128: [4.0, 5.0, 4.4]},
                             {2: [3.0, 2.5, 3.5], 128: [0.1, -0.1, 0.0]}, [2.0, 2.2, 1.8])
    verdicts = batchsize.paper_verdicts(rows, ways)
    assert [v.outcome for v in verdicts] == ["supported", "supported", "supported"]
    assert verdicts[0].effect == pytest.approx((3.0 + 3.0 + 2.9) / 3)  # per-seed differences
    assert all(v.method == "paired t over seeds" and v.n == 3 and v.paper and v.note
               for v in verdicts)
    lines = batchsize.findings(rows, ways)
    assert any(line.startswith("- Mini-batch statistics beat population statistics on the test "
                               "set (95% interval of the inconsistency above 0) at V = 2.")
               for line in lines), lines
    # no gap growth: the interval straddles 0; a V that does not train is not judged
    rows, ways = _ghost_rows({2: [1.0, 2.0, 1.5], 128: [2.0, 1.0, 1.6]},
                             {2: [3.0, 2.5, 3.5], 128: [0.1, -0.1, 0.0]}, [2.0, 2.2, 1.8])
    assert batchsize.paper_verdicts(rows, ways)[0].outcome == "unresolved"
    rows, ways = _ghost_rows({2: [1.0, 2.0, 1.5], 128: [4.0, 5.0, 4.4]},
                             {2: [3.0, 2.5, 3.5], 128: [0.1, -0.1, 0.0]}, [2.0, 2.2, 1.8], fail=128)
    first, second, third = batchsize.paper_verdicts(rows, ways)
    assert first.effect is None and first.failed == "3/6 failed" and "does not train" in first.note
    assert second.effect is None and third.outcome == "supported"


@pytest.mark.slow
def test_batchsize_quick_grid_runs_and_a_rerun_trains_and_measures_nothing(
        synthetic_fashion, tmp_path, monkeypatch):
    from bnlab.experiments import executors, get_experiment
    from bnlab.experiments.runner import run_experiment

    experiment = get_experiment("batchsize")
    figures = check_saved_figures(monkeypatch)
    report = run_experiment(experiment, QUICK, tmp_path, synthetic_fashion, progress=False)
    for section in ("## Normalization batch at SGD batch 128", "## Small normalization batches",
                    "| 128 |", "## Beside the paper", "> **Smoke test.**", "## Verdicts",
                    "## Calibration", "test images shifted on 8 of 10 channels"):
        assert section in report, section
    assert "## Findings" not in report  # a smoke test states none
    verdicts = json.loads((tmp_path / "batchsize" / "findings.json").read_text())["verdicts"]
    assert [v["claim"] for v in verdicts] == [
        "the generalization gap grows with the normalization batch",
        "small normalization batches suffer train-test inconsistency",
        "Frozen BN for the last epochs recovers it"]
    assert {v["outcome"] for v in verdicts} == {"no verdict (smoke test)"}
    caches = sorted(tmp_path.glob("runs/*/analysis/batchsize-three-ways.json"))
    # every batch-norm run: 6 ghost sizes, BN and Batch Renorm at 3 small batches
    assert len(caches) == len(batchsize.GHOST_SIZES) + 2 * len(batchsize.SMALL_BATCHES)
    assert (tmp_path / "batchsize" / "batchsize.png").stat().st_size > 0
    assert "batchsize/batchsize.png" in figures.problems and figures.failing == {}

    def must_not_run(*args, **kwargs):
        raise AssertionError("trained or reloaded again")

    monkeypatch.setattr(executors, "start_run", must_not_run)
    monkeypatch.setattr(restore, "load_trained_model", must_not_run)
    again = run_experiment(experiment, QUICK, tmp_path, synthetic_fashion, progress=False)
    assert without_provenance(again) == without_provenance(report)


def test_freeze_bn_epochs_over_several_processes_is_refused_before_anything_is_written(
        synthetic_fashion, tmp_path):
    from bnlab.training.distributed import DistributedConfig, DistributedError, launch

    config = TrainConfig(val_size=200, epochs=2, freeze_bn_epochs=1, subset=200, device="cpu")
    with pytest.raises(DistributedError, match="--freeze-bn-epochs is not supported"):
        launch(config, DistributedConfig(nproc=2), synthetic_fashion, tmp_path / "run")
    assert not (tmp_path / "run").exists()
