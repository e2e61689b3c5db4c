"""BatchNormAct1d/2d/3d and bnlab.functional.batch_norm_act against nn.Sequential(torch's batch
norm, torch's activation), for every implementation: outputs, gradients (gradcheck and
gradgradcheck in float64), running statistics, edge cases; the kernel's fused path against
bnlab's own batch norm then torch's activation bit for bit; what is saved for backward; the
fallback where the kernel declines; fusing, unfusing and the conversions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab.nn as bnn
from bnlab.bench.bn import saved_bytes
from bnlab.functional import ACTIVATIONS, batch_norm, batch_norm_act
from bnlab.kernels.cpp import KERNEL_ACTIVATIONS, kernel_batch_norm
from bnlab.nn.batchnorm_act import ACTIVATION_MODULES
from tests.helpers import CPP_SKIP, IMPL_PARAMS

ACTS = list(ACTIVATIONS)
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OURS = {1: bnn.BatchNormAct1d, 2: bnn.BatchNormAct2d, 3: bnn.BatchNormAct3d}
GRID = [(1, (6, 3)), (1, (4, 3, 5)), (2, (4, 3, 3, 5)), (3, (3, 3, 2, 3, 2))]
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10},
       torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
FUSED_NODE = "torch::autograd::CppNode<bnlab::BatchNormFunction>"


def _pair(kind, activation, impl, dtype=torch.float64, **kwargs):
    """(torch's Sequential(BN, act), ours) with the same non-trivial state."""
    bn = TORCH_BN[kind](3, dtype=dtype, **kwargs)
    if bn.affine:
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            bn.weight.copy_(torch.rand(3, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(3, generator=g))
    theirs = nn.Sequential(bn, ACTIVATION_MODULES[activation]())
    ours = OURS[kind](3, dtype=dtype, impl=impl, activation=activation, **kwargs)
    ours.load_state_dict(bn.state_dict())
    return theirs, ours


def _step(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return [y.detach(), *grads]


def _assert_same_state(ours, theirs_bn, tol):
    sa, sb = ours.state_dict(), theirs_bn.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("kind,shape", GRID)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_module_matches_torch_sequential(device, impl, activation, kind, shape, affine, track):
    """Training steps (contiguous and channels_last), then eval: outputs, input and
    parameter gradients, running statistics, num_batches_tracked. On CUDA (where there is
    one), against cuDNN's batch norm: the kernel declines, the fast path and torch's
    activation run."""
    theirs, ours = _pair(kind, activation, impl, affine=affine, track_running_stats=track)
    theirs.to(device)
    ours.to(device)
    g = torch.Generator().manual_seed(0)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    for step in range(4):
        if step == 3:
            theirs.eval()
            ours.eval()
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + step).to(device)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
        if fmt is not None and step % 2:
            x = x.to(memory_format=fmt)
        for a, b in zip(_step(ours, x, dy), _step(theirs, x, dy), strict=True):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
        _assert_same_state(ours, theirs[0], TOL[torch.float64])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_float32_module_matches_torch_sequential(impl, activation):
    theirs, ours = _pair(2, activation, impl, dtype=torch.float32, momentum=None)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, dy = torch.randn(8, 3, 5, 5, generator=g) * 3 + 1, torch.randn(8, 3, 5, 5, generator=g)
        for a, b in zip(_step(ours, x, dy), _step(theirs, x, dy), strict=True):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
    _assert_same_state(ours, theirs[0], TOL[torch.float32])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,fmt", [((6, 3), None), ((3, 2, 2, 3), None),
                                       ((3, 2, 2, 3), torch.channels_last)])
def test_gradcheck_and_gradgradcheck(impl, activation, training, shape, fmt):
    """First and second derivatives in float64 w.r.t. the input, weight and bias (the fused
    kernel's double backward recomputes z so that act'(z) is differentiated too)."""
    g = torch.Generator().manual_seed(12)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64) * 0.3
    rm = torch.randn(c, generator=g, dtype=torch.float64)
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, activation=activation,
                              impl=impl)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("activation", ACTS)
def test_functional_matches_batch_norm_then_activation(impl, activation):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) + 2
    rm1, rv1 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y = batch_norm_act(x, rm1, rv1, training=True, activation=activation, impl=impl)
    expected = ACTIVATIONS[activation](F.batch_norm(x, rm2, rv2, training=True))
    torch.testing.assert_close(y, expected, **TOL[torch.float64])
    torch.testing.assert_close((rm1, rv1), (rm2, rv2), **TOL[torch.float64])


