"""bnlab's C++ batch norm (``impl="cpp"``, and ``impl="auto"`` where it is built).

Why compiled code: the fast path (``bnlab.kernels.fused``) is plain tensor ops under a Python
``autograd.Function``. On large activations that is memory-bound, but on small ones (the
chapter's FC activations, (128, 120) and (128, 84)) a do-nothing Python
``autograd.Function`` already costs a large part of torch's whole forward+backward
(``bnlab bench bn --floor`` measures it), and each tensor op adds its dispatch. Only
compiled code gets under that floor, so ``csrc/batch_norm.cpp`` (our own kernel, not
torch's) holds one loop per direction and the autograd node, in C++.

Building: ``bnlab kernel build`` (which ``make demo`` and ``make test`` run) compiles it
once per machine with ``torch.utils.cpp_extension``; it needs a C++ compiler with OpenMP
(g++; clang++ with libomp) and ninja: without OpenMP, ATen's ``at::parallel_for`` in the
kernel would run every loop on one thread.
The build lives in ``$TORCH_EXTENSIONS_DIR`` (default: torch's
``~/.cache/torch_extensions``) under a name that encodes the source, the compiler flags,
the torch and Python versions, so a changed source or another torch never loads a stale
build. A finished build is imported directly, without the compiler or ninja, which is
how ``impl="auto"`` can use it on a machine that could not build it.

A damaged build must not take the process down: a truncated shared library can raise
SIGBUS inside ``dlopen``, before Python sees an error. So a build is loaded only when it
matches its build record (``<name>.so.sha256`` beside it: the library's size and SHA-256,
written once ``bnlab kernel build`` has built and imported it); a library without a
record, or one that no longer matches it, counts as not built (``impl="auto"`` says so
once and takes the fast path) and is rebuilt by the next build.

* ``impl="cpp"`` builds on first use (a notice on stderr says so) and fails, saying
  what is missing, where it cannot.
* ``impl="auto"`` never builds: it uses the kernel when a build is already there and
  loads, and otherwise the fast path, saying once on stderr why and how to build.

The kernel never falls back by itself: :func:`kernel_batch_norm` returns None where it
declines, and ``bnlab.functional`` (which holds the ``auto`` rule) runs the fast path then.

Activations: the kernel fuses the ones of :data:`KERNEL_ACTIVATIONS` into batch norm's
pass (``activation=``; ``bnlab.nn.BatchNormAct*``), saving nothing more than batch norm
alone (backward recomputes the activation's derivative from x); others it declines.

Tracing: ``torch.jit.trace`` records the build's registered op
(``torch.ops.<build name>.batch_norm``) rather than the pybind call, so a traced model
recomputes the statistics of whatever batch it is given, and ``torch.onnx.export(...,
dynamo=False)`` maps the op to ONNX's BatchNormalization (torch's own symbolic for
``aten::batch_norm``) followed by the activation. Outside tracing the pybind function is
called directly: the dispatcher's round trip costs a visible share of the small FC shapes.

Scope: plain CPU tensors in float32/float64, contiguous or channels_last, with parameters
and running statistics of the input's dtype. Anything else (CUDA, float16/bfloat16, other
strides, tensors under ``torch.func`` transforms, tensor subclasses that intercept
dispatch, forward-mode dual tensors) goes to the fast path, which has the same contract;
the kernel itself makes that choice (see ``plain`` and ``supported`` in the source).
Under ``torch.compile`` tracing neither cpp nor auto calls the extension (a call into an
opaque extension would break the graph): they take the fast path, which traces.
Statistics are accumulated per chunk in the input's dtype and merged across chunks in
float64 (Chan et al.'s pairwise update), so data with a large mean is as safe as in the
fast path. Double backward works: under ``create_graph=True`` the C++ node's backward
computes the gradients with differentiable ATen ops.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch.onnx import symbolic_helper, symbolic_opset9, symbolic_opset14

_SOURCE = Path(__file__).with_name("csrc") / "batch_norm.cpp"
_ARCH_FLAGS = {  # what torch's own CPU kernels were picked for on this machine
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
BUILD_COMMAND = "bnlab kernel build"
KERNEL_ACTIVATIONS = ("identity", "relu", "sigmoid")
"""The activations the kernel fuses, in the order of its ``Act`` codes (csrc)."""


class KernelUnavailable(RuntimeError):
    """The C++ kernel cannot be built or loaded here; the message says why."""


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH (this kernel's build, and torch.compile's CPU
    backend, need one)."""
    return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


def build_requirements_missing() -> list[str]:
    """What the build needs and this machine lacks (empty when it can build)."""
    # torch.utils.cpp_extension loads setuptools (70 ms): only a build or a look at
    # the build needs it, not every `import bnlab.nn`.
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    if not has_cxx_compiler():
        missing.append("a C++ compiler (c++, g++ or clang++ on PATH)")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    return missing


