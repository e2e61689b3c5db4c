"""``batch_norm`` as a function, a drop-in for ``torch.nn.functional.batch_norm``.

Why a functional layer: the modules in ``bnlab.nn`` only decide *which* statistics to
use and how fast the running averages move; the arithmetic lives here, once, and can be
called (and tested) on its own, with either implementation:

* ``impl="fast"`` (default): ``bnlab._fused.FusedBatchNorm``, an autograd Function with
  the hand-derived backward; at or below torch's kernel time on large conv activations
  on CPU, 1.4-1.7x on small ones, where Python overhead dominates (``bnlab bench bn``).
* ``impl="reference"``: ``bnlab._reference.reference_batch_norm``, the chapter's formula
  as plain tensor ops, differentiated by autograd.
* ``impl="cpp"``: ``bnlab._cpp``, the same math as one C++ loop per direction with the
  autograd node in C++ (CPU float32/float64; other inputs take the fast path). Faster
  than torch's kernel on the chapter's shapes, but it builds a C++ extension on first
  use (needs a compiler and ninja, about 30 s once per machine; cached afterwards).
* ``impl="compiled"``: the reference formula through ``torch.compile`` (Inductor fuses the
  forward and the derived backward into a few loops). Needs a C++ compiler (CPU) or Triton
  (CUDA) at run time, and each new input shape or mode compiles on its first call (about
  10-15 s on 2 CPU cores); see ``bnlab bench bn --compiled`` for whether it pays.

Formula, per channel c (statistics over every dim but dim 1)::

    y = (x - mean) / sqrt(var + eps) * gamma + beta

Training uses the batch mean and the biased batch variance (divide by m, the number of
values per channel) and updates the running statistics in place::

    running_mean = (1 - momentum) * running_mean + momentum * batch_mean
    running_var  = (1 - momentum) * running_var  + momentum * batch_var * m / (m - 1)

(the running variance is stored unbiased, as torch does). Prediction uses the running
statistics. ``momentum`` is the weight of the NEW batch (torch's convention); Keras and
Flax call ``momentum`` the weight of the OLD value, so their ``momentum=0.99`` is
``momentum=0.01`` here: bnlab momentum = 1 - Keras/Flax momentum.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

from bnlab._cpp import cpp_batch_norm
from bnlab._fused import fused_batch_norm, stat_dtype
from bnlab._reference import reference_batch_norm

__all__ = ["batch_norm", "check_arguments", "check_input", "fused_batch_norm"]

Impl = Literal["fast", "reference", "cpp", "compiled"]


@functools.cache
def _compiled_reference():
    return torch.compile(reference_batch_norm)


def check_input(x: torch.Tensor, num_features: int | None, training: bool) -> None:
    """Raise if ``x`` cannot be batch-normalized; touches nothing (``training``: whether
    the batch statistics normalize).

    Called before any buffer is updated, so a bad batch leaves the running statistics
    and ``num_batches_tracked`` exactly as they were. An empty batch (N = 0) is valid,
    as in torch: its output is empty and it changes no statistics.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor input (got {type(x).__name__})")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input (got {x.dtype})")
    if x.dim() < 2:
        raise ValueError(
            f"expected an input with at least 2 dims (N, C, ...) (got {x.dim()}D input)")
    if num_features is not None and x.shape[1] != num_features:
        raise RuntimeError(
            f"expected {num_features} channels (dim 1) (got {x.shape[1]})")
    if training and x.shape[0] * math.prod(x.shape[2:]) == 1:  # one value per channel
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size {x.shape}")


def check_arguments(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    eps: float,
) -> None:
    """Raise, as torch does, on an ``eps`` or a mix of dtypes that torch refuses.

    ``eps`` must be positive when the batch statistics normalize (a constant channel
    would divide by zero) and non-negative with the running ones. The tensors share the
    input's dtype, except that a float16/bfloat16 input may take float32 parameters and
    statistics (all of them). ``training`` is whether the batch statistics normalize.
    """
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    given = [(name, t.dtype) for name, t in (("weight", weight), ("bias", bias),
                                             ("running_mean", running_mean),
                                             ("running_var", running_var)) if t is not None]
    if not given:
        return
    low_precision = stat_dtype(x.dtype) != x.dtype
    wanted = x.dtype if given[0][1] == x.dtype or not low_precision else torch.float32
    for name, dtype in given:
        if dtype != wanted:
            raise RuntimeError(
                f"mixed dtypes: a {x.dtype} input takes weight, bias, running_mean and "
                "running_var of its own dtype" + (" or all float32" if low_precision else "")
                + f" (got {name} of {dtype})")


def _check_vector(name: str, t: torch.Tensor | None, channels: int) -> None:
    if t is not None and t.numel() != channels:
        raise RuntimeError(
            f"{name} should have {channels} elements, one per channel (dim 1) of the "
            f"input (got {t.numel()})")


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    impl: Impl = "fast",
) -> torch.Tensor:
    """Batch-normalize ``input`` (N, C, ...) per channel; same contract as torch's.

    With ``training=True`` the batch statistics normalize and, when given, the running
    statistics are updated in place with ``new = (1 - momentum) * old + momentum *
    batch`` (variance unbiased). With ``training=False`` the running statistics
    normalize; they must then be given. ``impl`` picks the implementation.
    """
    if not training and (running_mean is None or running_var is None):
        raise ValueError(
            "running_mean and running_var must be given when training=False "
            "(prediction normalizes with the running statistics)")
    check_input(input, None, training)
    check_arguments(input, running_mean, running_var, weight, bias, training, eps)
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_vector(name, t, channels)
    if impl == "fast":
        return fused_batch_norm(input, running_mean, running_var, weight, bias,
                                training, momentum, eps)
    if impl == "reference":
        return reference_batch_norm(input, running_mean, running_var, weight, bias,
                                    training, momentum, eps)
    if impl == "cpp":
        return cpp_batch_norm(input, running_mean, running_var, weight, bias, training,
                              momentum, eps)
    if impl == "compiled":
        return _compiled_reference()(input, running_mean, running_var, weight, bias,
                                     training, momentum, eps)
    raise ValueError(
        f"impl must be 'fast', 'reference', 'cpp' or 'compiled' (got {impl!r})")

