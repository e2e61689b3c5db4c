"""Paper: normalization batch vs SGD batch (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 4-5).

Why: "the batch" of batch norm is two things, the batch SGD averages the gradient over and
the batch whose statistics normalize. Ghost batch norm (``norm="ghost:V"``) separates
them: the SGD batch stays 128 and each chunk of V samples is normalized alone. Wu &
Johnson name two gaps: the *generalization gap* (training accuracy minus test accuracy,
both with mini-batch statistics of the normalization batch) and the *train-test
inconsistency* (test accuracy with mini-batch statistics minus with population
statistics: the model trained on one and predicts with the other).

Part 1, SGD batch 128, lr 0.1: BN-LeNet with Ghost BN of V in :data:`GHOST_SIZES` (V = 128
is plain batch norm). Each finished model is evaluated three ways (``measure``, cached in
its run folder):

- *train, mini-batch*: train-mode accuracy on the run's training images, in batches of
  128 of a fixed shuffle, so each chunk of V is normalized with its own statistics;
- *test, mini-batch*: the same on the test set;
- *test, population*: eval mode with population statistics of the final weights
  (``bnlab.nn.precise.update_bn_stats`` over one pass of the training images);

beside the trainer's *test, EMA* (eval mode, running statistics of momentum 0.1; Ghost BN
updates them once per step from its chunks' mean statistics, so at every V they rest on
as many samples as batch norm's: ``bnlab.nn.ghost``). Only whole batches of 128 count, so
every chunk has exactly V samples. ``--quick`` measures on a class-stratified
:data:`QUICK_TEST_IMAGES` of the test images. The remedy: the same
runs with the last :func:`frozen_epochs` epochs trained with batch norm frozen at the
population statistics (``TrainConfig.freeze_bn_epochs``; the paper: the last 2 of 10).
There the model trains with what it predicts with, so the three ways coincide; its
accuracy is the trainer's final test accuracy. The frozen layers keep their affine fixed
(``bnlab.nn.frozen``) and the rate stays 0.1 (the chapter's constant rate; the paper's
schedule has decayed by then).

Part 2, normalization batch b in :data:`SMALL_BATCHES`: batch norm, batch renormalization,
GroupNorm and LayerNorm trained with SGD batch b (so the normalization batch of the batch
norms is b), beside Part 1's Ghost BN of V = b at SGD batch 128. The rate follows the
linear scaling rule, ``0.1 * b / 128`` (Goyal et al. 2017), and every run trains the same
epochs, so each sees the same images with the same rate per image. SyncBN is not in this
grid: one process here; ``bnlab exp sync`` compares it with local BN and GroupNorm at
per-process batches 2-32. ``--norms`` replaces part 2's four norms with a list of one's own
(plug-ins included, see ``bnlab.training.norms``).

Verdicts (:func:`paper_verdicts`) pair the seeds (a plain run and its remedy share the seed,
so their first epochs are the same); a claim whose runs include one that does not train
(judged on the validation split) is not judged. The two gaps are calibrated in every report
on :mod:`bn_calibration`'s one-hot model, where each reads a known answer (:func:`calibration`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from bnlab.data.loader import Loader, stratified_subset
from bnlab.experiments import bn_calibration
from bnlab.experiments.analysis import FAIL_ACCURACY, Row, failed, final, plot_intervals, select
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    not_measured,
)
from bnlab.experiments.measure import accuracy_in_mode, fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant, norm_list
from bnlab.experiments.stats import difference, format_mean_ci, mean_ci
from bnlab.nn import BatchNorm1d, GhostBatchNorm1d
from bnlab.nn.precise import update_bn_stats
from bnlab.training import restore, runs
from bnlab.training.norms import uses_batch_statistics
from bnlab.util.plots import legend, log_axis, plt, reference_line, save_figure
from bnlab.util.tables import counted, format_table

SOURCE = "Wu & Johnson 2021"
SGD_BATCH = 128
BASE_LR = 0.1
GHOST_SIZES = (2, 4, 8, 16, 32, 128)
SMALL_BATCHES = (2, 4, 8)
SMALL_NORMS = {"BN": "bnlab", "Batch Renorm": "renorm", "GroupNorm": "group", "LayerNorm": "layer"}
"""Part 2's norms by their names in the report; ``--norms`` gives another list (names not
here are shown as given)."""
FROZEN_FRACTION = 0.2
"""The remedy freezes batch norm for the last 20% of the epochs (2 of 10, as the paper)."""
EVAL_SEED = 0
"""Seed of the fixed shuffles the measurements batch their images in."""


def frozen_epochs(epochs: int) -> int:
    """Epochs of the remedy's frozen phase: 20% of ``epochs``, at least 1; 0 (no remedy
    runs) for a one-epoch grid, whose frozen phase would start from the initial weights."""
    return max(1, round(FROZEN_FRACTION * epochs)) if epochs >= 2 else 0


def small_batch_lr(batch: int) -> float:
    """The linear scaling rule: ``BASE_LR * batch / SGD_BATCH``."""
    return BASE_LR * batch / SGD_BATCH


def variants(settings: ExpSettings) -> list[Variant]:
    ghost = [Variant(f"ghost {v}", {"model": "bn-lenet", "norm": f"ghost:{v}", "lr": BASE_LR,
                                    "batch_size": SGD_BATCH},
                     {"part": "ghost", "v": v, "frozen": False}) for v in GHOST_SIZES]
    frozen = frozen_epochs(settings.epochs)
    remedy = [Variant(f"ghost {v}, frozen last {frozen}",
                      {"model": "bn-lenet", "norm": f"ghost:{v}", "lr": BASE_LR,
                       "batch_size": SGD_BATCH, "freeze_bn_epochs": frozen},
                      {"part": "ghost", "v": v, "frozen": True})
              for v in GHOST_SIZES] if frozen else []
    small = [Variant(f"{label} batch {b}", {"model": "bn-lenet", "norm": norm,
                                            "lr": small_batch_lr(b), "batch_size": b},
                     {"part": "small", "b": b, "norm": label})
             for b in SMALL_BATCHES for label, norm in small_norms(settings).items()]
    return ghost + remedy + small


def small_norms(settings: ExpSettings) -> dict[str, str]:
    """Part 2's norms (resolved ``settings.norms``) by their names in the report."""
    labels = {norm: label for label, norm in SMALL_NORMS.items()}
    return {labels.get(norm, norm): norm for norm in norm_list(settings)}


