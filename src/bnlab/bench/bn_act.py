"""Batch norm followed by an activation, as a network runs it: fused against two steps.

Why: in a network batch norm is almost always followed by an activation, and what a
user would otherwise run is ``nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())``, eagerly or
under ``torch.compile`` (Inductor fuses the two). This benchmark times, on the chapter's
shapes (``bnlab.bench.bn.SHAPES``) and for relu and sigmoid, four ways to compute it at
module level (the module on an input that needs a gradient, then ``backward`` of a loss
whose gradient is dy, every ``.grad`` set to None first: ``bnlab.bench.bn.module_step``):

* ``bnlab fused``: ``bnlab.nn.BatchNormAct*d`` (one pass of the C++ kernel where built);
* ``bnlab unfused``: ``nn.Sequential(bnlab.nn.BatchNorm*d, activation)``;
* ``torch eager``: ``nn.Sequential(nn.BatchNorm*d, activation)``;
* ``torch.compile``: ``torch.compile`` of the same torch Sequential (its compilation, on
  the first call, is reported apart and never timed);
* ``floor``: a module whose forward is a view of its input (no arithmetic, one autograd
  node): what the module call, ``zero_grad`` and the autograd engine cost by themselves,
  a time no module can go under.

All four in one interleaved loop per shape (the order rotating each round), medians,
ratios to torch eager; the bytes each saves for backward (``saved_tensors_hooks``); and,
for the largest shape, achieved GB/s and the distance from a plain copy, for the
5 S bytes (x in, y out; dy and x in, dx out) a fused forward and backward must move.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.bench.bn import SHAPES, module_step, saved_bytes
from bnlab.bench.timing import time_interleaved
from bnlab.nn.batchnorm_act import ACTIVATION_MODULES
from bnlab.util.tables import format_table

ACTIVATIONS = ("relu", "sigmoid")
FUSED, UNFUSED, EAGER, COMPILED, FLOOR = ("bnlab fused", "bnlab unfused", "torch eager",
                                          "torch.compile", "floor")


class _Floor(nn.Module):
    """No arithmetic: the output is a view of the input (one autograd node, dy passed on)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)


def candidates(shape: tuple[int, ...], activation: str, device: torch.device,
               compile: bool = True) -> dict[str, nn.Module]:
    """The candidates (without ``torch.compile`` unless ``compile``), in training mode, with
    the same state."""
    channels, kind = shape[1], 1 if len(shape) <= 3 else 2
    torch_bn = (nn.BatchNorm1d, nn.BatchNorm2d)[kind - 1]
    act = ACTIVATION_MODULES[activation]
    modules = {
        FUSED: (bnn.BatchNormAct1d, bnn.BatchNormAct2d)[kind - 1](channels, activation=activation),
        UNFUSED: nn.Sequential((bnn.BatchNorm1d, bnn.BatchNorm2d)[kind - 1](channels), act()),
        EAGER: nn.Sequential(torch_bn(channels), act()),
    }
    if compile:
        modules[COMPILED] = torch.compile(nn.Sequential(torch_bn(channels), act()), dynamic=False)
    modules[FLOOR] = _Floor()
    return {name: m.to(device).train() for name, m in modules.items()}


def run_bn_act_benchmark(repeats: int = 100, device: str | torch.device = "cpu",
                         warmup: int = 3, activations: tuple[str, ...] = ACTIVATIONS,
                         compile: bool = True,
                         shapes: tuple[tuple[int, ...], ...] = tuple(SHAPES)) -> str:
    """Markdown tables (module-level times and saved bytes; GB/s at the last of ``shapes``)
    with a note. ``compile=False`` leaves ``torch.compile`` out (it needs a C++ compiler on
    CPU and compiles each shape)."""
    dev = torch.device(device)
    rows, bandwidth, first_calls = [], [], {}
    for activation in activations:
        for shape in shapes:
            label = "x".join(map(str, shape))
            times, saved, first_call = _measure(shape, activation, dev, repeats, warmup, compile,
                                                with_copy=shape == shapes[-1])
            if first_call is not None:
                first_calls[f"{activation} {label}"] = first_call
            rows += [[label, activation, name, f"{times[name] * 1e3:.3f}",
                      f"{times[name] / times[EAGER]:.2f}", f"{saved[name] / 2**20:.2f}"]
                     for name in saved]
            if shape == shapes[-1]:
                bandwidth += _bandwidth_rows(shape, activation, times)
    note = (f"device: {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            "float32, affine, running stats tracked, training mode. Module level: the module "
            "on an input that needs a gradient, then backward of a loss (every .grad set to "
            f"None first). The candidates of a shape in one interleaved loop, median of "
            f"{repeats} repeats; ratios to torch eager. saved MiB: what autograd keeps for "
            "backward (the input included).")
    if first_calls:
        note += (" torch.compile's first call per shape (compiles; excluded above): "
                 + ", ".join(f"{what} {sec:.1f} s" for what, sec in first_calls.items()) + ".")
    headers = ["shape", "act", "module", "fwd+bwd ms", "vs torch eager", "saved MiB"]
    bw_note = (f"Bytes at {'x'.join(map(str, shapes[-1]))} (S = the input's bytes): a fused "
               "forward and backward must move 5 S (x in, y out; dy and x in, dx out); "
               "GB/s = 5 S / median time, 'x bound' = time / the time x.clone() takes to "
               "move 5 S, measured in the same loop.")
    bw_headers = ["shape", "act", "module", "MiB moved", "ms", "GB/s", "x bound"]
    return (note + "\n\n" + format_table(headers, rows) + "\n\n" + bw_note + "\n\n"
            + format_table(bw_headers, bandwidth))


def _measure(shape: tuple[int, ...], activation: str, dev: torch.device, repeats: int,
             warmup: int, compile: bool, with_copy: bool):
    """Median seconds of each candidate's module step (and of ``x.clone()``), the bytes
    each saves for backward, and torch.compile's first call (None without it)."""
    torch.compiler.reset()  # each shape's modules compile afresh, never against the limit
    modules = candidates(shape, activation, dev, compile)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dev).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(dev)
    steps: dict[str, Callable[[], object]] = {
        name: (lambda m=m: module_step(m, x, dy)) for name, m in modules.items()}
    first_call = None
    if COMPILED in steps:  # compiles now, outside the timings
        start = time.perf_counter()
        steps[COMPILED]()
        first_call = time.perf_counter() - start
    if with_copy:
        steps["copy"] = x.detach().clone
    times = time_interleaved(steps, repeats=repeats, warmup=warmup, device=dev)
    saved = {name: saved_bytes(lambda m=m: m(x)) for name, m in modules.items()}
    return times, saved, first_call


def _bandwidth_rows(shape, activation: str, times: dict[str, float]) -> list[list[str]]:
    size = torch.Size(shape).numel() * 4  # float32
    copy = times.pop("copy")
    bound = 2 * size / copy  # bytes per second of a plain copy
    rows = [["x".join(map(str, shape)), activation, "x.clone()", f"{2 * size / 2**20:.0f}",
             f"{copy * 1e3:.3f}", f"{bound / 1e9:.1f}", "1.00"]]
    for name, seconds in times.items():
        if name == FLOOR:  # moves nothing
            continue
        moved = 5 * size
        rows.append(["", "", name, f"{moved / 2**20:.0f}", f"{seconds * 1e3:.3f}",
                     f"{moved / seconds / 1e9:.1f}", f"{seconds / (moved / bound):.2f}"])
    return rows

