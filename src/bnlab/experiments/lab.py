"""The whole lab in one command: every experiment at its defaults, one progress display, the
times it took, and the site.

Why: the lab answers some fifteen questions, one experiment each; a user who wants them
all should not have to run them one by one and add up the clock. ``bnlab lab`` runs every
experiment (or the named ones) through ``runner.run_experiment`` into one output folder, so
runs are shared by config hash, finished ones are skipped and cut-off ones resumed: a second
call only re-analyses. A failing experiment is listed with its one-line error and the others
go on. What each call took is kept in ``<out>/lab.json`` (:data:`LAB_RECORD`) beside what
each experiment cost over all calls (``bnlab.experiments.costs``), and the site
(``bnlab.experiments.site``) is written into ``<out>/site``.

Two times, never mixed up:

* **this call**: the wall time of this ``bnlab lab`` call per experiment and in total (it
  trains only what is not finished yet);
* **cost**: what the experiment's runs, measurements and last analysis recorded, whichever
  calls did the work (so a lab completed over several sittings still adds up).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bnlab.data.dataset import FashionMNIST
from bnlab.experiments import costs, sizing
from bnlab.experiments.executors import Executor
from bnlab.experiments.runner import (
    Experiment,
    ExpSettings,
    GridIncomplete,
    PlannedRun,
    check_data,
    config_key,
    is_finished,
    run_experiment,
)
from bnlab.experiments.site import build_site
from bnlab.training import runs
from bnlab.training.train import bar_disabled, steps_per_epoch, training_images
from bnlab.util.errors import BnlabError, describe_os_error
from bnlab.util.io import atomic_write_json, read_json
from bnlab.util.provenance import provenance, utc_now
from bnlab.util.tables import counted, format_table

LAB_RECORD = "lab.json"
SITE = "site"
DONE, INCOMPLETE, FAILED = "done", "incomplete", "failed"


@dataclass
class Outcome:
    """One experiment in one call of the lab."""

    name: str
    status: str  # DONE, INCOMPLETE (some runs could not be used) or FAILED
    wall_s: float  # this call's wall time
    runs: int  # runs of its grid
    trained: int  # of them trained or resumed by this call
    date: str
    command: str  # the `bnlab exp` command that reproduces it
    error: str = ""  # one line
    traceback: str = ""  # for an error that is not a BnlabError: where it came from


def one_line(exc: BaseException) -> str:
    """An error as one line: a bnlab or OS error as the CLI says it, anything else with its type."""
    if isinstance(exc, OSError):
        text = describe_os_error(exc)
    elif isinstance(exc, BnlabError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


# --------------------------------------------------------------------------- progress

def seconds_per_step(run_dir: Path) -> float | None:
    """A finished run's recorded training seconds per SGD step (None for a run that diverged
    or whose files cannot be read)."""
    try:
        summary = runs.read_object(run_dir / runs.SUMMARY, "")
        config = runs.read_config(run_dir)
        metrics = runs.read_jsonl(run_dir / runs.METRICS)
        evals = runs.read_jsonl(run_dir / runs.EVALS) if (run_dir / runs.EVALS).exists() else []
        steps = len(metrics) * steps_per_epoch(
            training_images(config["subset"], config.get("val_size", 0)), config["batch_size"])
    except (OSError, KeyError, TypeError, ValueError, runs.RunFolderError):
        return None
    if summary.get("diverged") or not steps:
        return None
    return costs.run_training_seconds(metrics, evals) / steps


def rate_key(p: PlannedRun) -> str:
    """Runs that cost the same per step: the same model, norm, batch size, processes, ..."""
    config, nproc = sizing.timed_config(p)
    return f"{config_key(config)}-{nproc}"


class LabProgress:
    """One line over the whole lab: experiments done of all, runs finished of all (a run
    shared between experiments counts once), the elapsed time, and an estimate of the
    training time left: each unfinished run's steps left times the seconds per step that
    finished runs of its kind (model, norm, batch size...) recorded, or all finished runs
    when none of its kind has, over the runs trained at once (``jobs``). Each experiment's
    own bars (``runner.execute``'s, the analysis's) show beneath it. A thread refreshes it
    every ``every`` seconds from the run folders, so the experiments know nothing of it."""

    def __init__(self, plans: dict[str, list[PlannedRun]], jobs: int, progress: bool,
                 experiments: int | None = None, every: float = 2.0) -> None:
        unique = {p.run_dir: p for planned in plans.values() for p in planned}
        self.runs = list(unique.values())
        self.kinds = {p.run_dir: rate_key(p) for p in self.runs}
        self.experiments = len(plans) if experiments is None else experiments
        self.done_experiments = 0
        self.jobs = max(1, jobs)
        self.rates: dict[Path, tuple[str, float | None]] = {}  # finished run -> (kind, s/step)
        self.bar = tqdm(total=len(self.runs), unit="run", position=0, dynamic_ncols=True,
                        disable=bar_disabled(progress), bar_format=self._format(""))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.refresh()
        self._thread = None
        if not self.bar.disable:
            self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)
            self._thread.start()

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self.refresh()

    def experiment_done(self) -> None:
        self.done_experiments += 1
        self.refresh()

    def time_left(self) -> str:
        """The estimate's text (also what ``refresh`` shows)."""
        for p in self.runs:
            if p.run_dir not in self.rates and is_finished(p.run_dir):
                self.rates[p.run_dir] = (self.kinds[p.run_dir], seconds_per_step(p.run_dir))
        measured = [(kind, rate) for kind, rate in self.rates.values() if rate is not None]
        left = [sizing.run_size(p) for p in self.runs if p.run_dir not in self.rates]
        steps = sum(s.steps for s in left)
        if not steps:
            return "nothing left to train"
        if not measured:
            return "time left: known after the first run"
        by_kind: dict[str, list[float]] = {}
        for kind, rate in measured:
            by_kind.setdefault(kind, []).append(rate)
        fallback = statistics.median(rate for _, rate in measured)
        seconds = sum(s.steps * statistics.median(by_kind.get(self.kinds[s.run.run_dir],
                                                              [fallback]))
                      for s in left) / self.jobs
        return (f"~{sizing.format_duration(seconds)} of training left (from "
                f"{counted(len(measured), 'run')} measured)")

    @staticmethod
    def _format(left: str) -> str:
        """The line's tqdm format, ending with the estimate (tqdm's own ETA would count the
        runs found finished as instant)."""
        left = left.replace("{", "{{").replace("}", "}}")
        return "{desc} |{bar:16}| runs {n_fmt}/{total_fmt} | {elapsed} elapsed | " + left

    def refresh(self) -> None:
        if self.bar.disable:
            return
        with self._lock:
            done = sum(p.run_dir in self.rates or is_finished(p.run_dir) for p in self.runs)
            self.bar.bar_format = self._format(self.time_left())
            self.bar.set_description_str(
                f"lab: experiments {self.done_experiments}/{self.experiments}", refresh=False)
            self.bar.n = done
            self.bar.refresh()

    def say(self, line: str) -> None:
        """A line above the bars, padded to the terminal's width over what a closed bar left."""
        if not self.bar.disable:
            width = shutil.get_terminal_size().columns - 1
            tqdm.write(line.ljust(width), file=sys.stderr)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.refresh()
        self.bar.close()