def small_labels(rows: list[Row]) -> list[str]:
    """The names of part 2's norms in ``rows``, in grid order."""
    return list(dict.fromkeys(r.tags["norm"] for r in select(rows, part="small")))


# --------------------------------------------------------------------------- measurement

def _shuffled(images: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels in a fixed shuffle, cut to whole batches of ``batch``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(EVAL_SEED))
    order = order[:len(order) // batch * batch]
    return images[order], labels[order]


def three_ways(model: torch.nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
               test_images: torch.Tensor, test_labels: torch.Tensor, batch: int) -> dict[str, float]:
    """Accuracy of ``model`` (left untouched) with mini-batch statistics on training and on
    test images (train mode, batches of ``batch``), and with population statistics of the
    training images on the test images (eval mode)."""
    result = {}
    for name, (images, labels) in {"train_minibatch": (train_images, train_labels),
                                   "test_minibatch": (test_images, test_labels)}.items():
        result[name] = accuracy_in_mode(model, *_shuffled(images, labels, batch), training=True,
                                        batch_size=batch)
    population = copy.deepcopy(model)
    loader = Loader(train_images, train_labels, batch, seed=EVAL_SEED)
    update_bn_stats(population, loader, len(loader), progress=False)
    result["test_population"] = accuracy_in_mode(population, test_images, test_labels,
                                                 training=False)
    return result


def measure(row: Row, dataset, test_images: int | None = None) -> dict[str, float]:
    """:func:`three_ways` of a finished run's model on its own training images and the test
    set (``test_images``: a class-stratified subset of it), cached in its folder as
    ``batchsize-three-ways.json``."""
    config = row.config
    images, labels = dataset.train_images, dataset.train_labels
    if config["subset"]:
        images, labels = stratified_subset(images, labels, config["subset"])
    test = (dataset.test_images, dataset.test_labels)
    if test_images is not None and test_images < len(test[1]):
        test = stratified_subset(*test, test_images)
    key = {"version": 1, "seed": EVAL_SEED, "batch": config["batch_size"],
           "data": fingerprint(images, labels, *test)}
    return runs.cached(row.run_dir, "batchsize-three-ways", key, lambda: three_ways(
        restore.load_trained_model(row.run_dir)[0], images, labels, *test, config["batch_size"]))


def calibration() -> list[Calibration]:
    """The generalization gap and the train-test inconsistency (:func:`three_ways`, then the
    differences the verdicts take) on :mod:`bn_calibration`'s one-hot model, batches of 32,
    640 balanced training images and 960 test images, with a known answer each:

    - test labels moved to the next class for a fraction q of the test images: every way
      classifies the images, so the test accuracy is 1 - q with mini-batch and with
      population statistics alike: generalization gap 100q points, inconsistency 0;
    - test images (class signal 1/3) shifted by 2/3 on the first j of the 10 channels:
      mini-batch statistics remove a constant shift (accuracy 1); population statistics of
      the unshifted training images make the shifted channels win for the 10 - j classes
      without a shift (accuracy j/10): inconsistency 100(10 - j)/10 points for j >= 1,
      generalization gap 0.

    And the running statistics behind the "test, EMA" column (``bnlab.nn.ghost``): on i.i.d.
    batches, Ghost BN's running variance at V = 2 scatters about as little as batch norm's at
    the whole batch (ratio ~1.4; one update per chunk would give ~12)."""
    labels = bn_calibration.balanced_labels(640)
    test_labels = bn_calibration.balanced_labels(960)
    out = []
    train = bn_calibration.one_hot_images(labels)
    for q in (0.0, 0.1, 0.3):
        ways = three_ways(bn_calibration.one_hot_model(), train, labels,
                          bn_calibration.one_hot_images(test_labels),
                          bn_calibration.flipped(test_labels, q), 32)
        case = (f"one-hot model, {100 * q:g}% of the test labels wrong" if q
                else "one-hot model, test images like the training images")
        out += [_calibrated("generalization gap", case, 100 * q,
                            _difference(ways, "train_minibatch", "test_minibatch")),
                _calibrated("train-test inconsistency", case, 0.0,
                            _difference(ways, "test_minibatch", "test_population"))]
    train = bn_calibration.one_hot_images(labels, level=85)
    for j in (5, 8):
        ways = three_ways(bn_calibration.one_hot_model(), train, labels,
                          bn_calibration.one_hot_images(test_labels, 85, 170, j), test_labels, 32)
        case = f"one-hot model, test images shifted on {j} of 10 channels"
        out += [_calibrated("train-test inconsistency", case, 10.0 * (10 - j),
                            _difference(ways, "test_minibatch", "test_population")),
                _calibrated("generalization gap", case, 0.0,
                            _difference(ways, "train_minibatch", "test_minibatch"))]
    ratio = ghost_ema_scatter()
    out.append(Calibration("test, EMA (Ghost BN's running statistics)",
                           "i.i.d. N(3, 4) batches of 128: RMS error of the running variance, "
                           "V = 2 over batch norm's", "about 1.4 (< 2); one update per chunk ~12",
                           f"{ratio:.2f}", ratio < 2))
    return out


def _difference(ways: dict[str, float], a: str, b: str) -> float:
    return 100 * (ways[a] - ways[b])


def _calibrated(measure: str, case: str, expected: float, read: float) -> Calibration:
    return Calibration(f"{measure} (points)", case, f"{expected:+.1f}", f"{read:+.1f}",
                       abs(read - expected) < 1e-9)


def ghost_ema_scatter(steps: int = 300, warm_up: int = 100) -> float:
    """RMS error of the running variance, Ghost BN at V = 2 over batch norm, fed the same
    i.i.d. N(3, 4) batches of (128, 8) (a fixed seed), after ``warm_up`` steps."""
    gen = torch.Generator().manual_seed(0)
    ghost, plain = GhostBatchNorm1d(8, 2), BatchNorm1d(8)
    errors: dict[str, list[torch.Tensor]] = {"ghost": [], "plain": []}
    with torch.no_grad():
        for step in range(steps):
            x = torch.randn(128, 8, generator=gen) * 2 + 3  # (128, 8)
            ghost(x)
            plain(x)
            if step >= warm_up:
                errors["ghost"].append(ghost.running_var - 4)
                errors["plain"].append(plain.running_var - 4)
    rms = {k: torch.stack(v).pow(2).mean().sqrt().item() for k, v in errors.items()}
    return rms["ghost"] / rms["plain"]


# --------------------------------------------------------------------------- analysis

WAYS = {"train_minibatch": "train, mini-batch", "test_minibatch": "test, mini-batch",
        "test_population": "test, population"}
QUICK_TEST_IMAGES = 2000
"""``--quick`` measures the three ways on this many test images (class-stratified)."""
TEST = "final_test_acc"
"""The trainer's number the report reads: test accuracy in eval mode (running statistics)."""


def measured_ways(rows: list[Row], dataset, test_images: int | None = None
                  ) -> dict[str, dict[str, float]]:
    """Per run folder: the three ways plus ``test_ema`` (the trainer's final test accuracy),
    for every run with batch norms that trained and is not a remedy run."""
    out = {}
    for r in rows:
        if r.diverged or r.tags.get("frozen") or not uses_batch_statistics(r.config["norm"]):
            continue
        out[r.run_dir] = {**measure(r, dataset, test_images), "test_ema": final(r, TEST)}
    return out


def plain(rows: list[Row], v: int) -> list[Row]:
    return select(rows, part="ghost", v=v, frozen=False)


def remedy(rows: list[Row], v: int) -> list[Row]:
    return select(rows, part="ghost", v=v, frozen=True)


def by_seed(rows: list[Row], ways, key: str) -> dict[int, float]:
    """``{seed: points}`` of way ``key`` over the measured runs of ``rows``."""
    return {r.seed: 100 * ways[r.run_dir][key] for r in rows if r.run_dir in ways}


def gap_by_seed(rows: list[Row], ways, a: str, b: str) -> dict[int, float]:
    """``{seed: points of way a minus way b}`` over the measured runs of ``rows``."""
    return {r.seed: _difference(ways[r.run_dir], a, b) for r in rows if r.run_dir in ways}


def tested(rows: list[Row]) -> dict[int, float]:
    """``{seed: points of final test accuracy}`` (a diverged run at chance)."""
    return {r.seed: 100 * final(r, TEST) for r in rows}


GAPS = {"generalization gap": ("train_minibatch", "test_minibatch"),
        "train-test inconsistency": ("test_minibatch", "test_population")}


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to measure)"],
                        calibration=calibration())
    images = QUICK_TEST_IMAGES if settings.quick else None
    ways = measured_ways(rows, dataset, images)
    plot(rows, ways, out / "batchsize.png")
    test = f"a class-stratified {images} of the test images" if images else "the whole test set"
    sections = [
        "## Normalization batch at SGD batch 128", "", ghost_table(rows, ways), "",
        f"Accuracy in points. The three ways on {test}; *test, EMA*: the trainer's final test "
        "accuracy (running statistics, one update per step from the chunks' mean statistics: "
        "bnlab.nn.ghost). Generalization gap = train minus test accuracy, both with mini-batch "
        "statistics; train-test inconsistency = test accuracy with mini-batch minus with "
        "population statistics (> 0: the population statistics the model predicts with cost "
        "accuracy). Frozen: the remedy runs' final test accuracy, and its difference from the "
        "plain runs' test accuracy with population statistics (paired over seeds). Mean ± 95% "
        "CI over seeds.", "",
        "## Small normalization batches", "", small_table(rows), "",
        f"Final test accuracy in eval mode (points). BN, Batch Renorm, GroupNorm, LayerNorm: "
        f"SGD batch b at lr {BASE_LR:g}·b/{SGD_BATCH}; Ghost BN: SGD batch {SGD_BATCH} at lr "
        f"{BASE_LR:g}, normalization batch b (part 1's runs).", "",
        "## Beside the paper", "",
        "Wu & Johnson (ResNet-50 on ImageNet, SGD batch fixed, normalization batch varied) "
        "find the generalization gap growing with the normalization batch and the "
        "train-test inconsistency the main cost of small normalization batches, closed by "
        "training the last epochs with population statistics; here BN-LeNet on "
        "Fashion-MNIST with plain SGD at a constant rate.", "",
        "![batchsize](batchsize.png)"]
    return Analysis(sections, findings(rows, ways), paper_verdicts(rows, ways), calibration())


