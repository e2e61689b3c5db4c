"""Training: minibatch SGD with per-epoch evaluation, checkpoints, resume and divergence.

Why: the chapter's claims are about training curves, so the trainer's numbers must be
trustworthy: ``train_one_epoch`` and ``evaluate`` are separate (evaluation always in eval
mode under no_grad, the caller's mode restored), every epoch is checkpointed atomically,
a resumed run ends with exactly the metrics of an uninterrupted one (data order is a pure
function of (seed, epoch); RNG state travels in the checkpoint), and a non-finite loss is
recorded as a result ("diverged") instead of crashing an experiment grid.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bnlab.data.dataset import TRAIN_SIZE, FashionMNIST
from bnlab.data.loader import Loader, stratified_subset
from bnlab.data.split import validation_split
from bnlab.nn.frozen import freeze_batch_norm
from bnlab.nn.precise import update_bn_stats
from bnlab.probes.spherical import SphericalMotionMonitor, scale_invariant_weights, weight_layers
from bnlab.training import runs
from bnlab.training.deep import check_architecture
from bnlab.training.models import MODEL_OPTIONS, build_model, check_norm, has_norm_layers, parse_norm_slots
from bnlab.training.norms import NORMS, check_norm_name, uses_batch_statistics
from bnlab.training.resnet import BLOCKS, RESIDUALS, SHORTCUTS, check_resnet
from bnlab.training.trainable import TRAIN_ONLY, restrict_training, trainable_masks
from bnlab.training.weight_decay import decay_groups
from bnlab.util.config import (
    OMIT_AT_DEFAULT,
    check,
    check_at_least,
    check_finite_at_least,
    config_to_dict,
)
from bnlab.util.denormals import denormals_flushed
from bnlab.util.errors import ConfigError
from bnlab.util.plots import plot_curves
from bnlab.util.scoped import in_mode

DEFAULT_VAL_SIZE = 10000
"""Training images held out as the validation split by default (``TrainConfig.val_size``)."""

SUBSET_HELP = ("train on a class-balanced subset of N training images (0 = all that the "
               "validation split leaves); the validation split and the test set stay whole")


def training_images(subset: int, val_size: int = DEFAULT_VAL_SIZE, n_train: int = TRAIN_SIZE) -> int:
    """How many images an epoch trains on: ``subset``, or all that the validation split of
    ``val_size`` leaves of the ``n_train`` training images when it is 0."""
    return subset or n_train - val_size


def describe_training_set(subset: int, val_size: int = DEFAULT_VAL_SIZE) -> str:
    """The training data in words, e.g. for a report: "all 50000 training images that the
    validation split of 10000 leaves"."""
    images = (f"all {training_images(0, val_size)} training images" if not subset
              else f"a class-balanced subset of {subset} training images")
    return f"{images}, {describe_validation(val_size)}"


def describe_validation(val_size: int) -> str:
    """Where choices are made, in words."""
    if not val_size:
        return ("no validation split: the test set is the validation set (the chapter's "
                "protocol), so val and test numbers are the same")
    return (f"{val_size} other training images held out as the validation split (choices "
            "are made on it; the test set is for reporting)")


