"""Edge cases, tried on torch's batch norm and bnlab's: the same outcome, or the documented
difference (docs/edge-cases.md holds the table; each of its rows is a test here).

"The same outcome": the same values within tolerance (outputs, gradients, running
statistics, ``num_batches_tracked``), or the same exception type, with bnlab's message
as specific as torch's (both messages are matched). Every implementation that runs here
is tried (the registry's, through ``_impls``): auto, fast, reference and cpp as modules and
functions; compiled on a few small cases (each new shape compiles). The C++ kernel declines
calls under torch.func transforms and empty batches, which the fast path then takes, and
its node computes double backward with differentiable ops.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

import bnlab.nn as bnn
from bnlab.functional import batch_norm
from tests.helpers import COMPILED_MARKS, COMPILED_SKIP, IMPL_PARAMS, NORM_SKIPS

IMPLS = IMPL_PARAMS  # every implementation but the compiled one, which is tried on few cases
COMPILED = pytest.param("compiled", marks=COMPILED_MARKS)
KINDS = {1: (nn.BatchNorm1d, bnn.BatchNorm1d), 2: (nn.BatchNorm2d, bnn.BatchNorm2d),
         3: (nn.BatchNorm3d, bnn.BatchNorm3d)}
TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


def _pair(kind, impl, device="cpu", dtype=torch.float32, c=3, **kwargs):
    """torch's module and bnlab's with the same, non-trivial state."""
    theirs_cls, ours_cls = KINDS[kind]
    theirs = theirs_cls(c, device=device, dtype=dtype, **kwargs)
    ours = ours_cls(c, device=device, dtype=dtype, impl=impl, **kwargs)
    if theirs.affine:
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            theirs.weight.copy_(torch.rand(c, generator=g) + 0.5)
            theirs.bias.copy_(torch.randn(c, generator=g))
    if theirs.track_running_stats:
        with torch.no_grad():
            theirs.running_mean.copy_(torch.randn(c, generator=torch.Generator().manual_seed(8)))
            theirs.running_var.copy_(torch.rand(c, generator=torch.Generator().manual_seed(9))
                                     + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _outcome(fn):
    """("ok", value) or ("raise", exception type, message)."""
    try:
        return ("ok", fn())
    except Exception as err:  # noqa: BLE001 -- the outcome is what is compared
        return ("raise", type(err), str(err))


def _assert_same_outcome(theirs, ours, torch_says=None, bnlab_says=None, **tol):
    """Same values, or the same exception type with the expected messages."""
    assert theirs[0] == ours[0], (theirs, ours)
    if theirs[0] == "raise":
        assert ours[1] is theirs[1], (theirs, ours)
        assert re.search(torch_says, theirs[2]), theirs[2]
        assert re.search(bnlab_says, ours[2]), ours[2]
        return
    _assert_tree_close(theirs[1], ours[1], **tol)


def _assert_tree_close(a, b, **tol):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_tree_close(a[k], b[k], **tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_tree_close(x, y, **tol)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        torch.testing.assert_close(b, a, equal_nan=True, **(tol or {"rtol": 1e-5, "atol": 1e-5}))
    else:
        assert a == b


def _step(module, x, dy=None):
    """Output, input and parameter gradients and the buffers after one call."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(torch.ones_like(y) if dy is None else dy)
    out = {"y": y.detach(), "dx": x.grad,  # (a compiled module's names have a prefix)
           **{f"d{n.removeprefix('_orig_mod.')}": p.grad for n, p in module.named_parameters()},
           **{n.removeprefix("_orig_mod."): b.clone() for n, b in module.named_buffers()}}
    module.zero_grad(set_to_none=True)
    return out


