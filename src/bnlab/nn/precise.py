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

``population_statistics`` returns the same statistics for several numbers of batches from
one pass (the counts are prefixes of one stream), without setting them: how many samples
an estimate needs, for the cost of the largest.

Not offered: a debiased exponential average (Adam-style correction of the (0, 1)
initialisation). For a fixed model the exact aggregate above is what such an average
estimates, with no momentum to choose, at the same cost of one forward pass per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

import torch
from torch import nn

from bnlab.nn.batchnorm import is_batch_norm

__all__ = ["Statistics", "batch_norm_layers", "population_statistics", "update_bn_stats"]


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


Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per batch-norm layer name: ``(running_mean, running_var)`` as batch norm stores them."""


def population_statistics(model: nn.Module, batches: Iterable, num_batches: Sequence[int],
                          progress: bool = False) -> list[Statistics]:
    """What :func:`update_bn_stats` would set after each count of ``num_batches``, from one
    pass over the first ``max(num_batches)`` batches (the counts are prefixes of one
    stream: precise BN at several sample sizes for the cost of the largest).

    Returns one :data:`Statistics` per count, in the order given, in the buffers' dtype; a
    layer the forward never reached is left out. The model is left exactly as it was
    (buffers, modes, everything: the statistics are returned, not set). A count past the
    batches there are gets the statistics of all of them. ValueError as
    :func:`update_bn_stats`, and for counts that are not integers >= 1.
    """
    counts = list(num_batches)
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"num_batches must be integers >= 1 (got {num_batches!r})")
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
    wanted, snapshots, seen = set(counts), {}, 0
    try:
        model.eval()
        for _, layer in layers:
            layer.train()
        with torch.no_grad():
            total = max(counts)
            for batch in _with_progress(islice(batches, total), total, progress):
                model(_first_tensor(batch).to(reference.device))
                seen += 1
                if seen in wanted:
                    snapshots[seen] = _stored(layers, moments)
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
    last = _stored(layers, moments)
    return [snapshots.get(n, last) for n in counts]


def _stored(layers: list[tuple[str, nn.Module]], moments: dict[str, _Moments]) -> Statistics:
    """The moments so far as batch norm stores them (unbiased variance, buffers' dtype)."""
    return {name: (moments[name].mean.to(layer.running_mean.dtype),
                   moments[name].unbiased_var().to(layer.running_var.dtype))
            for name, layer in layers if moments[name].mean is not None}


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
    (stats,) = population_statistics(model, batches, [num_batches], progress)
    with torch.no_grad():
        for name, layer in batch_norm_layers(model):
            if name in stats:  # a layer the forward never reached keeps its statistics
                layer.running_mean.copy_(stats[name][0])
                layer.running_var.copy_(stats[name][1])
    return model
