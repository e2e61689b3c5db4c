"""Folding BN into the layer before it (same eval output on random models, float64 near
exact), to_torch (the inverse of convert_batchnorm), and ONNX export through onnxruntime."""

from __future__ import annotations

import functools
import pickle
import random
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bnlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, convert_batchnorm, to_torch
from bnlab.nn.batchnorm import _BatchNorm as BnlabBatchNorm
from bnlab.nn.fold import fold_batch_norm
from bnlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNorm
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d
from bnlab.training.models import build_model

CONVS = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d),
         3: (nn.Conv3d, nn.ConvTranspose3d)}
BNS = {  # every batch norm that folds: its eval output is plain batch norm
    1: (nn.BatchNorm1d, BatchNorm1d, FrozenBatchNorm1d, BatchRenorm1d,
        functools.partial(GhostBatchNorm1d, virtual_batch_size=2)),
    2: (nn.BatchNorm2d, BatchNorm2d, FrozenBatchNorm2d, BatchRenorm2d,
        functools.partial(GhostBatchNorm2d, virtual_batch_size=2)),
    3: (nn.BatchNorm3d, BatchNorm3d, FrozenBatchNorm3d)}


def randomize_bn(bn: nn.Module, rng: random.Random) -> None:
    g = torch.Generator().manual_seed(rng.randrange(10**6))
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 2)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.1)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))


def random_block(rng: random.Random, in_ch: int) -> tuple[list[nn.Module], int, int]:
    """A random conv/transposed-conv/linear followed by a random BN; (modules, rank, out_ch)."""
    dim = rng.choice([0, 1, 2, 3])  # 0: Linear
    groups = rng.choice([1, 2, 3]) if dim else 1
    out_ch = groups * rng.randint(1, 3)
    in_ch = groups * max(1, in_ch // groups)
    bias = rng.random() < 0.5
    if dim == 0:
        layer = nn.Linear(in_ch, out_ch, bias=bias)
    else:
        cls = rng.choice(CONVS[dim])
        kwargs = {"kernel_size": rng.randint(1, 3), "stride": rng.randint(1, 2),
                  "dilation": rng.randint(1, 2), "groups": groups, "bias": bias}
        if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            kwargs["padding"] = rng.randint(0, 1)
        layer = cls(in_ch, out_ch, **kwargs)
    affine = rng.random() < 0.7
    bn = rng.choice(BNS[max(dim, 1)])(out_ch, affine=affine)
    randomize_bn(bn, rng)
    return [layer, bn], dim, out_ch


def random_model(seed: int, dtype: torch.dtype) -> tuple[nn.Sequential, torch.Tensor]:
    """A random chain of blocks of one rank; redrawn until its output is not empty."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    while True:
        model, x = _draw_model(rng, dtype)
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError:  # spatial size shrank below a kernel: draw again
            continue
        return model, x


def _draw_model(rng: random.Random, dtype: torch.dtype) -> tuple[nn.Sequential, torch.Tensor]:
    modules, dim, out_ch = random_block(rng, rng.randint(1, 6))
    in_ch = modules[0].in_features if dim == 0 else modules[0].in_channels
    blocks = [*modules, nn.Tanh()]
    for _ in range(rng.randint(0, 2)):  # more blocks of the same rank
        while True:
            more, more_dim, more_out = random_block(rng, out_ch)
            if more_dim == dim:
                break
        fix_in = more[0].in_features if dim == 0 else more[0].in_channels
        if fix_in != out_ch:  # channels must chain: put a 1x1 adapter in front
            adapter = nn.Linear(out_ch, fix_in) if dim == 0 else CONVS[dim][0](out_ch, fix_in, 1)
            blocks.append(adapter)
        blocks += [*more, nn.Tanh()]
        out_ch = more_out
    shape = (3, in_ch) if dim == 0 else (3, in_ch, *[rng.randint(6, 9)] * dim)
    return nn.Sequential(*blocks).to(dtype).eval(), torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("method", ["sequential", "fx"])
@pytest.mark.parametrize("seed", range(24))
def test_folded_random_models_give_the_same_eval_output(seed: int, method: str) -> None:
    model64, x64 = random_model(seed, torch.float64)
    folded64 = fold_batch_norm(model64, method=method)
    remaining = [m for m in folded64.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm | BnlabBatchNorm
                               | _FrozenBatchNorm)]
    assert remaining == []
    with torch.no_grad():
        expected = model64(x64)
        torch.testing.assert_close(folded64(x64), expected, rtol=1e-12, atol=1e-12)
        model32 = model64.float()
        folded32 = fold_batch_norm(model32, method=method)
        # float32: within float32 rounding of the exact (float64) output, as the unfolded is.
        err_unfolded = (model32(x64.float()).double() - expected).abs().max()
        err_folded = (folded32(x64.float()).double() - expected).abs().max()
        assert err_folded <= 10 * err_unfolded + 1e-6


def test_grouped_conv_transpose_folds_where_torch_fuser_raises() -> None:
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, dilation=2, groups=2).double()
    bn = nn.BatchNorm2d(6).double()
    randomize_bn(bn, random.Random(0))
    model = nn.Sequential(conv, bn).eval()
    with pytest.raises(RuntimeError):  # torch 2.13: scales (in, out/groups, ...) by out channels
        fuse_conv_bn_eval(conv, bn, transpose=True)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    folded = fold_batch_norm(model)
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


class Branchy(nn.Module):
    """A general model: a residual add, a conv whose output is used twice, a shared conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.shared, self.bn3 = nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4)
        self.bn4 = BatchRenorm2d(4)
        self.head, self.bn5 = nn.Linear(4, 3), GhostBatchNorm1d(3, 2)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(h)
        h = h + self.bn2(z) + z  # conv2's output used twice: bn2 must stay
        h = self.bn3(self.shared(h))  # shared is called twice: bn3 must stay
        h = self.bn4(self.shared(h)) + h
        return self.bn5(self.head(h.mean((2, 3))))