def drops_last_batch(n_images: int, batch_size: int) -> bool:
    """Whether training drops an epoch's last batch: it does when that batch would hold one image,
    since batch norm cannot normalize a single value per channel."""
    return n_images % batch_size == 1


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Training steps of one epoch over ``n_images`` (a last batch of one is dropped)."""
    full, rest = divmod(n_images, batch_size)
    return full if rest == 0 or drops_last_batch(n_images, batch_size) else full + 1


@dataclass
class TrainConfig:
    """One training run. Defaults are the chapter's: SGD, lr 0.1, batch 128, 10 epochs."""

    model: str = field(default="bn-lenet", metadata={"help": "model", "choices": tuple(MODEL_OPTIONS)})
    norm: str = field(default="bnlab", metadata={
        "help": f"norm layer (bnlab.training.norms): one of {', '.join(NORMS)}, or ghost:V "
                "(virtual batch V) / noisy-bn:S (strength S), or a plug-in: MODULE:ATTR[:VALUE] "
                "or an entry point of bnlab.norms (README: Add your own norm); lenet takes "
                "only 'none'"})
    norm_slots: str = field(default="all", metadata={
        "help": "where bn-lenet has norm layers: all, none, conv, fc or a comma list of "
                "conv1,conv2,fc1,fc2"})
    dropout: float = field(default=0.0, metadata={
        "help": "bn-lenet: dropout probability in the two hidden FC blocks (0 = none)"})
    dropout_order: str = field(default="after", metadata={
        "help": "bn-lenet: dropout 'after' the activation or 'before' the norm",
        "choices": ("after", "before")})
    depth: int = field(default=20, metadata={"help": "deep-mlp/deep-cnn: number of weight layers"})
    width: int = field(default=64, metadata={"help": "deep-mlp: hidden width; deep-cnn: channels"})
    activation: str = field(default="sigmoid", metadata={
        "help": "deep-mlp/deep-cnn: activation", "choices": ("sigmoid", "tanh", "relu")})
    shortcut: str = field(default="identity", metadata={
        "help": "resnet*: shortcut where a block changes shape: identity (He et al.'s option A: "
                "subsample, zero-pad the new channels) or projection (option B: 1x1 conv, norm)",
        "choices": SHORTCUTS, OMIT_AT_DEFAULT: True})
    residual: str = field(default="standard", metadata={
        "help": "resnet*: residual branch: standard (conv-norm-relu-conv-norm), skipinit (times "
                "a scalar initialized at 0; De & Smith use it with --norm none) or fixup (Zhang "
                "et al.'s scalar biases, multiplier and initialization; --norm none only)",
        "choices": RESIDUALS, OMIT_AT_DEFAULT: True})
    block: str = field(default="post", metadata={
        "help": "resnet*: block layout: post (He et al. 2016a: relu(branch(x) + shortcut(x))) or "
                "pre (He et al. 2016b: branch(x) + shortcut(x), the branch norm-relu-conv-norm-"
                "relu-conv; not with fixup)",
        "choices": BLOCKS, OMIT_AT_DEFAULT: True})
    train_only: str = field(default="all", metadata={
        "help": "which parameters train: all; bn (only every batch norm's gamma/beta, all else "
                "frozen at its initialization); random (as many randomly chosen other entries, "
                "drawn with --seed, all else frozen) (bnlab.training.trainable)",
        "choices": TRAIN_ONLY, OMIT_AT_DEFAULT: True})
    fuse_activation: bool = field(default=True, metadata={
        "help": "run each of bnlab's batch norms and the activation after it as one module "
                "(bnlab.nn.BatchNormAct: one pass of the C++ kernel); the same numbers as "
                "unfused", OMIT_AT_DEFAULT: True})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate"})
    batch_size: int = field(default=128, metadata={"help": "training minibatch size"})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay"})
    seed: int = field(default=0, metadata={"help": "seed of weights, data order and dropout"})
    subset: int = field(default=0, metadata={"help": SUBSET_HELP})
    val_size: int = field(default=DEFAULT_VAL_SIZE, metadata={
        "help": "training images held out as the validation split (seeded, class-stratified, "
                "the same for every run; choices are made on it, the test set is for "
                "reporting); 0 = none: the test set is the validation set, as in the chapter"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu, cuda"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the training step (compiles before epoch 1)"})
    eval_batch_size: int = field(default=1000, metadata={"help": "batch size of evaluation"})
    eval_every: int = field(default=0, metadata={
        "help": "also evaluate every N training steps (0 = only after each epoch)"})
    freeze_bn_epochs: int = field(default=0, metadata={
        "help": "train the last N epochs with every batch norm frozen at its population "
                "statistics, computed once when that phase starts (bnlab.nn.precise.update_bn_stats "
                "over one pass of the training set, then bnlab.nn.frozen.freeze_batch_norm; "
                "Wu & Johnson 2021's remedy for train-test inconsistency); 0 = never",
        OMIT_AT_DEFAULT: True})
    norm_weight_decay: bool = field(default=True, metadata={
        "help": "apply weight_decay to the norm layers' gamma/beta (--no-norm-weight-decay: "
                "not; bnlab.training.weight_decay)", OMIT_AT_DEFAULT: True})
    invariant_weight_decay: bool = field(default=True, metadata={
        "help": "apply weight_decay to the scale-invariant weights, those feeding a batch norm "
                "(--no-invariant-weight-decay: not; bnlab.probes.spherical)", OMIT_AT_DEFAULT: True})
    spherical_every: int = field(default=0, metadata={
        "help": "record, for every conv/linear weight, its norm, effective learning rate and "
                "angular update per step, averaged over windows of N steps, with their "
                "equilibrium predictions, in each epoch's metrics row (bnlab.probes.spherical; "
                "0 = off; the run's numbers are unchanged)", OMIT_AT_DEFAULT: True})
    flush_denormal: bool = field(default=True, metadata={
        "help": "flush denormal floats to zero on CPU while training and evaluating "
                "(bnlab.util.denormals: where the CPU is slow at them, a saturated net otherwise "
                "runs many times slower per step)",
        OMIT_AT_DEFAULT: True})

    def __post_init__(self) -> None:
        try:
            check_norm_name(self.norm)
            check_norm(self.model, self.norm)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        unused = [f.name for f in dataclasses.fields(self) if f.name in _ALL_MODEL_OPTIONS
                  and f.name not in MODEL_OPTIONS[self.model] and getattr(self, f.name) != f.default]
        check(not unused, f"{unused} set, but model {self.model!r} takes only "
                          f"{list(MODEL_OPTIONS[self.model])}")
        check_at_least(self, 1, "epochs", "batch_size", "eval_batch_size")
        check_at_least(self, 0, "seed", "subset", "val_size", "eval_every", "freeze_bn_epochs",
                       "spherical_every")
        check(self.freeze_bn_epochs < self.epochs or not self.freeze_bn_epochs,
              f"expected freeze_bn_epochs < epochs (got {self.freeze_bn_epochs} of "
              f"{self.epochs}): the statistics are those of a model trained for some epochs")
        check(math.isfinite(self.lr) and self.lr > 0, f"expected a finite lr > 0 (got {self.lr})")
        check_finite_at_least(self, 0, "momentum", "weight_decay")
        check(0 <= self.dropout < 1, f"expected dropout in [0, 1) (got {self.dropout})")
        options = MODEL_OPTIONS[self.model]
        try:
            slots = parse_norm_slots(self.norm_slots) if "norm_slots" in options else ("all",)
            if "depth" in options:
                check_architecture(self.depth, self.width, self.activation)
            if "residual" in options:
                check_resnet(self.shortcut, self.residual, self.norm, self.block)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        has_batch_norms = uses_batch_statistics(self.norm) and has_norm_layers(self.model) and bool(slots)
        check(not has_batch_norms or self.batch_size >= 2,
              f"batch norm needs batch_size >= 2: a batch of one has one value per channel "
              f"(got {self.batch_size})")
        check(not self.freeze_bn_epochs or has_batch_norms,
              f"freeze_bn_epochs needs a model with batch norms (got model {self.model!r}, "
              f"norm {self.norm!r}, norm_slots {self.norm_slots!r})")
        check(self.train_only in TRAIN_ONLY,
              f"expected train_only in {list(TRAIN_ONLY)} (got {self.train_only!r})")
        check(self.train_only == "all" or has_batch_norms,
              f"train_only {self.train_only!r} needs a model with batch norms (got model "
              f"{self.model!r}, norm {self.norm!r})")
        check(self.train_only == "all" or not self.freeze_bn_epochs,
              "train_only and freeze_bn_epochs do not go together: freezing makes batch norm's "
              "gamma and beta buffers")
        check(self.train_only == "all" or not self.spherical_every,
              f"spherical_every follows every conv/linear weight as it trains: it needs "
              f"train_only 'all' (got {self.train_only!r})")
        check_device_name(self.device)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_ALL_MODEL_OPTIONS = {option for options in MODEL_OPTIONS.values() for option in options}


