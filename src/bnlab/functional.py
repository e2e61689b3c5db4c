"""``batch_norm`` as a function, a drop-in for ``torch.nn.functional.batch_norm``, and
``batch_norm_act``: batch norm followed by an activation.

Why a functional layer: the modules in ``bnlab.nn`` only decide *which* statistics to
use and how fast the running averages move; the arithmetic lives here, once, and can be
called (and tested) on its own, with any of the implementations in ``IMPLEMENTATIONS``,
the one registry of them (``bnlab.nn``, ``bnlab.training.norms``, the benchmarks, the CLI and the
tests read it). Every implementation takes torch's functional argument order
``(input, running_mean, running_var, weight, bias, training, momentum, eps)``:

* ``"auto"`` (default): bnlab's C++ kernel where it applies (CPU, float32/float64,
  contiguous or channels_last, not under ``torch.func`` transforms or ``torch.compile``)
  and is already built (``bnlab kernel build``), the fast path everywhere else. It never
  builds during a forward; when it falls back for lack of a build it says so once on
  stderr, with the command that builds it.
* ``"fast"``: ``bnlab.kernels.fused.FusedBatchNorm``, an autograd Function with the
  hand-derived backward, in plain tensor ops: no compiler, any device. Under
  ``torch.jit.trace`` it runs the reference formula instead: the tracer records a Python
  autograd Function as an opaque op *and* the ops inside it, so a traced model would
  update its running statistics twice, with this batch's size baked in.
* ``"reference"``: ``bnlab.kernels.reference.reference_batch_norm``, the chapter's formula as
  plain tensor ops, differentiated by autograd. The one to read.
* ``"cpp"``: ``bnlab.kernels.cpp``, the same math as one C++ loop per direction with the
  autograd node in C++ (CPU float32/float64; other inputs take the fast path). Builds
  the extension on first use (needs a C++ compiler with OpenMP and ninja).
* ``"compiled"``: the reference formula through ``torch.compile`` (Inductor fuses the
  forward and the derived backward into a few loops). Needs a C++ compiler (CPU) or
  Triton (CUDA) at run time, and each new input shape or mode compiles on its first
  call; ``bnlab bench bn --compiled`` shows whether it pays.

Measured speeds are in docs/performance.md (written by ``bnlab bench bn --write-docs``).

``batch_norm_act(..., activation=)``: ``activation(batch_norm(...))`` for an activation of
:data:`ACTIVATIONS`. An implementation with a fused form (``Implementation.run_act``:
``auto`` and ``cpp``, through the C++ kernel) computes both in one pass and saves for
backward only what batch norm saves; for an activation the kernel does not fuse (tanh),
the kernel's batch norm then torch's activation; where the kernel declines (devices,
dtypes, transforms) and for the other implementations, their batch norm then torch's
activation. Either way the result is batch norm then torch's activation, bit for bit
(``bnlab.kernels.cpp``).

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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bnlab.kernels.cpp import KERNEL_ACTIVATIONS, kernel_batch_norm
from bnlab.kernels.fused import fused_batch_norm, stat_dtype
from bnlab.kernels.reference import reference_batch_norm

__all__ = ["ACTIVATIONS", "DEFAULT_IMPL", "IMPLEMENTATIONS", "Implementation", "batch_norm",
           "batch_norm_act", "check_activation", "check_arguments", "check_input",
           "fused_batch_norm", "get_implementation", "run_batch_norm_act"]

Impl = str
"""A key of :data:`IMPLEMENTATIONS`."""

BatchNormFn = Callable[..., torch.Tensor]
"""``(input, running_mean, running_var, weight, bias, training, momentum, eps) -> output``,
torch's functional order, arguments already checked."""

BatchNormActFn = Callable[..., torch.Tensor]
"""A :data:`BatchNormFn` with the keyword ``activation`` (a key of :data:`ACTIVATIONS`)."""


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": _identity, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
"""The activations ``batch_norm_act`` takes, as torch computes them (the unfused path).
The C++ kernel fuses those of ``bnlab.kernels.cpp.KERNEL_ACTIVATIONS``."""


@dataclass(frozen=True)
class Implementation:
    """One batch-norm implementation: how to call it and what it needs."""

    name: str          # the ``impl=`` value
    run: BatchNormFn   # unchecked: callers (batch_norm, the modules) check first
    needs: str         # what it needs at run time, for docs and ``--help``
    what: str          # one line for tables
    compiles: str = "no"  # "no", "once" (per machine: the C++ kernel) or "each shape"
    run_act: BatchNormActFn | None = None  # a fused BN + activation; None: run, then the activation


def _kernel_else_fast(build: bool, input, running_mean, running_var, weight, bias, training,
                      momentum, eps, activation="identity"):
    """The kernel's ``activation(batch_norm(...))``; for an activation it does not fuse, its
    batch norm then the activation; where it declines, the fast path then the activation."""
    if running_mean is None or running_var is None:  # half-given: neither is updated
        running_mean = running_var = None
    fused = activation if activation in KERNEL_ACTIVATIONS else "identity"
    y = kernel_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                          eps, build=build, activation=fused)
    if y is None:
        y, fused = fast_batch_norm(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps), "identity"
    return y if fused == activation else ACTIVATIONS[activation](y)


