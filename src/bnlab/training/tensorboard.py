"""TensorBoard logging of a training run: losses, accuracies and the distributions BN acts on.

Why: researchers watch training in TensorBoard, and the chapter's story is about
distributions (of each layer's inputs, and of the γ, β and running statistics that BN
learns and keeps). A :class:`TensorBoardLogger` is an observer of a ``TrainingRun``: the
run calls ``epoch_end`` once per epoch and the logger writes, with
``torch.utils.tensorboard.SummaryWriter``:

- ``train/loss`` every step (x = global step), written when its epoch ends;
- ``epoch/train_loss``, ``epoch/train_acc``, ``epoch/val_loss``, ``epoch/val_acc``
  (x = epoch), the numbers of ``metrics.jsonl``;
- per epoch, for every batch-norm layer ``L`` (``bnlab.training.models.norm_layers``: named as
  the model names its slot, ``conv1`` .. ``fc2`` in BN-LeNet, ``block3.norm`` in a deep net), histograms
  ``bn/L/gamma``, ``bn/L/beta``, ``bn/L/running_mean``, ``bn/L/running_var`` and
  ``bn/L/input``: the layer's input activations on one fixed batch (the first
  ``FIXED_BATCH`` test images), computed in eval mode under ``no_grad`` so that neither the
  running statistics nor any random state move: a logged run ends with exactly the numbers
  of an unlogged one.

Logging is an output option, not a training setting: it is not part of ``TrainConfig``, so
it changes no run's config hash. ``tensorboard`` is an optional dependency
(``pip install 'bnlab[tensorboard]'``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.training.models import norm_layers
from bnlab.util.errors import BnlabError
from bnlab.util.scoped import in_mode, removing

FIXED_BATCH = 256
"""Test images whose activations at each BN layer's input are logged every epoch."""

EPOCH_SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc")
"""Keys of a ``metrics.jsonl`` row logged as ``epoch/<key>``."""

BN_STATISTICS = ("gamma", "beta", "running_mean", "running_var")
_BN_ATTRIBUTES = {"gamma": "weight", "beta": "bias", "running_mean": "running_mean",
                  "running_var": "running_var"}


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a :class:`BnlabError` naming the extra."""
    try:  # the optional extra [tensorboard]: imported only when asked for
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise BnlabError(
            f"--tensorboard needs the tensorboard package ({exc}); install it with "
            "pip install 'bnlab[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLogger:
    """Writes one run's event files into ``logdir``; use as a context manager (closes them).

    A resumed run logged into the same ``logdir`` continues its curves from the next epoch.
    """

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.writer = summary_writer_class()(log_dir=str(self.logdir))
        self._fixed_batch: torch.Tensor | None = None

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.writer.close()

    def epoch_end(self, run: Any, epoch: int, step_losses: list[float],
                  row: dict[str, Any] | None) -> None:
        """Log epoch ``epoch`` of ``run`` (a ``TrainingRun``): its step losses and, unless it
        diverged (``row is None``), its metrics row and the BN histograms."""
        first_step = sum(len(losses) for losses in run.step_losses[:epoch - 1])
        for i, loss in enumerate(step_losses):
            self.writer.add_scalar("train/loss", loss, first_step + i + 1)
        if row is not None:
            for key in EPOCH_SCALARS:
                self.writer.add_scalar(f"epoch/{key}", row[key], epoch)
            self.log_norm_layers(run.model, self.fixed_batch(run.loaders.test), epoch)
        self.writer.flush()

    def fixed_batch(self, loader) -> torch.Tensor:
        """The first ``FIXED_BATCH`` test images (the test loader is not shuffled)."""
        if self._fixed_batch is None:
            x, _ = next(iter(loader))  # (B, 1, 28, 28)
            self._fixed_batch = x[:FIXED_BATCH]
        return self._fixed_batch

    def log_norm_layers(self, model: nn.Module, batch: torch.Tensor, epoch: int) -> None:
        """Histograms of every BN layer's statistics and of its inputs on ``batch``."""
        layers = norm_layers(model)
        for name, layer in layers:
            for key in BN_STATISTICS:
                value = getattr(layer, _BN_ATTRIBUTES[key], None)
                if value is not None:
                    self.writer.add_histogram(f"bn/{name}/{key}", value.detach().cpu(), epoch)
        for name, inputs in layer_inputs(model, layers, batch).items():
            self.writer.add_histogram(f"bn/{name}/input", inputs, epoch)


@contextlib.contextmanager
def optional_logger(logdir: str | Path | None) -> Iterator[TensorBoardLogger | None]:
    """A :class:`TensorBoardLogger` into ``logdir``, closed on exit; None without a logdir."""
    if logdir is None:
        yield None
        return
    with TensorBoardLogger(logdir) as logger:
        yield logger


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: list[tuple[str, nn.Module]],
                 batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's input on ``batch``, from one forward in eval mode (the mode is restored)."""
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[name] = args[0].detach().float().cpu()  # (B, C, ...) as the layer sees it
        return hook

    handles = [layer.register_forward_pre_hook(capture(name)) for name, layer in layers]
    with removing(handles), in_mode(model, False):
        model(batch)
    return captured
