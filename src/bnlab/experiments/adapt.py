"""Paper: test-time adaptation through batch norm (Schneider et al. 2020, BN-adapt; Wang et al.
2021, TENT), on Fashion-MNIST-C.

Why: a batch-norm model carries its training set's statistics; on shifted test images
(noise, blur, contrast) re-estimating them from the test batches (BN-adapt) and, beyond
that, minimizing the prediction entropy through batch norm's gamma/beta (TENT) lower the
error. The anchor, TENT's repository: WRN-28-10 on CIFAR-10-C at severity 5, mean error
43.5% (source), 20.4% (BN-adapt), 18.6% (TENT). Both methods need test batches whose
statistics are the shifted population's; this grid measures where that breaks.

The grid: source models trained on Fashion-MNIST, the chapter's BN-LeNet (bnlab's BN) and,
as controls that have no batch statistics to adapt, the same network with GroupNorm and
with LayerNorm (SGD lr 0.1, batch 128, the grid's epochs; the source model is each run's
final model). Then, per finished run (cached in its folder, ``runs.cached``), on
Fashion-MNIST-C (``bnlab.data.fashion_c``: the test set under the 9 corruptions of
``bnlab.data.corruptions.DEFAULT_CORRUPTIONS`` at severities 1-5, seed
:data:`CORRUPTION_SEED`), with ``bnlab.probes.adaptation``:

* **methods** (test batch :data:`TEST_BATCH`, an i.i.d. stream, reset to the source model at
  each corruption and severity): source (eval mode), BN-adapt (the batch's statistics,
  N = 0) and TENT (one step per batch on gamma/beta). For the GroupNorm and LayerNorm
  models every method is the source model (nothing to adapt): only the source is measured.
* **where they break** (BN-LeNet, severity 5, every corruption): test batches of
  :data:`BATCH_SIZES` on ``sweep_images`` class-balanced test images (:class:`Scale`), with BN-adapt,
  Schneider's mix with prior strength N, and TENT; a class-sorted and a class-imbalanced
  stream (``bnlab.data.streams``) of the test set at batch :data:`TEST_BATCH`; a continual
  stream, the 9 corruptions one after another, TENT never reset.

Choices, on the validation split (the run's held-out training images, corrupted the same
way at severity 5), never on the test set: TENT's optimizer and learning rate among
:data:`TENT_CHOICES` (lowest mean validation error over corruptions and seeds; the paper's
CIFAR-10-C setting, Adam at 1e-3, is reported beside it at severity 5 when it is not the
one chosen), and Schneider's N among :data:`PRIORS` per test batch size (on
``prior_images`` validation images). Errors are fractions of the images of a stream;
a cell's n is its seeds.

Verdicts (BN-LeNet, paired over seeds, mean error over the corruptions at severity 5):
BN-adapt below source; TENT below BN-adapt; BN-adapt at test batch :data:`SMALL_BATCH`
above source, and the prior mix below BN-adapt there; BN-adapt and TENT on a class-sorted
stream, and BN-adapt on a class-imbalanced one, above source; continual TENT above TENT
reset per corruption.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.data.corruptions import DEFAULT_CORRUPTIONS, SEVERITY_LEVELS
from bnlab.data.fashion_c import VERSION as CORRUPTION_VERSION
from bnlab.data.fashion_c import corrupted_images
from bnlab.data.loader import stratified_subset
from bnlab.data.split import validation_split
from bnlab.data.streams import DEFAULT_IMBALANCE, batches
from bnlab.experiments.analysis import FAIL_ACCURACY, Row, failed, plot_intervals, select
from bnlab.experiments.findings import (
    Analysis,
    Calibration,
    Verdict,
    judge_difference,
    not_measured,
)
from bnlab.experiments.measure import fingerprint
from bnlab.experiments.runner import Experiment, ExpSettings, Variant
from bnlab.experiments.stats import ACCURACY, format_mean_ci, mean_ci
from bnlab.probes.adaptation import (
    TentSettings,
    TestTimeAdapter,
    evaluate_stream,
    softmax_entropy,
)
from bnlab.training import restore, runs
from bnlab.training.models import build_model
from bnlab.util.plots import legend, log_axis, note_empty, plt, save_figure
from bnlab.util.tables import format_table

MODELS = {"BN": "bnlab", "GroupNorm": "group", "LayerNorm": "layer"}
SOURCE_LR = 0.1
CORRUPTIONS = DEFAULT_CORRUPTIONS
CORRUPTION_SEED = 0
STREAM_SEED = 0
TEST_BATCH = 128
BATCH_SIZES = (1, 2, 8, 32, 128)
SMALL_BATCH = 2
"""The test batch of the "breaks at small batches" verdicts: the smallest at which every
layer has a batch variance (at 1 a fully connected batch norm has none)."""
ANCHOR = 5
"""The severity of the anchor (TENT's CIFAR-10-C numbers) and of the breaking tests."""
TENT_CHOICES = (("adam", 1e-3), ("adam", 1e-2), ("sgd", 1e-2))
PAPER_TENT = ("adam", 1e-3)
"""TENT's CIFAR-10-C setting (its repository's ``cfgs/tent.yaml``)."""
PRIORS = (4.0, 16.0, 64.0, 256.0)
PAPER = {"source": 0.435, "bn-adapt": 0.204, "tent": 0.186}
"""TENT's repository, WRN-28-10 on CIFAR-10-C at severity 5, mean error over corruptions."""
CACHE_FOLDER: Path | None = None
"""Where Fashion-MNIST-C is cached: None is bnlab's cache folder (``$BNLAB_CACHE`` or
``~/.cache/bnlab``, ``bnlab.data.fashion_c``); the tests point it at a temporary folder."""


@dataclass(frozen=True)
class Scale:
    """How much of the test data the analysis uses (``--quick`` scales it down)."""

    test_images: int  # class-balanced test images of the main table and the streams (0 = all)
    severities: tuple[int, ...]
    sweep_images: int  # test images of the batch-size sweep
    prior_images: int  # validation images that choose N per batch size
    val_images: int  # validation images that choose TENT's setting (0 = the whole split)


FULL = Scale(test_images=0, severities=SEVERITY_LEVELS, sweep_images=1000, prior_images=500,
             val_images=0)
QUICK = Scale(test_images=1000, severities=(1, ANCHOR), sweep_images=200, prior_images=100,
              val_images=0)


def variants(settings: ExpSettings) -> list[Variant]:
    return [Variant(label, {"model": "bn-lenet", "norm": norm, "lr": SOURCE_LR},
                    {"norm": label, "bn": label == "BN"}) for label, norm in MODELS.items()]


# --------------------------------------------------------------------------- data

class Shifted:
    """The clean and corrupted test and validation images the analysis reads (corrupted sets
    built once and cached, ``bnlab.data.fashion_c``)."""

    def __init__(self, dataset: Any, scale: Scale, val_size: int) -> None:
        self.scale = scale
        images, labels = dataset.test_images, dataset.test_labels
        if scale.test_images and scale.test_images < len(labels):
            images, labels = stratified_subset(images, labels, scale.test_images)
        self.test = (images, labels)
        self.sweep = stratified_subset(images, labels, min(scale.sweep_images, len(labels)))
        _, (val_images, val_labels) = validation_split(dataset.train_images,
                                                       dataset.train_labels, val_size)
        if scale.val_images and scale.val_images < len(val_labels):
            val_images, val_labels = stratified_subset(val_images, val_labels, scale.val_images)
        self.val = (val_images, val_labels)
        self.prior = stratified_subset(val_images, val_labels,
                                       min(scale.prior_images, len(val_labels)))
        self.key = {"version": 1, "corruption_version": CORRUPTION_VERSION,
                    "corruption_seed": CORRUPTION_SEED, "stream_seed": STREAM_SEED,
                    "test": fingerprint(*self.test), "val": fingerprint(*self.val),
                    "sweep": fingerprint(*self.sweep), "prior": fingerprint(*self.prior)}

    def corrupted(self, part: str, name: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``part`` ("test", "val", "sweep", "prior") under corruption ``name`` at ``severity``
        (the clean images for ``name == "clean"``)."""
        images, labels = getattr(self, part)
        if name == "clean":
            return images, labels
        return corrupted_images(images, name, severity, CORRUPTION_SEED, CACHE_FOLDER), labels


class Stream:
    """The batches of a domain, made when iterated (one domain in memory at a time)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 order: str = "iid", device: torch.device | None = None) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.order, self.device = order, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from batches(self.images, self.labels, self.batch_size, self.order, STREAM_SEED,
                           DEFAULT_IMBALANCE, self.device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def tent_settings(choice: Sequence[Any]) -> TentSettings:
    return TentSettings(optimizer=choice[0], lr=float(choice[1]))


def choice_name(choice: Sequence[Any]) -> str:
    return f"{choice[0]} {float(choice[1]):g}"


def domain_error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, method: str,
                 batch_size: int = TEST_BATCH, prior: float = 0.0,
                 tent: Sequence[Any] | None = None, order: str = "iid") -> float:
    """Error of ``model`` under ``method`` on one domain, from the source model."""
    stream = Stream(images, labels, batch_size, order, _device(model))
    result = evaluate_stream(model, [("domain", stream)], method, prior,
                             tent_settings(tent) if tent else None)
    return result.error


# --------------------------------------------------------------------------- measurements

def validation_errors(model: nn.Module, data: Shifted) -> dict[str, Any]:
    """On the validation split at severity :data:`ANCHOR`: the mean error over corruptions of
    TENT under each of :data:`TENT_CHOICES` (batch :data:`TEST_BATCH`), and of the prior mix
    under each N of :data:`PRIORS` at each of :data:`BATCH_SIZES` (on the ``prior`` images)."""
    tent = {choice_name(c): [] for c in TENT_CHOICES}
    prior = {str(b): {f"{n:g}": [] for n in PRIORS} for b in BATCH_SIZES}
    for name in CORRUPTIONS:
        images, labels = data.corrupted("val", name, ANCHOR)
        for choice in TENT_CHOICES:
            tent[choice_name(choice)].append(domain_error(model, images, labels, "tent", tent=choice))
        images, labels = data.corrupted("prior", name, ANCHOR)
        for b in BATCH_SIZES:
            for n in PRIORS:
                prior[str(b)][f"{n:g}"].append(domain_error(model, images, labels, "bn-adapt", b, n))
    mean = lambda values: sum(values) / len(values)  # noqa: E731 (over corruptions)
    return {"tent": {k: mean(v) for k, v in tent.items()},
            "prior": {b: {n: mean(v) for n, v in per.items()} for b, per in prior.items()}}


def corruption_errors(model: nn.Module, data: Shifted, bn: bool, tent: Sequence[Any]) -> dict[str, Any]:
    """Error per corruption and severity (and clean) of source, BN-adapt and TENT (``tent``'s
    setting), reset per domain; TENT at :data:`PAPER_TENT` at severity :data:`ANCHOR` when it
    is another setting. A model without batch norm: the source alone (every method is it)."""
    methods = ("source", "bn-adapt", "tent") if bn else ("source",)
    errors: dict[str, dict[str, dict[str, float]]] = {}
    domains = [("clean", 0)] + [(c, s) for c in CORRUPTIONS for s in data.scale.severities]
    for name, severity in domains:
        images, labels = data.corrupted("test", name, severity)
        cell = errors.setdefault(name, {}).setdefault(str(severity), {})
        for method in methods:
            cell[method] = domain_error(model, images, labels, method, tent=tent)
        if bn and tuple(tent) != PAPER_TENT and severity == ANCHOR:
            cell["tent (paper)"] = domain_error(model, images, labels, "tent", tent=PAPER_TENT)
    return errors


def break_errors(model: nn.Module, data: Shifted, tent: Sequence[Any],
                 priors: dict[str, float]) -> dict[str, Any]:
    """At severity :data:`ANCHOR`, per corruption: the batch-size sweep (source, BN-adapt,
    the prior mix with ``priors[b]``, TENT), the non-i.i.d. streams (source, BN-adapt, TENT),
    and the continual stream (TENT never reset, per corruption in stream order)."""
    sweep: dict[str, dict[str, list[float]]] = {str(b): {} for b in BATCH_SIZES}
    streams: dict[str, dict[str, list[float]]] = {order: {} for order in ("class-sorted", "imbalanced")}
    for name in CORRUPTIONS:
        images, labels = data.corrupted("sweep", name, ANCHOR)
        for b in BATCH_SIZES:
            cell = sweep[str(b)]
            for method, kwargs in (("source", {}), ("bn-adapt", {}),
                                   ("prior", {"prior": priors[str(b)]}), ("tent", {"tent": tent})):
                if method == "source" and b != TEST_BATCH:
                    continue  # eval mode: the same at every batch size
                cell.setdefault(method, []).append(domain_error(
                    model, images, labels, "bn-adapt" if method == "prior" else method, b, **kwargs))
        images, labels = data.corrupted("test", name, ANCHOR)
        for order, cell in streams.items():
            for method in ("source", "bn-adapt", "tent"):
                cell.setdefault(method, []).append(domain_error(
                    model, images, labels, method, tent=tent if method == "tent" else None,
                    order=order))
    device = _device(model)
    continual = [(name, Stream(*data.corrupted("test", name, ANCHOR), TEST_BATCH, device=device))
                 for name in CORRUPTIONS]
    never = evaluate_stream(model, continual, "tent", tent=tent_settings(tent), reset="never")
    return {"sweep": sweep, "streams": streams, "continual": [d.error for d in never.domains]}


def measure(row: Row, data: Shifted, choices: dict[str, Any] | None) -> dict[str, Any]:
    """The run's test measurements (cached in its folder): ``test`` (:func:`corruption_errors`) and,
    for BN-LeNet, ``breaks`` (:func:`break_errors`)."""
    bn = row.tags["bn"]
    tent = choices["tent"] if choices else PAPER_TENT
    key = {**data.key, "corruptions": list(CORRUPTIONS), "severities": list(data.scale.severities),
           "batch": TEST_BATCH, **({"tent": list(tent), "paper_tent": list(PAPER_TENT)} if bn else {})}
    model = _loader(row)
    out = {"test": runs.cached(row.run_dir, "adapt-test", key,
                               lambda: corruption_errors(model(), data, bn, tent))}
    if bn and choices:
        priors = choices["priors"]
        out["breaks"] = runs.cached(
            row.run_dir, "adapt-breaks", {**key, "batch_sizes": list(BATCH_SIZES), "priors": priors,
                                          "imbalance": DEFAULT_IMBALANCE},
            lambda: break_errors(model(), data, tent, priors))
    return out


def _loader(row: Row) -> Callable[[], nn.Module]:
    """The run's model, loaded once and only if a measurement is computed."""
    loaded: list[nn.Module] = []

    def get() -> nn.Module:
        if not loaded:
            loaded.append(restore.load_trained_model(row.run_dir)[0])
        return loaded[0]

    return get


def choose(rows: list[Row], data: Shifted) -> dict[str, Any] | None:
    """TENT's setting and N per batch size, from the BN-LeNet runs' validation errors (mean
    over the seeds that did not diverge; ties to the earlier candidate); also the validation
    errors themselves. None without such a run."""
    trained = [r for r in select(rows, bn=True) if not r.diverged]
    if not trained:
        return None
    key = {**data.key, "corruptions": list(CORRUPTIONS), "severity": ANCHOR, "batch": TEST_BATCH,
           "tent_choices": [list(c) for c in TENT_CHOICES], "priors": list(PRIORS),
           "batch_sizes": list(BATCH_SIZES)}
    per_run = [runs.cached(r.run_dir, "adapt-validation", key,
                           lambda r=r: validation_errors(_loader(r)(), data)) for r in trained]
    return choices_from(per_run)


def choices_from(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    """From each run's :func:`validation_errors`: TENT's setting and N per batch size with the
    lowest mean over the runs (ties to the earlier candidate), and those means."""
    def mean(value: Callable[[dict[str, Any]], float]) -> float:
        return sum(value(v) for v in per_run) / len(per_run)

    tent_means = {choice_name(c): mean(lambda v, c=c: v["tent"][choice_name(c)])
                  for c in TENT_CHOICES}
    tent = min(TENT_CHOICES, key=lambda c: tent_means[choice_name(c)])
    prior_means = {str(b): {f"{n:g}": mean(lambda v, b=b, n=n: v["prior"][str(b)][f"{n:g}"])
                            for n in PRIORS} for b in BATCH_SIZES}
    priors = {b: float(min(means, key=lambda n: means[n])) for b, means in prior_means.items()}
    return {"tent": list(tent), "priors": priors, "tent_means": tent_means,
            "prior_means": prior_means, "seeds": len(per_run)}


# --------------------------------------------------------------------------- reading

Measured = dict[str, dict[str, Any]]  # run_dir -> measure()


def severity_error(m: dict[str, Any], method: str, severity: int) -> float:
    """Mean error over the corruptions at ``severity`` (0: the clean test set)."""
    test = m["test"]
    if severity == 0:
        return test["clean"]["0"].get(method, math.nan)
    values = [test[c][str(severity)].get(method, math.nan) for c in CORRUPTIONS]
    return sum(values) / len(values)


def by_seed(rows: list[Row], measured: Measured, value: Callable[[dict[str, Any]], float]
            ) -> dict[int, float]:
    """``value`` of each measured run's measurements, by seed."""
    return {r.seed: value(measured[r.run_dir]) for r in rows if r.run_dir in measured}


def sweep_error(m: dict[str, Any], batch: int, method: str) -> float:
    values = m["breaks"]["sweep"][str(batch if method != "source" else TEST_BATCH)].get(method)
    return sum(values) / len(values) if values else math.nan


def stream_error(m: dict[str, Any], order: str, method: str) -> float:
    """Mean over corruptions at severity :data:`ANCHOR`; ``order`` "iid" is the main table's."""
    if order == "iid":
        return severity_error(m, method, ANCHOR)
    values = m["breaks"]["streams"][order][method]
    return sum(values) / len(values)


def continual_error(m: dict[str, Any], reset: str) -> float:
    """TENT's mean error over the severity-5 stream of corruptions, reset per corruption
    (the main table's) or never."""
    if reset == "never":
        values = m["breaks"]["continual"]
        return sum(values) / len(values)
    return severity_error(m, "tent", ANCHOR)


# --------------------------------------------------------------------------- analysis

METHOD_NAMES = {"source": "source", "bn-adapt": "BN-adapt (N = 0)", "prior": "BN-adapt, prior N",
                "tent": "TENT", "tent (paper)": "TENT, the paper's Adam 1e-3"}


def analyze(rows: list[Row], out: Path, dataset: Any, settings: ExpSettings) -> Analysis:
    if dataset is None or not rows:
        return Analysis(["(no dataset or no finished runs: nothing to evaluate)"])
    scale = QUICK if settings.quick else FULL
    data = Shifted(dataset, scale, rows[0].config.get("val_size", 0))
    choices = choose(rows, data)
    measured = {r.run_dir: measure(r, data, choices) for r in rows if not r.diverged}
    bn_rows = [r for r in select(rows, bn=True) if not failed(r)]
    bn_all = select(rows, bn=True)
    plot_severity(rows, measured, scale, out / "adapt_severity.png")
    plot_breaks(select(rows, bn=True), measured, out / "adapt_breaks.png")
    sections = [
        "## The source models", "", source_table(rows), "",
        f"Each run's final model after {rows[0].config['epochs']} epochs of SGD (lr "
        f"{SOURCE_LR:g}, batch 128) on its training images; BN-LeNet's running statistics are "
        "the source statistics BN-adapt replaces. Diverged runs are not evaluated; runs that "
        f"failed (final validation accuracy at most {FAIL_ACCURACY}) are evaluated and in the "
        "tables, but no verdict or finding rests on them.", "",
        "## Choices on the validation split", "", *choice_lines(choices), "",
        "## Error by severity", "", severity_table(rows, measured, scale), "",
        f"Mean test error over the {len(CORRUPTIONS)} corruptions (clean: the uncorrupted test "
        f"set), test batch {TEST_BATCH}, i.i.d. order, every method reset to the source model "
        "at each corruption and severity; mean ± 95% CI over seeds. GroupNorm and LayerNorm "
        "have no batch statistics: BN-adapt and TENT are their source model.", "",
        "![error by severity](adapt_severity.png)", "",
        f"## Error by corruption at severity {ANCHOR}", "",
        corruption_table(rows, measured), "",
        "## Beside the paper", "", paper_table(bn_all, measured), "",
        "## Where they break", "", batch_table(bn_all, measured, choices), "",
        stream_table(bn_all, measured), "", continual_table(bn_all, measured), "",
        f"BN-LeNet at severity {ANCHOR}, mean error over the corruptions. Batch sizes: on "
        f"{len(data.sweep[1])} class-balanced test images (source: eval mode, the same at every "
        f"batch). Streams: the test images in class-sorted order, or a long-tailed subset (class "
        f"k keeps {DEFAULT_IMBALANCE:g}^(k/9) of its images) shuffled, batch {TEST_BATCH}. "
        "Continual: the corruptions one after another in the order of the table above, TENT "
        "never reset (its error per corruption in the table; 'reset' is the main table's).", "",
        "![where they break](adapt_breaks.png)", "",
        "## Error by corruption and severity", "", full_table(rows, measured, scale)]
    return Analysis(sections, findings(rows, bn_rows, measured, choices),
                    verdicts(rows, bn_rows, measured, choices), calibrate())


def source_table(rows: list[Row]) -> str:
    table = []
    for label in MODELS:
        group = select(rows, norm=label)
        if group:
            table.append([label, format_mean_ci([r.summary["final_val_acc"] for r in group]),
                          format_mean_ci([r.summary["final_test_acc"] for r in group]),
                          f"{sum(map(failed, group))}/{len(group)}"])
    return format_table(["model", "final val acc (clean)", "final test acc (clean)", "failed"], table)


def choice_lines(choices: dict[str, Any] | None) -> list[str]:
    if choices is None:
        return ["No BN-LeNet run trained: nothing chosen, nothing adapted."]
    tent = format_table(["TENT setting", "validation error"],
                        [[name + (" (the paper's)" if name == choice_name(PAPER_TENT) else ""),
                          f"{e:.4f}"] for name, e in choices["tent_means"].items()])
    prior = format_table(["test batch", *[f"N = {n:g}" for n in PRIORS], "chosen N"],
                         [[b, *[f"{means[f'{n:g}']:.4f}" for n in PRIORS],
                           f"{choices['priors'][b]:g}"] for b, means in choices["prior_means"].items()])
    return [tent, "", prior, "",
            f"Mean error over the corruptions at severity {ANCHOR} on the corrupted validation "
            f"split, mean over {choices['seeds']} BN-LeNet seeds. TENT (batch {TEST_BATCH}, reset "
            f"per corruption): chosen **{choice_name(choices['tent'])}**. The prior mix "
            "(Schneider et al.: N pseudo-samples of source statistics against the batch's n): N "
            "chosen per test batch size as above."]


def _cell(rows: list[Row], measured: Measured, value: Callable[[dict[str, Any]], float],
          spec: str = ".4f") -> str:
    values = [v for v in by_seed(rows, measured, value).values() if math.isfinite(v)]
    return format_mean_ci(values, spec) if values else "-"


def _columns(rows: list[Row]) -> list[tuple[str, list[Row], str]]:
    """(column name, runs, method) of every table: BN-LeNet's methods, then the controls."""
    bn = select(rows, bn=True)
    out = [(f"BN-LeNet: {METHOD_NAMES[m]}", bn, m) for m in ("source", "bn-adapt", "tent")]
    return out + [(f"{label} LeNet (source)", select(rows, norm=label), "source")
                  for label in MODELS if label != "BN" and select(rows, norm=label)]


def severity_table(rows: list[Row], measured: Measured, scale: Scale) -> str:
    columns = _columns(rows)
    return format_table(["severity", *[c[0] for c in columns]], [
        [str(s) if s else "clean", *[_cell(group, measured, lambda m, s=s, k=method:
                                           severity_error(m, k, s)) for _, group, method in columns]]
        for s in (0, *scale.severities)])


def corruption_table(rows: list[Row], measured: Measured) -> str:
    columns = _columns(rows)
    paper = [r for r in select(rows, bn=True) if r.run_dir in measured
             and "tent (paper)" in measured[r.run_dir]["test"][CORRUPTIONS[0]].get(str(ANCHOR), {})]
    if paper:
        columns.append((f"BN-LeNet: {METHOD_NAMES['tent (paper)']}", paper, "tent (paper)"))
    return format_table(["corruption", *[c[0] for c in columns]], [
        [name, *[_cell(group, measured, lambda m, n=name, k=method:
                       m["test"][n].get(str(ANCHOR), {}).get(k, math.nan))
                 for _, group, method in columns]] for name in CORRUPTIONS])


def full_table(rows: list[Row], measured: Measured, scale: Scale) -> str:
    columns = _columns(rows)
    return format_table(["corruption", "severity", *[c[0] for c in columns]], [
        [name, str(s), *[_cell(group, measured, lambda m, n=name, s=s, k=method:
                               m["test"][n][str(s)].get(k, math.nan)) for _, group, method in columns]]
        for name in CORRUPTIONS for s in scale.severities])


def paper_table(bn_rows: list[Row], measured: Measured) -> str:
    if not bn_rows:
        return "(no BN-LeNet run measured)"
    return format_table(
        ["method", f"here: BN-LeNet, Fashion-MNIST-C severity {ANCHOR}",
         f"TENT's repository: WRN-28-10, CIFAR-10-C severity {ANCHOR}"],
        [[METHOD_NAMES[m], _cell(bn_rows, measured, lambda x, k=m: severity_error(x, k, ANCHOR)),
          f"{PAPER[m]:.3f}"] for m in ("source", "bn-adapt", "tent")])


def batch_table(bn_rows: list[Row], measured: Measured, choices: dict[str, Any] | None) -> str:
    if not bn_rows or choices is None:
        return "(no BN-LeNet run measured)"
    return format_table(
        ["test batch", *[METHOD_NAMES[m] for m in ("source", "bn-adapt", "prior", "tent")], "N"],
        [[str(b), *[_cell(bn_rows, measured, lambda m, b=b, k=k: sweep_error(m, b, k))
                    for k in ("source", "bn-adapt", "prior", "tent")],
          f"{choices['priors'][str(b)]:g}"] for b in BATCH_SIZES])


def stream_table(bn_rows: list[Row], measured: Measured) -> str:
    if not bn_rows:
        return ""
    return format_table(["stream", *[METHOD_NAMES[m] for m in ("source", "bn-adapt", "tent")]], [
        [order, *[_cell(bn_rows, measured, lambda m, o=order, k=k: stream_error(m, o, k))
                  for k in ("source", "bn-adapt", "tent")]]
        for order in ("iid", "imbalanced", "class-sorted")])


def continual_table(bn_rows: list[Row], measured: Measured) -> str:
    if not bn_rows:
        return ""
    table = [[name, _cell(bn_rows, measured, lambda m, n=name: m["test"][n][str(ANCHOR)]["tent"]),
              _cell(bn_rows, measured, lambda m, i=i: m["breaks"]["continual"][i])]
             for i, name in enumerate(CORRUPTIONS)]
    table.append(["mean", _cell(bn_rows, measured, lambda m: continual_error(m, "domain")),
                  _cell(bn_rows, measured, lambda m: continual_error(m, "never"))])
    return format_table(["corruption (stream order)", "TENT, reset per corruption",
                         "TENT, continual (never reset)"], table)


# --------------------------------------------------------------------------- verdicts

NOTE = (f"BN-LeNet (bnlab's BN) on Fashion-MNIST-C ({len(CORRUPTIONS)} corruptions of 28x28 "
        f"grayscale, severity {ANCHOR}), SGD-trained source models; test batch {TEST_BATCH}; "
        "TENT's setting chosen on the corrupted validation split")


def verdicts(rows: list[Row], bn_rows: list[Row], measured: Measured,
             choices: dict[str, Any] | None) -> list[Verdict]:
    """The claims, each on BN-LeNet's mean error over corruptions at severity 5, paired over
    seeds (``b`` below ``a`` is ``direction=-1``)."""
    m = f"test error, mean over the corruptions at severity {ANCHOR}"
    small = f"at test batch {SMALL_BATCH}"
    claims: list[tuple[str, str, str, Callable, Callable, int, str]] = [
        ("BN-adapt lowers error under shift", "Schneider et al. 2020", f"{m}, BN-adapt − source",
         lambda x: severity_error(x, "source", ANCHOR), lambda x: severity_error(x, "bn-adapt", ANCHOR),
         -1, f"source {PAPER['source']:.1%} → BN-adapt {PAPER['bn-adapt']:.1%} (WRN-28-10, CIFAR-10-C)"),
        ("TENT lowers error further than BN-adapt", "Wang et al. 2021", f"{m}, TENT − BN-adapt",
         lambda x: severity_error(x, "bn-adapt", ANCHOR), lambda x: severity_error(x, "tent", ANCHOR),
         -1, f"BN-adapt {PAPER['bn-adapt']:.1%} → TENT {PAPER['tent']:.1%} (WRN-28-10, CIFAR-10-C)"),
        ("BN-adapt breaks at small test batches (error above the source model's)",
         "Schneider et al. 2020", f"{m} {small}, BN-adapt − source",
         lambda x: sweep_error(x, TEST_BATCH, "source"), lambda x: sweep_error(x, SMALL_BATCH, "bn-adapt"),
         1, "BN-adapt with N = 0 degrades at small batches; the prior N repairs it"),
        ("Schneider's prior mix repairs BN-adapt at small test batches", "Schneider et al. 2020",
         f"{m} {small}, prior N − BN-adapt (N = 0)",
         lambda x: sweep_error(x, SMALL_BATCH, "bn-adapt"), lambda x: sweep_error(x, SMALL_BATCH, "prior"),
         -1, "N chosen per batch size; ImageNet-C, ResNet-50"),
        ("a class-sorted stream breaks BN-adapt (error above the source model's)",
         "Boudiaf et al. 2022; Gong et al. 2022", f"{m}, class-sorted stream, BN-adapt − source",
         lambda x: stream_error(x, "class-sorted", "source"),
         lambda x: stream_error(x, "class-sorted", "bn-adapt"), 1,
         "non-i.i.d. test streams break batch-statistics adaptation"),
        ("a class-sorted stream breaks TENT (error above the source model's)",
         "Boudiaf et al. 2022; Gong et al. 2022", f"{m}, class-sorted stream, TENT − source",
         lambda x: stream_error(x, "class-sorted", "source"),
         lambda x: stream_error(x, "class-sorted", "tent"), 1,
         "non-i.i.d. test streams break TENT"),
        ("a class-imbalanced stream breaks BN-adapt (error above the source model's)",
         "Boudiaf et al. 2022", f"{m}, imbalanced stream ({DEFAULT_IMBALANCE:g} long tail), "
         "BN-adapt − source", lambda x: stream_error(x, "imbalanced", "source"),
         lambda x: stream_error(x, "imbalanced", "bn-adapt"), 1,
         "a shifted label distribution biases the batch statistics"),
        ("continual TENT (never reset) ends worse than TENT reset per corruption",
         "Wang et al. 2022 (CoTTA)", f"{m}, {len(CORRUPTIONS)} corruptions in a row, never − reset",
         lambda x: continual_error(x, "domain"), lambda x: continual_error(x, "never"), 1,
         "TENT's error accumulates over long continual streams (CIFAR-10-C, 15 corruptions)"),
    ]
    if choices is not None and tuple(choices["tent"]) != PAPER_TENT:
        claims.insert(2, (
            "TENT at the paper's setting (Adam 1e-3) lowers error further than BN-adapt",
            "Wang et al. 2021", f"{m}, TENT (Adam 1e-3) − BN-adapt",
            lambda x: severity_error(x, "bn-adapt", ANCHOR),
            lambda x: severity_error(x, "tent (paper)", ANCHOR), -1,
            f"BN-adapt {PAPER['bn-adapt']:.1%} → TENT {PAPER['tent']:.1%}"))
    bn_all = select(rows, bn=True)
    bad = sum(map(failed, bn_all))
    failed_text = f"{bad}/{len(bn_all)} source runs failed" if bad else ""
    if len(bn_rows) < 2 or choices is None:
        why = (f"fewer than two BN-LeNet source models trained (final validation accuracy above "
               f"{FAIL_ACCURACY})")
        return [not_measured(claim, source, measure, why, paper=paper, failed=failed_text)
                for claim, source, measure, _, _, _, paper in claims]
    return [judge_difference(claim, source, measure, by_seed(bn_rows, measured, a),
                             by_seed(bn_rows, measured, b), direction, paper=paper, note=NOTE,
                             failed=failed_text,
                             evidence="Beside the paper" if "lowers error" in claim
                             else "Where they break")
            for claim, source, measure, a, b, direction, paper in claims]


def findings(rows: list[Row], bn_rows: list[Row], measured: Measured,
             choices: dict[str, Any] | None) -> list[str]:
    if not bn_rows or choices is None:
        return []
    mean = lambda value: mean_ci(list(by_seed(bn_rows, measured, value).values()))[0]  # noqa: E731
    at5 = {k: mean(lambda x, k=k: severity_error(x, k, ANCHOR)) for k in ("source", "bn-adapt", "tent")}
    order = sorted(at5, key=at5.get, reverse=True)
    lines = [f"- Severity {ANCHOR}, mean error: source {at5['source']:.3f}, BN-adapt "
             f"{at5['bn-adapt']:.3f}, TENT {at5['tent']:.3f}: the order from highest to lowest "
             f"is {' > '.join(order)} (the paper's: source > bn-adapt > tent), "
             + ("the same." if order == ["source", "bn-adapt", "tent"] else "**not** the paper's.")]
    for label in MODELS:
        group = [r for r in select(rows, norm=label) if r.run_dir in measured]
        if label != "BN" and group:
            err = mean_ci([severity_error(measured[r.run_dir], "source", ANCHOR) for r in group])[0]
            lines.append(f"- {label} (nothing to adapt): mean error {err:.3f} at severity {ANCHOR}, "
                         f"vs BN-LeNet's source {at5['source']:.3f} and BN-adapt {at5['bn-adapt']:.3f}.")
    source = mean(lambda x: sweep_error(x, TEST_BATCH, "source"))
    above = {k: [b for b in BATCH_SIZES if mean(lambda x, b=b, k=k: sweep_error(x, b, k)) > source]
             for k in ("bn-adapt", "prior", "tent")}
    lines.append(f"- Test batch sizes with a mean error above the source model's ({source:.3f}): "
                 + "; ".join(f"{METHOD_NAMES[k]} {', '.join(map(str, sizes)) or 'none'}"
                             for k, sizes in above.items()) + " (means over seeds).")
    for order_name in ("imbalanced", "class-sorted"):
        cells = {k: mean(lambda x, k=k, o=order_name: stream_error(x, o, k))
                 for k in ("source", "bn-adapt", "tent")}
        lines.append(f"- {order_name} stream: source {cells['source']:.3f}, BN-adapt "
                     f"{cells['bn-adapt']:.3f}, TENT {cells['tent']:.3f} (i.i.d.: "
                     f"{at5['source']:.3f}, {at5['bn-adapt']:.3f}, {at5['tent']:.3f}).")
    never = [mean(lambda x, i=i: x["breaks"]["continual"][i]) for i in range(len(CORRUPTIONS))]
    reset = [mean(lambda x, n=n: x["test"][n][str(ANCHOR)]["tent"]) for n in CORRUPTIONS]
    lines.append("- Continual TENT minus TENT reset, per corruption in stream order: "
                 + ", ".join(f"{a - b:+.3f}" for a, b in zip(never, reset)) + ".")
    return lines


# --------------------------------------------------------------------------- calibration

def calibrate() -> list[Calibration]:
    """BN-adapt on a known mean shift (exact), the error measure on a two-class problem with a
    closed-form answer, and TENT's entropy on its batch."""
    return shift_calibration() + error_calibration() + entropy_calibration()


SHIFTS = (0.0, 0.1, 0.5)


def shift_calibration() -> list[Calibration]:
    """BN-LeNet (float64, untrained) on a batch and on the batch plus a constant δ: BN-adapt's
    logits unchanged (its first conv is unpadded, so δ is a per-channel constant there, which
    the batch mean removes); the source model's change grows with δ."""
    torch.manual_seed(0)
    model = build_model("bn-lenet", norm="bnlab").double().eval()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    adapt = TestTimeAdapter(model, "bn-adapt")
    source_clean, adapt_clean = model(x).detach(), adapt(x)
    out = []
    source_changes = []
    for delta in SHIFTS:
        with torch.no_grad():
            source_change = (model(x + delta) - source_clean).abs().max().item()
        adapt_change = (adapt(x + delta) - adapt_clean).abs().max().item()
        source_changes.append(source_change)
        grows = delta == 0 or source_change > source_changes[-2]
        ok = adapt_change < 1e-10 and (source_change == 0 if delta == 0 else source_change > 1e-6 and grows)
        out.append(Calibration(
            "BN-adapt on a mean shift (largest change of a logit)",
            f"BN-LeNet float64, 64 images + δ = {delta:g}", "BN-adapt 0 (< 1e-10); source "
            + ("0" if delta == 0 else "> 1e-6, growing with δ"),
            f"BN-adapt {adapt_change:.1e}, source {source_change:.3g}", ok))
    return out


def two_class_case(shift: float, n: int = 10000, dim: int = 4, separation: float = 2.0,
                   seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float, float]:
    """Two Gaussian classes at ±``separation`` along the first axis (unit variance), shifted by
    ``shift`` along it; a model BN(dim) -> Linear(dim, 2) that thresholds the first normalized
    feature at 0, its running statistics the clean mixture's. Returns the model, the shifted
    images (as (n, dim) features), labels, the source's closed-form error and the clean
    error (both from the normal CDF)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    sign = labels.double() * 2 - 1  # (n,) in {-1, +1}
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x[:, 0] += separation * sign + shift
    bn = bnn.BatchNorm1d(dim).double()
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.running_var[0] = 1 + separation ** 2  # the clean mixture's variance
    head = nn.Linear(dim, 2).double()
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0], head.weight[1, 0] = -1.0, 1.0
        head.bias.zero_()
    phi = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731 (the normal CDF)
    source = (phi(-(separation + shift)) + phi(-(separation - shift))) / 2
    return nn.Sequential(bn, head).eval(), x, labels, source, phi(-separation)


def error_calibration() -> list[Calibration]:
    """The error measure (``evaluate_stream``) on the two-class case: with a shift the source's
    error is its closed form and BN-adapt's the clean error; without, both the clean error."""
    out = []
    for shift in (0.0, 2.0):
        model, x, y, source, clean = two_class_case(shift)
        stream = [(b[0], b[1]) for b in _feature_batches(x, y)]
        read = {m: evaluate_stream(model, [("d", stream)], m).error for m in ("source", "bn-adapt")}
        ok = abs(read["source"] - source) < 0.01 and abs(read["bn-adapt"] - clean) < 0.01
        out.append(Calibration(
            "test error (evaluate_stream), source and BN-adapt",
            f"two Gaussian classes 4 apart, shifted by {shift:g} (10000 points, batch {TEST_BATCH})",
            f"source {source:.3f}, BN-adapt {clean:.3f} (± 0.01)",
            f"source {read['source']:.3f}, BN-adapt {read['bn-adapt']:.3f}", ok))
    return out


def _feature_batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(STREAM_SEED))
    return [(x[order[i:i + TEST_BATCH]], y[order[i:i + TEST_BATCH]])
            for i in range(0, len(y), TEST_BATCH)]


def entropy_calibration() -> list[Calibration]:
    """One TENT step (Adam) on a random batch of an untrained BN-LeNet: the batch's mean
    entropy falls, more at the larger rate; a GroupNorm model has nothing to adapt."""
    x = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    out = []
    drops = []
    for norm, lr in (("bnlab", 1e-3), ("bnlab", 1e-2), ("group", 1e-2)):
        torch.manual_seed(0)
        model = build_model("bn-lenet", norm=norm).eval()
        adapter = TestTimeAdapter(model, "tent", tent=TentSettings("adam", lr))
        before = softmax_entropy(adapter(x)).mean().item()  # the step's own forward
        with torch.no_grad():
            after = softmax_entropy(adapter.model(x)).mean().item()
        drop = before - after
        if norm == "bnlab":
            drops.append(drop)
            ok = drop > 0 and (len(drops) == 1 or drop > drops[0])
            expected = "falls" + (", by more than at 1e-3" if len(drops) == 2 else "")
        else:
            ok, expected = drop == 0, "unchanged (no batch norm to adapt)"
        name = "BN-LeNet" if norm == "bnlab" else "GroupNorm LeNet"
        out.append(Calibration("TENT: mean entropy of its batch after one step",
                               f"{name}, random batch of 128, Adam lr {lr:g}", expected,
                               f"{before:.4f} → {after:.4f} nats", ok))
    return out


# --------------------------------------------------------------------------- plots

def plot_severity(rows: list[Row], measured: Measured, scale: Scale, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, group, method in _columns(rows):
        points = {s: list(by_seed(group, measured, lambda m, s=s, k=method:
                                  severity_error(m, k, s)).values()) for s in (0, *scale.severities)}
        points = {s: v for s, v in points.items() if v}
        if points:
            plot_intervals(ax, points, ACCURACY, label=name)
    if not ax.lines:
        note_empty(ax, "no source model trained: nothing evaluated")
    ax.set_xticks([0, *scale.severities], ["clean", *map(str, scale.severities)])
    ax.set_xlabel("corruption severity")
    ax.set_ylabel(f"test error (mean over {len(CORRUPTIONS)} corruptions)")
    ax.set_title("Fashion-MNIST-C (mean, 95% CI over seeds)")
    legend(ax)
    save_figure(fig, path)


def plot_breaks(bn_rows: list[Row], measured: Measured, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    for method in ("source", "bn-adapt", "prior", "tent"):
        points = {b: list(by_seed(bn_rows, measured, lambda m, b=b, k=method:
                                  sweep_error(m, b, k)).values()) for b in BATCH_SIZES}
        points = {b: v for b, v in points.items() if v}
        if points:
            plot_intervals(ax, points, ACCURACY, label=METHOD_NAMES[method])
    log_axis(ax, "x", base=2, ticks=BATCH_SIZES, label="test batch size (images)")
    ax.set_ylabel(f"test error, severity {ANCHOR}")
    ax.set_title("small test batches")
    orders = ("iid", "imbalanced", "class-sorted")
    for method in ("source", "bn-adapt", "tent"):
        points = {i: list(by_seed(bn_rows, measured, lambda m, o=o, k=method:
                                  stream_error(m, o, k)).values()) for i, o in enumerate(orders)}
        points = {i: v for i, v in points.items() if v}
        if points:
            plot_intervals(axes[1], points, ACCURACY, label=METHOD_NAMES[method])
    axes[1].set_xticks(range(len(orders)), orders)
    axes[1].set_xlabel("test stream (batch 128)")
    axes[1].set_ylabel(f"test error, severity {ANCHOR}")
    axes[1].set_title("non-i.i.d. streams")
    for reset, label in (("domain", "TENT, reset per corruption"), ("never", "TENT, continual")):
        points = {i: list(by_seed(bn_rows, measured, (
            lambda m, n=name: m["test"][n][str(ANCHOR)]["tent"]) if reset == "domain" else (
            lambda m, i=i: m["breaks"]["continual"][i])).values()) for i, name in enumerate(CORRUPTIONS)}
        points = {i: v for i, v in points.items() if v}
        if points:
            plot_intervals(axes[2], points, ACCURACY, label=label)
    axes[2].set_xticks(range(len(CORRUPTIONS)), [c.replace("_", " ") for c in CORRUPTIONS],
                       rotation=60, ha="right")
    axes[2].set_xlabel("corruption, in stream order")
    axes[2].set_ylabel(f"test error, severity {ANCHOR}")
    axes[2].set_title("continual stream")
    for ax in axes:
        if not ax.lines:
            note_empty(ax, "no BN-LeNet source model trained: nothing adapted")
        legend(ax)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="adapt",
    title="Paper: test-time adaptation through batch norm (BN-adapt, TENT) on Fashion-MNIST-C",
    question="On Fashion-MNIST-C, does re-estimating batch norm's statistics on the test batches "
             "(BN-adapt) lower the error of BN-LeNet, does TENT lower it further (TENT's "
             "CIFAR-10-C order: source > BN-adapt > TENT), and where do they break: small test "
             "batches, class-sorted or imbalanced streams, a continual stream without reset?",
    variants=variants,
    analyze=analyze,
    default_epochs=10,
    default_subset=0,
    notes=f"Source models: BN-LeNet (bnlab's BN), and GroupNorm and LayerNorm LeNets as controls "
          f"with no batch statistics, SGD lr {SOURCE_LR:g}, batch 128, each run's final model. "
          f"Fashion-MNIST-C: the test set under {len(CORRUPTIONS)} corruptions at severities "
          f"1-5 (bnlab.data.corruptions). Methods: source, BN-adapt (N = 0; Schneider's prior N "
          f"in the batch-size sweep), TENT (one step per test batch on γ/β), test batch "
          f"{TEST_BATCH}, reset per corruption; TENT's optimizer/rate among "
          f"{[choice_name(c) for c in TENT_CHOICES]} and N among {[f'{n:g}' for n in PRIORS]} "
          "per batch size chosen on the corrupted validation split. Breaking tests at severity "
          f"{ANCHOR}: test batches {list(BATCH_SIZES)} (on a class-balanced part of the test "
          "set), class-sorted and class-imbalanced streams, a continual stream of the corruptions. "
          "The analysis evaluates every finished run (cached per run folder) and costs more "
          "than the training.",
)
