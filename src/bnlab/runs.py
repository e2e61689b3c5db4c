"""A training run's folder: its config, metrics, summary and checkpoint on disk.

Why: a run is only useful if a person (or the experiment runner) can read what it did
after the fact and pick it up where it was killed. Every file is written atomically, so a
killed run leaves the previous epoch's state, never a torn file.
``load_trained_model`` turns a finished folder back into the model it trained::

    runs/<name>/
      config.json      the TrainConfig, verbatim
      metrics.jsonl    one JSON object per finished epoch
      steps.jsonl      the training loss of every step, one line per epoch
      evals.jsonl      validation every N steps (only with eval_every)
      summary.json     final/best val acc, seconds per epoch, diverged (written at the end)
      checkpoint.pt    model, optimizer, history and RNG state after the last finished epoch
      curves.png       train loss, val loss and val acc against epoch
      analysis/<name>.json   a measurement of the finished model (``cached``), with its key
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.config import config_from_dict
from bnlab.errors import BnlabError
from bnlab.io import atomic_write, atomic_write_json, atomic_write_text, read_json

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
EVALS = "evals.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
CURVES = "curves.png"
ANALYSIS = "analysis"


class RunFolderError(BnlabError):
    """A run folder that does not match what was asked of it."""


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def prepare(run_dir: Path, config: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Make ``run_dir`` ready for a run with ``config``; return its checkpoint when resuming.

    A folder that already holds a run is only reused with ``resume=True`` and the same
    config; anything else is an error that names the folder, so no result is overwritten.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG
    if config_path.exists():
        if not resume:
            raise RunFolderError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose "
                f"another --out"
            )
        saved = read_json(config_path)
        if saved != config:
            changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise RunFolderError(
                f"cannot resume {run_dir}: its config differs in {changed} "
                f"(saved {[saved.get(k) for k in changed]}, given {[config.get(k) for k in changed]})"
            )
    else:
        atomic_write_json(config_path, config)
    checkpoint = run_dir / CHECKPOINT
    if resume and checkpoint.exists():
        return torch.load(checkpoint, map_location="cpu", weights_only=False)
    return None


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write(run_dir / CHECKPOINT, lambda f: torch.save(state, f))


def write_history(run_dir: Path, history: list[dict[str, Any]], step_losses: list[list[float]],
                  evals: list[dict[str, Any]]) -> None:
    write_jsonl(run_dir / METRICS, history)
    if evals:
        write_jsonl(run_dir / EVALS, evals)
    # A non-finite loss (the step a run diverged) is written as null: JSON has no NaN.
    write_jsonl(run_dir / STEPS, [
        {"epoch": i + 1, "loss": [x if math.isfinite(x) else None for x in losses]}
        for i, losses in enumerate(step_losses)
    ])


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(run_dir / SUMMARY, summary)


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """config, metrics and (when finished) summary of a run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        raise RunFolderError(f"{run_dir} is not a run folder (no {CONFIG})")
    return {
        "dir": run_dir,
        "config": read_json(run_dir / CONFIG),
        "metrics": read_jsonl(run_dir / METRICS) if (run_dir / METRICS).exists() else [],
        "evals": read_jsonl(run_dir / EVALS) if (run_dir / EVALS).exists() else [],
        "summary": read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).exists() else None,
    }


def load_trained_model(run_dir: str | Path) -> tuple[nn.Module, Any]:
    """The model of a run folder with its last checkpointed weights (on CPU, eval mode), and
    its ``TrainConfig``."""
    from bnlab.train import TrainConfig, model_for  # train writes run folders: import lazily

    run = load_run(run_dir)
    config = config_from_dict(TrainConfig, run["config"])
    checkpoint_path = Path(run_dir) / CHECKPOINT
    if not checkpoint_path.exists():
        raise RunFolderError(f"{run_dir} has no {CHECKPOINT} (no epoch finished yet)")
    torch.manual_seed(config.seed)
    model = model_for(config, "cpu")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config


def cached(run_dir: str | Path, name: str, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()`` for a finished run, computed once per ``key`` and kept in the run folder.

    The value is stored with its key in ``analysis/<name>.json`` (atomically). A stored
    value whose key differs from ``key`` (a changed setting, other images, a new version of
    the measurement) is recomputed and replaced. ``key`` and the value must be JSON (floats
    may be NaN); the value returned has been through JSON either way, so a first and a
    cached analysis see exactly the same numbers.
    """
    path = Path(run_dir) / ANALYSIS / f"{name}.json"
    key = json.loads(json.dumps(key))
    if path.exists():
        stored = read_json(path)
        if stored["key"] == key:
            return stored["value"]
    value = json.loads(json.dumps(compute()))
    atomic_write_json(path, {"key": key, "value": value})
    return value
