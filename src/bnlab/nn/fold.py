"""Folding batch norm into the layer before it, for inference.

Why: in prediction a batch norm is a fixed per-channel affine map, and so is the bias
part of the convolution or linear layer before it; their composition is one layer with
rescaled weights. The folded model computes the same function with no batch-norm cost.
torch's ``fuse_conv_bn_eval`` does this for some layers but raises on a grouped
``ConvTranspose2d``; here every grouping and dilation of ``Conv1d/2d/3d``,
``ConvTranspose1d/2d/3d`` and ``Linear`` is folded.

Formula: a batch norm in eval mode computes, per output channel o,
``y_o = s_o * z_o + t_o`` with::

    s_o = gamma_o / sqrt(running_var_o + eps)        t_o = beta_o - running_mean_o * s_o

(gamma = 1 and beta = 0 without affine). For ``z = W * x + b`` the folded layer has
``W'`` = W with every weight that feeds output channel o multiplied by ``s_o`` and
``b'_o = s_o * b_o + t_o`` (b = 0 for a layer without bias; the folded layer gets one).
Where channel o lives in the weight:

* ``Conv*d`` (out, in / groups, *k) and ``Linear`` (out, in): dim 0 is o;
* ``ConvTranspose*d`` (in, out / groups, *k): viewed as (groups, in / groups,
  out / groups, *k), output channel o = g * (out / groups) + j sits at [g, :, j].

The products are formed in float64 and rounded once to the layer's dtype, so a folded
float32 model agrees with the unfolded one to float32 rounding, a float64 one nearly
exactly.

What folds: a batch norm (torch's, bnlab's plain, ghost, renorm or frozen layer, with
running statistics; their prediction is plain batch norm) whose input is the output of
one of the layers above, of matching channels and rank, when that output goes nowhere
else and that layer is used once. Anything else stays as it was. A ``BatchNormAct``
folds its batch norm and keeps its activation (in its place, or as a call in the graph).

What is refused, since the folded model would be silently wrong:

* a layer whose weight or bias is also used elsewhere (tied to another module's, or read
  directly by the model's forward): the other use would see the folded values, or the tie
  would be cut; folding raises ``ValueError`` naming both;
* ``BatchNorm1d`` accepts (N, C) and (N, C, L), and normalizes dim 1 in both. After a
  ``Linear`` that is its output features only for (N, features) inputs (on (N, L, features)
  dim 1 is L), after a ``Conv1d`` only for batched (N, C, L) inputs. Which one a model gets
  is known only when it runs, so a layer with a ``BatchNorm1d`` folded into it carries a
  forward pre-hook that raises ``ValueError`` on an input of another rank. (torch's
  ``fuse_linear_bn_eval`` folds the 3-D case silently wrong.)
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Literal

import torch
from torch import fx, nn

from bnlab.functional import ACTIVATIONS
from bnlab.nn.batchnorm import _BatchNorm
from bnlab.nn.batchnorm_act import _BatchNormAct
from bnlab.nn.frozen import _FrozenBatchNorm

__all__ = ["fold_batch_norm"]

_CONV_RANKS = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5, nn.ConvTranspose1d: 3,
               nn.ConvTranspose2d: 4, nn.ConvTranspose3d: 5, nn.Linear: 2}
_TORCH_BN_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}

Method = Literal["auto", "sequential", "fx"]


def _bn_ranks(m: nn.Module) -> tuple[int, ...] | None:
    """Input ranks of a foldable batch norm (with running statistics), else None."""
    if getattr(m, "running_mean", None) is None:
        return None
    if isinstance(m, _BatchNorm | _FrozenBatchNorm):
        return m._ranks
    return next((r for cls, r in _TORCH_BN_RANKS.items() if type(m) is cls), None)


def _layer_rank(m: nn.Module) -> int | None:
    return next((r for cls, r in _CONV_RANKS.items() if type(m) is cls), None)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    rank, ranks = _layer_rank(layer), _bn_ranks(bn)
    return (rank is not None and ranks is not None and rank in ranks
            and _out_channels(layer) == bn.num_features)


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Rescale ``layer``'s weight and bias so that it computes ``bn(layer(x))``."""
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)  # (C,)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    shift = beta - bn.running_mean.double() * scale
    weight = layer.weight.double()
    kernel = [1] * (weight.dim() - 2)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        groups = layer.groups
        in_ch, out_per_group = weight.shape[:2]
        grouped = weight.reshape(groups, in_ch // groups, out_per_group, *weight.shape[2:])
        folded = (grouped * scale.reshape(groups, 1, out_per_group, *kernel)).reshape(weight.shape)
    else:
        folded = weight * scale.reshape(-1, 1, *kernel)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(folded.to(dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter((bias * scale + shift).to(dtype))


class _FoldedRank:
    """Forward pre-hook of a layer that a ``BatchNorm1d`` was folded into: refuses inputs of
    another rank than the fold assumed (a class, not a closure, so the model still pickles)."""

    def __init__(self, rank: int, layer: str) -> None:
        self.rank, self.layer = rank, layer

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if x.dim() != self.rank:
            raise ValueError(
                f"{self.layer!r} has a BatchNorm1d folded into it assuming {self.rank}-D inputs "
                f"(got shape {tuple(x.shape)}): on this input BatchNorm1d normalizes dim 1, which "
                f"is not the {type(module).__name__}'s output channel, so the folded weights do "
                "not compute the model; use the unfolded model for such inputs")


def _fold_pair(model: nn.Module, layer_name: str, layer: nn.Module, bn_name: str, bn: nn.Module,
               reads: frozenset[str] = frozenset()) -> None:
    """Fold ``bn`` into ``layer`` (their names in ``model``), refusing a layer whose parameters
    are also used elsewhere: by another module, or read by the forward itself (``reads``: the
    attributes of ``model`` the forward reads, as torch.fx's ``get_attr`` targets)."""
    for kind in ("weight", "bias"):
        param = getattr(layer, kind)
        others = [f"{name}.{pname}" if name else pname
                  for name, m in model.named_modules(remove_duplicate=False) if m is not layer
                  for pname, q in m.named_parameters(recurse=False) if q is param]
        read_directly = bool({layer_name, f"{layer_name}.{kind}"} & reads)
        if param is not None and (others or read_directly):
            where = f"tied to {', '.join(others)}" if others else "read directly by the forward"
            raise ValueError(f"cannot fold {bn_name!r} into {layer_name!r}: its {kind} is also "
                             f"used elsewhere ({where}), which would see the folded values or "
                             "lose the tie; untie it or leave this batch norm unfolded")
    _fold_into(layer, bn)
    if len(_bn_ranks(bn)) > 1:  # BatchNorm1d: the rank decides which dim is its channel
        layer.register_forward_pre_hook(_FoldedRank(_layer_rank(layer), layer_name))


def _is_sequential_tree(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and all(
        isinstance(m, nn.Sequential) for m in model.modules() if next(m.children(), None))


def _fold_sequentials(model: nn.Module) -> nn.Module:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for prefix, seq in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            layer, bn = seq._modules[first], seq._modules[second]
            if uses[id(layer)] == 1 and _can_fold(layer, bn):
                path = f"{prefix}." if prefix else ""
                _fold_pair(model, path + first, layer, path + second, bn)
                # A fused activation stays: only the batch norm is folded.
                seq._modules[second] = bn.act if isinstance(bn, _BatchNormAct) else nn.Identity()
    return model


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping bnlab's batch norms whole (as it keeps torch's)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _bn_ranks(m) is not None or super().is_leaf_module(m, qualname)


def _fold_graph(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    reads = frozenset(n.target for n in graph.nodes if n.op == "get_attr")
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or len(prev.users) != 1 or calls[prev.target] != 1:
            continue
        layer, bn = modules[prev.target], modules[node.target]
        if len(node.args) == 1 and not node.kwargs and _can_fold(layer, bn):
            _fold_pair(gm, prev.target, layer, node.target, bn, reads)
            result = prev
            if isinstance(bn, _BatchNormAct):  # a fused activation stays
                with graph.inserting_after(node):
                    result = graph.call_function(ACTIVATIONS[bn.activation], (prev,))
            node.replace_all_uses_with(result)
            graph.erase_node(node)
            calls[node.target] -= 1
            if calls[node.target] == 0:
                gm.delete_submodule(node.target)
    graph.lint()
    gm.recompile()
    return gm


def fold_batch_norm(model: nn.Module, method: Method = "auto") -> nn.Module:
    """A copy of the eval-mode ``model`` with batch norms folded into the layers before them.

    ``model`` itself is not changed. ``method``: ``"sequential"`` folds adjacent pairs
    inside every ``nn.Sequential`` of the module tree (the returned model has the same
    structure, each folded batch norm replaced by ``nn.Identity``); ``"fx"`` traces the
    model with ``torch.fx`` and folds along the graph (returns a ``GraphModule``; needs
    a traceable forward); ``"auto"`` (default) is ``"sequential"`` for a tree of
    ``nn.Sequential`` and ``"fx"`` otherwise. See the module docstring for the formula
    and for which batch norms fold.

    Raises ``ValueError`` when any module of ``model`` is in training mode (a training
    batch norm normalizes with batch statistics, which no fixed weights reproduce: call
    ``model.eval()`` first), when a lazy layer is still uninitialized, or when a layer to
    fold into has its weight or bias used elsewhere. A layer with a ``BatchNorm1d`` folded
    into it raises ``ValueError`` when called on an input of another rank than the fold
    assumed (see the module docstring).
    """
    if method not in ("auto", "sequential", "fx"):
        raise ValueError(f"method must be 'auto', 'sequential' or 'fx' (got {method!r})")
    training = [name or "model" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
        raise ValueError("fold_batch_norm needs a model in eval mode (call model.eval() "
                         f"first); in training mode: {shown}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"cannot fold the uninitialized lazy layer {name or 'model'!r}: "
                             "run one batch through the model first")
    model = copy.deepcopy(model)
    if method == "sequential" or (method == "auto" and _is_sequential_tree(model)):
        return _fold_sequentials(model)
    return _fold_graph(model)