# empty batch ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind,shape", [(1, (0, 3)), (2, (0, 3, 4, 4)), (1, (4, 3, 0))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_module(device, impl, training, kind, shape, momentum):
    """Empty output, zero parameter gradients, running statistics untouched, and in
    training the batch still counted in num_batches_tracked."""
    theirs, ours = _pair(kind, impl, device, momentum=momentum)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(shape, device=device)
    for _ in range(2):
        _assert_same_outcome(_outcome(lambda: _step(theirs, x)), _outcome(lambda: _step(ours, x)))
    assert ours.num_batches_tracked.item() == (2 if training else 0)


@pytest.mark.parametrize("impl", IMPLS + [COMPILED])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_functional(device, impl, training):
    x = torch.randn(0, 3, 2, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    w, b = torch.ones(3, device=device), torch.zeros(3, device=device)

    def run(fn):
        xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
        stats = rm.clone(), rv.clone()
        y = fn(xl, *stats, wl, bl, training)
        return [y, *torch.autograd.grad(y.sum(), (xl, wl, bl)), *stats]

    _assert_same_outcome(_outcome(lambda: run(F.batch_norm)),
                         _outcome(lambda: run(lambda *a: batch_norm(*a, impl=impl))))


# eps, momentum, one value per channel, rank ----------------------------------------------

EPS_CASES = [  # eps, module training, track_running_stats, torch's message, bnlab's
    (0.0, True, True, r"eps must be positive during training, but got 0.0",
     r"eps must be positive during training, but got 0.0"),
    (-1e-5, True, True, r"eps must be positive during training", r"eps must be positive"),
    (-1e-5, False, True, r"eps must be non-negative, but got -1e-05",
     r"eps must be non-negative, but got -1e-05"),
    (0.0, False, False, r"eps must be positive during training", r"eps must be positive"),
    (0.0, False, True, None, None),  # eval with running statistics: eps = 0 is allowed
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(len(EPS_CASES)), ids=lambda i: f"eps{i}")
def test_eps(device, impl, case):
    eps, training, track, torch_says, bnlab_says = EPS_CASES[case]
    theirs, ours = _pair(2, impl, device, eps=eps, track_running_stats=track)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(4, 3, 2, 2, device=device)
    _assert_same_outcome(_outcome(lambda: _step(theirs, x)), _outcome(lambda: _step(ours, x)),
                         torch_says, bnlab_says)
    if torch_says is not None:  # bnlab raised before touching anything (torch counts it)
        assert ours.num_batches_tracked is None or ours.num_batches_tracked.item() == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eps,training", [(0.0, True), (-1.0, False)])
def test_eps_functional(impl, eps, training):
    x, rm, rv = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
    _assert_same_outcome(
        _outcome(lambda: F.batch_norm(x, rm, rv, training=training, eps=eps)),
        _outcome(lambda: batch_norm(x, rm, rv, training=training, eps=eps, impl=impl)),
        r"batch_norm eps must be", r"batch_norm eps must be")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("momentum", [-0.5, 0.0, 1.0, 1.5])
def test_momentum_outside_unit_interval(device, impl, momentum):
    """torch accepts any momentum (extrapolating the running statistics); so does bnlab."""
    theirs, ours = _pair(2, impl, device, momentum=momentum)
    for step in range(3):
        x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(step)).to(device)
        _assert_same_outcome(_outcome(lambda x=x: _step(theirs, x)),
                             _outcome(lambda x=x: _step(ours, x)))


@pytest.mark.parametrize("impl", IMPLS)
def test_one_value_per_channel_without_running_stats_in_eval(impl):
    """Eval mode without running statistics normalizes with the batch's: torch's check of
    more than one value per channel applies."""
    theirs, ours = _pair(1, impl, track_running_stats=False)
    theirs.eval()
    ours.eval()
    x = torch.randn(1, 3)
    _assert_same_outcome(_outcome(lambda: _step(theirs, x)), _outcome(lambda: _step(ours, x)),
                         r"Expected more than 1 value per channel when training",
                         r"Expected more than 1 value per channel when training")


