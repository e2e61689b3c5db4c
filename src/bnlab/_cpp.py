"""The opt-in C++ batch norm (``impl="cpp"``): one loop per direction, autograd in C++.

Why: the fast path (``bnlab._fused``) is plain tensor ops under a Python
``autograd.Function``. On large activations it is memory-bound and as fast as torch's
kernel or faster, but on the chapter's FC activations, (128, 120) and (128, 84), a whole
forward+backward of torch's kernel takes 75-110 us, of which a do-nothing Python
``autograd.Function`` already costs ~45 us; the 15 tensor ops of the math add ~80 us
more. Only compiled code gets under that floor, so this module compiles
``csrc/batch_norm.cpp`` (our own kernel, not torch's) on first use with
``torch.utils.cpp_extension`` and caches the build.

First-call cost: a C++ compiler and ninja are needed at run time, and the first use on a
machine builds the extension (about 30 s on 2 CPU cores); later processes load the cached
build from ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in well under
a second. ``bnlab bench bn --cpp`` reports the load time it saw.

Scope: CPU tensors in float32/float64, contiguous or channels_last, with parameters and
running statistics of the input's dtype. Anything else (CUDA, float16/bfloat16, other
strides) goes to the fast path, which has the same contract. Statistics are accumulated
per chunk in the input's dtype and merged across chunks in float64 (Chan et al.'s
pairwise update), so data with a large mean is as safe as in the fast path.
Double backward raises, as in the fast path.
"""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from bnlab._fused import fused_batch_norm

_SOURCE = Path(__file__).with_name("csrc") / "batch_norm.cpp"
_ARCH_FLAGS = {  # what torch's own CPU kernels were picked for on this machine
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def build_requirements_missing() -> list[str]:
    """What the build needs and this machine lacks (empty when it can build)."""
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (c++, g++ or clang++ on PATH)")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    return missing


@functools.cache
def load_extension() -> ModuleType:
    """Build (first time on this machine) or load the cached C++ extension."""
    missing = build_requirements_missing()
    if missing:
        raise RuntimeError("impl='cpp' compiles a C++ kernel on first use and needs "
                           + " and ".join(missing) + "; impl='fast' needs neither")
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    name = f"bnlab_batch_norm_{capability.lower()}"
    if not _is_built(name):
        print(f"bnlab: building the impl='cpp' kernel {name} (once per machine, ~35 s on 2 "
              "cores)...", file=sys.stderr, flush=True)
    return load(name=name, sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-fopenmp-simd", *_ARCH_FLAGS.get(capability, [])],
                verbose=False)


def _is_built(name: str) -> bool:
    """Whether torch's extension cache already holds a build of ``name`` (a guess: torch
    rebuilds a cached one whose source changed)."""
    from torch.utils import cpp_extension

    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    except (AttributeError, OSError):  # a private helper: treat as not built if it moved
        return False
    return any(build_dir.glob(f"{name}*.so"))


def cpp_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """``impl="cpp"`` without argument checks (callers have checked)."""
    if running_mean is None or running_var is None:  # half-given: neither is updated
        running_mean = running_var = None
    # Off the CPU the kernel never applies: no build needed to know that.
    y = None if input.device.type != "cpu" else load_extension().try_batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps)
    if y is None:  # not a CPU float32/float64 call the kernel takes: the fast path
        y = fused_batch_norm(input, running_mean, running_var, weight, bias, training,
                             momentum, eps)
    return y
