"""bnlab.functional.batch_norm (both implementations) against torch's kernel, gradcheck,
mixed precision, channels_last, large-mean stability and argument errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.functional import IMPLEMENTATIONS, batch_norm
from tests.helpers import COMPILED_MARKS, COMPILED_SKIP, CPP_SKIP, IMPL_PARAMS, RUNNABLE

IMPLS = IMPL_PARAMS
SHAPES = [(8, 3), (4, 3, 5), (4, 3, 5, 6), (3, 3, 2, 4, 3)]
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10},
       torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


def _inputs(shape, dtype, affine=True, seed=0, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine else None
    rm = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, rm, rv, dy


def _run(fn, x, w, b, rm, rv, dy, training, momentum=0.1, eps=1e-5):
    """Output, grads of (x, w, b) and the running stats after one call."""
    x = x.clone().requires_grad_()
    w = None if w is None else w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    y = fn(x, rm, rv, w, b, training, momentum, eps)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    return [y.detach(), *grads, *(t for t in (rm, rv) if t is not None)]


def _ours(impl):
    return lambda *a: batch_norm(*a, impl=impl)


def _assert_all_close(ours, theirs, **tol):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"item {i}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_matches_torch(device, impl, shape, dtype, training, affine, momentum):
    args = [None if t is None else t.to(device)
            for t in _inputs(shape, dtype, affine, mean=0.5, std=2.0)]
    ours = _run(_ours(impl), *args, training, momentum)
    theirs = _run(F.batch_norm, *args, training, momentum)
    _assert_all_close(ours, theirs, **TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 6)])
def test_training_without_running_stats(impl, shape):
    x, w, b, _, _, dy = _inputs(shape, torch.float64)
    ours = _run(_ours(impl), x, w, b, None, None, dy, True)
    theirs = _run(F.batch_norm, x, w, b, None, None, dy, True)
    _assert_all_close(ours, theirs, **TOL[torch.float64])


def test_fast_and_reference_agree():
    args = _inputs((5, 4, 3, 3), torch.float64, seed=3)
    for training in (True, False):
        _assert_all_close(_run(_ours("fast"), *args, training),
                          _run(_ours("reference"), *args, training), **TOL[torch.float64])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 2, 3)])
def test_gradcheck(impl, training, affine, shape):
    x, w, b, rm, rv, _ = _inputs(shape, torch.float64, affine, seed=1)
    leaves = [x.requires_grad_()] + ([w.requires_grad_(), b.requires_grad_()] if affine else [])

    def fn(*tensors):
        weight, bias = (tensors[1], tensors[2]) if affine else (None, None)
        # running stats are not inputs of the function being checked: fresh copies
        return batch_norm(tensors[0], rm.clone(), rv.clone(), weight, bias, training,
                          impl=impl)

    assert torch.autograd.gradcheck(fn, leaves)


def test_gradcheck_partial_requires_grad():
    """needs_input_grad: only the weight, only the input."""
    x, w, b, rm, rv, _ = _inputs((4, 3, 2), torch.float64, seed=2)
    for training in (True, False):
        w_leaf, x_leaf = w.clone().requires_grad_(), x.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda w_, t=training: batch_norm(x, rm.clone(), rv.clone(), w_, b, t), [w_leaf])
        assert torch.autograd.gradcheck(
            lambda x_, t=training: batch_norm(x_, rm.clone(), rv.clone(), w, b, t), [x_leaf])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (3, 3, 2, 4, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last(impl, shape, training):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x, w, b, rm, rv, dy = _inputs(shape, torch.float32)
    x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    ours = _run(_ours(impl), x, w, b, rm, rv, dy, training)
    theirs = _run(F.batch_norm, x, w, b, rm, rv, dy, training)
    _assert_all_close(ours, theirs, **TOL[torch.float32])
    if impl != "reference":
        assert ours[0].is_contiguous(memory_format=fmt)
        assert ours[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_input_float32_params(impl, dtype, training):
    x, w, b, rm, rv, dy = _inputs((16, 4, 3, 3), torch.float32, seed=4)
    x, dy = x.to(dtype), dy.to(dtype)
    ours = _run(_ours(impl), x, w, b, rm, rv, dy, training)
    theirs = _run(F.batch_norm, x, w, b, rm, rv, dy, training)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    assert ours[2].dtype == torch.float32 and ours[4].dtype == torch.float32
    # Outputs and input grads are rounded to 8 (bf16) / 11 (fp16) bits; statistics and
    # parameter grads are float32 sums of rounded values.
    low = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3,
                                                                           "atol": 2e-3}
    _assert_all_close(ours[:2], theirs[:2], **low)
    _assert_all_close(ours[2:], theirs[2:], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(64, 3, 6, 6), (128, 3), (16, 5)])
def test_large_mean_is_stable(impl, shape):
    """mean 1e4, std 1 in float32, against float64 truth, with torch's kernel as yardstick.

    Naive E[x^2] - E[x]^2 in float32 would give errors of order 1 (or NaN). The fast path
    on (N, C, ...) input corrects its float32 mean by the mean of the deviations and never
    forms x * scale with a large x, so it must be at least as accurate as torch (which
    accumulates in float64). On (N, C) input it is an exact two-pass algorithm whose mean
    is rounded to float32 once, as torch's is: its statistics must be as accurate as
    torch's, its outputs and gradients within the float32 bound. The C++ kernel merges
    per-chunk means and squared deviations in float64, so it must be as accurate as torch
    everywhere. The reference sums deviations from the first sample's mean: its statistics
    are as accurate as torch's, the rest within the float32 bound.
    """
    x, w, b, rm, rv, dy = _inputs(shape, torch.float32, mean=1e4, std=1.0, seed=5)
    means = torch.arange(float(shape[1])).view(1, -1, *(1,) * (len(shape) - 2))
    x = x + means * 1e3  # different large means per channel
    truth = _run(F.batch_norm, *(t.double() for t in (x, w, b, rm, rv, dy)), True)
    ours = _run(_ours(impl), x, w, b, rm, rv, dy, True)
    torchs = _run(F.batch_norm, x, w, b, rm, rv, dy, True)
    exact = {"fast": range(6) if len(shape) > 2 else (4, 5), "cpp": range(6),
             "reference": (4, 5)}
    exact["auto"] = exact["cpp" if _auto_uses_kernel() else "fast"]
    as_exact_as_torch = exact[impl]
    for i, (o, t, r) in enumerate(zip(ours, torchs, truth)):
        err_ours = (o.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        scale = max(r.abs().max().item(), 1.0)
        assert err_ours <= 1e-2 * scale, (i, err_ours)
        if i in as_exact_as_torch:
            assert err_ours <= 2 * err_torch + 1e-6 * scale, (i, err_ours, err_torch)


@pytest.mark.parametrize("impl", IMPLS)
def test_running_variance_at_mean_1e8(impl):
    """float32 data with mean 1e8 (values 8 apart) and std 100: the running variance is as
    close to the data's variance as torch's, and the output has unit variance. The plain
    two-pass reference formula was off by 2% here (its mean, rounded at 1e8, offset every
    deviation)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 3, 8, 8, generator=g, dtype=torch.float64) * 100 + 1e8).float()
    truth = x.double().transpose(0, 1).reshape(3, -1).var(dim=1)  # unbiased, as stored
    errors = {}
    for name, fn in (("ours", _ours(impl)), ("torch", F.batch_norm)):
        rm, rv = torch.zeros(3), torch.ones(3)
        y = fn(x, rm, rv, None, None, True, 1.0, 1e-5)  # momentum 1: the batch's statistics
        errors[name] = (rv.double() - truth).abs().max().item()
        assert y.double().transpose(0, 1).reshape(3, -1).std(dim=1).sub(1).abs().max() < 1e-3
    assert errors["ours"] <= 2 * errors["torch"] + 1e-6 * truth.max().item(), errors