def model_for(config: TrainConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The initialized model ``config`` describes (seed torch's RNG first)."""
    options = {name: getattr(config, name) for name in MODEL_OPTIONS[config.model]}
    return build_model(config.model, config.norm, device, **options)


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when not asked for; when asked for, only on a terminal (None),
    so logs get the per-epoch lines without thousands of carriage-return updates."""
    return None if progress else True


def check_device_name(name: str) -> None:
    """ConfigError unless ``name`` is ``auto`` or a device torch can name (available or not:
    a config written on a GPU machine stays readable on a CPU one)."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"expected device auto, cpu, cuda or cuda:N (got {name!r})") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch spells it."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""A training step ``(x, y) -> (loss, logits)``, both detached."""


class Loaders(NamedTuple):
    """A run's data: training batches, the validation split and the test set (``val`` is
    ``test`` itself when the config holds out no validation split)."""

    train: Loader
    val: Loader
    test: Loader


@dataclass
class EpochResult:
    loss: float  # mean training loss over the epoch's steps
    accuracy: float  # training accuracy over the epoch (batch-norm in train mode)
    seconds: float
    images: int
    step_losses: list[float]
    diverged_step: int | None = None  # 1-based step of the first non-finite loss


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    step_fn: Step | None = None,
    progress: tqdm | None = None,
    after_step: Callable[[int, float], float] | None = None,
) -> EpochResult:
    """One pass of minibatch SGD in train mode; stops at the first non-finite loss.

    ``after_step(step, train_seconds_so_far)`` runs after every step (for periodic
    evaluation) and returns the seconds it took, which are not counted as training time.
    """
    step_fn = step_fn or make_step(model, optimizer)
    model.train()
    losses: list[float] = []
    correct = images = 0
    start = time.perf_counter()
    paused = 0.0
    for x, y in batches:
        loss, logits = step_fn(x, y)
        loss_value = loss.item()
        losses.append(loss_value)
        if not math.isfinite(loss_value):
            return EpochResult(math.nan, math.nan, time.perf_counter() - start - paused, images,
                               losses, diverged_step=len(losses))
        correct += (logits.argmax(dim=1) == y).sum().item()
        images += y.numel()
        if after_step is not None:
            paused += after_step(len(losses), time.perf_counter() - start - paused)
        if progress is not None:
            progress.update(1)
            if len(losses) % 10 == 0:
                rate = images / (time.perf_counter() - start - paused)
                progress.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{rate:,.0f}")
    seconds = time.perf_counter() - start - paused
    return EpochResult(statistics.fmean(losses), correct / images, seconds, images, losses)


def optimizer_for(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """The optimizer ``config`` trains ``model`` with: SGD with its lr, momentum and weight decay
    (on the parameter groups of ``bnlab.training.weight_decay.decay_groups``).

    With ``config.train_only`` other than ``all``, the entries it does not train are frozen in
    ``model`` first, in place (``bnlab.training.trainable``; the choice depends on ``config.seed``).
    """
    groups = decay_groups(model, config.weight_decay, config.norm_weight_decay,
                          config.invariant_weight_decay)
    masks = trainable_masks(model, config.train_only, config.seed)
    return torch.optim.SGD(restrict_training(model, groups, masks), lr=config.lr,
                           momentum=config.momentum)


def seeded_steps(configs: dict[str, TrainConfig], device: torch.device | str) -> dict[str, Step]:
    """Per name, the training step (``make_step``) of a fresh model of that config in train
    mode, torch's RNG seeded with ``config.seed`` before each model is built (so configs
    that differ only in their norm start from the same weights)."""
    steps = {}
    for name, config in configs.items():
        torch.manual_seed(config.seed)
        model = model_for(config, device).train()
        steps[name] = make_step(model, optimizer_for(model, config))
    return steps


def step_for(model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig) -> Step:
    """The training step ``config`` trains ``model`` with: :func:`make_step`, on
    ``torch.compile(model)`` when ``config.compile``."""
    return make_step(torch.compile(model) if config.compile else model, optimizer)


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Step:
    """A training step ``(x, y) -> (loss, logits)``: forward, cross-entropy, backward, update."""

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)  # (N, 10)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        return loss.detach(), logits.detach()

    return step


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``batches`` in eval mode; the mode is restored."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = count = 0
    with in_mode(model, False):
        for x, y in batches:
            logits = model(x)  # (N, 10)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
            correct += (logits.argmax(dim=1) == y).sum().item()
            count += y.numel()
    return loss_sum.item() / count, correct / count


class TrainingRun:
    """A run that advances one epoch at a time: ``train`` runs it to the end, the demo
    interleaves several with ``train_next_epoch``. Make one with :func:`start_run`.

    ``loaders.train`` must have ``set_epoch(epoch)`` and ``len()`` (``bnlab.data.loader.Loader``):
    its order depends only on (seed, epoch), which is what makes resume exact. Every epoch
    ends with an evaluation on ``loaders.val`` (``val_*`` in the metrics) and ``loaders.test``
    (``test_*``); without a validation split they are the same loader, evaluated once. With
    ``run_dir`` every epoch is checkpointed and the run folder files are written
    (``bnlab.training.runs``); ``resume=True`` continues from the last checkpoint there.
    ``observer.epoch_end(run, epoch, step_losses, row)`` (e.g. ``bnlab.training.tensorboard``) is
    called after each epoch, ``row`` None when it diverged.
    """

    def __init__(self, model: nn.Module, loaders: Loaders, config: TrainConfig,
                 run_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = True, label: str = "", observer: Any = None) -> None:
        self.model, self.config, self.progress = model, config, progress
        self.observer = observer
        self.label = label
        self.loaders = loaders
        self.train_loader = loaders.train
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.optimizer = optimizer_for(model, config)
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[list[float]] = []
        self.evals: list[dict[str, Any]] = []  # every config.eval_every steps
        self.diverged: dict[str, int] | None = None
        # config.spherical_every: the monitor only reads the weights around each step, so the
        # run's numbers are those of an unmonitored run; its windows go into the metrics rows,
        # which the checkpoint carries, so a resumed run keeps them.
        self.spherical = (SphericalMotionMonitor(weight_layers(model)).attach(self.optimizer)
                          if config.spherical_every else None)
        if self.run_dir is not None:
            checkpoint = runs.prepare(self.run_dir, config_to_dict(config), resume,
                                      required=CHECKPOINT_KEYS,
                                      known=[f.name for f in dataclasses.fields(TrainConfig)])
            if checkpoint is not None:
                self._restore(checkpoint)
                # A kill after the checkpoint's rename left the history files one epoch behind
                # (or a file was damaged): the checkpoint holds the history, so rewrite what
                # disagrees with it. Files that agree are not touched.
                runs.write_history(self.run_dir, self.history, self.step_losses, self.evals)
        self._step = step_for(model, self.optimizer, config)
        self.bn_frozen = False
        frozen = config.freeze_bn_epochs
        if frozen and len(self.history) > config.epochs - frozen:
            self._freeze_batch_norms(recompute=False)  # resumed: the checkpoint holds them

    @property
    def done(self) -> bool:
        return self.diverged is not None or len(self.history) >= self.config.epochs

    def train_next_epoch(self) -> dict[str, Any] | None:
        """Train and evaluate one epoch; return its metrics row (None if it diverged)."""
        epoch = len(self.history) + 1
        self.train_loader.set_epoch(epoch)
        if self._in_frozen_phase() and not self.bn_frozen:
            self._freeze_batch_norms(recompute=True)
        bar = tqdm(total=len(self.train_loader),
                   desc=f"{self.label + ' ' if self.label else ''}epoch {epoch}/{self.config.epochs}",
                   unit="step", leave=False, disable=bar_disabled(self.progress),
                   dynamic_ncols=True)
        with bar, denormals_flushed(self.config.flush_denormal):
            result = train_one_epoch(self.model, self.train_loader, self.optimizer, self._step, bar,
                                     self._periodic_evaluation(epoch))
        self.step_losses.append(result.step_losses)
        if result.diverged_step is not None:
            self._observe(epoch, result.step_losses, None)
            self.diverged = {"epoch": epoch, "step": result.diverged_step}
            self._log(f"epoch {epoch}: loss is not finite at step {result.diverged_step}; "
                      "stopping (diverged)")
            self._checkpoint()
            return None
        eval_start = time.perf_counter()
        with denormals_flushed(self.config.flush_denormal):
            val_loss, val_acc = evaluate(self.model, self.loaders.val)
            test_loss, test_acc = ((val_loss, val_acc) if self.loaders.val is self.loaders.test
                                   else evaluate(self.model, self.loaders.test))
        eval_seconds = time.perf_counter() - eval_start
        row = {
            "epoch": epoch,
            "train_loss": result.loss,
            "train_acc": result.accuracy,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "seconds": result.seconds + eval_seconds,
            "train_seconds": result.seconds,
            "eval_seconds": eval_seconds,
            "images_per_s": result.images / result.seconds,
            # CPU reductions split over threads round differently: a replay of the run
            # (experiments.probed) needs the count to retrace the same weights.
            "threads": torch.get_num_threads(),
        }
        if self.spherical is not None:
            steps_before = sum(len(losses) for losses in self.step_losses[:-1])
            invariant = frozenset(name for name, _ in scale_invariant_weights(self.model))
            row["spherical"] = self.spherical.take_windows(epoch, self.config.spherical_every,
                                                           steps_before, invariant)
        self.history.append(row)
        self._log(format_epoch(row, self.config.epochs))
        self._observe(epoch, result.step_losses, row)
        self._checkpoint()
        return row

    def _in_frozen_phase(self) -> bool:
        """Whether the next epoch is one of the last ``config.freeze_bn_epochs``."""
        frozen = self.config.freeze_bn_epochs
        return bool(frozen) and len(self.history) >= self.config.epochs - frozen

    def _freeze_batch_norms(self, recompute: bool) -> None:
        """Replace every batch norm by a frozen one (``bnlab.nn.frozen``); with ``recompute``, its
        statistics are first set to the population statistics of the current weights over one
        pass of the training set (``bnlab.nn.precise.update_bn_stats``, in this epoch's order)."""
        if recompute:
            with denormals_flushed(self.config.flush_denormal):
                update_bn_stats(self.model, self.train_loader, len(self.train_loader),
                                progress=False)
        freeze_batch_norm(self.model)  # in place: the model object stays the same
        self._step = step_for(self.model, self.optimizer, self.config)
        self.bn_frozen = True

    def _observe(self, epoch: int, step_losses: list[float], row: dict[str, Any] | None) -> None:
        if self.observer is not None:
            self.observer.epoch_end(self, epoch, step_losses, row)

    def _periodic_evaluation(self, epoch: int) -> Callable[[int, float], float] | None:
        """The ``after_step`` hook that evaluates every ``config.eval_every`` global steps."""
        every = self.config.eval_every
        if not every:
            return None
        steps_before = sum(len(losses) for losses in self.step_losses)
        seconds_before = sum(row["train_seconds"] for row in self.history)

        def after_step(step: int, train_seconds: float) -> float:
            if (steps_before + step) % every:
                return 0.0
            start = time.perf_counter()
            val_loss, val_acc = evaluate(self.model, self.loaders.val)
            seconds = time.perf_counter() - start
            self.evals.append({"step": steps_before + step, "epoch": epoch, "val_loss": val_loss,
                               "val_acc": val_acc, "train_seconds": seconds_before + train_seconds,
                               "eval_seconds": seconds})
            return seconds

        return after_step

    def train(self) -> dict[str, Any]:
        """Train to the last epoch (or divergence) and return the summary (see ``finish``)."""
        while not self.done:
            self.train_next_epoch()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """The summary; with a run folder, also ``curves.png`` and then ``summary.json``.

        ``summary.json`` is written last, since it marks the run finished; a finished run
        whose files already say all this is not written to at all (it may be read-only).
        """
        summary = summarize(self.history, self.config.epochs, self.diverged)
        if self.run_dir is not None and not (runs.summary_is_current(self.run_dir, summary)
                                             and (self.run_dir / runs.CURVES).exists()):
            plot_curves(self.history, self.run_dir / runs.CURVES, title=describe(self.config),
                        diverged=self.diverged)
            runs.write_summary(self.run_dir, summary)
        return summary

    def _log(self, line: str) -> None:
        if self.progress:
            tqdm.write(f"{self.label}: {line}" if self.label else line)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError) as exc:  # weights of another model, say
            raise runs.RunFileError(
                f"{self.run_dir / runs.CHECKPOINT}: does not fit the model of {runs.CONFIG} "
                f"({str(exc).splitlines()[0]}); delete {self.run_dir} to train the run again"
            ) from None
        self.history, self.step_losses = checkpoint["history"], checkpoint["step_losses"]
        self.evals = checkpoint["evals"]
        self.diverged = checkpoint["diverged"]
        torch.set_rng_state(checkpoint["rng"])
        if checkpoint["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])

    def _checkpoint(self) -> None:
        if self.run_dir is None:
            return
        runs.save_checkpoint(self.run_dir, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "step_losses": self.step_losses,
            "evals": self.evals,
            "diverged": self.diverged,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        })
        runs.write_history(self.run_dir, self.history, self.step_losses, self.evals)


