"""Atomic file writes: a result is either absent or whole, never half-written.

Why: long runs get killed. Writing to a temporary file in the same folder and then
renaming it over the target is atomic on POSIX, so a reader (or a resumed run) never
sees a truncated ``summary.json`` or checkpoint. A kill during a write leaves only the
temporary file (``.NAME.XXXXXXXX.tmp``); whoever next opens the folder to write in it
removes such strays (``remove_stray_temps``). Files get the mode a plain ``open`` would
give them (0666 less the umask), so results on a shared machine are as readable as the
user's other files.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

# ``.<target name>.<mkstemp's 8 random characters>.tmp``: the only names removed as strays.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600 whatever the umask
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if exc.filename is not None:
                raise
            # A failed write on a file object names no file: name the one being written.
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text_if_changed(path: str | os.PathLike, text: str) -> bool:
    """``atomic_write_text`` unless ``path`` already holds exactly ``text``; True if written."""
    path = Path(path)
    try:
        if path.read_bytes() == text.encode("utf-8"):
            return False
    except OSError:
        pass
    atomic_write_text(path, text)
    return True


def remove_stray_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files killed atomic writes left in ``folder``; return what was removed.

    Call it only on a folder this process owns for writing, under its ``folder_lock`` (a run
    it trains, an experiment it analyzes): another writer's temp file in flight looks the same.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if _TEMP_NAME.match(entry.name) and entry.is_file():
            try:
                entry.unlink(missing_ok=True)
            except OSError:  # a read-only folder keeps its strays; they hide no result
                continue
            removed.append(entry)
    return removed


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


LOCK = ".lock"


@contextmanager
def folder_lock(folder: str | os.PathLike,
                on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock (``flock`` on its ``.lock``) for the block.

    Two processes on one output folder (two ``bnlab exp`` on the same ``--out``) would both
    train every run, and each would remove the other's temp files in flight; with this, the
    second waits here until the first is done with the folder. ``on_wait`` is called once
    when it has to wait. A folder where the lock cannot be taken (read-only, a file system
    without locks) is used without it. Closing the file (the block's end, or the process's)
    unlocks.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(folder / LOCK, "ab")  # noqa: SIM115 -- closed by the with below
    except OSError:
        handle = None
    with handle if handle is not None else nullcontext():
        if handle is not None:
            _take_lock(handle, on_wait)
        yield


def _take_lock(handle: IO[bytes], on_wait: Callable[[], None] | None) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:  # held by another process
        pass
    except OSError:  # no locks on this file system (ENOLCK): go on without
        return
    if on_wait is not None:
        on_wait()
    fcntl.flock(handle, fcntl.LOCK_EX)