def test_fx_folds_a_general_model_and_leaves_unsafe_pairs() -> None:
    torch.manual_seed(0)
    model = Branchy().double()
    rng = random.Random(1)
    for bn in (model.bn1, model.bn2, model.bn3, model.bn4, model.bn5):
        randomize_bn(bn, rng)
    model.eval()
    folded = fold_batch_norm(model)
    kept = {name for name, m in folded.named_modules() if name.startswith("bn")}
    assert kept == {"bn2", "bn3", "bn4"}
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_bn_after_something_else_stays() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3)).eval()
    assert isinstance(fold_batch_norm(model)[2], nn.BatchNorm2d)


def test_folding_a_training_model_is_an_error_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), BatchNorm2d(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"needs a model in eval mode .* in training mode: model"):
        fold_batch_norm(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="in training mode: 1"):
        fold_batch_norm(model)
    assert isinstance(model[1], BatchNorm2d) and model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_fold_leaves_the_input_model_unchanged() -> None:
    model = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4)).eval()
    weight = model[0].weight.detach().clone()
    fold_batch_norm(model)
    assert isinstance(model[1], BatchNorm1d) and torch.equal(model[0].weight, weight)


class ReadsItsWeight(nn.Module):
    """A conv followed by BN whose weight the forward also uses directly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.conv.weight, padding=1)


def tied_sequential() -> nn.Sequential:
    first, second = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
    second.weight = first.weight
    return nn.Sequential(nn.Sequential(first, nn.BatchNorm2d(2)), second)


@pytest.mark.parametrize("make, method, message", [
    (ReadsItsWeight, "auto", r"cannot fold 'bn' into 'conv': its weight is also used elsewhere "
                             r"\(read directly by the forward\)"),
    (tied_sequential, "sequential", r"cannot fold '0\.1' into '0\.0': its weight is also used "
                                    r"elsewhere \(tied to 1\.weight\)"),
    (tied_sequential, "fx", r"cannot fold '0\.1' into '0\.0': its weight is also used "
                            r"elsewhere \(tied to 1\.weight\)"),
], ids=["read-by-forward", "tied-sequential", "tied-fx"])
def test_a_layer_whose_weight_is_used_elsewhere_is_refused(make, method, message) -> None:
    """Issue 26: the forward's own use of the weight saw the folded one (max error 2.1)."""
    model = make().eval()
    with pytest.raises(ValueError, match=message):
        fold_batch_norm(model, method=method)