@dataclass(frozen=True)
class KernelBuild:
    """Where this machine's build of the kernel lives (built or not)."""

    name: str        # module name: encodes source, flags, torch and Python
    directory: Path  # torch's build folder for it
    flags: tuple[str, ...]

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}{_library_suffix()}"

    @property
    def record(self) -> Path:
        """The build record: the library's size and SHA-256, written after a good build."""
        return self.library.with_name(self.library.name + ".sha256")

    @property
    def built(self) -> bool:
        return self.library.is_file()

    def damage(self) -> str | None:
        """Why the library must not be loaded (missing, unrecorded, not what was built), or
        None when it matches its build record. Reads the file; never maps it."""
        if not self.built:
            return f"no {self.library}"
        try:
            recorded = self.record.read_text().strip()
        except OSError:
            return (f"{self.library} has no build record ({self.record.name}): its build did "
                    "not finish")
        if recorded != _fingerprint(self.library):
            return (f"{self.library} is damaged (it does not match its build record: "
                    "truncated or changed since it was built)")
        return None

    def write_record(self) -> None:
        # Whole or absent (a temp file renamed over it); not bnlab.util.io, which the
        # library (bnlab.nn and below) does not load.
        temp = self.record.with_name(f".{self.record.name}.{os.getpid()}.tmp")
        temp.write_text(_fingerprint(self.library) + "\n")
        os.replace(temp, self.record)


def _fingerprint(path: Path) -> str:
    """``<size> <sha256>`` of a file."""
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _library_suffix() -> str:
    return ".pyd" if sys.platform == "win32" else ".so"  # what cpp_extension.load writes


def extensions_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR``, else torch's default extension cache."""
    # torch.utils.cpp_extension loads setuptools (70 ms): only a build or a look at
    # the build needs it, not every `import bnlab.nn`.
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def kernel_build() -> KernelBuild:
    """This machine's build of the kernel: name and folder, from what it is built of."""
    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp, not only -fopenmp-simd: ATen's at::parallel_for is a header template that
    # runs its loop on the calling thread unless the extension itself is compiled with
    # OpenMP (_OPENMP defined). Linked with -fopenmp, the extension needs libgomp.so.1,
    # which resolves to the copy torch has already loaded: one OpenMP runtime, torch's
    # thread pool and torch.set_num_threads.
    # CPU_CAPABILITY selects ATen's Vectorized implementation for that instruction set (the
    # one torch's own kernels of this machine use): the fused activations call its exp.
    # -ffp-contract=off: no a * b + c fused into one rounding, so the scalar loops and the
    # vector code compute the same bits (what the fused activations' equality with torch's
    # rests on), whichever compiler's default.
    flags = ("-O3", "-fopenmp", "-ffp-contract=off", *_ARCH_FLAGS.get(capability, []),
             f"-DCPU_CAPABILITY={capability}",
             *([f"-DCPU_CAPABILITY_{capability}"] if capability in _ARCH_FLAGS else []))
    digest = hashlib.sha256()
    python = f"{sys.implementation.cache_tag} {sys.platform}"  # the extension's ABI
    for part in (_SOURCE.read_bytes(), " ".join(flags).encode(), torch.__version__.encode(),
                 python.encode()):
        digest.update(part)
        digest.update(b"\0")
    name = f"bnlab_batch_norm_{capability.lower()}_{digest.hexdigest()[:12]}"
    return KernelBuild(name, extensions_root() / name, flags)