@given(
    n=st.integers(2, 6), c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    training=st.booleans(), affine=st.booleans(),
    loc=st.floats(-100, 100), scale=st.floats(0.01, 100), seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_random_shapes_and_values(n, c, spatial, training, affine, loc, scale, seed):
    shape = (n, c, *spatial)
    args = _inputs(shape, torch.float64, affine, seed, mean=loc, std=scale)
    theirs = _run(F.batch_norm, *args, training)
    for impl in RUNNABLE:
        _assert_all_close(_run(_ours(impl), *args, training), theirs, rtol=1e-8, atol=1e-8)


def test_eval_does_not_touch_running_stats():
    x, w, b, rm, rv, _ = _inputs((4, 3, 2, 2), torch.float32)
    before = rm.clone(), rv.clone()
    for impl in RUNNABLE:
        batch_norm(x, rm, rv, w, b, False, impl=impl)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


# errors: raised before anything is touched, with torch's exception types ------------

def _error_cases():
    rm, rv = torch.zeros(3), torch.ones(3)
    return [
        (torch.randn(1, 3), True, ValueError,
         r"Expected more than 1 value per channel when training, got input size "
         r"torch.Size\(\[1, 3\]\)"),
        (torch.ones(4, 3, dtype=torch.int64), True, TypeError,
         r"expected a floating-point input \(got torch.int64\)"),
        (torch.randn(4, 5), True, RuntimeError,
         r"running_mean should have 5 elements, one per channel \(dim 1\) of the input "
         r"\(got 3\)"),
        (torch.randn(4), True, ValueError, r"at least 2 dims"),
    ], rm, rv


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(4))
def test_errors_leave_stats_alone(impl, case):
    cases, rm, rv = _error_cases()
    x, training, exc, msg = cases[case]
    with pytest.raises(exc, match=msg):
        batch_norm(x, rm, rv, None, None, training, impl=impl)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_eval_needs_running_stats():
    with pytest.raises(ValueError, match="running_mean and running_var must be given"):
        batch_norm(torch.randn(4, 3), None, None, training=False)