@pytest.mark.parametrize("method", ["sequential", "fx"])
@pytest.mark.parametrize("layer, rank, wrong", [
    (nn.Linear(4, 3), 2, (5, 3, 4)),  # (N, L, features): BatchNorm1d's dim 1 is L, not features
    (nn.Conv1d(2, 3, 1), 3, (2, 3)),  # unbatched (C, L): BatchNorm1d's dim 1 is L
], ids=["linear-3d", "conv1d-unbatched"])
def test_a_folded_batch_norm_1d_refuses_inputs_of_another_rank(layer, rank, wrong, method) -> None:
    """Issue 26: Linear -> BatchNorm1d(3) on (5, 3, 4) inputs folded silently wrong (as
    torch's fuser does); the folded model computes the right thing on the rank it assumed."""
    bn = BatchNorm1d(3)
    randomize_bn(bn, random.Random(0))
    model = nn.Sequential(layer, bn).double().eval()
    folded = fold_batch_norm(model, method=method)
    right = torch.randn((5, 4) if rank == 2 else (5, 2, 7), dtype=torch.float64)
    torch.testing.assert_close(folded(right), model(right), rtol=1e-12, atol=1e-12)
    x = torch.randn(wrong, dtype=torch.float64)
    model(x)  # the unfolded model accepts it
    with pytest.raises(ValueError, match=rf"^'0' has a BatchNorm1d folded into it assuming "
                                         rf"{rank}-D inputs \(got shape {re.escape(str(wrong))}\)"):
        folded(x)
    loaded = pickle.loads(pickle.dumps(folded))  # the check travels with the model
    with pytest.raises(ValueError, match="folded into it"):
        loaded(x)


# ---------------------------------------------------------------- to_torch


def test_to_torch_is_the_inverse_of_convert_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4),
                          BatchNorm1d(4, affine=False), GhostBatchNorm1d(4, 2)).double()
    model(torch.randn(4, 1, 4, 4, dtype=torch.float64))
    model[4].eval()
    params = [model[1].weight, model[1].bias]
    buffers = [model[1].running_mean, model[1].running_var, model[1].num_batches_tracked,
               model[4].running_mean]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert to_torch(model) is model
    assert type(model[1]) is nn.BatchNorm2d and type(model[4]) is nn.BatchNorm1d
    assert isinstance(model[5], GhostBatchNorm1d)  # no torch equivalent: left alone
    assert model[1].weight is params[0] and model[1].bias is params[1]
    assert [model[1].running_mean, model[1].running_var, model[1].num_batches_tracked,
            model[4].running_mean] == buffers
    assert model[1].training and not model[4].training
    assert model[1].running_mean.dtype == torch.float64
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    convert_batchnorm(model)
    assert type(model[1]) is BatchNorm2d and model[1].weight is params[0]
    assert isinstance(to_torch(BatchNorm3d(2)), nn.BatchNorm3d)


def test_to_torch_refuses_an_uninitialized_lazy_layer() -> None:
    with pytest.raises(ValueError, match="uninitialized LazyBatchNorm1d"):
        to_torch(nn.Sequential(LazyBatchNorm1d()))


# ---------------------------------------------------------------- ONNX


def trained_bn_lenet() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("bn-lenet", "bnlab")
    with torch.no_grad():
        for _ in range(3):  # running statistics away from (0, 1)
            model(torch.rand(16, 1, 28, 28))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["folded", "unfolded"])
def test_onnx_export_runs_in_onnxruntime_with_the_eval_output(variant: str) -> None:
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'bnlab[onnx]')")
    ort = pytest.importorskip("onnxruntime",
                              reason="onnxruntime not installed (pip install 'bnlab[onnx]')")
    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript "
                        "(pip install 'bnlab[onnx]')")
    model = trained_bn_lenet()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        expected = model(x).numpy()
    exported = fold_batch_norm(model) if variant == "folded" else to_torch(model)
    # optimize=False: onnxscript's optimizer would fold the BatchNormalization op itself.
    program = torch.onnx.export(exported, (x,), dynamo=True, optimize=False, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert ("BatchNormalization" in ops) == (variant == "unfolded")
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bench fold


def test_bench_fold_times_four_models_that_agree() -> None:
    from bnlab.bench.fold import run_fold_benchmark

    table = run_fold_benchmark(repeats=2, device="cpu", batch_sizes=(2,))
    rows = [line for line in table.splitlines() if line.startswith("| 2 ")]
    assert [r.split("|")[2].strip() for r in rows] == [
        "unfolded (bnlab BN)", "unfolded (torch BN)", "folded (bnlab.nn.fold)", "torch fx fuse"]
    assert all(float(r.split("|")[5]) < 1e-5 for r in rows)  # the same function


def test_bench_fold_cli_rejects_bad_repeats(capsys) -> None:
    from bnlab.cli import main

    assert main(["bench", "fold", "--repeats", "0"]) == 2
    assert "bnlab: error: expected --repeats >= 1 (got 0)" in capsys.readouterr().err
