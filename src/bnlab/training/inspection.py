"""A trained run's normalization layers, looked at: the chapter's last step, made general.

Why: after training, the chapter prints gamma and beta of the first BN layer. Users want
that, and the same for every layer (with running mean and variance), as numbers and as a
figure, from nothing more than a run folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bnlab.training import restore, runs
from bnlab.training.models import norm_layers
from bnlab.training.train import describe
from bnlab.util.plots import plot_norm_parameters
from bnlab.util.tables import counted, format_table

PARAMS_FIGURE = "norm_params.png"


def norm_parameters(model: nn.Module) -> dict[str, dict[str, list[float] | None]]:
    """Per norm layer: gamma, beta, running_mean, running_var as plain lists (None if absent)."""

    def values(t: torch.Tensor | None) -> list[float] | None:
        return None if t is None else t.detach().float().cpu().reshape(-1).tolist()

    return {
        name: {
            "gamma": values(layer.weight),
            "beta": values(layer.bias),
            "running_mean": values(layer.running_mean),
            "running_var": values(layer.running_var),
        }
        for name, layer in norm_layers(model)
    }


def _stats(vals: list[float] | None) -> str:
    if vals is None:
        return "-"
    t = torch.tensor(vals)
    return f"{t.mean():+.3f} ± {t.std():.3f} [{t.min():+.2f}, {t.max():+.2f}]"


def format_first_layer(name: str, values: dict[str, list[float] | None]) -> str:
    fmt = lambda vals: "[" + ", ".join(f"{v:+.4f}" for v in vals) + "]"  # noqa: E731
    lines = [f"first norm layer ({name}), {len(values['gamma'] or [])} channels:"]
    for key in ("gamma", "beta"):
        if values[key] is not None:
            lines.append(f"  {key:<5} = {fmt(values[key])}")
    return "\n".join(lines)


def format_norm_table(params: dict[str, dict[str, list[float] | None]]) -> str:
    """One row per layer: mean ± std [min, max] over channels of each statistic."""
    keys = ("gamma", "beta", "running_mean", "running_var")
    rows = [[name, len(vals["gamma"] or vals["running_mean"] or []),
             *(_stats(vals[k]) for k in keys)] for name, vals in params.items()]
    return format_table(["layer", "channels", *keys], rows)


def write_norm_figure(run_dir: str | Path) -> Path | None:
    """Write ``norm_params.png`` into the run folder (None for a model without norm layers)."""
    model, config = restore.load_trained_model(run_dir)
    params = norm_parameters(model)
    if not params:
        return None
    return plot_norm_parameters(params, Path(run_dir) / PARAMS_FIGURE, describe(config))


def inspect_run(run_dir: str | Path, figure: bool = True) -> str:
    """The text of ``bnlab inspect``; with ``figure``, writes ``norm_params.png`` in the run."""
    model, config = restore.load_trained_model(run_dir)
    run = runs.load_run(run_dir)
    params = norm_parameters(model)
    done = len(run["metrics"])
    last = run["metrics"][-1]["val_acc"] if run["metrics"] else None
    lines = [f"run {run_dir}: {describe(config)}, {done}/{counted(config.epochs, 'epoch')}"
             + (f", val acc {last:.4f}" if last is not None else "")]
    if not params:
        lines.append("this model has no normalization layers")
        return "\n".join(lines)
    first_name, first = next(iter(params.items()))
    lines += [format_first_layer(first_name, first), "", "every norm layer "
              "(mean ± std [min, max] over channels):", format_norm_table(params)]
    if figure:
        lines.append(f"\nfigure: {write_norm_figure(run_dir)}")
    return "\n".join(lines)
