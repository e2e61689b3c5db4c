"""Test-time adaptation through batch norm: source, BN-adapt (with Schneider's prior), TENT.

Why: a model trained with batch norm carries its training set's activation statistics
(the running mean and variance). When the test images shift (noise, blur, contrast),
those statistics no longer fit, and two cheap remedies work on unlabeled test batches:

* **BN-adapt** (Schneider et al., NeurIPS 2020, "Improving robustness against common
  corruptions by covariate shift adaptation"; also Nado et al. 2020): normalize with a
  mix of the source statistics and the test batch's, the source counting as N pseudo-
  samples against the batch's n images::

      mean = N / (N + n) * mean_source + n / (N + n) * mean_batch
      var  = N / (N + n) * var_source  + n / (N + n) * var_batch

  The variances mix linearly like the means (no between-means term), as the authors'
  code does (``BayesianBatchNorm`` in bethgelab/robustness, ``robusta/batchnorm/bn.py``,
  whose ``prior`` is the weight ``N / (N + n)``). N = 0 is pure test-batch
  statistics (TENT's "norm" baseline); N = inf is the source model. ``var_source`` is the
  running variance (stored unbiased, as batch norm uses it in prediction), ``var_batch``
  the biased batch variance (as batch norm normalizes a training batch; the authors' code
  takes the unbiased one, a factor m / (m - 1) with m values per channel), so that N = 0
  is exactly batch norm in training mode.
* **TENT** (Wang et al., ICLR 2021, "Tent: Fully test-time adaptation by entropy
  minimization"; github.com/DequanWang/tent, ``tent.py``): normalize with the test
  batch's statistics and take one gradient step per batch on the mean Shannon entropy of
  the softmax predictions, updating only batch norm's affine gamma and beta; the batch's
  predictions are the logits of the forward that the step differentiates (before the
  update). Optimizer as in the repository's CIFAR-10-C config (``cfgs/tent.yaml``,
  ``conf.py``): Adam, lr 1e-3, betas (0.9, 0.999), no weight decay; or SGD with momentum
  0.9, Nesterov, no dampening. The model and optimizer are reset to the source model at
  each new domain (their evaluation protocol), or never (a continual stream).

Everything runs on a deep copy: the given model, its mode and buffers are untouched.
Only layers with running statistics (``bnlab.nn.precise.batch_norm_layers``: bnlab's and
torch's batch norms, ghost, renorm, ...) are adapted, each replaced in the copy by
:class:`AdaptiveBatchNorm`. A model without them (group norm, layer norm, no norm) has no
batch statistics to adapt: there, BN-adapt and TENT are the source model (TENT has no
gamma/beta of a batch norm to update), and results report ``adapted_layers == 0``.
Everything other than the adapted layers runs in eval mode (dropout off).

A batch of one image gives a fully connected batch norm one value per channel: its
batch variance is 0 and the normalized value 0, so BN-adapt with N = 0 predicts the same
class for every image there. That is the known failure, measured, not avoided.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bnlab.kernels.reference import reference_batch_norm
from bnlab.nn import unfuse_batch_norm_act
from bnlab.nn.precise import batch_norm_layers

METHODS = ("source", "bn-adapt", "tent")
RESETS = ("domain", "never")
"""When an adapting model returns to the source model: at each new domain (corruption)
of a stream, or never (continual adaptation)."""

Batch = tuple[torch.Tensor, torch.Tensor]


def check_prior(prior: float) -> None:
    """ValueError unless ``prior`` (Schneider's N) is in [0, inf]."""
    if not prior >= 0:
        raise ValueError(f"expected a prior strength N >= 0 (got {prior})")


def mixed_statistics(source_mean: torch.Tensor, source_var: torch.Tensor,
                     batch_mean: torch.Tensor, batch_var: torch.Tensor, n: int,
                     prior: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Schneider et al.'s mean and variance: weight ``N / (N + n)`` on the source statistics
    and ``n / (N + n)`` on the batch's, for prior strength ``N = prior`` (inf: source)."""
    check_prior(prior)
    if math.isinf(prior):
        return source_mean, source_var
    weight = prior / (prior + n)
    return (weight * source_mean + (1 - weight) * batch_mean,
            weight * source_var + (1 - weight) * batch_var)


class AdaptiveBatchNorm(nn.Module):
    """A batch norm at test time: normalizes each batch with :func:`mixed_statistics` of the
    layer's running statistics (the source) and the batch's, prior strength ``prior``.

    It takes over the layer's gamma and beta (the same Parameter objects) and a copy of its
    running statistics; the batch statistics stay in the graph, so a gradient (TENT's)
    flows through them as through batch norm in training. It behaves the same in train
    and eval mode: it exists only at test time. The formula after the statistics is
    ``bnlab.kernels.reference``'s.
    """

    def __init__(self, layer: nn.Module, prior: float = 0.0) -> None:
        super().__init__()
        check_prior(prior)
        self.prior = prior
        self.eps = layer.eps
        self.weight = layer.weight
        self.bias = layer.bias
        self.register_buffer("source_mean", layer.running_mean.detach().clone())
        self.register_buffer("source_var", layer.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]  # every dim but the channels
        source_mean, source_var = self.source_mean.to(x.dtype), self.source_var.to(x.dtype)
        if math.isinf(self.prior):
            mean, var = source_mean, source_var
        else:
            batch_var, batch_mean = torch.var_mean(x, dim=dims, correction=0)  # (C,), (C,)
            mean, var = mixed_statistics(source_mean, source_var, batch_mean, batch_var,
                                         x.shape[0], self.prior)
        return reference_batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.source_mean.numel()}, prior={self.prior}, eps={self.eps}"


def with_adaptive_batch_norms(model: nn.Module, prior: float = 0.0) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` in eval mode with each batch norm that has running statistics
    replaced by :class:`AdaptiveBatchNorm` (``prior``), and how many were replaced. A batch
    norm fused with its activation is unfused first, so the activation stays."""
    adapted = unfuse_batch_norm_act(copy.deepcopy(model)).eval()
    layers = batch_norm_layers(adapted)
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = adapted.get_submodule(parent_name) if parent_name else adapted
        setattr(parent, child, AdaptiveBatchNorm(layer, prior))
    return adapted, len(layers)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row's softmax: (N, K) logits -> (N,)."""
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


@dataclass(frozen=True)
class TentSettings:
    """TENT's optimization (defaults: the repository's CIFAR-10-C config)."""

    optimizer: str = "adam"  # "adam" or "sgd"
    lr: float = 1e-3
    beta: float = 0.9  # Adam's first beta (the second is 0.999)
    momentum: float = 0.9  # SGD, with Nesterov and no dampening
    steps: int = 1  # gradient steps per test batch

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"expected TENT optimizer 'adam' or 'sgd' (got {self.optimizer!r})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"expected a finite lr > 0 (got {self.lr})")
        if self.steps < 1:
            raise ValueError(f"expected steps >= 1 (got {self.steps})")


def tent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Prepare ``model`` (with :class:`AdaptiveBatchNorm` layers) for TENT: no parameter
    requires grad except those layers' gamma and beta, which are returned."""
    model.requires_grad_(False)
    params = [p for m in model.modules() if isinstance(m, AdaptiveBatchNorm)
              for p in (m.weight, m.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)
    return params


def tent_optimizer(params: list[nn.Parameter], settings: TentSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, betas=(settings.beta, 0.999), weight_decay=0.0)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, dampening=0.0,
                           nesterov=True, weight_decay=0.0)


def tent_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """One TENT step on batch ``x``: forward, mean softmax entropy, backward, update. Returns
    the (detached) logits of that forward, i.e. before the update."""
    with torch.enable_grad():
        logits = model(x)  # (B, K)
        loss = softmax_entropy(logits).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return logits.detach()


class TestTimeAdapter:
    """A copy of a model that predicts (and, for TENT, adapts) batch by batch: call it on a
    batch to get that batch's logits; :meth:`reset` returns it to the source model."""

    __test__ = False  # not a pytest class

    def __init__(self, model: nn.Module, method: str, prior: float = 0.0,
                 tent: TentSettings | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown adaptation method {method!r}; expected one of {METHODS}")
        self.method = method
        self.tent = tent or TentSettings()
        if method == "source":
            self.model, self.adapted_layers = copy.deepcopy(model).eval(), 0
        else:  # TENT normalizes with the batch's statistics alone
            self.model, self.adapted_layers = with_adaptive_batch_norms(
                model, prior if method == "bn-adapt" else 0.0)
        self.optimizer = None
        if method == "tent":
            params = tent_parameters(self.model)
            self.optimizer = tent_optimizer(params, self.tent) if params else None
        self._initial = self._state()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.optimizer is None:
            with torch.no_grad():
                return self.model(x)
        for _ in range(self.tent.steps):
            logits = tent_step(self.model, self.optimizer, x)
        return logits

    def reset(self) -> None:
        """Back to the source model (and a fresh optimizer state)."""
        model_state, optimizer_state = copy.deepcopy(self._initial)
        self.model.load_state_dict(model_state)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(optimizer_state)

    def _state(self) -> tuple[dict, dict | None]:
        optimizer = self.optimizer.state_dict() if self.optimizer is not None else None
        return copy.deepcopy((self.model.state_dict(), optimizer))


@dataclass
class DomainResult:
    """One domain (e.g. a corruption at a severity) of a stream: images seen, correct."""

    name: str
    images: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else math.nan

    @property
    def error(self) -> float:
        return 1 - self.accuracy


@dataclass
class StreamResult:
    """A method's accuracy over a stream of domains, domain by domain."""

    method: str
    prior: float
    reset: str
    adapted_layers: int
    domains: list[DomainResult] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Over all images of all domains."""
        images = sum(d.images for d in self.domains)
        return sum(d.correct for d in self.domains) / images if images else math.nan

    @property
    def error(self) -> float:
        return 1 - self.accuracy


def evaluate_stream(model: nn.Module, domains: Sequence[tuple[str, Iterable[Batch]]],
                    method: str, prior: float = 0.0, tent: TentSettings | None = None,
                    reset: str = "domain") -> StreamResult:
    """Accuracy of ``model`` under ``method`` on ``domains``, a sequence of (name, batches)
    seen in that order (one corruption, or corruptions one after another). With
    ``reset="domain"`` the adapting copy returns to the source model at each domain; with
    ``"never"`` it carries its adaptation on (continual). ``model`` is not changed."""
    if reset not in RESETS:
        raise ValueError(f"expected reset in {RESETS} (got {reset!r})")
    adapter = TestTimeAdapter(model, method, prior, tent)
    result = StreamResult(method, prior, reset, adapter.adapted_layers)
    for index, (name, domain) in enumerate(domains):
        if reset == "domain" and index:
            adapter.reset()
        counts = DomainResult(name)
        for x, y in domain:
            logits = adapter(x)  # (B, K)
            counts.correct += (logits.argmax(dim=1) == y).sum().item()
            counts.images += y.numel()
        result.domains.append(counts)
    return result
