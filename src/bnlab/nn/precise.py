"""Precise batch-norm statistics: population mean and variance recomputed for a fixed model.

Why: the running averages are an exponential average over batches seen while the weights
were still moving, so they lag the final weights (and are wrong after weight averaging,
pruning or a change of input distribution). Re-estimating them on the final model with
the weights fixed gives the statistics prediction should use (Wu & Johnson, "Rethinking
'Batch' in BatchNorm", 2021: "precise BN").

What is computed, per batch-norm layer and channel: the mean and variance of the
layer's input over all values of ``num_batches`` batches, exactly as if the batches were
one batch. Batch b with ``m_b`` values per channel, mean ``mu_b`` and biased variance
``v_b`` is weighted by ``m_b``::

    mean = sum_b m_b mu_b / M                                       (M = sum_b m_b)
    var  = sum_b m_b (v_b + mu_b^2) / M - mean^2     (= E[mu_B^2 + var_B] - E[mu_B]^2)

accumulated in float64 with Chan et al.'s pairwise update (the same value, without the
cancellation of the last subtraction), and stored as batch norm stores it: the running
variance unbiased, ``var * M / (M - 1)``, the running mean ``mean``, in the buffers'
dtype. Batches may have different sizes.

During the passes the batch-norm layers are in training mode (each normalizes with its
batch's statistics, as in training, which is what the layers downstream were trained
on) and everything else in eval mode (dropout off). Afterwards the model is as it was
except for the layers' ``running_mean``/``running_var``: train/eval flags, parameters,
``.grad``, ``num_batches_tracked`` and every other buffer are restored; nothing is
differentiated.

Not offered: a debiased exponential average (Adam-style correction of the (0, 1)
initialisation). For a fixed model the exact aggregate above is what such an average
estimates, with no momentum to choose, at the same cost of one forward pass per batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from bnlab.nn.batchnorm import is_batch_norm

__all__ = ["batch_norm_layers", "update_bn_stats"]


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every batch norm with running statistics, torch's or bnlab's."""
    return [(name, m) for name, m in model.named_modules()
            if is_batch_norm(m) and getattr(m, "running_mean", None) is not None]


class _Moments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch (float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach().double(), dim=dims, correction=0)  # (C,)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.count = total

    def unbiased_var(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)


def _with_progress(batches: Iterable, total: int, progress: bool) -> Iterable:
    if not progress:
        return batches
    # tqdm belongs to the lab, not the library: `import bnlab.nn` must not load it.
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc="BN statistics", disable=None)


def _first_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError("expected batches of tensors or of (input, ...) tuples "
                    f"(got {type(batch).__name__})")


def update_bn_stats(model: nn.Module, batches: Iterable, num_batches: int = 200,
                    progress: bool = True) -> nn.Module:
    """Set every batch norm's running statistics to its input's population statistics.

    ``batches`` yields inputs of ``model`` (tensors, or tuples whose first item is the
    input, as a loader of ``(x, y)`` gives); the first ``num_batches`` are used, moved to
    the model's device. Returns ``model``, changed in place only in its batch norms'
    ``running_mean``/``running_var`` (see the module docstring for the formula and what
    is restored). Raises ``ValueError`` for a model without batch norms that have
    running statistics, for ``num_batches < 1`` and when ``batches`` yields nothing; on
    any error the model is left exactly as it was.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an integer >= 1 (got {num_batches!r})")
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError("the model has no batch-norm layer with running statistics "
                         "(torch's or bnlab's BatchNorm with track_running_stats=True)")
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()))
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    moments = {name: _Moments() for name, _ in layers}
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, acc=moments[name]: acc.add(args[0])) for name, layer in layers]
    seen = 0
    try:
        model.eval()
        for _, layer in layers:
            layer.train()
        with torch.no_grad():
            for batch in _with_progress(islice(batches, num_batches), num_batches, progress):
                model(_first_tensor(batch).to(reference.device))
                seen += 1
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for m, training in modes.items():
            m.train(training)
    if seen == 0:
        raise ValueError("update_bn_stats got no batches (the iterable was empty)")
    with torch.no_grad():
        for name, layer in layers:
            acc = moments[name]
            if acc.mean is None:  # a layer the forward never reached keeps its statistics
                continue
            layer.running_mean.copy_(acc.mean)
            layer.running_var.copy_(acc.unbiased_var())
    return model