def test_bad_impl_name():
    with pytest.raises(ValueError, match="impl must be"):
        batch_norm(torch.randn(4, 3), None, None, training=True, impl="nope")


@pytest.mark.slow
@COMPILED_SKIP
def test_compiled_impl_matches_torch():
    """impl='compiled' (torch.compile of the reference math): one small case, since each
    new shape compiles (seconds)."""
    args = _inputs((16, 4), torch.float32, mean=0.5, std=2.0)
    ours = _run(_ours("compiled"), *args, True, 0.1)
    theirs = _run(F.batch_norm, *args, True, 0.1)
    _assert_all_close(ours, theirs, **TOL[torch.float32])


@pytest.mark.slow
@pytest.mark.parametrize("impls", ["default", pytest.param(("cpp",), marks=CPP_SKIP)])
@pytest.mark.parametrize("floor", [False, True])
def test_bn_benchmark_reports_every_shape_and_impl(impls, floor):
    from bnlab.bench.bn import DEFAULT_IMPLS, SHAPES, run_bn_benchmark

    impls = DEFAULT_IMPLS if impls == "default" else impls
    text = run_bn_benchmark(repeats=2, warmup=1, impls=impls, floor=floor)
    main, bandwidth = text.split("Bytes moved at")
    rows = [line for line in main.splitlines() if line.startswith("| ") and "impl" not in line]
    assert len(rows) == (len(impls) + 1 + floor) * len(SHAPES)
    for name in impls:
        assert sum(f"| {name} " in r for r in rows) == len(SHAPES)
    assert sum("| floor " in r for r in rows) == (len(SHAPES) if floor else 0)
    assert sum("| native " in r for r in rows) == len(SHAPES)
    assert all(r.count("| - ") == 2 for r in rows if "| floor " in r)  # the floor has no module
    # The largest shape: the copy, then four measurements per implementation and native.
    bw_rows = [line for line in bandwidth.splitlines() if line.startswith("| ")][1:]
    assert "x.clone()" in bw_rows[0] and len(bw_rows) == 1 + 4 * (len(impls) + 1)
    assert sum("module fwd+bwd" in r for r in bw_rows) == len(impls) + 1
    size = 2 * torch.Size(SHAPES[-1]).numel() * 4 / 2**20
    assert f"| {size:.0f} " in bw_rows[0] and f"| {2.5 * size:.0f} " in bw_rows[3]


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=COMPILED_MARKS)])
def test_bn_act_benchmark_reports_every_candidate_and_what_each_saves(compile):
    """Rows for each activation, shape and candidate; the fused module saves what batch norm
    alone saves (one input-sized tensor), the two-step ones an output more."""
    from bnlab.bench.bn_act import COMPILED, EAGER, FLOOR, FUSED, UNFUSED, run_bn_act_benchmark

    shapes = ((16, 3), (8, 4, 6, 6))
    text = run_bn_act_benchmark(repeats=2, warmup=1, compile=compile, shapes=shapes)
    main, bandwidth = text.split("Bytes at")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in main.splitlines()
            if line.startswith("| ") and "module" not in line]
    names = [FUSED, UNFUSED, EAGER, *([COMPILED] if compile else []), FLOOR]
    assert [r[2] for r in rows] == names * 4
    assert [(r[0], r[1]) for r in rows[::len(names)]] == [
        ("16x3", "relu"), ("8x4x6x6", "relu"), ("16x3", "sigmoid"), ("8x4x6x6", "sigmoid")]
    size = 8 * 4 * 6 * 6 * 4 / 2**20
    for row in rows[len(names)::2 * len(names)]:  # the 4D shape's fused row, each activation
        saved = {r[2]: float(r[5]) for r in rows if r[:2] == row[:2]}
        assert saved[FUSED] == pytest.approx(size, abs=0.01)
        assert saved[EAGER] == pytest.approx(saved[UNFUSED]) == pytest.approx(2 * size, abs=0.01)
        assert saved[FLOOR] == 0
    assert all(r[4] == "1.00" for r in rows if r[2] == EAGER)
    bw_rows = [line for line in bandwidth.splitlines() if line.startswith("| ")][1:]
    assert len(bw_rows) == 2 * len(names) and "x.clone()" in bw_rows[0]  # no floor


