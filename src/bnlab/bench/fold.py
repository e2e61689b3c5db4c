"""What folding batch norm into the layers before it saves at inference.

Why: an eval-mode batch norm is a per-channel affine map that ``bnlab.nn.fold`` removes by
rescaling the preceding convolution or linear layer; this benchmark measures what that
is worth on the chapter's BN-LeNet, against the unfolded model with bnlab's and with
torch's batch norm and against torch's own fusion (``torch.fx.experimental.optimization
.fuse``, built on ``fuse_conv_bn_eval``/``fuse_linear_bn_eval``). The four models are
timed round-robin in one process (``bench.timing.time_interleaved``), at batch 1 (where
per-layer overhead dominates) and 128 (the chapter's batch); the table gives medians,
ratios to the unfolded bnlab model and each model's largest deviation from its output.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as torch_fuse

from bnlab.bench.timing import sync, time_interleaved
from bnlab.nn import to_torch
from bnlab.nn.fold import fold_batch_norm
from bnlab.training.models import build_model
from bnlab.util.tables import format_table

BATCH_SIZES = (1, 128)


def _models(device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    model = build_model("bn-lenet", "bnlab", device)
    with torch.no_grad():  # a few training batches, so the running statistics are not (0, 1)
        for _ in range(5):
            model(torch.rand(64, 1, 28, 28, device=device))
    model.eval()
    torch_bn = to_torch(copy.deepcopy(model))
    return {
        "unfolded (bnlab BN)": model,
        "unfolded (torch BN)": torch_bn,
        "folded (bnlab.nn.fold)": fold_batch_norm(model),
        "torch fx fuse": torch_fuse(torch_bn),
    }


def run_fold_benchmark(repeats: int = 200, device: str = "auto",
                       batch_sizes: tuple[int, ...] = BATCH_SIZES) -> str:
    """Median eval latency of BN-LeNet unfolded, folded and torch-fused; a markdown table."""
    if repeats < 1:
        raise ValueError(f"expected repeats >= 1 (got {repeats})")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if device == "auto" else device)
    models = _models(dev)
    reference = next(iter(models))
    rows = []
    for batch in batch_sizes:
        x = torch.rand(batch, 1, 28, 28, device=dev)
        with torch.inference_mode():
            outputs = {name: m(x) for name, m in models.items()}
            sync(dev)
            medians = time_interleaved({name: (lambda m=m, x=x: m(x)) for name, m in models.items()},
                                       repeats=repeats, device=dev)
        for name, seconds in medians.items():
            deviation = (outputs[name] - outputs[reference]).abs().max().item()
            rows.append([batch, name, f"{seconds * 1e6:.1f}",
                         f"{seconds / medians[reference]:.3f}", f"{deviation:.1e}"])
    note = (f"BN-LeNet in eval mode under inference_mode, device {dev}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads; {repeats} interleaved "
            "calls per model and batch size, medians.")
    headers = ["batch", "model", "us/call (median)", f"vs {reference}", "max |diff|"]
    return note + "\n\n" + format_table(headers, rows)