# --------------------------------------------------------------------------- the record

def read_record(out: Path) -> dict[str, Any]:
    """``<out>/lab.json``, or an empty record where there is none or it cannot be read (said
    on stderr: it is replaced)."""
    path = out / LAB_RECORD
    if not path.exists():
        return {"calls": [], "experiments": {}}
    try:
        record = read_json(path)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bytes that are not UTF-8
        record = None
        print(f"bnlab: note: {path}: {exc}; starting a new {LAB_RECORD}", file=sys.stderr)
    if not (isinstance(record, dict) and isinstance(record.get("calls"), list)
            and isinstance(record.get("experiments"), dict)):
        return {"calls": [], "experiments": {}}
    return record


def experiment_costs(out: Path, names: list[str]) -> dict[str, costs.Cost | str]:
    """Per experiment its cost, or why it is unknown."""
    found: dict[str, costs.Cost | str] = {}
    for name in names:
        try:
            found[name] = costs.experiment_cost(out / name, out / "runs")
        except costs.CostUnknown as exc:
            found[name] = str(exc)
    return found


def _write_record(out: Path, record: dict[str, Any], outcomes: list[Outcome]) -> None:
    """Write ``record`` with ``outcomes`` (each experiment's latest) and every experiment's cost."""
    for o in outcomes:
        record["experiments"][o.name] = asdict(o)
    known = experiment_costs(out, sorted(record["experiments"]))
    found = [c for c in known.values() if isinstance(c, costs.Cost)]
    record["costs"] = {
        "experiments": {n: c.to_json() if isinstance(c, costs.Cost) else {"unknown": c}
                        for n, c in known.items()},
        "total": costs.total_cost(found).to_json(),
        "explained": costs.TIMES_EXPLAINED}
    atomic_write_json(out / LAB_RECORD, record)


# --------------------------------------------------------------------------- the lab

@dataclass
class LabResult:
    outcomes: list[Outcome]
    wall_s: float
    runs: int  # runs of all the grids, each once (experiments share runs)
    record: dict[str, Any]
    site: Path | None
    site_error: str = ""

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != DONE]


