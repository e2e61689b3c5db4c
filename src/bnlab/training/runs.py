"""A training run's folder: its config, metrics, summary and checkpoint on disk.

Why: a run is only useful if a person (or the experiment runner) can read what it did
after the fact and pick it up where it was killed. Every file is written atomically, so a
killed run leaves the previous epoch's state, never a torn file.
``bnlab.training.train.load_trained_model`` turns a finished folder back into the model it
trained::

    runs/<name>/
      config.json      the TrainConfig, verbatim
      metrics.jsonl    one JSON object per finished epoch
      steps.jsonl      the training loss of every step, one line per epoch
      evals.jsonl      validation every N steps, with its seconds (only with eval_every)
      summary.json     final/best val acc, seconds per epoch, diverged (written at the end)
      checkpoint.pt    model, optimizer, history and RNG state after the last finished epoch
      curves.png       train loss, val loss and val acc against epoch
      analysis/<name>.json   a measurement of the finished model (``cached``), with its key
      .lock            locked while a grid's process trains the run (``bnlab.util.io.folder_lock``)

``checkpoint.pt`` is the source of truth: the history files are derived from it (a resume
rewrites any that disagree), ``summary.json`` is written last and marks a finished run. A
file that cannot be read is an error naming it, what is wrong and what to do.

Run folders are shared (a Ray cluster's storage, a colleague's results), so opening one must
never run code from it. ``checkpoint.pt`` holds only tensors, numbers, strings, None and
dicts, lists and tuples of them (:func:`check_plain`, enforced on every save), and is read
with ``torch.load(..., weights_only=True)``, whose unpickler builds nothing else: a file
holding anything else (a crafted pickle) is refused in one line naming it, before any of it
runs. :func:`upgrade_checkpoint` (``bnlab runs upgrade``) is the one place that unpickles a
checkpoint fully, for a file the user says they trust, and rewrites it in the safe form.
"""

from __future__ import annotations

import io as io_module
import json
import math
import pickle
import re
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.util.errors import BnlabError
from bnlab.util.io import (
    atomic_write,
    atomic_write_json,
    read_json,
    remove_stray_temps,
    write_text_if_changed,
)

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


class RunFileError(RunFolderError):
    """A file of a run folder that cannot be read (truncated, corrupt, not bnlab's)."""


def _start_over(run_dir: Path) -> str:
    return f"delete {run_dir} to train the run again"


def _rewrite_from_checkpoint(run_dir: Path) -> str:
    return (f"`bnlab train --resume --out {run_dir}` with the run's flags rewrites it from its "
            f"{CHECKPOINT}, or {_start_over(run_dir)}")