@pytest.mark.parametrize("impl", IMPLS + [COMPILED])
@pytest.mark.parametrize("ndim", [9, 10])
@pytest.mark.parametrize("training", [True, False])
def test_more_than_8_dims(device, impl, ndim, training):
    if impl == "compiled" and ndim == 10:
        pytest.skip("one compiled rank is enough (each shape compiles)")
    shape = (3, 2) + (1,) * (ndim - 4) + (2, 3)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)

    def run(fn):
        xl = x.clone().requires_grad_()
        stats = rm.clone(), rv.clone()
        y = fn(xl, *stats, None, None, training)
        return [y, torch.autograd.grad(y.square().sum(), xl)[0], *stats]

    _assert_same_outcome(_outcome(lambda: run(F.batch_norm)),
                         _outcome(lambda: run(lambda *a: batch_norm(*a, impl=impl))))


# dtypes ------------------------------------------------------------------------------------

MIXED = [  # input dtype, module dtype (every parameter and buffer), torch's message
    (torch.float64, torch.float32, r"mixed dtype \(CPU\): all inputs must share same datatype"),
    (torch.float32, torch.float64, r"expect parameter to have scalar type of Float"),
    (torch.float16, torch.bfloat16, r"expect parameter to have scalar type of Float"),
    (torch.bfloat16, torch.float64, r"expect parameter to have scalar type of Float"),
    (torch.bfloat16, torch.float32, None),  # allowed: float32 statistics, bfloat16 output
    (torch.float16, torch.float32, None),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(len(MIXED)), ids=lambda i: f"mixed{i}")