def ghost_table(rows: list[Row], ways) -> str:
    headers = ["V", *WAYS.values(), "test, EMA", *GAPS, "frozen: test", "frozen − population"]
    table = []
    for v in GHOST_SIZES:
        runs_, fixed = plain(rows, v), remedy(rows, v)
        if not runs_ and not fixed:
            continue
        cells = [format_mean_ci(list(by_seed(runs_, ways, k).values()), ".2f")
                 for k in (*WAYS, "test_ema")]
        cells += [format_mean_ci(list(gap_by_seed(runs_, ways, *pair).values()), ".2f")
                  for pair in GAPS.values()]
        d = difference(by_seed(runs_, ways, "test_population"), tested(fixed))
        cells += [format_mean_ci(list(tested(fixed).values()), ".2f") if fixed else "-",
                  _effect(d) if fixed else "-"]
        table.append([str(v), *cells])
    return format_table(headers, table)


def _effect(d) -> str:
    """A paired difference as ``+1.23 [0.50, 1.96] (n=3)``, or its point with fewer seeds."""
    if not math.isfinite(d.effect):
        return "-"
    if d.n < 2:
        return f"{d.effect:+.2f} (n={d.n})"
    return f"{d.effect:+.2f} [{d.low:+.2f}, {d.high:+.2f}] (n={d.n})"