def jsonl_text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> bool:
    """Write ``rows`` one JSON object a line, unless the file already holds exactly that."""
    return write_text_if_changed(path, jsonl_text(rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file of a run; RunFileError naming the line that is not one."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RunFileError(f"{path}: line {number} is not valid JSON ({exc}); "
                               f"{_rewrite_from_checkpoint(path.parent)}") from None
        if not isinstance(row, dict):
            raise RunFileError(f"{path}: line {number} is not a JSON object; "
                               f"{_rewrite_from_checkpoint(path.parent)}")
        rows.append(row)
    return rows


def read_object(path: Path, what_to_do: str) -> dict[str, Any]:
    """A JSON file holding one object; RunFileError saying what is wrong and ``what_to_do``."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, and undecodable bytes
        raise RunFileError(f"{path}: not valid JSON ({exc}); {what_to_do}") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path}: expected a JSON object, found {type(value).__name__}; "
                           f"{what_to_do}")
    return value


def read_config(run_dir: Path) -> dict[str, Any]:
    return read_object(run_dir / CONFIG, _start_over(run_dir))


def has_finished_epoch(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` got as far as a result (its first checkpoint or summary)."""
    return (run_dir / CHECKPOINT).exists() or (run_dir / SUMMARY).exists()


def _note(message: str) -> None:
    print(f"bnlab: note: {message}", file=sys.stderr)


def prepare(run_dir: Path, config: dict[str, Any], resume: bool,
            required: tuple[str, ...] = (), known: Collection[str] | None = None
            ) -> dict[str, Any] | None:
    """Make ``run_dir`` ready for a run with ``config``; return its checkpoint when resuming.

    A folder that holds a run with a finished epoch is only reused with ``resume=True`` and
    the same config; anything else is an error that names the folder, so no result is
    overwritten. A folder whose run died before its first epoch holds no result, so a new
    config may replace it (said on stderr). Temp files of killed writes are removed. The
    checkpoint must hold the ``required`` keys; a saved config key outside ``known`` (the
    config class's fields) means the file is not a config of this bnlab.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, expected a run folder (choose another --out)")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stray_temps(run_dir)
    config_path = run_dir / CONFIG
    if not config_path.exists():
        atomic_write_json(config_path, config)
    elif not has_finished_epoch(run_dir):
        _replace_unstarted(run_dir, config)
        return None
    else:
        saved = read_config(run_dir)
        if not resume:
            raise RunFolderError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose "
                f"another --out"
            )
        unknown = sorted(set(saved) - set(config if known is None else known))
        if unknown:
            raise RunFileError(f"{config_path}: unknown key(s) {unknown}, not a config of this "
                               f"bnlab; {_start_over(run_dir)}")
        if saved != config:
            changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise RunFolderError(
                f"cannot resume {run_dir}: its config differs in {changed} "
                f"(saved {[saved.get(k) for k in changed]}, given {[config.get(k) for k in changed]})"
            )
    if resume and (run_dir / CHECKPOINT).exists():
        return load_checkpoint(run_dir, required)
    return None


def _replace_unstarted(run_dir: Path, config: dict[str, Any]) -> None:
    """Start the run in a folder whose earlier run finished no epoch, saying so."""
    try:
        saved = read_config(run_dir)
    except RunFileError as exc:
        _note(f"{run_dir} held a run with no finished epoch and an unreadable config ({exc}); "
              "replacing it")
        atomic_write_json(run_dir / CONFIG, config)
        return
    if saved == config:
        _note(f"{run_dir} held this run with no finished epoch; starting it over")
        return
    changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    _note(f"{run_dir} held a run with no finished epoch (config differs in {changed}); "
          "replacing it")
    atomic_write_json(run_dir / CONFIG, config)


def load_checkpoint(run_dir: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The checkpoint of ``run_dir``, read without running any code from it; RunFileError when
    it is damaged, holds more than tensors and plain containers, or lacks ``required`` keys."""
    path = run_dir / CHECKPOINT
    try:
        checkpoint = _load_safely(path)
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir} has no {CHECKPOINT} (no epoch finished yet)") from None
    except _UnsafeCheckpoint as exc:
        raise RunFileError(f"{path}: refused: it holds {exc}, not only tensors and plain "
                           f"containers (nothing of it was run); if you trust the file (a "
                           f"checkpoint of an older bnlab), `bnlab runs upgrade {run_dir}` "
                           f"converts it, else {_start_over(run_dir)}") from None
    except _DamagedCheckpoint as exc:
        raise RunFileError(f"{path}: not a readable checkpoint, truncated or corrupt ({exc}); "
                           f"{_checkpoint_advice(run_dir)}") from None
    return _checked(checkpoint, path, required)


def _checkpoint_advice(run_dir: Path) -> str:
    return (f"delete it to train the run again from epoch 1 (keeping {CONFIG}), or "
            f"{_start_over(run_dir)}")