@pytest.mark.parametrize("training", [True, False])
def test_mixed_dtypes_module(impl, case, training):
    x_dtype, m_dtype, torch_says = MIXED[case]
    theirs, ours = _pair(1, impl, dtype=m_dtype)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(8, 3).to(x_dtype)
    low = {"rtol": 2e-2, "atol": 2e-2}
    _assert_same_outcome(_outcome(lambda: _step(theirs, x)), _outcome(lambda: _step(ours, x)),
                         torch_says, rf"mixed dtypes: a {x_dtype} input takes weight, bias, "
                         rf"running_mean and running_var of its own dtype.* \(got weight of "
                         rf"{m_dtype}\)", **low)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("given,torch_says,bnlab_says", [
    ({"bias": torch.float64}, r"expected scalar type Float but found Double",
     r"\(got bias of torch.float64\)"),
    ({"weight": None, "running_mean": torch.float64},
     r"expected scalar type Float but found Double", r"\(got running_mean of torch.float64\)"),
    ({"x": torch.bfloat16, "weight": torch.bfloat16},
     r"expected scalar type BFloat16 but found Float", r"\(got bias of torch.float32\)"),
    ({"x": torch.bfloat16, "running_var": torch.bfloat16},
     r"expect parameter to have scalar type of Float", r"\(got running_var of torch.bfloat16\)"),
])
def test_mixed_dtypes_functional(impl, given, torch_says, bnlab_says):
    """One tensor of another dtype: torch's rules (CPU) for each."""
    args = {"x": torch.randn(4, 3), "running_mean": torch.zeros(3), "running_var": torch.ones(3),
            "weight": torch.ones(3), "bias": torch.zeros(3)}
    for name, dtype in given.items():
        args[name] = None if dtype is None else args[name].to(dtype)
    order = [args[k] for k in ("x", "running_mean", "running_var", "weight", "bias")]
    _assert_same_outcome(_outcome(lambda: F.batch_norm(*order, training=True)),
                         _outcome(lambda: batch_norm(*order, training=True, impl=impl)),
                         torch_says, bnlab_says)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_cpu_bfloat16(impl):
    """Under CPU autocast batch norm is not on the lower-precision list: a float32 input
    stays float32; a bfloat16 activation (from an autocast Linear) gives bfloat16."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    theirs, ours = _pair(1, impl)
    x, x_full = torch.randn(16, 5), torch.randn(16, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        outs = [(m(h), m(x_full)) for m in (theirs, ours)]
    (t_low, t_full), (o_low, o_full) = outs
    assert h.dtype == torch.bfloat16
    assert o_low.dtype == t_low.dtype == torch.bfloat16
    assert o_full.dtype == t_full.dtype == torch.float32
    torch.testing.assert_close(o_low.float(), t_low.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(o_full, t_full, rtol=1e-5, atol=1e-5)
    _assert_tree_close(dict(theirs.named_buffers()), dict(ours.named_buffers()),
                       rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_autocast_cuda_float16(impl):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).cuda()
    theirs, ours = _pair(1, impl, "cuda")
    x = torch.randn(16, 5, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        h = lin(x)
        t, o = theirs(h), ours(h)
    assert o.dtype == t.dtype
    torch.testing.assert_close(o.float(), t.float(), rtol=2e-3, atol=2e-3)


# NaN and Inf -------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,shape", [(1, (6, 3)), (2, (6, 3, 2, 2))])
@pytest.mark.parametrize("training", [True, False])
def test_nan_and_inf_input(impl, kind, shape, training):
    """A NaN or Inf poisons its own channel, as in torch: the same entries of the output,
    gradients and running statistics are non-finite, the finite ones agree. (Within a
    poisoned channel bnlab's running mean can be NaN where torch's is Inf.)"""
    theirs, ours = _pair(kind, impl)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x[1, 0] = float("nan")
    x[2, 1] = float("inf")
    t, o = _step(theirs, x), _step(ours, x)
    for key in t:
        assert torch.equal(t[key].isfinite(), o[key].isfinite()), key
        fin = t[key].isfinite()
        torch.testing.assert_close(o[key][fin], t[key][fin], rtol=1e-5, atol=1e-5, msg=key)


# deterministic algorithms, meta device ------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_algorithms(device, impl):
    """Nothing bnlab calls is refused by torch.use_deterministic_algorithms(True), and two
    runs agree bit for bit."""
    theirs, ours = _pair(2, impl, device)
    x = torch.randn(8, 3, 4, 4, device=device)
    dy = torch.randn_like(x)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_step(copy.deepcopy(ours), x, dy) for _ in range(2)]
        expected = _step(theirs, x, dy)
    finally:
        torch.use_deterministic_algorithms(before)
    _assert_tree_close(runs[0], runs[1], rtol=0, atol=0)
    _assert_tree_close(expected, runs[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
def test_meta_device_and_to_empty(impl, training):
    theirs = nn.BatchNorm2d(3, device="meta").train(training)
    ours = bnn.BatchNorm2d(3, device="meta", impl=impl).train(training)
    x = torch.empty(4, 3, 2, 2, device="meta")
    y_t, y_o = theirs(x), ours(x)
    assert y_o.device == y_t.device and y_o.shape == y_t.shape and y_o.dtype == y_t.dtype
    assert [(n, b.device.type) for n, b in ours.named_buffers()] == \
        [(n, b.device.type) for n, b in theirs.named_buffers()]
    for m in (theirs, ours):
        m.to_empty(device="cpu")
        m.reset_parameters()
    xr = torch.randn(4, 3, 2, 2)
    _assert_tree_close(_step(theirs, xr), _step(ours, xr))


# double backward ----------------------------------------------------------------------------

def _gradgrad_fn(impl, training, shape):
    g = torch.Generator().manual_seed(3)
    c = shape[1]
    rm = torch.randn(c, generator=g, dtype=torch.float64)
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    leaves = [torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(),
              (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_(),
              torch.randn(c, generator=g, dtype=torch.float64).requires_grad_()]

    def fn(x, w, b):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, impl=impl)

    return fn, leaves


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 2, 3)])
def test_gradgradcheck(impl, training, shape):
    fn, leaves = _gradgrad_fn(impl, training, shape)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.slow
@COMPILED_SKIP
def test_double_backward_compiled():
    """torch.compile's AOT autograd has no double backward: impl='compiled' refuses a
    second derivative as torch's compiled batch norm does."""
    torch._dynamo.reset()
    fn, leaves = _gradgrad_fn("compiled", True, (4, 2))
    compiled_torch = torch.compile(F.batch_norm)

    def second(f):
        (gx,) = torch.autograd.grad(f(*leaves).pow(3).sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(gx.sum(), leaves[0])

    says = r"torch.compile with aot_autograd does not currently support double backward"
    _assert_same_outcome(
        _outcome(lambda: second(lambda x, w, b: compiled_torch(x, None, None, w, b, True))),
        _outcome(lambda: second(fn)), says, says)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
def test_gradient_penalty_and_input_hessian(device, impl, training):
    """A gradient penalty ||dL/dx||^2 differentiated w.r.t. the parameters, and a
    Hessian-vector product w.r.t. the input, equal torch's."""
    theirs, ours = _pair(2, impl, device, dtype=torch.float64)
    theirs.train(training)
    ours.train(training)
    x0 = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    v = torch.randn_like(x0)

    def run(m):
        x = x0.to(device).requires_grad_()
        (gx,) = torch.autograd.grad(m(x).pow(3).sum(), x, create_graph=True)
        penalty = gx.pow(2).sum()
        pgrads = torch.autograd.grad(penalty, list(m.parameters()), retain_graph=True)
        (hvp,) = torch.autograd.grad(gx, x, v.to(device))
        return [penalty.detach(), *pgrads, hvp]

    _assert_same_outcome(_outcome(lambda: run(theirs)), _outcome(lambda: run(ours)),
                         **TOL[torch.float64])


# torch.func -----------------------------------------------------------------------------------

def _functional(m):
    params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    return lambda x: functional_call(m, (params, buffers), (x,)), params, buffers


FUNC_MODES = [(True, False), (False, True), (False, False)]  # (training, track) torch allows


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training,track", FUNC_MODES)
def test_vmap_over_inputs(impl, training, track):
    theirs, ours = _pair(1, impl, track_running_stats=track)
    theirs.train(training)
    ours.train(training)
    xs = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(5))
    _assert_tree_close(vmap(theirs)(xs), vmap(ours)(xs))