def small_table(rows: list[Row]) -> str:
    labels = small_labels(rows)
    headers = ["b", *labels, f"Ghost BN (SGD {SGD_BATCH})"]
    table = []
    for b in SMALL_BATCHES:
        cells = [format_mean_ci(list(tested(select(rows, part="small", b=b, norm=label)).values()),
                                ".2f") for label in labels]
        cells.append(format_mean_ci(list(tested(plain(rows, b)).values()), ".2f"))
        table.append([str(b), *cells])
    return format_table(headers, table)


def measured_sizes(rows: list[Row], ways) -> list[int]:
    """The ghost sizes V with measured plain runs, ascending."""
    return [v for v in GHOST_SIZES if by_seed(plain(rows, v), ways, "test_population")]


def findings(rows: list[Row], ways) -> list[str]:
    """Lines that state what the numbers say, each from a paired interval over seeds."""
    lines = []
    sizes = measured_sizes(rows, ways)
    if sizes:
        small, large = sizes[0], sizes[-1]
        for name, pair in GAPS.items():
            a, b = (gap_by_seed(plain(rows, v), ways, *pair) for v in (small, large))
            lines.append(f"- The {name} is {format_mean_ci(list(a.values()), '.2f')} points at "
                         f"V = {small} and {format_mean_ci(list(b.values()), '.2f')} at V = "
                         f"{large}; V = {large} minus V = {small}: {_effect(difference(a, b))} "
                         f"({_side(difference(a, b))}).")
        above = [v for v in sizes if _side(difference(
            {s: 0.0 for s in gap_by_seed(plain(rows, v), ways, *GAPS["train-test inconsistency"])},
            gap_by_seed(plain(rows, v), ways, *GAPS["train-test inconsistency"]))) == "above 0"]
        lines.append("- Mini-batch statistics beat population statistics on the test set (95% "
                     "interval of the inconsistency above 0) "
                     + (f"at V = {', '.join(map(str, above))}" if above else "at no V of the grid")
                     + ".")
    for v in GHOST_SIZES:
        fixed = remedy(rows, v)
        population = by_seed(plain(rows, v), ways, "test_population")
        if fixed and population:
            d = difference(population, tested(fixed))
            lines.append(f"- V = {v}: Frozen BN for the last epochs, test accuracy minus the plain "
                         f"runs' with population statistics: {_effect(d)} points ({_side(d)}).")
    jumps = [j for r in select(rows, part="ghost", frozen=True)
             if (j := freeze_loss_jump(r)) is not None]
    if jumps:
        before, after = (mean_ci([j[i] for j in jumps])[0] for i in (0, 1))
        lines.append(f"- Training loss of the remedy runs, last epoch with batch statistics vs "
                     f"first frozen epoch: {before:.3f} vs {after:.3f} (mean over "
                     f"{counted(len(jumps), 'run')}, every V), at the same constant rate "
                     f"{BASE_LR:g}.")
    for b in SMALL_BATCHES:
        scores = {label: tested(select(rows, part="small", b=b, norm=label))
                  for label in small_labels(rows)}
        scores["Ghost BN"] = tested(plain(rows, b))
        scores = {k: s for k, s in scores.items() if s}
        if not scores:
            continue
        best = max(scores, key=lambda k: mean_ci(list(scores[k].values()))[0])
        tied = [k for k in scores if k != best and _side(difference(scores[k], scores[best])) != "above 0"]
        others = ", ".join(f"{k} {mean_ci(list(scores[k].values()))[0]:.2f}"
                           for k in scores if k != best)
        lines.append(f"- Normalization batch {b}: highest mean test accuracy {best} "
                     f"({format_mean_ci(list(scores[best].values()), '.2f')}; {others}); "
                     + (f"its paired 95% interval over {', '.join(tied)} includes 0." if tied
                        else "above every other norm (paired 95% intervals)."))
    return lines


