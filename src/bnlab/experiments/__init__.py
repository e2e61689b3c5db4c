"""The chapter's exercises and claims as experiments: grids of runs, with plots and reports.

Each module defines one ``EXPERIMENT`` (``bnlab.experiments.runner.Experiment``); this
registry is what ``bnlab exp NAME`` looks names up in.
"""

from __future__ import annotations

from bnlab.experiments import (
    adapt,
    batchsize,
    chapter,
    convergence,
    decay,
    depth,
    dropout,
    ics,
    landscape,
    lr,
    norm_choice,
    onlybn,
    placement,
    precise,
    residual,
    robustness_claim,
    sync,
)
from bnlab.experiments.runner import Experiment

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (chapter.EXPERIMENT, lr.EXPERIMENT, placement.EXPERIMENT, dropout.EXPERIMENT,
                        depth.EXPERIMENT, convergence.EXPERIMENT, norm_choice.EXPERIMENT,
                        robustness_claim.EXPERIMENT, sync.EXPERIMENT, ics.EXPERIMENT,
                        landscape.EXPERIMENT, precise.EXPERIMENT,
                        batchsize.EXPERIMENT, adapt.EXPERIMENT, decay.EXPERIMENT,
                        residual.EXPERIMENT, onlybn.EXPERIMENT)
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; expected one of {sorted(EXPERIMENTS)}") from None
