"""bnlab exp adapt: the grid, the data it reads (Fashion-MNIST-C in a cache folder of the
test's own), the choices on validation, the reading of measurements and the verdicts on
synthetic measurements with known answers (effect large, effect absent, nets that did not
train), the calibrations, and the quick grid end to end (cached, re-analysed without
training or measuring)."""

from __future__ import annotations

import json

import pytest
import torch

from bnlab.experiments import adapt
from bnlab.experiments.analysis import Row
from bnlab.experiments.findings import CONTRADICTED, SUPPORTED, UNRESOLVED
from bnlab.experiments.runner import QUICK, ExpSettings, resolve
from bnlab.training.models import build_model
from tests.helpers import without_provenance
from tests.util.figure_checks import check_saved_figures


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist-c"
    monkeypatch.setattr(adapt, "CACHE_FOLDER", folder)
    return folder


def test_the_grid_is_bn_lenet_and_its_two_controls():
    grid = adapt.variants(resolve(ExpSettings(), adapt.EXPERIMENT))
    assert [(v.label, v.params["norm"], v.tags["bn"]) for v in grid] == [
        ("BN", "bnlab", True), ("GroupNorm", "group", False), ("LayerNorm", "layer", False)]
    assert {v.params["lr"] for v in grid} == {adapt.SOURCE_LR}


def test_the_data_is_cut_to_scale_and_corrupted_into_the_configured_cache(synthetic_fashion, cache):
    data = adapt.Shifted(synthetic_fashion, adapt.QUICK, val_size=500)
    assert len(data.test[1]) == 200  # the synthetic test set is smaller than the quick cut
    assert len(data.sweep[1]) == 200 and len(data.val[1]) == 500 and len(data.prior[1]) == 100
    assert torch.bincount(data.prior[1]).tolist() == [10] * 10  # class-balanced
    clean = data.corrupted("test", "clean", 0)
    assert clean[0] is data.test[0]
    images, labels = data.corrupted("val", "contrast", 5)
    assert images.shape == data.val[0].shape and images.dtype == torch.uint8
    assert torch.equal(labels, data.val[1]) and not torch.equal(images, data.val[0])
    assert len(list(cache.glob("contrast-5-*.npy"))) == 1  # built in the test's folder, once
    again, _ = data.corrupted("val", "contrast", 5)
    assert torch.equal(again, images) and len(list(cache.glob("*.npy"))) == 1


def test_a_stream_makes_its_batches_when_iterated_in_its_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 28, 28).contiguous()
    labels = torch.tensor([3, 1, 2, 0, 1, 3, 2, 0, 1, 2])
    sizes = [len(y) for _, y in adapt.Stream(images, labels, 4)]
    assert sizes == [4, 4, 2]
    sorted_labels = torch.cat([y for _, y in adapt.Stream(images, labels, 4, "class-sorted")])
    assert sorted_labels.tolist() == sorted(labels.tolist())


def validation(tent: dict[str, float], prior: float) -> dict:
    """A run's validation errors: ``tent`` by setting name, the prior errors N-dependent."""
    return {"tent": tent, "prior": {str(b): {f"{n:g}": prior + abs(n - 16) / 1000 for n in adapt.PRIORS}
                                    for b in adapt.BATCH_SIZES}}


def test_the_choices_are_the_lowest_mean_validation_error_over_seeds():
    names = [adapt.choice_name(c) for c in adapt.TENT_CHOICES]
    per_run = [validation({names[0]: 0.30, names[1]: 0.20, names[2]: 0.40}, 0.5),
               validation({names[0]: 0.30, names[1]: 0.50, names[2]: 0.10}, 0.5)]
    choices = adapt.choices_from(per_run)  # means 0.30, 0.35, 0.25
    assert choices["tent"] == list(adapt.TENT_CHOICES[2]) and choices["seeds"] == 2
    assert choices["tent_means"][names[1]] == pytest.approx(0.35)
    assert set(choices["priors"].values()) == {16.0}
    tie = adapt.choices_from([validation(dict.fromkeys(names, 0.3), 0.5)])
    assert tie["tent"] == list(adapt.TENT_CHOICES[0])  # ties to the earlier (the paper's)