def _side(d) -> str:
    """Where a paired interval lies: ``above 0``, ``below 0``, ``includes 0``, or ``no
    interval`` (fewer than two seeds)."""
    if d.n < 2 or not math.isfinite(d.effect):
        return "no interval"
    return "above 0" if d.low > 0 else "below 0" if d.high < 0 else "includes 0"


def freeze_loss_jump(row: Row) -> tuple[float, float] | None:
    """A remedy run's training loss in its last epoch with batch statistics and in its first
    frozen epoch (None if it has neither, e.g. it diverged first)."""
    first_frozen = row.config["epochs"] - row.config["freeze_bn_epochs"]  # index of that epoch
    if first_frozen < 1 or len(row.metrics) <= first_frozen:
        return None
    return row.metrics[first_frozen - 1]["train_loss"], row.metrics[first_frozen]["train_loss"]


NOTE = ("BN-LeNet (sigmoid) on a subset of Fashion-MNIST, plain SGD at a constant "
        "rate; theirs: ResNet-50 on ImageNet, momentum SGD with a decaying rate")


def paper_verdicts(rows: list[Row], ways) -> list[Verdict]:
    """The paper's three claims against this grid (points, paired over seeds), at the smallest
    and the largest normalization batch measured (``findings.judge_difference``):

    - the generalization gap grows with the normalization batch: gap(V large) - gap(V small) > 0;
    - small normalization batches suffer train-test inconsistency:
      inconsistency(V small) - inconsistency(V large) > 0;
    - Frozen BN for the last epochs recovers it: at V small, the remedy's final test accuracy
      minus the plain runs' test accuracy with population statistics > 0.

    A claim whose runs include one that does not train (diverged, or validation accuracy at
    most ``analysis.FAIL_ACCURACY``) is not judged."""
    sizes = measured_sizes(rows, ways)
    claims = ("the generalization gap grows with the normalization batch",
              "small normalization batches suffer train-test inconsistency",
              "Frozen BN for the last epochs recovers it")
    if not sizes:
        return [not_measured(c, SOURCE, "-", "no measured Ghost BN runs") for c in claims]
    small, large = sizes[0], sizes[-1]
    gen, inc = GAPS["generalization gap"], GAPS["train-test inconsistency"]
    fixed = remedy(rows, small)
    return [
        _judge(plain(rows, small) + plain(rows, large), claims[0],
               f"train minus test accuracy (mini-batch statistics, points), V = {large} minus "
               f"V = {small}", gap_by_seed(plain(rows, small), ways, *gen),
               gap_by_seed(plain(rows, large), ways, *gen),
               paper="the generalization gap grows with the normalization batch size"),
        _judge(plain(rows, small) + plain(rows, large), claims[1],
               f"test accuracy with mini-batch minus with population statistics (points), "
               f"V = {small} minus V = {large}", gap_by_seed(plain(rows, large), ways, *inc),
               gap_by_seed(plain(rows, small), ways, *inc),
               paper="at small normalization batches, train-test inconsistency is the main "
                     "cost"),
        _judge(plain(rows, small) + fixed, claims[2],
               f"V = {small}, test accuracy (points) after the frozen remedy minus with "
               f"population statistics after plain training",
               by_seed(plain(rows, small), ways, "test_population"), tested(fixed),
               paper="training the last epochs with population statistics (Frozen BN) "
                     "closes the inconsistency")
        if fixed else not_measured(claims[2], SOURCE, f"V = {small}, frozen remedy", "no remedy "
                                   "runs in this grid (one epoch leaves no frozen phase)")]


