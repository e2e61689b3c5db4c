"""Speed and memory of bnlab's batch norms against torch's native kernel.

Why: the chapter's scratch batch norm was 3-5x slower than torch's; bnlab's claim is
that its default is not. This benchmark checks the claim on the chapter's BN-LeNet
shapes at batch 128 (and one larger conv shape) with affine parameters and tracked
running statistics: forward and forward+backward in training mode, and the eval-mode
forward under ``torch.no_grad()`` (inference). Each implementation is timed against
torch's kernel in pairs, one pair per measurement, in one process, so that the ratios
survive a noisy machine; within a pair the two alternate which runs first (on a busy
host the second of two back-to-back calls can run faster than the same call first).

Two forward+backward figures, because they answer different questions:

* **kernel** ("fwd+bwd"): the function (``bnlab.functional.batch_norm``, torch's
  ``F.batch_norm``) and ``torch.autograd.grad`` of its output: the arithmetic and its
  autograd node, nothing else.
* **module** ("module fwd+bwd"): what a user's training step pays for the layer: the
  module (``bnlab.nn.BatchNorm*d``, torch's ``nn.BatchNorm*d``) called on an input that
  needs a gradient, then ``backward`` of a loss whose gradient is dy, with every ``.grad``
  set to None first, as ``optimizer.zero_grad()`` leaves them. On top of the kernel it
  pays the module's Python (checks, ``num_batches_tracked``), the autograd engine's
  ``backward`` (which also writes the parameters' ``.grad``) and fresh output and gradient
  buffers each call.

Physical limit: batch norm must read its input and write its output, so a direction
moves at least ``2 S`` (forward: x in, y out) or ``3 S`` (backward: x and dy in, dx
out) bytes for an input of S bytes, the same as 1 or 1.5 plain copies of x. For the
largest shape the benchmark times ``x.clone()`` beside the rest and prints each
direction's achieved GB/s and its distance from that copy bound.

Memory: on CUDA, the peak of ``torch.cuda.max_memory_allocated`` over one training step
above what was allocated before it; elsewhere, the bytes of the tensors autograd saves
for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once,
the input included, since every implementation saves it).

Batch norm followed by an activation (``bnlab.nn.BatchNormAct``, fused in one pass, against
the same two steps in bnlab and in torch, and ``torch.compile`` of torch's) is measured by
``bnlab.bench.bn_act``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bnlab.nn as bnn
from bnlab.bench.timing import time_interleaved
from bnlab.functional import IMPLEMENTATIONS, batch_norm, get_implementation
from bnlab.util.tables import counted, format_table

SHAPES: list[tuple[int, ...]] = [
    (128, 6, 24, 24),   # BN-LeNet: after conv1
    (128, 16, 8, 8),    # after conv2
    (128, 120),         # after fc1
    (128, 84),          # after fc2
    (64, 64, 32, 32),   # a larger conv activation
]
# By default, every implementation that needs no compiler at run time.
DEFAULT_IMPLS = tuple(name for name, impl in IMPLEMENTATIONS.items() if impl.compiles == "no")
NATIVE = "native"
FLOOR = "floor"


class _PythonFunctionFloor(torch.autograd.Function):
    """A Python ``autograd.Function`` that does no math: the forward copies the input (an
    output must be a new tensor), the backward hands back ``dy`` and the parameters
    themselves as their gradients. Its time is what the fast path pays before any
    arithmetic, so ``floor / native`` bounds what plain tensor ops can reach."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight, bias)
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        weight, bias = ctx.saved_tensors
        return dy, weight, bias


def _floor(x, running_mean, running_var, weight, bias, training, momentum, eps):
    return _PythonFunctionFloor.apply(x, weight, bias)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _candidate(name: str) -> Callable[..., torch.Tensor]:
    """Called in torch's functional order; through bnlab.functional (argument checks
    included, as a user calls it)."""
    if name == NATIVE:
        return F.batch_norm
    if name == FLOOR:
        return _floor
    get_implementation(name)  # unknown names fail here
    return lambda *args: batch_norm(*args, impl=name)


def module_for(name: str, shape: tuple[int, ...], device: torch.device) -> nn.Module | None:
    """The module a user would write for ``shape``: torch's ``BatchNorm1d/2d`` (``native``)
    or bnlab's with ``impl=name``, in training mode; None for the floor."""
    if name == FLOOR:
        return None
    kind = 1 if len(shape) <= 3 else 2
    if name == NATIVE:
        module = (nn.BatchNorm1d, nn.BatchNorm2d)[kind - 1](shape[1])
    else:
        module = (bnn.BatchNorm1d, bnn.BatchNorm2d)[kind - 1](shape[1], impl=name)
    return module.to(device).train()