# impl="cpp": the C++ kernel runs where it can, the fast path takes the rest ------------

def _auto_uses_kernel() -> bool:
    from bnlab.kernels.cpp import cached_extension

    return cached_extension() is not None


def _grad_fn_name(impl, x):
    return batch_norm(x, None, None, training=True, impl=impl).grad_fn.name()


@CPP_SKIP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cpp_kernel_runs_on_cpu_float_inputs(dtype, fmt):
    x = torch.randn(4, 3, 2, 2, dtype=dtype).to(memory_format=fmt).requires_grad_()
    assert _grad_fn_name("cpp", x) == "torch::autograd::CppNode<bnlab::BatchNormFunction>"


@CPP_SKIP
@pytest.mark.parametrize("x", [
    torch.randn(4, 3, 2, 2).to(torch.bfloat16),                # low precision
    torch.randn(4, 3, 2, 6)[..., ::2],                       # strided view
    torch.randn(8, 3, 5)[::2],                               # every other sample
], ids=["bfloat16", "strided", "sliced"])
def test_cpp_falls_back_to_fast_path(x):
    x = x.detach().requires_grad_()
    assert _grad_fn_name("cpp", x) == _grad_fn_name("fast", x) == "FusedBatchNormBackward"
    dy = torch.randn_like(x)
    _assert_all_close(_run(_ours("cpp"), x.detach(), None, None, None, None, dy, True),
                      _run(F.batch_norm, x.detach(), None, None, None, None, dy, True),
                      rtol=2e-2, atol=2e-2)