VMAP_REFUSAL = {  # the reference's in-place update meets vmap's own refusal
    "fast": r"batch norm got a batched input under torch.func.vmap but running_mean and "
            r"running_var, which training updates in place, are not batched",
    "reference": r"doesn't match the broadcast shape|vmap: inplace arithmetic",
    "cpp": r"batch norm got a batched input under torch.func.vmap",  # declined: the fast path
    "auto": r"batch norm got a batched input under torch.func.vmap"}


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_refuses_unbatched_running_stats_in_training(impl):
    """torch's documented restriction: training mode would update unbatched running
    statistics with a batch of statistics. Both refuse, and nothing is updated."""
    theirs, ours = _pair(1, impl)
    xs = torch.randn(5, 4, 3)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    _assert_same_outcome(
        _outcome(lambda: vmap(theirs)(xs)), _outcome(lambda: vmap(ours)(xs)),
        r"Batch norm got a batched tensor as input while the running_mean or running_var, "
        r"which will be updated in place, were not batched", VMAP_REFUSAL[impl])
    if impl == "reference":  # its plain update has scaled the buffers before vmap refused
        return
    for k, v in ours.state_dict().items():
        if k != "num_batches_tracked":  # counted before the statistics, as in torch
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
def test_ensemble_vmap_over_stacked_modules(impl, training):
    """stack_module_state + functional_call: each model's own parameters and running
    statistics, which training updates in place, batched."""
    def models(cls, **kw):
        out = []
        for i in range(3):
            torch.manual_seed(i)
            m = cls(3, **kw)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_()
            out.append(m.train(training))
        return out

    x = torch.randn(4, 3, 2, 2)
    results = []
    for ms in (models(nn.BatchNorm2d), models(bnn.BatchNorm2d, impl=impl)):
        params, buffers = stack_module_state(ms)
        base = copy.deepcopy(ms[0]).to("meta")
        y = vmap(lambda p, b, x, base=base: functional_call(base, (p, b), (x,)),
                 in_dims=(0, 0, None))(params, buffers, x)
        results.append([y, buffers])
    _assert_tree_close(*results)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training,track", FUNC_MODES)