CHECKPOINT_KEYS = ("model", "optimizer", "history", "step_losses", "evals", "diverged", "rng",
                   "cuda_rng")


def format_epoch(row: dict[str, Any], epochs: int) -> str:
    return (f"epoch {row['epoch']:>2}/{epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f} | val loss {row['val_loss']:.4f} "
            f"acc {row['val_acc']:.4f} | test acc {row['test_acc']:.4f} | {row['seconds']:.1f} s "
            f"({row['images_per_s']:,.0f} img/s)")


def summarize(history: list[dict[str, Any]], epochs: int, diverged: dict[str, int] | None) -> dict[str, Any]:
    """Final and best validation accuracy (the best epoch chosen on validation, and the test
    accuracy at it), final test accuracy, time per epoch, and whether the run diverged."""
    seconds = [row["seconds"] for row in history]
    best = max(history, key=lambda row: row["val_acc"], default=None)
    last = history[-1] if history else {}
    return {
        "epochs": epochs,
        "epochs_completed": len(history),
        "final_val_acc": last.get("val_acc"),
        "final_val_loss": last.get("val_loss"),
        "final_test_acc": last.get("test_acc"),
        "final_test_loss": last.get("test_loss"),
        "final_train_acc": last.get("train_acc"),
        "best_val_acc": best["val_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "test_acc_at_best_epoch": best["test_acc"] if best else None,
        "mean_seconds_per_epoch": statistics.fmean(seconds) if seconds else None,
        "median_seconds_per_epoch": statistics.median(seconds) if seconds else None,
        "median_images_per_s": statistics.median(r["images_per_s"] for r in history) if history else None,
        "diverged": diverged is not None,
        "diverged_at": diverged,
    }


def describe(config: TrainConfig) -> str:
    """A short human label, e.g. ``bn-lenet (bnlab) lr=0.1 bs=128 seed=0``; the ResNet options and
    ``train_only`` are named where they are not the default (``residual=fixup``)."""
    norm = ""
    if has_norm_layers(config.model):
        slots = "" if config.norm_slots == "all" else f" @ {config.norm_slots}"
        norm = f" ({config.norm}{slots})"
    changed = {name: getattr(config, name) for name in ("shortcut", "residual", "block", "train_only")
               if getattr(config, name) != _DEFAULTS[name]}
    extra = "".join(f" {name}={value}" for name, value in changed.items())
    return f"{config.model}{norm}{extra} lr={config.lr:g} bs={config.batch_size} seed={config.seed}"


def build_loaders(config: TrainConfig, dataset: FashionMNIST,
                  device: torch.device | str) -> Loaders:
    """Training, validation and test loaders of ``dataset`` for ``config``.

    ``config.val_size`` training images are held out as the validation split
    (``bnlab.data.split``); ``config.subset`` then takes a class-balanced subset of the
    rest. The validation split and the test set are always whole. A final training batch of
    one image is dropped, since batch norm cannot train on one value per channel.
    """
    (images, labels), (val_images, val_labels) = validation_split(
        dataset.train_images, dataset.train_labels, config.val_size)
    if config.subset:
        images, labels = stratified_subset(images, labels, config.subset)
    train = Loader(images, labels, config.batch_size, shuffle=True, seed=config.seed,
                   drop_last=drops_last_batch(len(labels), config.batch_size), device=device)
    test = Loader(dataset.test_images, dataset.test_labels, config.eval_batch_size,
                  shuffle=False, device=device)
    val = test if not config.val_size else Loader(val_images, val_labels, config.eval_batch_size,
                                                  shuffle=False, device=device)
    return Loaders(train, val, test)


def start_run(config: TrainConfig, dataset: FashionMNIST, run_dir: str | Path | None = None,
              resume: bool = False, progress: bool = True, label: str = "",
              observer: Any = None) -> TrainingRun:
    """The one way to train ``config`` on ``dataset``: a seeded :class:`TrainingRun`, not yet
    trained. ``start_run(...).train()`` trains it to the end and returns its summary.
    ``observer``: see :class:`TrainingRun`."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = model_for(config, device)
    loaders = build_loaders(config, dataset, device)
    return TrainingRun(model, loaders, config, run_dir, resume, progress, label, observer)