def _judge(group: list[Row], claim: str, measure: str, a, b, paper: str) -> Verdict:
    """``judge_difference`` (b > a), or ``not_measured`` where a run of ``group`` fails."""
    bad = sum(failed(r) for r in group)
    if bad:
        return not_measured(claim, SOURCE, measure, "a run does not train (diverged, or "
                            f"validation accuracy at most {FAIL_ACCURACY:g})",
                            failed=f"{bad}/{len(group)} failed", paper=paper)
    return judge_difference(claim, SOURCE, measure, a, b, paper=paper, note=NOTE)


def plot(rows: list[Row], ways, path: Path) -> None:
    """Accuracies in points: the three ways and the trainer's EMA per V, the two gaps per V,
    and the small normalization batches' norms; mean and 95% interval over seeds."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    points_range = (0.0, 100.0)
    for key, label in (*WAYS.items(), ("test_ema", "test, EMA")):
        points = {v: list(by_seed(plain(rows, v), ways, key).values()) for v in GHOST_SIZES}
        plot_intervals(axes[0], {v: p for v, p in points.items() if p}, points_range, label=label)
    frozen = {v: list(tested(remedy(rows, v)).values()) for v in GHOST_SIZES}
    if any(frozen.values()):
        plot_intervals(axes[0], {v: p for v, p in frozen.items() if p}, points_range,
                       label="frozen remedy: test")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title(f"Ghost BN at SGD batch {SGD_BATCH}")
    for name, pair in GAPS.items():
        points = {v: list(gap_by_seed(plain(rows, v), ways, *pair).values()) for v in GHOST_SIZES}
        plot_intervals(axes[1], {v: p for v, p in points.items() if p},
                       bounds=(-math.inf, math.inf), label=name)
    reference_line(axes[1], 0.0)
    axes[1].set_ylabel("accuracy difference (points)")
    axes[1].set_title("the paper's two gaps")
    for label in small_labels(rows):
        points = {b: list(tested(select(rows, part="small", b=b, norm=label)).values())
                  for b in SMALL_BATCHES}
        plot_intervals(axes[2], {b: p for b, p in points.items() if p}, points_range,
                       label=f"{label} (SGD b)")
    ghost = {b: list(tested(plain(rows, b)).values()) for b in SMALL_BATCHES}
    plot_intervals(axes[2], {b: p for b, p in ghost.items() if p}, points_range,
                   label=f"Ghost BN (SGD {SGD_BATCH})")
    axes[2].set_ylabel("test accuracy, eval mode (%)")
    axes[2].set_title("small normalization batches")
    for ax, sizes in zip(axes, (GHOST_SIZES, GHOST_SIZES, SMALL_BATCHES)):
        log_axis(ax, "x", base=2, ticks=sizes, label="normalization batch (examples)")
        legend(ax)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="batchsize",
    title="Paper: normalization batch vs SGD batch",
    question="With the SGD batch fixed, how do the normalization batch's generalization gap and "
             "train-test inconsistency change, does training the last epochs with frozen "
             "population statistics help, and which norm does best at normalization batch 2-8?",
    variants=variants,
    analyze=analyze,
    default_epochs=10,  # the paper's remedy: the last 2 of 10 epochs
    default_subset=4000,  # sized to fit 40 minutes on 2 cores with --jobs 2 (the batch-2 runs,
    # 2000 steps an epoch, take most of it)
    norms=tuple(SMALL_NORMS.values()),
    notes=f"Ghost BN V in {list(GHOST_SIZES)} at SGD batch {SGD_BATCH}, lr {BASE_LR:g}, with and "
          "without the frozen remedy (batch norm frozen at population statistics for the last "
          "20% of the epochs, as the paper's last 2 of 10; none in a one-epoch grid); BN, Batch "
          f"Renorm, GroupNorm, LayerNorm at SGD batch {list(SMALL_BATCHES)} with linearly scaled "
          "rates. Each Ghost BN model is measured three ways (train and test accuracy with "
          "mini-batch statistics, test accuracy with population statistics).",
)