def run_lab(experiments: list[Experiment], settings: ExpSettings, out: str | Path,
            dataset: FashionMNIST, exp_command: Callable[[str], str], command: str,
            jobs: int = 1, executor: Executor | None = None, progress: bool = True) -> LabResult:
    """Run ``experiments`` one after another into ``out`` with ``settings`` (each resolved to
    its own defaults), record every call's times in ``<out>/lab.json`` and write the site into
    ``<out>/site``. A failing experiment is recorded with its one-line error and the next one
    starts. ``exp_command(name)``: the ``bnlab exp`` command line that reproduces experiment
    ``name`` alone (its reports' provenance); ``command``: this call's command line."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = read_record(out)
    facts = provenance(command, settings.quick)
    started, outcomes = time.perf_counter(), []
    call = {"command": command, "provenance": facts,
            "experiments": [e.name for e in experiments], "wall_s": None}
    record["calls"].append(call)
    plans: dict[str, list[PlannedRun]] = {}
    errors: dict[str, BaseException] = {}
    for e in experiments:
        try:
            plans[e.name] = sizing.planned_runs(e, settings, out)  # validates every config
        except Exception as exc:  # noqa: BLE001  said when its turn comes; the others run
            errors[e.name] = exc
    bar = LabProgress(plans, jobs, progress, len(experiments))
    try:
        for e in experiments:
            bar.say(f"\n{e.name}: {e.title}")
            outcome = _run_one(e, plans.get(e.name, []), errors.get(e.name), settings, out,
                               dataset, exp_command(e.name), jobs, executor, progress)
            outcomes.append(outcome)
            bar.experiment_done()
            bar.say(f"{e.name}: {outcome.status} in {sizing.format_duration(outcome.wall_s)}"
                    + (f": {outcome.error}" if outcome.error else ""))
            _write_record(out, record, [outcome])
    finally:
        bar.close()
    call["wall_s"] = time.perf_counter() - started
    _write_record(out, record, [])
    site, site_error = None, ""
    try:
        site = build_site([out], out / SITE)
    except (BnlabError, OSError) as exc:
        site_error = one_line(exc)
    return LabResult(outcomes, call["wall_s"], len(bar.runs), record, site, site_error)


def _run_one(e: Experiment, planned: list[PlannedRun], error: BaseException | None,
             settings: ExpSettings, out: Path, dataset: FashionMNIST, command: str, jobs: int,
             executor: Executor | None, progress: bool) -> Outcome:
    """One experiment of the lab, whatever happens to it."""
    before = sum(is_finished(p.run_dir) for p in planned)
    started = time.perf_counter()
    status, trace = DONE, ""
    try:
        if error is not None:
            raise error
        check_data(planned, dataset)
        with sizing.grid_progress(planned, progress):
            run_experiment(e, settings, out, dataset, jobs, progress, executor, command=command)
    except GridIncomplete as exc:
        status, error = INCOMPLETE, exc
    except (BnlabError, OSError) as exc:
        status, error = FAILED, exc
    except Exception as exc:  # noqa: BLE001  a bug in one experiment must not stop the lab
        status, error, trace = FAILED, exc, traceback.format_exc()
    trained = sum(is_finished(p.run_dir) for p in planned) - before
    return Outcome(e.name, status, time.perf_counter() - started, len(planned), trained,
                   utc_now(), command, one_line(error) if error is not None else "", trace)


# --------------------------------------------------------------------------- the summary

def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else sizing.format_duration(seconds)


def summary(result: LabResult, out: Path) -> str:
    """The closing text: per experiment its status, this call's wall time and its cost
    (training, measurements, analysis), the totals, the machine, and the failures."""
    known = experiment_costs(out, [o.name for o in result.outcomes])
    rows = []
    for o in result.outcomes:
        c = known[o.name]
        cost = ([f"{_duration(c.training_s)} ({counted(len(c.runs), 'run')})",
                 _duration(c.measurements_s), _duration(c.analysis_s), _duration(c.total_s)]
                if isinstance(c, costs.Cost) else ["-"] * 4)
        rows.append([o.name, o.status, _duration(o.wall_s),
                     f"{o.trained}/{o.runs}", *cost])
    total = costs.total_cost([c for c in known.values() if isinstance(c, costs.Cost)])
    rows.append(["all", f"{len(result.outcomes) - len(result.failed)}/{len(result.outcomes)} done",
                 _duration(result.wall_s),
                 f"{sum(o.trained for o in result.outcomes)}/{result.runs}",
                 f"{_duration(total.training_s)} ({counted(len(total.runs), 'run')})",
                 _duration(total.measurements_s), _duration(total.analysis_s),
                 _duration(total.total_s)])
    facts = result.record["calls"][-1]["provenance"]
    lines = [format_table(["experiment", "status", "this call", "runs trained", "cost: training",
                           "measurements", "analysis", "total cost"], rows), "",
             costs.TIMES_EXPLAINED, "",
             f"Machine: {facts['machine']}; {facts['date']}."]
    lines += [f"{o.name}: {o.status}: {o.error}" for o in result.failed]
    if result.site is not None:
        lines.append(f"site: {result.site / 'index.html'}")
    else:
        lines.append(f"site: not written: {result.site_error}")
    lines.append(f"times: {out / LAB_RECORD}")
    return "\n".join(lines)