def test_functional_and_module_refuse_an_unknown_activation():
    with pytest.raises(ValueError, match=r"activation must be one of identity, relu, sigmoid, "
                                         r"tanh \(got 'gelu'\)"):
        batch_norm_act(torch.randn(4, 3), None, None, training=True, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        bnn.BatchNormAct2d(3, activation="gelu")
    with pytest.raises(ValueError, match="impl must be one of"):
        batch_norm_act(torch.randn(4, 3), None, None, training=True, impl="nope")


# --------------------------------------------------------------- the kernel's fused path

@CPP_SKIP
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,fmt", [
    ((16, 6, 24, 24), None),          # planes (BN-LeNet's conv layers, batch 16)
    ((128, 120), None),               # rows (its FC layers)
    ((60, 100), None),                # 6000 values: torch's sigmoid ends on 16 scalar ones
    ((1000, 84), None),               # over torch's grain: two chunks with scalar tails
    ((7, 5, 3, 5), None),             # planes with a scalar tail
    ((100, 5, 7, 7), torch.channels_last),
], ids=["planes", "rows", "scalar-tail", "two-chunks", "planes-tail", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_fused_kernel_is_batch_norm_then_torch_activation_bit_for_bit(threads, shape, fmt,
                                                                      dtype, activation):
    """The same bits as bnlab's batch norm followed by torch.relu / torch.sigmoid: outputs,
    gradients and running statistics, in training and eval (what lets the lab's models fuse
    without changing any run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for training in (True, False):
            g = torch.Generator().manual_seed(5)
            c = shape[1]
            x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
            if fmt is not None:
                x = x.to(memory_format=fmt)
            w = (torch.rand(c, generator=g) + 0.5).to(dtype).requires_grad_()
            b = torch.randn(c, generator=g).to(dtype).requires_grad_()
            dy = torch.randn(shape, generator=g).to(dtype)
            results = []
            for fused in (True, False):
                xs = x.clone().requires_grad_()
                rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
                if fused:
                    y = batch_norm_act(xs, rm, rv, w, b, training, activation=activation,
                                       impl="cpp")
                    assert y.grad_fn.name() == FUSED_NODE
                else:
                    y = ACTIVATIONS[activation](batch_norm(xs, rm, rv, w, b, training, impl="cpp"))
                results.append([y, *torch.autograd.grad(y, (xs, w, b), dy), rm, rv])
            for ours, theirs in zip(*results, strict=True):
                assert torch.equal(ours, theirs)
    finally:
        torch.set_num_threads(before)


@CPP_SKIP
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_fused_saves_no_more_than_batch_norm_alone(activation):
    """BN + act keeps the input and per-channel vectors, as batch norm does; unfused, the
    activation keeps its output besides."""
    x = torch.randn(8, 4, 16, 16, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    alone = saved_bytes(lambda: batch_norm(x, None, None, w, b, True, impl="cpp"))
    fused = saved_bytes(lambda: batch_norm_act(x, None, None, w, b, True, activation=activation,
                                                impl="cpp"))
    unfused = saved_bytes(lambda: ACTIVATIONS[activation](
        batch_norm(x, None, None, w, b, True, impl="cpp")))
    assert fused == alone
    assert unfused >= alone + x.numel() * x.element_size()


DECLINED = [(torch.randn(4, 3, 2, 2).to(torch.bfloat16), "sigmoid"),  # dtype
            (torch.randn(4, 3, 2, 6)[..., ::2], "sigmoid"),              # strides
            (torch.randn(4, 3, 2, 2), "tanh")]                           # activation
DECLINED_IDS = ["bfloat16", "strided", "tanh"]


def test_kernel_declines_off_the_cpu_without_a_build():
    x = torch.randn(4, 3, 2, 2, device="meta")
    assert kernel_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, build=False,
                             activation="relu") is None


@CPP_SKIP
@pytest.mark.parametrize("x,activation", DECLINED, ids=DECLINED_IDS)
def test_kernel_declines_what_it_cannot_do(x, activation):
    """The kernel returns None (it does not fall back itself) for inputs outside its scope
    and activations it does not fuse."""
    assert ("tanh" in KERNEL_ACTIVATIONS) is False
    assert kernel_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, build=True,
                             activation=activation) is None


@pytest.mark.parametrize("impl", ["auto", pytest.param("cpp", marks=CPP_SKIP)])
@pytest.mark.parametrize("x,activation", DECLINED, ids=DECLINED_IDS)
def test_fallback_where_the_kernel_declines_is_batch_norm_then_torch_activation(impl, x,
                                                                                activation):
    """Declined calls run the fast path's batch norm, then torch's activation: the same
    values as torch's Sequential, and the activation's own autograd node."""
    theirs, ours = _pair(2, activation, impl, dtype=torch.float32)
    theirs.to(x.dtype)
    ours.to(x.dtype)
    dy = torch.randn(x.shape).to(x.dtype)
    y = ours(x.detach().requires_grad_())  # a view keeps its strides (a clone would not)
    assert y.grad_fn.name() == {"tanh": "TanhBackward0", "sigmoid": "SigmoidBackward0"}[activation]
    tol = {"rtol": 2e-2, "atol": 2e-2} if x.dtype == torch.bfloat16 else TOL[torch.float32]
    for a, b in zip(_step(ours, x, dy), _step(theirs, x, dy), strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_vmap_over_a_fused_module_falls_back():
    """Under torch.func the kernel declines; eval mode (no statistics to update) vmaps."""
    _, ours = _pair(1, "sigmoid", "auto", dtype=torch.float64)
    theirs = nn.Sequential(nn.BatchNorm1d(3, dtype=torch.float64), nn.Sigmoid())
    theirs[0].load_state_dict(ours.state_dict())
    ours.eval()
    theirs.eval()
    xs = torch.randn(5, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(ours)(xs), torch.func.vmap(theirs)(xs))


# --------------------------------------------------------------- edge cases

@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(impl, training):
    theirs, ours = _pair(2, "sigmoid", impl)
    for m in (theirs, ours):
        m.train(training)
    x = torch.randn(0, 3, 4, 4, dtype=torch.float64)
    for a, b in zip(_step(ours, x, x), _step(theirs, x, x), strict=True):
        torch.testing.assert_close(a, b)
    _assert_same_state(ours, theirs[0], TOL[torch.float64])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_errors_as_batch_norm(impl):
    ours = bnn.BatchNormAct2d(3, impl=impl)
    with pytest.raises(ValueError, match="expected 4D input"):
        ours(torch.randn(4, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours(torch.randn(1, 3, 1, 1))
    assert ours.num_batches_tracked.item() == 0  # nothing touched


def test_mode_follows_training_not_grad_mode():
    _, ours = _pair(2, "relu", "auto")
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        ours(x)  # training mode under no_grad: the statistics move
    assert ours.num_batches_tracked.item() == 1
    ours.eval()
    before = ours.running_mean.clone()
    ours(x.requires_grad_())  # eval mode with grad: they stay
    assert torch.equal(ours.running_mean, before)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_half_precision_trains_as_torch_does(impl):
    """float16 input with float16 parameters and statistics (module.half()), as torch's
    module: statistics in float32, output and gradients in float16."""
    theirs, ours = _pair(2, "relu", impl, dtype=torch.float32)
    theirs.half()
    ours.half()
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        x = (torch.randn(8, 3, 4, 4, generator=g) * 2 + 3).half()
        dy = torch.randn(8, 3, 4, 4, generator=g).half()
        for a, b in zip(_step(ours, x, dy), _step(theirs, x, dy), strict=True):
            assert a.dtype == b.dtype == torch.float16
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    _assert_same_state(ours, theirs[0], {"rtol": 1e-3, "atol": 1e-3})


# --------------------------------------------------------------- a drop-in for BatchNorm*d

def test_state_dict_repr_and_children_look_like_batch_norm():
    ours = bnn.BatchNormAct2d(3, activation="sigmoid")
    plain = bnn.BatchNorm2d(3)
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    assert type(ours.act) is nn.Sigmoid and ours.fused
    assert repr(plain)[len("BatchNorm2d("):-1] + ", activation='sigmoid'" in repr(ours)
    assert bnn.is_batch_norm(ours)
    torch_bn = nn.BatchNorm2d(3)
    torch_bn.load_state_dict(ours.state_dict())  # both ways
    ours.load_state_dict(torch_bn.state_dict())


@pytest.mark.parametrize("cls,shape,target", [
    (bnn.LazyBatchNormAct1d, (4, 5), bnn.BatchNormAct1d),
    (bnn.LazyBatchNormAct2d, (4, 5, 2, 2), bnn.BatchNormAct2d),
    (bnn.LazyBatchNormAct3d, (4, 5, 2, 2, 2), bnn.BatchNormAct3d),
])
def test_lazy_forms_become_the_concrete_class(cls, shape, target):
    lazy = cls(activation="sigmoid", momentum=0.3)
    x = torch.randn(shape)
    y = lazy(x)
    assert type(lazy) is target and lazy.num_features == 5 and lazy.activation == "sigmoid"
    expected = torch.sigmoid(F.batch_norm(x, torch.zeros(5), torch.ones(5), training=True))
    torch.testing.assert_close(y, expected)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), bnn.BatchNorm2d(3), nn.Sigmoid(), nn.Flatten(),
                         nn.Linear(12, 4), bnn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_fuse_and_unfuse_keep_state_keys_and_values():
    model = _model()
    x = torch.randn(6, 1, 4, 4)
    keys = list(model.state_dict())
    params = list(model.parameters())
    expected = model(x)
    assert bnn.fuse_batch_norm_act(model) is model
    assert [type(m).__name__ for m in model] == ["Conv2d", "BatchNormAct2d", "Identity",
                                                "Flatten", "Linear", "BatchNormAct1d",
                                                "Identity", "Linear"]
    assert model[1].activation == "sigmoid" and model[5].activation == "relu"
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    torch.testing.assert_close(model(x), expected)
    other = _model()
    other(torch.randn(6, 1, 4, 4))  # other running statistics
    model.load_state_dict(other.state_dict())  # a checkpoint of the unfused model loads
    torch.testing.assert_close(model.eval()(x), other.eval()(x))
    back = bnn.unfuse_batch_norm_act(model)
    assert [type(m).__name__ for m in back] == [type(m).__name__ for m in _model()]
    assert list(back.state_dict()) == keys and list(back.parameters()) == params


def test_unfuse_without_a_place_for_the_activation_makes_a_sequential():
    fused = bnn.BatchNormAct1d(4, activation="tanh")
    root = bnn.unfuse_batch_norm_act(fused)
    assert [type(m) for m in root] == [bnn.BatchNorm1d, nn.Tanh]
    assert root[0].weight is fused.weight
    with pytest.raises(ValueError, match="uninitialized LazyBatchNormAct2d"):
        bnn.unfuse_batch_norm_act(nn.Sequential(bnn.LazyBatchNormAct2d()))


def test_to_torch_gives_torch_batch_norm_and_the_activation():
    model = bnn.fuse_batch_norm_act(_model()).eval()
    x = torch.randn(6, 1, 4, 4)
    expected = model(x)
    keys = list(model.state_dict())
    bnn.to_torch(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2]) is nn.Sigmoid
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected)
    alone = bnn.to_torch(bnn.BatchNormAct2d(3, activation="relu"))
    assert [type(m) for m in alone] == [nn.BatchNorm2d, nn.ReLU]


@pytest.mark.parametrize("method", ["sequential", "fx"])
def test_fold_keeps_the_activation(method):
    model = bnn.fuse_batch_norm_act(_model())
    with torch.no_grad():
        model(torch.randn(16, 1, 4, 4) * 2 + 1)  # statistics away from (0, 1)
    model.eval()
    x = torch.randn(5, 1, 4, 4)
    folded = bnn.fold_batch_norm(model, method=method)
    assert not any(isinstance(m, bnn.BatchNormAct2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


def test_freeze_and_sync_conversion_keep_the_activation():
    model = bnn.fuse_batch_norm_act(_model())
    with torch.no_grad():
        model(torch.randn(16, 1, 4, 4))
    model.eval()
    x = torch.randn(5, 1, 4, 4)
    expected = model(x)
    keys = list(model.state_dict())
    bnn.freeze_batch_norm(model)
    assert type(model[1]) is bnn.FrozenBatchNorm2d and type(model[2]) is nn.Sigmoid
    torch.testing.assert_close(model(x), expected)
    synced = bnn.SyncBatchNorm.convert_sync_batchnorm(bnn.fuse_batch_norm_act(_model()))
    assert type(synced[1]) is bnn.SyncBatchNorm and type(synced[2]) is nn.Sigmoid
    assert list(synced.state_dict()) == keys


def test_unfused_lets_hooks_on_the_activation_see_its_input():
    model = bnn.fuse_batch_norm_act(_model())
    seen = []
    model[1].act.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    x = torch.randn(6, 1, 4, 4)
    expected = model(x)
    assert seen == []  # fused: the activation module is not called
    with bnn.unfused(model) as same:
        assert same is model and not model[1].fused
        torch.testing.assert_close(model(x), expected)
    assert model[1].fused and len(seen) == 1
    torch.testing.assert_close(torch.sigmoid(seen[0]), model[1](model[0](x)).detach())