def test_grad_jacrev_jvp(impl, training, track):
    theirs, ours = _pair(1, impl, dtype=torch.float64, track_running_stats=track)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = torch.randn_like(x)

    def transforms(m):
        f, params, buffers = _functional(m)

        def loss(p, x):
            return functional_call(m, (p, buffers), (x,)).pow(3).sum()

        per_sample = vmap(grad(loss, argnums=1), in_dims=(None, 0))(params, x.unsqueeze(1)
                                                                    .expand(4, 2, 3))
        wt = {k: torch.ones_like(v) for k, v in params.items()}
        param_jvp = jvp(lambda p: functional_call(m, (p, buffers), (x,)), (params,), (wt,))
        return [grad(loss)(params, x), grad(loss, argnums=1)(params, x), jacrev(f)(x),
                jvp(f, (x,), (t,)), param_jvp, per_sample]

    _assert_same_outcome(_outcome(lambda: transforms(theirs)),
                         _outcome(lambda: transforms(ours)), **TOL[torch.float64])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp"])
def test_grad_transforms_refuse_captured_running_stats_in_training(impl, transform):
    """Training with tracked statistics mutates buffers the transformed function captured:
    torch refuses (num_batches_tracked.add_), and so does bnlab, with the same message."""
    theirs, ours = _pair(1, impl, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)

    def run(m):
        f, _, _ = _functional(m)
        if transform == "jvp":
            return jvp(f, (x,), (x,))
        return {"grad": grad(lambda x: f(x).sum()), "jacrev": jacrev(f)}[transform](x)

    says = r"attempted to call in-place operation .* that would mutate a captured Tensor"
    _assert_same_outcome(_outcome(lambda: run(theirs)), _outcome(lambda: run(ours)), says, says)


def test_replace_all_batch_norm_modules():
    """torch.func.replace_all_batch_norm_modules_ recognises torch's modules only;
    bnlab.nn.replace_all_batch_norm_modules_ does the same to both, after which vmap in
    training works on either."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), bnn.BatchNorm1d(3))

    untouched = torch.func.replace_all_batch_norm_modules_(model())
    assert untouched[1].running_mean is None and untouched[2].running_mean is not None
    ours = bnn.replace_all_batch_norm_modules_(model())
    theirs_only = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    theirs_only.load_state_dict(model().state_dict())
    torch.func.replace_all_batch_norm_modules_(theirs_only)
    for m in (ours[1], ours[2]):
        assert m.running_mean is None and m.running_var is None
        assert m.num_batches_tracked is None and not m.track_running_stats
    xs = torch.randn(5, 6, 4)
    _assert_tree_close(vmap(theirs_only)(xs), vmap(ours)(xs))


# torch.compile ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph(impl, momentum):
    """fullgraph=True, train then eval, against torch's eager module (aot_eager: dynamo
    and AOT autograd, without the C++ compiler). torch's own module cannot compile
    momentum=None training with fullgraph=True (a data-dependent float); bnlab's can."""
    torch._dynamo.reset()
    theirs, ours = _pair(2, impl, momentum=momentum)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for step in range(3):
        training = step < 2
        theirs.train(training)
        ours.train(training)
        x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(step))
        _assert_tree_close(_step(theirs, x), _step(compiled, x))
    if momentum is None:
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.UserError, match="data-dependent"):
            torch.compile(nn.BatchNorm2d(3, momentum=None), fullgraph=True,
                          backend="aot_eager")(x)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False])
@COMPILED_SKIP
def test_compile_fullgraph_inductor(training):
    torch._dynamo.reset()
    theirs, ours = _pair(1, "fast")
    theirs.train(training)
    ours.train(training)
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(8, 3)
    _assert_tree_close(_step(theirs, x), _step(compiled, x))