def _checked(checkpoint: Any, path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if not isinstance(checkpoint, dict) or missing:
        raise RunFileError(f"{path}: not a bnlab checkpoint (missing {missing}); "
                           f"{_checkpoint_advice(path.parent)}")
    return checkpoint


class _UnsafeCheckpoint(Exception):
    """The file holds objects that only a full unpickler builds (the message says which)."""


class _DamagedCheckpoint(Exception):
    """The file is no checkpoint at all (the message says what failed)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _load_safely(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain containers only.

    Raises FileNotFoundError, ``_UnsafeCheckpoint`` (the weights-only unpickler met something
    else: a class, a function, an opcode it does not run) or ``_DamagedCheckpoint``.
    """
    try:
        with warnings.catch_warnings():  # a bare pickle of another protocol draws a warning
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("Weights only load failed"):
            raise _UnsafeCheckpoint(_refused_part(str(exc))) from None
        raise _DamagedCheckpoint(_first_line(exc)) from None
    # A damaged file fails inside torch.load or pickle in many ways (EOFError, RuntimeError
    # from the zip reader, OSError, ValueError, ...): all say "not a checkpoint".
    except Exception as exc:  # noqa: BLE001
        raise _DamagedCheckpoint(_first_line(exc)) from None


def _refused_part(message: str) -> str:
    """What torch's weights-only unpickler refused, from its several-paragraph message."""
    if found := re.search(r"GLOBAL ([\w.]+)", message):
        return f"a reference to {found.group(1)}"
    if found := re.search(r"Unsupported operand (\d+)", message):
        return f"pickle opcode {found.group(1)}"
    return "an object the safe loader does not build"


PLAIN_SCALARS = (bool, int, float, str, type(None))
PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple)  # OrderedDict: state_dict()'s type
PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def check_plain(value: Any, where: str = "checkpoint") -> None:
    """TypeError unless ``value`` is tensors, numbers, strings and None in dicts (str or int
    keys), lists and tuples, exactly those types (no subclasses): what
    ``torch.load(..., weights_only=True)`` reads back."""
    for path, item in _walk(value, where):
        if type(item) not in (*PLAIN_TENSORS, *PLAIN_SCALARS, *PLAIN_CONTAINERS):
            raise TypeError(f"{path} is a {type(item).__module__}.{type(item).__qualname__}: a "
                            "checkpoint holds only tensors, numbers, strings, None, dicts, "
                            "lists and tuples")
        if isinstance(item, dict) and not all(type(k) in (str, int) for k in item):
            raise TypeError(f"{path} has a key that is neither a str nor an int")


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plain: :func:`check_plain`) atomically as ``run_dir``'s checkpoint."""
    check_plain(state)
    # Serialized in memory first: torch.save into a file that fails (a full disk) raises
    # "unexpected pos ..."; a plain write raises the OSError that says what happened.
    buffer = io_module.BytesIO()
    torch.save(state, buffer)
    atomic_write(run_dir / CHECKPOINT, lambda f: f.write(buffer.getbuffer()))


def checkpoints_under(root: Path) -> list[Path]:
    """The run folder ``root`` (it has a checkpoint), else every run folder below it."""
    if (root / CHECKPOINT).is_file():
        return [root]
    return sorted(path.parent for path in root.rglob(CHECKPOINT) if path.is_file())


def upgrade_checkpoint(run_dir: Path, required: tuple[str, ...] = (),
                       say: Callable[[str], None] = print) -> bool:
    """Rewrite ``run_dir``'s checkpoint in the safe form when it does not load safely; True if
    rewritten. This TRUSTS the file: it is unpickled fully, which runs any code it holds
    (``say`` tells the user so before). A checkpoint that already loads safely is left alone."""
    path = run_dir / CHECKPOINT
    try:
        _checked(_load_safely(path), path, required)
        say(f"{path}: loads safely already; unchanged")
        return False
    except _DamagedCheckpoint as exc:
        raise RunFileError(f"{path}: not a readable checkpoint, truncated or corrupt ({exc}); "
                           f"{_checkpoint_advice(run_dir)}") from None
    except _UnsafeCheckpoint:
        pass
    say(f"{path}: trusting it as you asked: unpickling it fully, which runs any code it holds")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 -- any failure of a full unpickle: not a checkpoint
        raise RunFileError(f"{path}: not a readable checkpoint ({_first_line(exc)}); "
                           f"{_checkpoint_advice(run_dir)}") from None
    try:
        plain = _to_plain(_checked(loaded, path, required), "checkpoint")
    except TypeError as exc:
        raise RunFileError(f"{path}: cannot be converted: {exc}") from None
    save_checkpoint(run_dir, plain)
    _checked(_load_safely(path), path, required)
    say(f"{path}: rewritten with tensors and plain containers only; it now loads safely")
    return True