def measurement(source: float, bn: float, tent: float, small: float = 0.9, prior: float = 0.3,
                sorted_bn: float = 0.8, never: float = 0.5) -> dict:
    """One run's measurements: every corruption with the same errors at severity 5."""
    test = {"clean": {"0": {"source": 0.1, "bn-adapt": 0.1, "tent": 0.1}}}
    for name in adapt.CORRUPTIONS:
        test[name] = {"5": {"source": source, "bn-adapt": bn, "tent": tent}}
    sweep = {str(b): {"bn-adapt": [small if b <= adapt.SMALL_BATCH else bn] * 9,
                      "prior": [prior] * 9, "tent": [tent] * 9} for b in adapt.BATCH_SIZES}
    sweep[str(adapt.TEST_BATCH)]["source"] = [source] * 9
    streams = {order: {"source": [source] * 9, "bn-adapt": [sorted_bn] * 9, "tent": [sorted_bn] * 9}
               for order in ("class-sorted", "imbalanced")}
    return {"test": test, "breaks": {"sweep": sweep, "streams": streams,
                                     "continual": [never] * 9}}


def bn_rows(n: int = 3, final_val: float = 0.85) -> list[Row]:
    return [Row(label="BN", tags={"norm": "BN", "bn": True}, seed=s, config={"epochs": 1},
                metrics=[], summary={"diverged": False, "final_val_acc": final_val,
                                     "final_test_acc": final_val}, run_dir=f"run{s}")
            for s in range(n)]


def measured_for(rows: list[Row], **errors) -> dict:
    return {r.run_dir: measurement(**{k: v + 0.001 * r.seed for k, v in errors.items()}) for r in rows}


CHOICES = {"tent": list(adapt.PAPER_TENT), "priors": {str(b): 16.0 for b in adapt.BATCH_SIZES}}


def test_the_readings_of_a_measurement():
    m = measurement(0.6, 0.3, 0.25, small=0.9, prior=0.35, sorted_bn=0.7, never=0.4)
    assert adapt.severity_error(m, "source", 5) == pytest.approx(0.6)
    assert adapt.severity_error(m, "tent", 0) == 0.1
    assert adapt.sweep_error(m, 2, "bn-adapt") == pytest.approx(0.9)
    assert adapt.sweep_error(m, 1, "source") == pytest.approx(0.6)  # the one eval-mode number
    assert adapt.stream_error(m, "class-sorted", "tent") == pytest.approx(0.7)
    assert adapt.stream_error(m, "iid", "bn-adapt") == pytest.approx(0.3)
    assert adapt.continual_error(m, "never") == pytest.approx(0.4)
    assert adapt.continual_error(m, "domain") == pytest.approx(0.25)


def test_the_verdicts_read_large_effects_as_supported():
    rows = bn_rows()
    measured = measured_for(rows, source=0.6, bn=0.3, tent=0.25, small=0.9, prior=0.35,
                            sorted_bn=0.8, never=0.4)
    verdicts = {v.claim: v for v in adapt.verdicts(rows, rows, measured, CHOICES)}
    assert len(verdicts) == 8
    assert all(v.outcome == SUPPORTED and v.n == 3 for v in verdicts.values()), verdicts
    assert verdicts["BN-adapt lowers error under shift"].effect == pytest.approx(-0.3)
    assert verdicts["TENT lowers error further than BN-adapt"].effect == pytest.approx(-0.05)
    assert "43.5%" in verdicts["BN-adapt lowers error under shift"].paper


def test_the_verdicts_read_absent_or_reversed_effects_as_not_supported():
    rows = bn_rows()
    measured = measured_for(rows, source=0.6, bn=0.6, tent=0.7, small=0.5, prior=0.6,
                            sorted_bn=0.5, never=0.7)
    verdicts = {v.claim: v for v in adapt.verdicts(rows, rows, measured, CHOICES)}
    assert verdicts["BN-adapt lowers error under shift"].outcome == UNRESOLVED  # no change
    assert verdicts["TENT lowers error further than BN-adapt"].outcome == CONTRADICTED
    breaks = "BN-adapt breaks at small test batches (error above the source model's)"
    assert verdicts[breaks].outcome == CONTRADICTED
    assert verdicts["a class-sorted stream breaks BN-adapt (error above the source model's)"
                    ].outcome == CONTRADICTED
    assert verdicts["continual TENT (never reset) ends worse than TENT reset per corruption"
                    ].outcome == UNRESOLVED  # never (0.7) equals reset (tent 0.7)


def test_without_two_trained_bn_models_nothing_is_judged():
    rows = bn_rows(final_val=0.1)
    measured = measured_for(rows, source=0.6, bn=0.3, tent=0.25)
    verdicts = adapt.verdicts(rows, [], measured, CHOICES)
    assert verdicts and all(v.outcome == UNRESOLVED and v.effect is None for v in verdicts)
    assert all(v.failed == "3/3 source runs failed" for v in verdicts)
    assert adapt.findings(rows, [], measured, CHOICES) == []