def module_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    """A training step's share of ``module``: gradients set to None (``zero_grad``), the
    forward, ``backward`` of a loss whose gradient is ``dy``."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    module(x).backward(dy)


class _Case:
    """One shape's tensors and the measured calls of one implementation."""

    def __init__(self, shape: tuple[int, ...], device: torch.device,
                 fn: Callable[..., torch.Tensor], compiles: str = "no",
                 module: nn.Module | None = None):
        gen = torch.Generator().manual_seed(0)
        channels = shape[1]
        self.x = torch.randn(shape, generator=gen).to(device).requires_grad_()
        self.dy = torch.randn(shape, generator=gen).to(device)
        self.weight = torch.ones(channels, device=device, requires_grad=True)
        self.bias = torch.zeros(channels, device=device, requires_grad=True)
        self.running_mean = torch.zeros(channels, device=device)
        self.running_var = torch.ones(channels, device=device)
        self.fn = fn
        self.compiles = compiles
        self.module = module

    def forward(self, training: bool = True) -> torch.Tensor:
        return self.fn(self.x, self.running_mean, self.running_var, self.weight, self.bias,
                       training, 0.1, 1e-5)

    def step(self) -> None:
        torch.autograd.grad(self.forward(), (self.x, self.weight, self.bias), self.dy)

    def eval_forward(self) -> None:
        with torch.no_grad():
            self.forward(training=False)

    def module_step(self) -> None:
        module_step(self.module, self.x, self.dy)

    def calls(self) -> dict[str, Callable[[], object]]:
        calls = {"fwd": self.forward, "fwd+bwd": self.step, "eval fwd": self.eval_forward}
        if self.module is not None:
            calls["module fwd+bwd"] = self.module_step
        return calls


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the storages autograd saves for backward in ``forward()`` (each once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y
    return sum(seen.values())


def _peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _time_pairs(case: _Case, native: _Case, repeats: int, warmup: int,
                device: torch.device, copy: Callable[[], object] | None = None
                ) -> dict[str, tuple[float, ...]]:
    """(ours, native) median seconds per measurement, each measured as its own pair; with
    ``copy``, (ours, native, copy): ``copy`` timed in the same loop, the yardstick of
    what the machine moves under the same conditions."""
    ours_calls, native_calls = case.calls(), native.calls()
    out = {}
    for what in ours_calls:  # the floor has no module call
        # Two candidates: time_interleaved's rotation alternates which one runs first.
        candidates = {"ours": ours_calls[what], NATIVE: native_calls[what]}
        if copy is not None:
            candidates["copy"] = copy
        times = time_interleaved(candidates, repeats=repeats, warmup=warmup, device=device)
        out[what] = tuple(times[name] for name in candidates)
    return out


_MOVED = {"eval fwd": (2, "eval fwd (2 S)"), "fwd": (2, "train fwd (2 S)"),
          "fwd+bwd": (5, "kernel fwd+bwd (2 S + 3 S)"),
          "module fwd+bwd": (5, "module fwd+bwd (2 S + 3 S)")}
"""What each measurement must move, in multiples of S (the input's bytes), and its label."""


def _bandwidth_rows(shape, times: dict[str, dict[str, tuple[float, ...]]]) -> list[list[str]]:
    """Bytes each measurement must move, achieved GB/s and the ratio to the copy bound, from
    the main table's measurements (``times[impl][what] = (seconds, copy seconds)``)."""
    size = torch.Size(shape).numel() * 4  # float32
    copy = statistics.median(c for per_impl in times.values() for _, c in per_impl.values())
    rows = [copy_row(shape, size, copy)]
    for name, per_impl in times.items():
        for what, (multiple, label) in _MOVED.items():
            seconds, copy_here = per_impl[what]
            nbytes = multiple * size
            rows.append(["", name, label, f"{nbytes / 2**20:.0f}", f"{seconds * 1e3:.3f}",
                         f"{nbytes / seconds / 1e9:.1f}",
                         f"{seconds / (multiple / 2 * copy_here):.2f}"])
    return rows


def copy_row(shape: tuple[int, ...], size: int, copy: float) -> list[str]:
    """The bandwidth table's yardstick row: ``x.clone()`` moves 2 S bytes in ``copy`` s."""
    return ["x".join(map(str, shape)), "x.clone()", "2 S", f"{2 * size / 2**20:.0f}",
            f"{copy * 1e3:.3f}", f"{2 * size / copy / 1e9:.1f}", "1.00"]


def run_bn_benchmark(repeats: int = 100, device: str = "auto", warmup: int = 3,
                     impls: tuple[str, ...] = DEFAULT_IMPLS, floor: bool = False) -> str:
    """Time each implementation against torch's kernel; markdown tables with a note.

    ``impls`` are names from ``bnlab.functional.IMPLEMENTATIONS``. One that compiles
    once (the C++ kernel) is built or loaded on its first call, one that compiles each
    shape compiles on each shape's first call; those first calls are excluded from the
    timings and reported.
    ``floor`` adds a do-nothing Python ``autograd.Function`` (``_PythonFunctionFloor``).
    """
    dev = resolve_device(device)
    names = list(dict.fromkeys(impls)) + ([FLOOR] if floor else [])
    first_call: dict[str, float] = {}
    cuda = dev.type == "cuda"
    mem_label = "peak step MiB (cuda max_memory_allocated)" if cuda else "saved MiB"
    rows, bandwidth = [], []
    for shape in SHAPES:
        cases = {name: _Case(shape, dev, _candidate(name),
                             IMPLEMENTATIONS[name].compiles if name in IMPLEMENTATIONS else "no",
                             module_for(name, shape, dev))
                 for name in [*names, NATIVE]}
        for name in names:  # builds and compilations happen here, outside the timings
            start = time.perf_counter()
            for call in cases[name].calls().values():
                call()
            compiles = cases[name].compiles
            if compiles == "each shape" or (compiles == "once" and shape == SHAPES[0]):
                first_call[f"{name} {'x'.join(map(str, shape))}"] = time.perf_counter() - start
        native = cases[NATIVE]
        largest = shape == SHAPES[-1]
        copy = native.x.detach().clone if largest else None
        native_times: dict[str, list[tuple[float, ...]]] = {what: [] for what in native.calls()}
        moved: dict[str, dict[str, tuple[float, ...]]] = {}
        for name in names:
            times = _time_pairs(cases[name], native, repeats, warmup, dev, copy)
            for what, (_, *theirs) in times.items():
                native_times[what].append(theirs)
            rows.append(_row(shape, name, times, cases[name], dev))
            if largest and name != FLOOR:
                moved[name] = {what: (t[0], t[2]) for what, t in times.items()}
        medians = {what: tuple(statistics.median(col) for col in zip(*t, strict=True))
                   for what, t in native_times.items()}
        rows.append(_row(shape, NATIVE, {w: (t[0], t[0]) for w, t in medians.items()}, native,
                         dev))
        if largest:
            moved[NATIVE] = medians
            bandwidth = _bandwidth_rows(shape, moved)
    headers = ["shape", "impl", "fwd ms", "fwd / native", "fwd+bwd ms", "fwd+bwd / native",
               "module fwd+bwd ms", "module / native", "eval fwd ms", "eval fwd / native",
               mem_label]
    threads = torch.get_num_threads()
    note = (f"device: {dev}, torch {torch.__version__}, {threads} threads, float32, affine, "
            "running stats tracked. fwd and fwd+bwd: training mode; eval fwd: eval mode "
            f"under torch.no_grad(). Each measurement is its own interleaved pair with "
            f"native (alternating which runs first), median of {counted(repeats, 'repeat')}; native's "
            "row is the median over its pairs. fwd+bwd is the kernel alone: the function and "
            "torch.autograd.grad of its output. module fwd+bwd is what a training step pays "
            "for the layer: nn.BatchNorm*d (torch's, or bnlab's with that impl) on an input "
            "that needs a gradient, then backward of a loss (every .grad set to None first, "
            "as zero_grad leaves them): the module's Python, the autograd engine's backward "
            "with the parameters' .grad written, and fresh output and gradient buffers.")
    if first_call:
        note += " First calls (build, load or compile; excluded above): " + ", ".join(
            f"{what} {sec:.1f} s" for what, sec in first_call.items()) + "."
    bw_note = (f"Bytes moved at {'x'.join(map(str, SHAPES[-1]))} (S = the input's bytes; "
               "a direction must read its inputs and write its output once) and achieved "
               "GB/s = minimum bytes / median time, for the measurements of the table above "
               "(the same times: x.clone() ran in each of their loops); 'x bound' = time / "
               "the time x.clone() took, in the same loop, to move as many bytes. The copy "
               "row is the median over those loops.")
    bw_headers = ["shape", "impl", "direction", "MiB moved", "ms", "GB/s", "x bound"]
    return (note + "\n\n" + format_table(headers, rows) + "\n\n" + bw_note + "\n\n"
            + format_table(bw_headers, bandwidth))


def _row(shape, name, times, case: _Case, dev) -> list[str]:
    mem = _peak_bytes(case.step, dev) if dev.type == "cuda" else saved_bytes(case.forward)
    cells = ["x".join(map(str, shape)), name]
    for what in ("fwd", "fwd+bwd", "module fwd+bwd", "eval fwd"):
        if what not in times:  # the floor has no module
            cells += ["-", "-"]
            continue
        ours, theirs = times[what][:2]
        cells += [f"{ours * 1e3:.3f}", f"{ours / theirs:.2f}"]
    return [*cells, f"{mem / 2**20:.2f}"]