@pytest.fixture
def two_threads():
    """torch (and so the kernel's loops) on two threads for the test, whatever the worker had."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@CPP_SKIP
def test_cpp_kernel_splits_its_loops_over_torchs_threads(two_threads):
    """Built without OpenMP, ATen's at::parallel_for runs every loop on one thread (the
    kernel's builds before -fopenmp did); the built kernel must use torch's threads."""
    from bnlab.kernels.cpp import load_extension

    assert load_extension().parallel_chunks() == 2


@CPP_SKIP
@pytest.mark.parametrize("shape, fmt", [((1000, 40), torch.contiguous_format),
                                        ((64, 8, 24, 24), torch.contiguous_format),
                                        ((64, 8, 12, 12), torch.channels_last)],
                         ids=["rows", "planes", "channels_last"])
def test_cpp_large_batch_parallel_chunks(two_threads, shape, fmt):
    """Enough rows and channels that the kernel splits the work across two threads and
    merges per-chunk statistics: torch's results, and the same bits on a second call."""
    args = list(_inputs(shape, torch.float64, mean=3.0, std=2.0, seed=9))
    args[0], args[5] = (t.to(memory_format=fmt) for t in (args[0], args[5]))
    first = _run(_ours("cpp"), *args, True)
    _assert_all_close(first, _run(F.batch_norm, *args, True), **TOL[torch.float64])
    again = _run(_ours("cpp"), *args, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("given", ["weight", "bias"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 2)])
def test_weight_or_bias_alone(impl, given, shape):
    x, w, b, rm, rv, dy = _inputs(shape, torch.float64, seed=11)
    w, b = (w, None) if given == "weight" else (None, b)
    for training in (True, False):
        _assert_all_close(_run(_ours(impl), x, w, b, rm, rv, dy, training),
                          _run(F.batch_norm, x, w, b, rm, rv, dy, training),
                          **TOL[torch.float64])


def test_cpp_says_what_its_build_lacks(monkeypatch, tmp_path):
    import shutil

    import torch.utils.cpp_extension as cpp_extension

    import bnlab.kernels.cpp as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert cpp.build_requirements_missing() == [
        "a C++ compiler (c++, g++ or clang++ on PATH)", "ninja (pip install ninja)"]
    with pytest.raises(cpp.KernelUnavailable, match=r"impl='cpp' needs bnlab's C\+\+ kernel, "
                       r"and building bnlab's C\+\+ kernel needs a C\+\+ compiler .* and ninja"):
        cpp.load_extension.__wrapped__()


def test_cpp_off_the_cpu_needs_no_build(monkeypatch):
    """A non-CPU input takes the fast path without building (or needing) the extension.
    The meta device stands in for CUDA here: shapes and dtypes, no data."""
    import bnlab.kernels.cpp as cpp

    def refuse():
        raise AssertionError("the extension was loaded for a non-CPU input")

    monkeypatch.setattr(cpp, "load_extension", refuse)
    x = torch.empty(4, 3, 2, 2, device="meta")
    y = IMPLEMENTATIONS["cpp"].run(x, None, None, None, None, True, 0.1, 1e-5)
    assert y.device.type == "meta" and y.shape == x.shape


# impl="auto": the built kernel where it applies, the fast path elsewhere, never a build --

@pytest.fixture
def fresh_auto(monkeypatch):
    """impl='auto' deciding afresh (its answer is cached per process), restored after."""
    import bnlab.kernels.cpp as cpp

    cpp.cached_extension.cache_clear()
    yield cpp
    cpp.cached_extension.cache_clear()


