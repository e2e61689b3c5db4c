"""Speed and memory of bnlab's two batch norms against torch's native kernel.

Why: the chapter's scratch batch norm was 3-5x slower than torch's; bnlab's claim is
that its fast path is not. This benchmark checks the claim on the chapter's BN-LeNet
shapes at batch 128 (and one larger conv shape), in training mode with affine
parameters and tracked running statistics, timing each implementation round-robin with
torch's kernel in one process so that the ratios survive a noisy machine.

Memory: on CUDA, the peak of ``torch.cuda.max_memory_allocated`` over one training step
above what was allocated before it; elsewhere, the bytes of the tensors autograd saves
for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once,
the input included, since every implementation saves it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bnlab._cpp import load_extension
from bnlab.bench.timing import time_interleaved
from bnlab.functional import batch_norm
from bnlab.tables import format_table

SHAPES: list[tuple[int, ...]] = [
    (128, 6, 24, 24),   # BN-LeNet: after conv1
    (128, 16, 8, 8),    # after conv2
    (128, 120),         # after fc1
    (128, 84),          # after fc2
    (64, 64, 32, 32),   # a larger conv activation
]

IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": lambda *a, **k: batch_norm(*a, impl="reference", **k),
    "fast": lambda *a, **k: batch_norm(*a, impl="fast", **k),
    "native": F.batch_norm,
}


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


# Called as the fast path calls its Function: the C++ apply, without the Python wrapper.
_floor_apply = super(torch.autograd.Function, _PythonFunctionFloor).apply


def _floor(x, running_mean, running_var, weight, bias, **_):
    return _floor_apply(x, weight, bias)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _case(shape: tuple[int, ...], device: torch.device, fn: Callable[..., torch.Tensor]):
    gen = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(device)
    weight = torch.ones(channels, device=device, requires_grad=True)
    bias = torch.zeros(channels, device=device, requires_grad=True)
    running_mean = torch.zeros(channels, device=device)
    running_var = torch.ones(channels, device=device)

    def forward() -> torch.Tensor:
        return fn(x, running_mean, running_var, weight, bias, training=True, momentum=0.1,
                  eps=1e-5)

    def step() -> None:
        torch.autograd.grad(forward(), (x, weight, bias), dy)

    return forward, step


def _row(shape, name, fwd, both, native_fwd, native_both, step, forward, dev) -> list[str]:
    mem = _peak_bytes(step, dev) if dev.type == "cuda" else _saved_bytes(forward)
    return ["x".join(map(str, shape)), name, f"{fwd * 1e3:.3f}", f"{fwd / native_fwd:.2f}",
            f"{both * 1e3:.3f}", f"{both / native_both:.2f}", f"{mem / 2**20:.2f}"]


def _saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
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


def run_bn_benchmark(repeats: int = 100, device: str = "auto", warmup: int = 3,
                     compiled: bool = False, cpp: bool = False, floor: bool = False) -> str:
    """Time forward and forward+backward of each implementation; a markdown table.

    ``cpp`` adds ``impl="cpp"`` (bnlab's C++ kernel); the time to build or load its
    extension is reported separately. ``compiled`` adds ``impl="compiled"``
    (torch.compile of the reference math); its compile time per shape is reported
    separately. Both first-call costs are excluded from the timings. ``floor`` adds a
    do-nothing Python ``autograd.Function`` (see ``_PythonFunctionFloor``).
    """
    dev = _resolve_device(device)
    impls = dict(IMPLS)
    cpp_seconds = None
    if cpp:
        start = time.perf_counter()
        load_extension()  # builds on first use on this machine, else loads the cached build
        cpp_seconds = time.perf_counter() - start
        impls["cpp"] = lambda *a, **k: batch_norm(*a, impl="cpp", **k)
    if compiled:
        impls["compiled"] = lambda *a, **k: batch_norm(*a, impl="compiled", **k)
    if floor:
        impls["floor"] = _floor
    compile_seconds: dict[str, float] = {}
    cuda = dev.type == "cuda"
    mem_label = "peak step MiB (cuda max_memory_allocated)" if cuda else "saved-for-backward MiB"
    rows = []
    for shape in SHAPES:
        cases = {name: _case(shape, dev, fn) for name, fn in impls.items()}
        if compiled:
            start = time.perf_counter()
            cases["compiled"][1]()  # first call: compiles forward and backward
            compile_seconds["x".join(map(str, shape))] = time.perf_counter() - start
        native_forward, native_step = cases.pop("native")
        native_times: list[tuple[float, float]] = []
        for name, (forward, step) in cases.items():
            # Each implementation is paired with native alone: a third candidate's freed
            # memory (the reference's temporaries are 3x larger) would otherwise be
            # page-faulted back by whoever runs next, an artifact of the benchmark.
            times = time_interleaved({"fwd": forward, "fwd+bwd": step, "native fwd":
                                      native_forward, "native fwd+bwd": native_step},
                                     repeats=repeats, warmup=warmup, device=dev)
            native_times.append((times["native fwd"], times["native fwd+bwd"]))
            rows.append(_row(shape, name, times["fwd"], times["fwd+bwd"], times["native fwd"],
                             times["native fwd+bwd"], step, forward, dev))
        fwd = statistics.median(t for t, _ in native_times)
        both = statistics.median(t for _, t in native_times)
        rows.append(_row(shape, "native", fwd, both, fwd, both, native_step, native_forward, dev))
    headers = ["shape", "impl", "fwd ms", "fwd / native", "fwd+bwd ms", "fwd+bwd / native",
               mem_label]
    threads = torch.get_num_threads()
    note = (f"device: {dev}, torch {torch.__version__}, {threads} threads, float32, "
            f"training mode, affine, running stats tracked; each implementation interleaved "
            f"with native in its own loop, median of {repeats} repeats (native's row: the "
            "median over those loops).")
    if cpp_seconds is not None:
        note += (f" impl='cpp' extension built or loaded in {cpp_seconds:.1f} s before "
                 "timing (a build takes ~30 s once per machine; a cached load ~1 s).")
    if compile_seconds:
        note += " First call of impl='compiled' (compile, excluded above): " + ", ".join(
            f"{shape} {sec:.1f} s" for shape, sec in compile_seconds.items()) + "."
    return note + "\n\n" + format_table(headers, rows)
