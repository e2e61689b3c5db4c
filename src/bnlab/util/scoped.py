"""Temporary changes to a model, undone on exit: its mode, its hooks, its parameters.

Why: measurements (evaluation, probes of the loss landscape, internal covariate shift,
TensorBoard's layer inputs) switch a model to eval or train mode, hook its layers or move
its weights, and must leave it exactly as they found it, also when they raise. Each
context manager here undoes one kind of change in a ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model`` in train (``training=True``) or eval mode inside the block; the mode it
    had before is restored afterwards (one flag for the whole model, as ``model.train``
    sets it)."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def removing(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Removes the hooks behind ``handles`` (``register_forward_hook`` and friends) on exit."""
    handles = list(handles)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def restored_values(tensors: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The values ``tensors`` (parameters, say) hold now are copied back into them on exit.
    Yields those saved values (copies, in the order given)."""
    tensors = list(tensors)
    saved = [t.detach().clone() for t in tensors]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` (BN running mean/var, batch counts) on exit."""
    with restored_values(model.buffers()):
        yield