def _to_plain(value: Any, where: str) -> Any:
    """``value`` in the types :func:`check_plain` allows: tensor subclasses become tensors,
    numpy values tensors or numbers, subclasses of dict/list/tuple the plain type (an
    OrderedDict keeps its type and a state_dict's ``_metadata``); TypeError naming anything
    else."""
    if isinstance(value, torch.Tensor):
        return value.detach().as_subclass(torch.Tensor)
    if type(value) in PLAIN_SCALARS:
        return value
    if isinstance(value, dict):
        plain = (OrderedDict if isinstance(value, OrderedDict) else dict)(
            (key, _to_plain(item, f"{where}[{key!r}]")) for key, item in value.items())
        if hasattr(value, "_metadata"):
            plain._metadata = _to_plain(value._metadata, f"{where}._metadata")
        return plain
    if isinstance(value, list | tuple):
        items = [_to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if type(value).__module__ == "numpy":  # numpy scalars and arrays, by name: no numpy import
        return value.item() if value.shape == () else torch.as_tensor(value)
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}")


def write_history(run_dir: Path, history: list[dict[str, Any]], step_losses: list[list[float]],
                  evals: list[dict[str, Any]]) -> None:
    """metrics, evals and steps files from the checkpoint's lists; unchanged files are kept."""
    write_jsonl(run_dir / METRICS, history)
    if evals:
        write_jsonl(run_dir / EVALS, evals)
    # A non-finite loss (the step a run diverged) is written as null: JSON has no NaN.
    write_jsonl(run_dir / STEPS, [
        {"epoch": i + 1, "loss": [x if math.isfinite(x) else None for x in losses]}
        for i, losses in enumerate(step_losses)
    ])


def summary_text(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True) + "\n"


def summary_is_current(run_dir: Path, summary: dict[str, Any]) -> bool:
    """Whether ``summary.json`` (and so the finished run's curves) already says ``summary``."""
    try:
        return (run_dir / SUMMARY).read_text(encoding="utf-8") == summary_text(summary)
    except OSError:
        return False


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_text_if_changed(run_dir / SUMMARY, summary_text(summary))


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """config, metrics and (when finished) summary of a run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        raise RunFolderError(f"{run_dir} is not a run folder (no {CONFIG})")
    return {
        "dir": run_dir,
        "config": read_config(run_dir),
        "metrics": read_jsonl(run_dir / METRICS) if (run_dir / METRICS).exists() else [],
        "evals": read_jsonl(run_dir / EVALS) if (run_dir / EVALS).exists() else [],
        "summary": (read_object(run_dir / SUMMARY, _rewrite_from_checkpoint(run_dir))
                    if (run_dir / SUMMARY).exists() else None),
    }


def cached(run_dir: str | Path, name: str, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()`` for a finished run, computed once per ``key`` and kept in the run folder.

    The value is stored with its key in ``analysis/<name>.json`` (atomically). A stored
    value whose key differs from ``key`` (a changed setting, other images, a new version of
    the measurement) is recomputed and replaced. ``key`` and the value must be JSON (floats
    may be NaN); the value returned has been through JSON either way, so a first and a
    cached analysis see exactly the same numbers. The file also records the seconds the
    computation took and when it started (Unix time): what the measurement cost, for
    ``bnlab.experiments.costs``.
    """
    path = Path(run_dir) / ANALYSIS / f"{name}.json"
    key = json.loads(json.dumps(key))
    observer = _measurement_observer.get()
    if path.exists():
        stored = read_json(path)
        if stored["key"] == key:
            if observer is not None:
                observer(name, False)
            return stored["value"]
    started, started_at = time.perf_counter(), time.time()
    value = json.loads(json.dumps(compute()))
    atomic_write_json(path, {"key": key, "value": value, "seconds": time.perf_counter() - started,
                             "computed_at": started_at})
    if observer is not None:
        observer(name, True)
    return value


_measurement_observer: ContextVar[Callable[[str, bool], None] | None] = ContextVar(
    "bnlab_measurement_observer", default=None)


@contextmanager
def observing_measurements(observer: Callable[[str, bool], None]) -> Iterator[None]:
    """Within the block, every :func:`cached` call ends with ``observer(name, computed)``
    (``computed`` False when the stored value was used): how a progress bar follows an
    experiment's analysis without the analysis knowing about it. In nested blocks every
    observer sees each call, the innermost first."""
    outer = _measurement_observer.get()

    def chained(name: str, computed: bool) -> None:
        observer(name, computed)
        if outer is not None:
            outer(name, computed)

    token = _measurement_observer.set(chained)
    try:
        yield
    finally:
        _measurement_observer.reset(token)
