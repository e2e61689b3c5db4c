"""Where a result came from: bnlab's version and commit, torch, the machine, threads, date.

Why: a number in a report is only as good as what can be said about how it was made. Every
experiment report and results file, and every benchmark page, carries these facts, written
by the code that made the numbers, never typed by hand.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from bnlab import __version__

_REPO = Path(__file__).resolve().parents[3]  # src/bnlab/util/ -> the checkout, when it is one


def machine_line() -> str:
    """CPU, cores, threads, OS, Python and torch: what a timing depends on."""
    cpu = _cpu_model() or platform.processor() or platform.machine()
    gpu = (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    return (f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
            f"{gpu}; {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def _cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def source_commit() -> str:
    """The git commit bnlab's source was at (``+changes`` when the tree differs from it), or
    ``"unknown"`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+changes" if dirty.strip() else head


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def provenance(command: str, quick: bool) -> dict[str, Any]:
    """The facts of this process: what made the numbers, where, when and how it was asked."""
    return {"bnlab": __version__, "commit": source_commit(), "torch": torch.__version__,
            "machine": machine_line(), "threads": torch.get_num_threads(), "date": utc_now(),
            "command": command, "quick": quick}


def provenance_line(facts: dict[str, Any]) -> str:
    """``provenance(...)`` as one line of a report."""
    return (f"bnlab {facts['bnlab']} (commit {facts['commit']}), torch {facts['torch']}, "
            f"{facts['threads']} threads, on {facts['machine']}; {facts['date']}; "
            f"`{facts['command']}`" + (" (--quick)" if facts["quick"] else ""))