# half precision ------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,shape", [(1, (8, 3)), (2, (8, 3, 4, 4))])
def test_half_module_trains_as_torchs(impl, kind, shape):
    """``module.half()`` (float16 parameters and statistics) trains as torch's module does:
    statistics computed in float32 and stored in float16, float16 outputs and gradients.
    (The fast path raised a RuntimeError about torch.func.vmap: its float32 statistics
    could not be lerped into float16 buffers.)"""
    theirs, ours = _pair(kind, impl)
    theirs.half().train()
    ours.half().train()
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = (torch.randn(shape, generator=g) * 2 + 3).half()
        dy = torch.randn(shape, generator=g).half()
        _assert_same_outcome(_outcome(lambda x=x, dy=dy: _step(theirs, x, dy)),
                             _outcome(lambda x=x, dy=dy: _step(ours, x, dy)), rtol=1e-2, atol=1e-2)


# torch.jit and the TorchScript ONNX exporter --------------------------------------------

@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_jit_trace_replays_any_batch(impl, training, activation):
    """A traced module computes what the module computes, for batches of other sizes and
    values than the traced one, running statistics included. (Was, with the C++ kernel: the
    traced graph held only the output's allocation, so any input gave garbage; with the
    fast path, the running statistics were updated twice with the traced batch's size.)"""
    ours = (bnn.BatchNorm2d(3, impl=impl) if activation is None
            else bnn.BatchNormAct2d(3, impl=impl, activation=activation))
    _, source = _pair(2, impl)
    ours.load_state_dict(source.state_dict())
    ours.train(training)
    expected = copy.deepcopy(ours)
    traced = torch.jit.trace(copy.deepcopy(ours), torch.randn(4, 3, 5, 5), check_trace=False)
    traced.load_state_dict(expected.state_dict())  # tracing ran one batch
    g = torch.Generator().manual_seed(6)
    for n in (8, 3):
        x = torch.randn(n, 3, 5, 5, generator=g) * 3 + 1
        torch.testing.assert_close(traced(x), expected(x))
        _assert_tree_close(dict(expected.named_buffers()), dict(traced.named_buffers()))


def test_jit_script_refuses_bnlab_modules():
    """torch.jit.script cannot compile bnlab's modules (their forward picks an implementation
    from a registry of Python functions): it raises, nothing is half-made. Trace them, or
    script bnlab.nn.to_torch(model)."""
    with pytest.raises(RuntimeError, match="BatchNorm2d"):
        torch.jit.script(bnn.BatchNorm2d(3))
    torch.jit.script(bnn.to_torch(nn.Sequential(bnn.BatchNormAct2d(3, activation="relu"))))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("norm", ["bnlab", "bnlab-fast", "bnlab-ref",
                                  pytest.param("bnlab-cpp", marks=NORM_SKIPS["bnlab-cpp"])])
@pytest.mark.parametrize("fuse", [True, False])
def test_onnx_torchscript_export_of_an_unconverted_bn_lenet(norm, fuse):
    """torch.onnx.export(..., dynamo=False) of BN-LeNet with bnlab's batch norms as they are
    (no to_torch) runs in onnxruntime with the model's output. (Was off by 0.31 with the
    C++ kernel: the exporter traced a constant.)"""
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'bnlab[onnx]')")
    ort = pytest.importorskip("onnxruntime",
                              reason="onnxruntime not installed (pip install 'bnlab[onnx]')")
    import io

    from bnlab.training.models import build_model

    torch.manual_seed(0)
    model = build_model("bn-lenet", norm, fuse_activation=fuse)
    with torch.no_grad():
        for _ in range(3):  # running statistics away from (0, 1)
            model(torch.rand(16, 1, 28, 28))
    model.eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, dynamic_axes={"input": {0: "batch"}},
                      input_names=["input"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for batch in (x, torch.rand(3, 1, 28, 28)):
        with torch.no_grad():
            want = model(batch)
        got = session.run(None, {"input": batch.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    assert expected.shape == (5, 10)
