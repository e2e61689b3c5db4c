"""The ``ics`` experiment: its calibration, the rates it chooses, its verdicts on synthetic rows
with known answers, the condensed probes, and its quick grid end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bnlab.experiments import get_experiment, ics
from bnlab.experiments.analysis import Row
from bnlab.experiments.findings import CONTRADICTED, SUPPORTED, UNRESOLVED
from bnlab.experiments.probed import default_probe_steps
from bnlab.experiments.runner import QUICK, run_experiment
from tests.util.figure_checks import check_saved_figures


def test_calibration_reads_every_known_answer_with_the_effect_large_and_absent():
    records = ics.calibration()
    assert all(c.ok for c in records), [c for c in records if not c.ok]
    measures = {c.measure for c in records}
    assert len(measures) == 3  # one-step shift, shift over training, gradient ICS
    for measure in measures:
        cases = [c for c in records if c.measure == measure]
        assert any(c.expected == "0" for c in cases) and any(c.expected != "0" for c in cases)


def test_the_grid_compares_the_same_architecture_at_every_rate():
    grid = ics.variants(QUICK)
    assert len(grid) == sum(len(net.lrs) for net in ics.NETS.values()) * len(ics.NORMS)
    lenets = [v for v in grid if v.tags["net"] == "lenet"]
    assert {v.params["model"] for v in lenets} == {"bn-lenet"}  # --norm none: same architecture
    assert {(v.tags["norm"], v.tags["lr"]) for v in lenets} == {
        (n, lr) for n in ics.NORMS for lr in ics.NETS["lenet"].lrs}
    assert "noisy-bn:1:unit" in ics.NORMS and ics.strength("noisy-bn:0.5:unit") == 0.5


def test_anchors_and_the_step_after_each_are_probed():
    anchors, steps = ics.anchors_and_steps(100)
    assert anchors == default_probe_steps(100) and anchors[0] == 0 and anchors[-1] == 99
    assert steps == sorted(set(anchors) | {a + 1 for a in anchors}) and steps[-1] == 100


def test_condense_pairs_each_anchor_with_the_next_step():
    def moments(mean: float, std: float = 1.0) -> list[dict[str, torch.Tensor]]:
        t = torch.tensor
        return [{"mean": t([mean, mean]), "std": t([std, std]), "spread": t([2.0, 2.0])}]

    # Unit means 0, 1, 3 at the anchors 0, 5, 9; one step later +0.5 each time.
    records = []
    for step, mean in ((0, 0.0), (5, 1.0), (9, 3.0)):
        records.append({"step": step, "layers": moments(mean), "anchor": True, "train": [2],
                        "ics": [{"relative": 0.1, "cosine": 0.9}]})
        records.append({"step": step + 1, "layers": moments(mean + 0.5)})
    out = ics.condense({"records": records, "reproduces_run": True})
    (layer,) = out["layers"]
    assert layer["step_mean"] == pytest.approx(0.5) and layer["step_mean_rel"] == pytest.approx(0.25)
    assert layer["run_mean"] == pytest.approx(3.0) and layer["run_mean_rel"] == pytest.approx(1.5)
    assert layer["step_std"] == 0.0 and layer["run_std"] == 0.0
    assert [a["step"] for a in out["anchors"]] == [0, 5, 9] and out["reproduces_run"] is True
    one_pair = ics.condense({"records": records[:2], "reproduces_run": None})
    assert one_pair["layers"] == [{}]  # a range needs two anchors
    assert math.isnan(ics.layer_mean(one_pair, "run_mean_rel"))


# --------------------------------------------------------------------------- verdicts

def _row(net: str, norm: str, lr: float, seed: int, val_acc: float, loss: float = 0.5,
         diverged: bool = False) -> Row:
    return Row(label=f"{net} {norm} {lr}", tags={"net": net, "norm": norm, "lr": lr}, seed=seed,
               config={}, metrics=[{"train_loss": loss}], run_dir=f"{net}-{norm}-{lr}-{seed}",
               summary={"final_val_acc": val_acc, "diverged": diverged})


def _grid(plain_acc: dict[float, float], shift: dict[str, float], grad_ics: dict[str, float],
          loss: dict[str, float], bn_acc: dict[float, float] | None = None,
          noisy_diverged: bool = False):
    """Synthetic LeNet rows and probes: per norm a stability number, a gradient ICS and a
    training loss (the same at every rate), with a little seed-to-seed spread."""
    rows, probes = [], {}
    for norm in ics.NORMS:
        for lr in ics.NETS["lenet"].lrs:
            for seed in range(3):
                acc = plain_acc[lr] if norm == "none" else (bn_acc or {}).get(lr, 0.85)
                kind = "noisy" if norm.startswith("noisy") else norm
                diverged = noisy_diverged and kind == "noisy"
                row = _row("lenet", norm, lr, seed, acc, loss[kind] * (1 + 0.01 * seed), diverged)
                rows.append(row)
                wobble = 1 + 0.02 * seed
                probes[row.run_dir] = {
                    "layers": [{"run_mean_rel": shift[kind] * wobble,
                                "step_mean_rel": shift[kind] * wobble}] * 4,
                    "anchors": [{"ics": [{"relative": grad_ics[kind] * wobble,
                                          "cosine": 0.9}]}]}
    return rows, probes


SHIFT = {"none": 1.0, "bnlab": 0.01, "noisy": 3.0}
ICS = {"none": 0.05, "bnlab": 0.2, "noisy": 0.25}
LOSS = {"none": 0.9, "bnlab": 0.4, "noisy": 0.41}


def _by_claim(verdicts):
    return {(v.claim, "each one's best" in v.measure): v for v in verdicts}


def test_rates_are_chosen_on_validation_and_the_same_rate_is_the_plain_nets_best():
    rows, _ = _grid({0.1: 0.1, 0.3: 0.6, 1.0: 0.7}, SHIFT, ICS, LOSS, bn_acc={0.3: 0.9})
    rate = ics.rates(rows, "lenet")
    assert rate["same"] == rate["none"] == 1.0 and rate["bnlab"] == 0.3


def test_verdicts_read_the_known_answers_paired_over_seeds():
    rows, probes = _grid({0.1: 0.1, 0.3: 0.6, 1.0: 0.7}, SHIFT, ICS, LOSS, bn_acc={0.3: 0.9})
    verdicts = _by_claim(ics.net_verdicts(rows, probes, "lenet"))
    stabilizes = verdicts["BN stabilizes the distribution of layer inputs", False]
    assert stabilizes.outcome == SUPPORTED and stabilizes.n == 3
    assert stabilizes.method == "paired t over seeds" and "lr 1 for both" in stabilizes.measure
    assert verdicts["noisy BN 1's layer inputs are less stable than the plain net's",
                    False].outcome == SUPPORTED
    assert verdicts["noisy BN 1 (more ICS) trains about as well as BN", False].outcome == SUPPORTED
    ics_verdict = verdicts["BN does not reduce gradient ICS (BN nets have as much or more)", False]
    assert ics_verdict.outcome == SUPPORTED
    # BN's best rate (0.3) differs from the same rate (1): each one's best rate is judged too.
    assert verdicts["BN stabilizes the distribution of layer inputs", True].outcome == SUPPORTED
    assert len(verdicts) == 10

    # The reverse: BN's inputs move more, its gradient ICS is smaller, noisy BN trains worse.
    rows, probes = _grid({0.1: 0.1, 0.3: 0.6, 1.0: 0.7}, {**SHIFT, "bnlab": 2.0},
                         {**ICS, "bnlab": 0.01}, {**LOSS, "noisy": 0.8}, bn_acc={1.0: 0.9})
    verdicts = _by_claim(ics.net_verdicts(rows, probes, "lenet"))
    assert verdicts["BN stabilizes the distribution of layer inputs", False].outcome == CONTRADICTED
    assert verdicts["BN does not reduce gradient ICS (BN nets have as much or more)",
                    False].outcome == CONTRADICTED
    assert verdicts["noisy BN 1 (more ICS) trains about as well as BN",
                    False].outcome == CONTRADICTED
    assert len(verdicts) == 8  # BN's best rate is the same rate: no second comparison


def test_nets_that_do_not_train_are_not_measured_and_diverged_runs_are_counted():
    rows, probes = _grid({0.1: 0.1, 0.3: 0.1, 1.0: 0.1}, SHIFT, ICS, LOSS)
    verdicts = ics.net_verdicts(rows, probes, "lenet")
    compared_with_plain = [v for v in verdicts if "trains about as well" not in v.claim]
    for v in compared_with_plain:
        assert v.outcome == UNRESOLVED and v.note.startswith("not measured") and v.effect is None
        assert "plain: 3/3 failed" in v.failed
    # Noisy BN diverging at the same rate: counted at chance loss, and the claim is contradicted.
    rows, probes = _grid({0.1: 0.1, 0.3: 0.6, 1.0: 0.7}, SHIFT, ICS, LOSS, noisy_diverged=True)
    verdict = _by_claim(ics.net_verdicts(rows, probes, "lenet"))[
        "noisy BN 2 (more ICS) trains about as well as BN", False]
    assert verdict.outcome == CONTRADICTED and "noisy BN 2: 3/3 failed" in verdict.failed
    assert verdict.effect == pytest.approx(math.log(ics.CHANCE_LOSS) - math.log(0.4 * 1.01),
                                           rel=1e-2)
    # BN not training leaves "as well as BN" without a meaning.
    rows, probes = _grid({0.1: 0.1, 0.3: 0.6, 1.0: 0.7}, SHIFT, ICS, LOSS,
                         bn_acc={lr: 0.1 for lr in ics.NETS["lenet"].lrs})
    verdict = _by_claim(ics.net_verdicts(rows, probes, "lenet"))[
        "noisy BN 1 (more ICS) trains about as well as BN", False]
    assert verdict.outcome == UNRESOLVED and "BN did not train" in verdict.note


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_ics_experiment_quick_grid_runs_and_probes_are_cached(synthetic_fashion, tmp_path,
                                                             monkeypatch):
    figures = check_saved_figures(monkeypatch)
    report = run_experiment(get_experiment("ics"), QUICK, tmp_path, synthetic_fashion,
                            progress=False)
    assert "Every probed replay ended on exactly its run's weights." in report
    assert "## Calibration" in report and "**NO**" not in report
    assert "noisy BN 1" in report and "## Stability of layer inputs" in report
    assert "no verdict (smoke test)" in report and "**supported**" not in report
    caches = sorted(tmp_path.glob("runs/*/analysis/ics-stability.json"))
    rows = [Row.from_json(json.loads(line)) for line in
            (tmp_path / "ics" / "results.jsonl").read_text().splitlines()]
    compared = {r.run_dir for net in ics.NETS for _, group in ics._stability_rows(rows, net)
                for r in group}  # every norm at the same rate, BN at its best
    assert {str(c.parents[1]) for c in caches} == compared
    assert len(ics.NORMS) * len(ics.NETS) <= len(compared) < len(rows)
    assert {"ics/ioffe_fig1.png", "ics/stability.png", "ics/gradient_ics.png"} <= set(
        figures.problems)
    assert figures.failing == {}
    stamp = [c.stat().st_mtime_ns for c in caches]
    run_experiment(get_experiment("ics"), QUICK, tmp_path, synthetic_fashion, progress=False)
    assert [c.stat().st_mtime_ns for c in caches] == stamp  # nothing measured again
