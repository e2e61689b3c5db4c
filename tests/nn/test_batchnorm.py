"""bnlab.nn modules against torch.nn.BatchNorm* (on each device present): training steps
then eval, state_dicts both ways, lazy modules, convert_batchnorm, mode vs grad mode,
errors, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from tests.helpers import IMPL_PARAMS

PAIRS = {1: (nn.BatchNorm1d, bnn.BatchNorm1d), 2: (nn.BatchNorm2d, bnn.BatchNorm2d),
         3: (nn.BatchNorm3d, bnn.BatchNorm3d)}
VALID_SHAPES = {1: [(6, 3), (4, 3, 5)], 2: [(4, 3, 3, 5)], 3: [(3, 3, 2, 3, 2)]}
GRID = [(k, s) for k, shapes in VALID_SHAPES.items() for s in shapes]
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10},
       torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


def _pair(kind, dtype=torch.float32, impl="fast", **kwargs):
    theirs_cls, ours_cls = PAIRS[kind]
    theirs = theirs_cls(3, dtype=dtype, **kwargs)
    ours = ours_cls(3, dtype=dtype, impl=impl, **kwargs)
    if theirs.affine:  # not the identity, so that weight and bias matter
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            theirs.weight.copy_(torch.rand(3, generator=g) + 0.5)
            theirs.bias.copy_(torch.randn(3, generator=g))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _step(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return [y.detach(), *grads]


def _same_state(a, b, tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        torch.testing.assert_close(sa[k], sb[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("kind,shape", GRID)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_matches_torch(device, impl, kind, shape, affine, track, momentum, dtype):
    theirs, ours = _pair(kind, dtype, impl, affine=affine, track_running_stats=track,
                         momentum=momentum)
    theirs.to(device)
    ours.to(device)
    g = torch.Generator().manual_seed(0)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    for step in range(4):
        if step == 3:
            theirs.eval()
            ours.eval()
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + step).to(device, dtype)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
        if fmt is not None and step % 2:
            x = x.to(memory_format=fmt)
        for a, b in zip(_step(ours, x, dy), _step(theirs, x, dy)):
            torch.testing.assert_close(a, b, **TOL[dtype])
        _same_state(ours, theirs, TOL[dtype])


def test_buffers_and_parameters_look_like_torchs():
    for kind in PAIRS:
        theirs, ours = _pair(kind)
        assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
        assert ours.num_batches_tracked.dtype == torch.int64
        assert ours.num_batches_tracked.shape == ()
        assert repr(ours) == repr(theirs)
    _, ours = _pair(2, affine=False, track_running_stats=False)
    assert ours.weight is None and ours.bias is None
    assert ours.running_mean is None and ours.running_var is None
    assert ours.num_batches_tracked is None
    assert list(ours.state_dict()) == []


def test_state_dict_round_trips_both_ways():
    theirs, ours = _pair(2, momentum=0.3)
    x = torch.randn(4, 3, 5, 5)
    theirs(x)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # torch -> bnlab
    back = nn.BatchNorm2d(3)
    back.load_state_dict(ours.state_dict(), strict=True)  # bnlab -> torch
    for m in (theirs, ours, back):
        m.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(back(x), theirs(x))
    assert ours.num_batches_tracked.item() == 1 == back.num_batches_tracked.item()


def test_old_state_dict_without_num_batches_tracked_loads():
    ours = bnn.BatchNorm1d(3)
    sd = nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    ours.load_state_dict(sd)
    assert ours.num_batches_tracked.item() == 0


def test_reset_methods():
    _, ours = _pair(2)
    ours(torch.randn(4, 3, 2, 2))
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(3))
    assert torch.equal(ours.running_var, torch.ones(3))
    assert ours.num_batches_tracked.item() == 0
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(3)) and torch.equal(ours.bias, torch.zeros(3))


def test_eval_never_changes_a_buffer():
    _, ours = _pair(2)
    ours(torch.randn(4, 3, 2, 2))
    ours.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    ours(x).sum().backward()
    with torch.no_grad():
        ours(torch.randn(4, 3, 2, 2))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mode_follows_module_training_not_grad_mode():
    theirs, ours = _pair(2)
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    # training mode under no_grad: batch statistics, and the buffers do move
    with torch.no_grad():
        y = ours(x)
        y_ref = theirs(x)
    torch.testing.assert_close(y, y_ref)
    assert ours.num_batches_tracked.item() == 1
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    # eval mode with grad enabled: running statistics, buffers frozen, input grads work
    ours.eval()
    theirs.eval()
    before = ours.running_mean.clone()
    xg = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    ours(xg).square().sum().backward()
    theirs(xr).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    assert torch.equal(ours.running_mean, before)
    assert ours.num_batches_tracked.item() == 1


# errors: messages, types, and nothing touched ---------------------------------------

@pytest.mark.parametrize("module,x,exc,msg", [
    (bnn.BatchNorm2d(3), torch.randn(4, 3, 5), ValueError, r"expected 4D input \(got 3D input\)"),
    (bnn.BatchNorm1d(3), torch.randn(4, 3, 5, 5), ValueError,
     r"expected 2D or 3D input \(got 4D input\)"),
    (bnn.BatchNorm3d(3), torch.randn(4, 3, 5, 5), ValueError, r"expected 5D input \(got 4D"),
    (bnn.BatchNorm1d(6), torch.randn(4, 5), RuntimeError,
     r"expected 6 channels \(dim 1\) \(got 5\)"),
    (bnn.BatchNorm1d(3), torch.randn(1, 3), ValueError,
     r"Expected more than 1 value per channel when training, got input size "
     r"torch.Size\(\[1, 3\]\)"),
    (bnn.BatchNorm1d(3), torch.ones(4, 3, dtype=torch.int64), TypeError,
     r"expected a floating-point input \(got torch.int64\)"),
])
def test_errors_touch_nothing(module, x, exc, msg):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(exc, match=msg):
        module(x)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_one_value_per_channel_is_fine_in_eval():
    m = bnn.BatchNorm1d(3).eval()
    assert m(torch.randn(1, 3)).shape == (1, 3)


# lazy modules -------------------------------------------------------------------------

@pytest.mark.parametrize("kind,shape", [(1, (4, 5)), (1, (4, 5, 3)), (2, (4, 5, 3, 3)),
                                        (3, (2, 5, 2, 3, 2))])
@pytest.mark.parametrize("affine,track", [(True, True), (False, False)])
def test_lazy_matches_torch_lazy(kind, shape, affine, track):
    theirs_cls = {1: nn.LazyBatchNorm1d, 2: nn.LazyBatchNorm2d, 3: nn.LazyBatchNorm3d}[kind]
    ours_cls = {1: bnn.LazyBatchNorm1d, 2: bnn.LazyBatchNorm2d, 3: bnn.LazyBatchNorm3d}[kind]
    theirs = theirs_cls(affine=affine, track_running_stats=track)
    ours = ours_cls(affine=affine, track_running_stats=track)
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))
    assert type(ours) is PAIRS[kind][1]
    assert ours.num_features == 5
    # torch's lazy module with nothing to materialize keeps num_features=0; ours learns it
    assert repr(ours) == repr(theirs).replace("(0,", "(5,")
    _same_state(ours, theirs, TOL[torch.float32])


def test_lazy_rejects_bad_first_input_without_materializing():
    lazy = bnn.LazyBatchNorm2d()
    with pytest.raises(ValueError, match="expected 4D input"):
        lazy(torch.randn(4, 3))
    assert lazy.has_uninitialized_params()


# convert_batchnorm ----------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6, momentum=None)),
    )


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_convert_keeps_outputs_state_and_mode(impl):
    import copy

    ref = _model()
    ref(torch.randn(8, 1, 6, 6))  # non-trivial running stats
    ref[1].weight.requires_grad_(False)
    ref.eval()
    model = bnn.convert_batchnorm(copy.deepcopy(ref), impl=impl)
    assert isinstance(model[1], bnn.BatchNorm2d) and isinstance(model[3][2], bnn.BatchNorm1d)
    assert model[1].impl == impl
    assert not model.training and not model[1].training
    assert not model[1].weight.requires_grad and model[3][2].weight.requires_grad
    assert model[3][2].momentum is None
    _same_state(model, ref, {"rtol": 0, "atol": 0})
    x = torch.randn(8, 1, 6, 6)
    torch.testing.assert_close(model(x), ref(x))  # eval
    model.train()
    ref.train()
    torch.testing.assert_close(model(x), ref(x))  # train, and buffers follow
    _same_state(model, ref, TOL[torch.float32])


def test_convert_root_dtype_and_shared_parameters():
    bn = nn.BatchNorm1d(3, dtype=torch.float64)
    out = bnn.convert_batchnorm(bn)
    assert isinstance(out, bnn.BatchNorm1d) and out.weight is bn.weight
    assert out.running_mean.dtype == torch.float64 and out.weight.device == bn.weight.device


def test_convert_leaves_syncbatchnorm_and_refuses_uninitialized_lazy():
    sync = nn.SyncBatchNorm(3)
    assert bnn.convert_batchnorm(nn.Sequential(sync))[0] is sync
    with pytest.raises(ValueError, match="uninitialized"):
        bnn.convert_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))


# torch.compile ---------------------------------------------------------------------------

def test_compiled_model_matches_eager():
    torch._dynamo.reset()

    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 4), bnn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))

    eager, compiled_model = build(), build()
    compiled = torch.compile(compiled_model, backend="eager")
    for step in range(2):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
        for m in (eager, compiled):
            m.zero_grad()
            m(x).square().sum().backward()
        torch.testing.assert_close(compiled(x), eager(x))
        for (n, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=n)
        _same_state(eager, compiled_model, TOL[torch.float32])
    eager.eval()
    compiled_model.eval()
    x = torch.randn(8, 5)
    torch.testing.assert_close(compiled(x), eager(x))


def test_unknown_impl_is_refused_at_construction():
    from bnlab.functional import IMPLEMENTATIONS

    names = ", ".join(IMPLEMENTATIONS)
    with pytest.raises(ValueError, match=rf"impl must be one of {names} \(got 'fats'\)"):
        bnn.BatchNorm2d(3, impl="fats")


def test_default_impl_is_auto_everywhere():
    """Every module, the functional form and convert_batchnorm default to impl='auto'."""
    import inspect

    from bnlab.functional import batch_norm

    assert inspect.signature(batch_norm).parameters["impl"].default == "auto"
    for cls in (bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d, bnn.LazyBatchNorm1d,
                bnn.LazyBatchNorm2d, bnn.LazyBatchNorm3d):
        assert cls(3).impl == "auto", cls
    assert bnn.convert_batchnorm(nn.BatchNorm2d(3)).impl == "auto"