def _hide_build_tools(monkeypatch, tmp_path):
    """An empty extensions dir and a PATH without compiler or ninja."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))


def test_auto_without_a_build_takes_the_fast_path_and_says_so_once(
        fresh_auto, monkeypatch, tmp_path, capsys):
    _hide_build_tools(monkeypatch, tmp_path)

    def no_build(*args, **kwargs):
        raise AssertionError("impl='auto' started a build")

    monkeypatch.setattr(fresh_auto, "build_extension", no_build)
    x = torch.randn(8, 3, 2, 2, requires_grad=True)
    for _ in range(3):
        assert _grad_fn_name("auto", x) == "FusedBatchNormBackward"
    err = capsys.readouterr().err
    assert err.count("bnlab: impl='auto' uses the fast path") == 1, err
    assert "is not built" in err and "`bnlab kernel build` builds it where there is a C++ " \
        "compiler (c++, g++ or clang++ on PATH) and ninja" in err


@CPP_SKIP
def test_auto_uses_the_built_kernel_silently(fresh_auto, capsys):
    fresh_auto.load_extension()  # builds it if this machine has not yet
    capsys.readouterr()
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert _grad_fn_name("auto", x) == "torch::autograd::CppNode<bnlab::BatchNormFunction>"
    assert _grad_fn_name("auto", x.detach().float().requires_grad_()).startswith("torch::")
    assert _grad_fn_name("auto", x.detach().half().requires_grad_()) == "FusedBatchNormBackward"
    assert capsys.readouterr().err == ""


@CPP_SKIP
def test_built_kernel_imports_without_compiler_or_ninja(fresh_auto, monkeypatch, tmp_path):
    fresh_auto.load_extension()
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert fresh_auto.build_requirements_missing()  # nothing to build with
    assert fresh_auto.import_built().batch_norm is not None


def _damaged_build(tmp_path, damage):
    """The build of this source in a fresh extensions folder under ``tmp_path``, damaged: a
    truncated library beside its build record, or an empty library without one; the
    environment of a process that looks there, and the intact library's bytes."""
    import os
    import shutil

    from bnlab.kernels.cpp import kernel_build, load_extension

    load_extension()
    good = kernel_build()
    folder = tmp_path / good.name
    folder.mkdir()
    data = good.library.read_bytes()
    (folder / good.library.name).write_bytes(data[: len(data) // 2] if damage == "truncated"
                                             else b"")
    if damage == "truncated":
        shutil.copy(good.record, folder / good.record.name)
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}, folder / good.library.name, data


def _run_python(env, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=600)


@CPP_SKIP
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_build_is_not_loaded(tmp_path, damage):
    """A truncated library beside its build record, or an empty one without it (a build
    killed midway, a full disk), in a fresh process: ``kernel info`` says it does not load
    and why, and a forward of impl='auto' takes the fast path, saying so in one line.
    (Was: SIGBUS inside dlopen, rc 135, for the truncated library; an ImportError traceback
    for the empty one.)"""
    env, _, _ = _damaged_build(tmp_path, damage)
    info = _run_python(env, "-m", "bnlab.cli", "kernel", "info")
    assert info.returncode == 0 and info.stderr == "", info
    why = "is damaged" if damage == "truncated" else "has no build record"
    assert re.search(rf"loads: +no: bnlab's C\+\+ kernel is not loaded: .*{why}", info.stdout)
    assert re.search(r"impl='auto' on CPU: +fast path", info.stdout)
    forward = _run_python(env, "-c", "import torch, bnlab.nn; "
                          "x = torch.randn(4, 3, 2, 2, requires_grad=True); "
                          "print(bnlab.nn.BatchNorm2d(3)(x).grad_fn.name())")
    assert forward.returncode == 0 and forward.stdout == "FusedBatchNormBackward\n", forward
    lines = forward.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnlab: impl='auto' uses the fast path on "
                                                   "CPU: bnlab's C++ kernel is not loaded")
    assert why in lines[0]