def build_extension(quiet: bool = False) -> ModuleType:
    """Build the kernel (a no-op when this exact build exists) and import it.

    Raises :class:`KernelUnavailable`, naming what is missing, where it cannot build.
    """
    missing = build_requirements_missing()
    build = kernel_build()
    if missing:
        raise KernelUnavailable("building bnlab's C++ kernel needs " + " and ".join(missing))
    # torch.utils.cpp_extension loads setuptools (70 ms): only a build or a look at
    # the build needs it, not every `import bnlab.nn`.
    from torch.utils.cpp_extension import load

    if build.damage() is not None:
        # An unrecorded or damaged library would be imported as it is (ninja sees it up to
        # date): removed, it is linked again.
        build.library.unlink(missing_ok=True)
        build.record.unlink(missing_ok=True)
        if not quiet:
            print(f"bnlab: building the C++ batch-norm kernel into {build.directory} (once "
                  "per machine and torch version)...", file=sys.stderr, flush=True)
    build.directory.mkdir(parents=True, exist_ok=True)
    try:
        module = load(name=build.name, sources=[str(_SOURCE)], extra_cflags=list(build.flags),
                      extra_ldflags=["-fopenmp"], build_directory=str(build.directory),
                      verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # a compiler error, say
        raise KernelUnavailable(f"building bnlab's C++ kernel failed: {_first_line(exc)}") \
            from exc
    if not build.record.is_file():
        build.write_record()
    _register_onnx_symbolic(module.__name__)
    return module


def import_built() -> ModuleType:
    """Import the finished build without compiler or ninja; KernelUnavailable if it is
    absent, damaged (see the module docstring) or does not load."""
    build = kernel_build()
    if not build.built:
        raise KernelUnavailable(f"bnlab's C++ kernel is not built for this source and torch "
                                f"(no {build.library})")
    damage = build.damage()
    if damage is not None:
        raise KernelUnavailable(f"bnlab's C++ kernel is not loaded: {damage}")
    spec = importlib.util.spec_from_file_location(build.name, build.library)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        raise KernelUnavailable(f"the build at {build.library} does not load: "
                                f"{_first_line(exc)}") from exc
    _register_onnx_symbolic(module.__name__)
    return module


@functools.cache
def _register_onnx_symbolic(namespace: str) -> None:
    """Let the TorchScript ONNX exporter map this build's op: torch's own symbolic for
    ``aten::batch_norm`` (BatchNormalization), then the activation."""
    for opset, torch_symbolic in ((9, symbolic_opset9.batch_norm),
                                  (14, symbolic_opset14.batch_norm)):
        torch.onnx.register_custom_op_symbolic(f"{namespace}::batch_norm",
                                               _onnx_batch_norm(torch_symbolic), opset)


def _onnx_batch_norm(torch_symbolic):
    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "f", "f", "i")
    def symbolic(g, input, running_mean, running_var, weight, bias, training, momentum, eps,
                 activation):
        y = torch_symbolic(g, input, weight, bias, running_mean, running_var, training,
                           momentum, eps, False)
        name = KERNEL_ACTIVATIONS[activation]
        return y if name == "identity" else g.op({"relu": "Relu", "sigmoid": "Sigmoid"}[name], y)

    return symbolic


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@functools.cache
def load_extension() -> ModuleType:
    """The kernel for ``impl="cpp"``: the finished build, else built now."""
    try:
        return import_built()
    except KernelUnavailable:
        pass
    try:
        return build_extension()
    except KernelUnavailable as exc:
        raise KernelUnavailable(f"impl='cpp' needs bnlab's C++ kernel, and {exc}; "
                                "impl='fast' needs neither") from None


@functools.cache
def cached_extension() -> ModuleType | None:
    """The kernel for ``impl="auto"`` if already built and loadable, else None.

    Never builds. The first time it finds none it says once on stderr why and how to
    build it (the answer is cached for the process, so later calls are silent).
    """
    try:
        return import_built()
    except KernelUnavailable as exc:
        reason = str(exc)
    missing = build_requirements_missing()
    how = (f"`{BUILD_COMMAND}` builds it" if not missing else
           f"`{BUILD_COMMAND}` builds it where there is " + " and ".join(missing))
    print(f"bnlab: impl='auto' uses the fast path on CPU: {reason}; {how}.",
          file=sys.stderr, flush=True)
    return None


def kernel_info() -> dict[str, str]:
    """Where the kernel is cached, whether it loads, what a build needs (for the CLI)."""
    build = kernel_build()
    missing = build_requirements_missing()
    threads = "-"
    if build.built:
        try:
            kernel = import_built()
            loads = "yes"
            threads = f"{kernel.parallel_chunks()} of torch's {torch.get_num_threads()}"
        except KernelUnavailable as exc:
            loads = f"no: {exc}"
    else:
        loads = f"not built (run `{BUILD_COMMAND}`)"
    return {
        "name": build.name,
        "library": str(build.library),
        "built": "yes" if build.built else "no",
        "loads": loads,
        "threads per loop": threads,
        "build needs": "a C++ compiler with OpenMP (c++, g++, or clang++ with libomp) and ninja",
        "missing here": ", ".join(missing) if missing else "nothing",
        "impl='auto' on CPU": "C++ kernel" if loads == "yes" else "fast path",
    }


def _kernel_may_take(input: torch.Tensor, activation: str) -> bool:
    """Whether to offer the call to the kernel at all: not off the CPU or while
    torch.compile traces (no build needed to know that), not an empty batch, whose
    meaning (counted, statistics untouched) the fast path carries, and not an activation
    the kernel does not fuse."""
    return (input.is_cpu and input.numel() > 0 and activation in KERNEL_ACTIVATIONS
            and not torch.compiler.is_compiling())


def kernel_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    *,
    build: bool,
    activation: str = "identity",
) -> torch.Tensor | None:
    """The C++ kernel's output, ``activation(batch_norm(input))``, or None where it declines
    the call (arguments already checked): off the CPU, while torch.compile traces, an
    empty batch, an activation outside :data:`KERNEL_ACTIVATIONS`, an input outside its
    scope (module docstring), or, with ``build=False``, where no build is there to load.
    ``build=True`` builds the kernel on first use (``impl="cpp"``); ``bnlab.functional``
    decides what runs instead. Under ``torch.jit.trace`` the call goes through the
    registered op, which the tracer records."""
    if not _kernel_may_take(input, activation):
        return None
    kernel = load_extension() if build else cached_extension()
    if kernel is None:
        return None
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps,
            KERNEL_ACTIVATIONS.index(activation))
    if torch.jit.is_tracing():
        if not kernel.supported(*args[:5]):
            return None
        return getattr(torch.ops, kernel.__name__).batch_norm(*args)
    return kernel.batch_norm(*args)
