"""Wall time of one small grid through each executor: local process pool vs Ray.

Why: Ray is for grids that outgrow one machine; on one machine it should cost little more
than the local pool. Both train the same runs (the ``chapter`` grid, tiny) with the same
parallelism (``workers`` at a time, one thread each) into fresh folders, in alternating
order over ``repeats`` rounds; the difference of the medians divided by the number of runs
is Ray's overhead per task. Starting the local Ray instance is timed on its own; its
workers stay up from one round to the next (as on a cluster), while the pool starts its
processes for every grid (as each ``bnlab exp`` does).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bnlab.experiments import get_experiment
from bnlab.experiments.executors import LocalExecutor, RayExecutor, import_ray
from bnlab.experiments.runner import ExpSettings, execute, plan
from bnlab.util.tables import counted, format_table


def run_grid_benchmark(dataset, seeds: int = 2, workers: int = 2, repeats: int = 2,
                       subset: int = 1000) -> str:
    """The table of ``bnlab bench grid``: seconds per grid, per run, and Ray's overhead."""
    ray = import_ray()
    settings = ExpSettings(seeds=seeds, epochs=1, subset=subset)
    experiment = get_experiment("chapter")
    n_runs = len(experiment.variants(settings)) * seeds

    def time_grid(executor) -> float:
        with tempfile.TemporaryDirectory() as out:
            planned = plan(experiment, settings, Path(out))
            start = time.perf_counter()
            execute(planned, dataset, progress=False, executor=executor)
            return time.perf_counter() - start

    start = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="warning")
    ray_start = time.perf_counter() - start
    times: dict[str, list[float]] = {"local pool": [], "ray": []}
    try:
        executors = {"local pool": LocalExecutor(jobs=workers, threads=1),
                     "ray": RayExecutor(threads=1)}
        for round_ in range(repeats):
            for name in (list(executors) if round_ % 2 == 0 else list(executors)[::-1]):
                times[name].append(time_grid(executors[name]))
    finally:
        ray.shutdown()
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = [[name, f"{m:.1f}", f"{m / n_runs:.2f}",
             f"{(m - medians['local pool']) / n_runs:+.2f}"] for name, m in medians.items()]
    rows.append(["ray: starting the local instance", f"{ray_start:.1f}", "", ""])
    header = (f"grid `chapter`, {n_runs} runs of 1 epoch on {subset} images, {workers} at a "
              f"time with 1 thread each; median of {counted(repeats, 'round')}, fresh run folders")
    table = format_table(["executor", "wall s (grid)", "s / run", "overhead s / run vs pool"], rows)
    return f"{header}\n\n{table}"