@CPP_SKIP
@pytest.mark.slow
def test_kernel_build_replaces_a_damaged_build(tmp_path):
    """``bnlab kernel build`` over a truncated library builds it again (compiles: slow)."""
    env, library, data = _damaged_build(tmp_path, "truncated")
    rebuilt = _run_python(env, "-m", "bnlab.cli", "kernel", "build")
    assert rebuilt.returncode == 0, rebuilt
    assert len(library.read_bytes()) == len(data)
    assert re.search(r"loads: +yes", _run_python(env, "-m", "bnlab.cli", "kernel", "info").stdout)


@CPP_SKIP
def test_kernel_declines_transformed_and_traced_inputs():
    """Under torch.func transforms and forward-mode AD the kernel returns None, so cpp and
    auto take the fast path; under torch.compile tracing they do not call it at all."""
    import torch.autograd.forward_ad as fwAD

    from bnlab.kernels.cpp import load_extension

    kernel = load_extension()
    args = (None, None, None, None, True, 0.1, 1e-5)
    x = torch.randn(6, 3)
    assert kernel.batch_norm(x, *args) is not None  # plain: taken

    def declined(t):
        assert kernel.batch_norm(t, *args) is None
        return t.sum()

    torch.func.grad(declined)(x)
    torch.func.vmap(declined)(x.view(2, 3, 3))
    torch.func.jvp(declined, (x,), (torch.ones_like(x),))
    with fwAD.dual_level():
        declined(fwAD.make_dual(x, torch.ones_like(x)))


def test_auto_and_cpp_trace_under_compile(monkeypatch):
    """torch.compile(fullgraph=True) traces impl='auto' and impl='cpp' without a graph
    break: while tracing they take the fast path (the kernel is never loaded)."""
    import bnlab.kernels.cpp as cpp

    def refuse():
        raise AssertionError("the extension was called while tracing")

    monkeypatch.setattr(cpp, "load_extension", refuse)
    monkeypatch.setattr(cpp, "cached_extension", refuse)
    args = _inputs((8, 3), torch.float32, seed=6)
    for impl in ("auto", "cpp"):
        fn = torch.compile(lambda *a, impl=impl: batch_norm(*a, impl=impl), fullgraph=True,
                           backend="eager")
        _assert_all_close(_run(fn, *args, True), _run(F.batch_norm, *args, True),
                          **TOL[torch.float32])


@pytest.mark.parametrize("impl", ["auto", pytest.param("cpp", marks=CPP_SKIP)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,fmt", [((5, 3), None), ((3, 2, 2, 3), None),
                                       ((3, 2, 2, 3), torch.channels_last)])
def test_gradgradcheck(impl, training, affine, shape, fmt):
    """Second derivatives (create_graph=True), float64: the C++ node's backward switches
    to differentiable ops when a graph is being recorded."""
    x, w, b, rm, rv, _ = _inputs(shape, torch.float64, affine, seed=12)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    leaves = [x.requires_grad_()] + ([w.requires_grad_(), b.requires_grad_()] if affine else [])

    def fn(*tensors):
        weight, bias = (tensors[1], tensors[2]) if affine else (None, None)
        return batch_norm(tensors[0], rm.clone(), rv.clone(), weight, bias, training,
                          impl=impl)

    if impl == "auto" and not _auto_uses_kernel():
        pytest.skip("impl='auto' runs the fast path here (no kernel built); its double "
                    "backward is the fast path's")
    assert torch.autograd.gradgradcheck(fn, leaves)


@CPP_SKIP
def test_cpp_gradient_penalty_matches_torch():
    """A gradient penalty, the common use of create_graph: d/dw of |dL/dx|^2."""
    x, w, b, rm, rv, _ = _inputs((6, 3, 2, 2), torch.float64, seed=13)

    def penalty_grads(fn):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xs, rm.clone(), rv.clone(), ws, b, True, 0.1, 1e-5)
        (gx,) = torch.autograd.grad((y.sin()).sum(), xs, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (xs, ws))

    _assert_all_close(penalty_grads(_ours("cpp")), penalty_grads(F.batch_norm),
                      **TOL[torch.float64])