def auto_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                    activation="identity"):
    """``impl="auto"``: the C++ kernel where it takes the call and is already built, the fast
    path everywhere else. Never builds (a forward must not start a compiler); without a
    build it says once on stderr why, and how to build."""
    return _kernel_else_fast(False, input, running_mean, running_var, weight, bias, training,
                             momentum, eps, activation)


def cpp_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation="identity"):
    """``impl="cpp"``: the C++ kernel, built on first use; the fast path for inputs it
    declines (off the CPU, other dtypes, transforms, torch.compile)."""
    return _kernel_else_fast(True, input, running_mean, running_var, weight, bias, training,
                             momentum, eps, activation)


def fast_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """``impl="fast"``: ``fused_batch_norm``; the reference formula under ``torch.jit.trace``
    (see the module docstring)."""
    run = reference_batch_norm if torch.jit.is_tracing() else fused_batch_norm
    return run(input, running_mean, running_var, weight, bias, training, momentum, eps)


def compiled_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                        eps):
    """``impl="compiled"``: the reference formula through ``torch.compile``."""
    return _compiled_reference()(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps)


@functools.cache
def _compiled_reference():
    return torch.compile(reference_batch_norm)


IMPLEMENTATIONS: dict[str, Implementation] = {impl.name: impl for impl in (
    Implementation("auto", auto_batch_norm, "nothing (uses the C++ kernel once built)",
                   "the C++ kernel where it applies and is built, else fast",
                   run_act=auto_batch_norm),
    Implementation("fast", fast_batch_norm, "nothing",
                   "autograd Function with the hand-derived backward, plain tensor ops"),
    Implementation("reference", reference_batch_norm, "nothing",
                   "the chapter's formula, differentiated by autograd"),
    Implementation("cpp", cpp_batch_norm, "a C++ compiler with OpenMP and ninja (builds on first use)",
                   "bnlab's C++ kernel, autograd node in C++", compiles="once",
                   run_act=cpp_batch_norm),
    Implementation("compiled", compiled_batch_norm,
                   "a C++ compiler (CPU) or Triton (CUDA); compiles each shape",
                   "the reference formula through torch.compile", compiles="each shape"),
)}
DEFAULT_IMPL = "auto"


def get_implementation(name: str) -> Implementation:
    """The registered implementation ``name``; ValueError naming the choices otherwise."""
    try:
        return IMPLEMENTATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"impl must be one of {', '.join(IMPLEMENTATIONS)} "
                         f"(got {name!r})") from None


def check_activation(name: str) -> None:
    """ValueError naming the choices unless ``name`` is a key of :data:`ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} (got {name!r})")


def run_batch_norm_act(impl: Implementation, input, running_mean, running_var, weight, bias,
                       training, momentum, eps, activation: str) -> torch.Tensor:
    """``activation(batch_norm(...))`` by ``impl``, arguments already checked: its fused form
    where it has one, else its batch norm, then torch's activation."""
    if activation == "identity":
        return impl.run(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if impl.run_act is not None:
        return impl.run_act(input, running_mean, running_var, weight, bias, training, momentum,
                            eps, activation=activation)
    return ACTIVATIONS[activation](impl.run(input, running_mean, running_var, weight, bias,
                                            training, momentum, eps))


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
    impl: Impl = DEFAULT_IMPL,
) -> torch.Tensor:
    """Batch-normalize ``input`` (N, C, ...) per channel; same contract as torch's.

    With ``training=True`` the batch statistics normalize and, when given, the running
    statistics are updated in place with ``new = (1 - momentum) * old + momentum *
    batch`` (variance unbiased). With ``training=False`` the running statistics
    normalize; they must then be given. ``impl`` picks the implementation (a key of
    ``IMPLEMENTATIONS``).
    """
    run = get_implementation(impl).run  # a bad name fails before anything else
    _check_call(input, running_mean, running_var, weight, bias, training, eps)
    return run(input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "relu",
    impl: Impl = DEFAULT_IMPL,
) -> torch.Tensor:
    """``activation(batch_norm(input, ...))``: the same contract as :func:`batch_norm`, then
    the activation (a key of :data:`ACTIVATIONS`); one pass where ``impl`` fuses it (see the
    module docstring), its batch norm then torch's activation elsewhere."""
    implementation = get_implementation(impl)
    check_activation(activation)
    _check_call(input, running_mean, running_var, weight, bias, training, eps)
    return run_batch_norm_act(implementation, input, running_mean, running_var, weight, bias,
                              training, momentum, eps, activation)


def _check_call(input, running_mean, running_var, weight, bias, training, eps) -> None:
    """Every check of the functional forms, before anything is touched."""
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