def test_a_tent_choice_other_than_the_papers_adds_its_verdict():
    rows = bn_rows()
    measured = measured_for(rows, source=0.6, bn=0.3, tent=0.25)
    for m in measured.values():
        for name in adapt.CORRUPTIONS:
            m["test"][name]["5"]["tent (paper)"] = 0.29
    other = {**CHOICES, "tent": list(adapt.TENT_CHOICES[1])}
    claims = [v.claim for v in adapt.verdicts(rows, rows, measured, other)]
    assert len(claims) == 9 and "the paper's setting" in claims[2]


def test_the_findings_state_the_order_beside_the_papers():
    rows = bn_rows()
    lines = adapt.findings(rows, rows, measured_for(rows, source=0.6, bn=0.3, tent=0.25), CHOICES)
    assert "source > bn-adapt > tent" in lines[0] and "the same." in lines[0]
    reversed_ = adapt.findings(rows, rows, measured_for(rows, source=0.6, bn=0.3, tent=0.4), CHOICES)
    assert "**not** the paper's" in reversed_[0]


def test_every_calibration_reads_its_known_answer():
    calibration = adapt.calibrate()
    assert all(c.ok for c in calibration), [c for c in calibration if not c.ok]
    shifted = [c for c in calibration if "mean shift" in c.measure]
    assert len(shifted) == len(adapt.SHIFTS)


def test_the_two_class_case_has_its_closed_form():
    model, x, y, source, clean = adapt.two_class_case(0.0, n=20000)
    with torch.no_grad():
        error = (model(x).argmax(1) != y).double().mean().item()
    assert source == pytest.approx(clean) and error == pytest.approx(clean, abs=0.005)
    assert adapt.two_class_case(2.0)[3] > 0.2  # the shift moves half of a class over the line


def test_tent_choices_name_their_settings():
    assert adapt.choice_name(("adam", 1e-3)) == "adam 0.001"
    settings = adapt.tent_settings(["sgd", 0.01])
    assert settings.optimizer == "sgd" and settings.lr == 0.01
    model = build_model("bn-lenet", norm="bnlab").eval()
    x = torch.rand(12, 28, 28).mul(255).to(torch.uint8)
    assert 0 <= adapt.domain_error(model, x, torch.arange(12) % 10, "tent", 4,
                                   tent=("adam", 1e-3)) <= 1


@pytest.mark.slow
def test_adapt_quick_grid_runs_and_a_rerun_trains_and_measures_nothing(synthetic_fashion, cache,
                                                                       tmp_path, monkeypatch):
    from bnlab.experiments import executors, get_experiment
    from bnlab.experiments.runner import run_experiment
    from bnlab.training import restore

    figures = check_saved_figures(monkeypatch)
    out = tmp_path / "out"
    report = run_experiment(get_experiment("adapt"), QUICK, out, synthetic_fashion, progress=False)
    for section in ("## The source models", "## Choices on the validation split",
                    "## Error by severity", "## Where they break", "## Beside the paper",
                    "## Error by corruption and severity", "## Calibration", "> **Smoke test.**"):
        assert section in report, section
    assert "**NO**" not in report
    rows = (out / "adapt" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all(len(json.loads(r)["metrics"]) == 1 for r in rows)
    verdicts = json.loads((out / "adapt" / "findings.json").read_text())["verdicts"]
    assert len(verdicts) >= 8 and {v["outcome"] for v in verdicts} == {"no verdict (smoke test)"}
    names = {p.name for p in out.glob("runs/*/analysis/*.json")}
    assert names == {"adapt-test.json", "adapt-validation.json", "adapt-breaks.json"}
    assert len(list(cache.glob("*.npy"))) > len(adapt.CORRUPTIONS)  # built in the test's folder
    assert {f"adapt/{f}" for f in ("adapt_severity.png", "adapt_breaks.png")} <= set(figures.problems)
    assert figures.failing == {}

    def must_not_run(*args, **kwargs):
        raise AssertionError("trained or measured again")

    monkeypatch.setattr(executors, "start_run", must_not_run)
    monkeypatch.setattr(restore, "load_trained_model", must_not_run)
    again = run_experiment(get_experiment("adapt"), QUICK, out, synthetic_fashion, progress=False)
    assert without_provenance(again) == without_provenance(report)
