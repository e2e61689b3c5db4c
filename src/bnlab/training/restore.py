"""A finished run folder turned back into the model it trained.

Why apart from ``runs``: ``runs`` is the folder format alone (it knows no model); building the
model needs the trainer's ``TrainConfig`` and ``model_for``, and the trainer writes run
folders, so this one function sits above both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bnlab.training import runs
from bnlab.training.train import TrainConfig, model_for
from bnlab.util.config import config_from_dict


def load_trained_model(run_dir: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The model of a run folder with its last checkpointed weights (on CPU, eval mode), and
    its ``TrainConfig``. A config or checkpoint that does not fit is a ``runs.RunFileError``."""
    run_dir = Path(run_dir)
    run = runs.load_run(run_dir)
    try:
        config = config_from_dict(TrainConfig, run["config"])
    except (TypeError, ValueError) as exc:
        raise runs.RunFileError(f"{run_dir / runs.CONFIG}: {exc}; delete {run_dir} to train "
                           "the run again") from None
    checkpoint = runs.load_checkpoint(run_dir, required=("model",))
    torch.manual_seed(config.seed)
    model = model_for(config, "cpu")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise runs.RunFileError(f"{run_dir / runs.CHECKPOINT}: its weights do not fit the model "
                           f"of {runs.CONFIG} ({str(exc).splitlines()[0]}); delete {run_dir} "
                           "to train the run again") from None
    return model.eval(), config
