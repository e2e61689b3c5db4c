"""docs/performance.md: the benchmarks' tables, with the machine and date they came from.

Why a generated page: timings are measurements of one machine on one day, so they live
beside the facts that qualify them (CPU, cores, threads, torch, date) and are rewritten
by the benchmark, never typed into docstrings or the README. Each benchmark owns one
section of the page, delimited by HTML comments; writing it replaces that section and
keeps the others.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bnlab.util.provenance import machine_line, utc_now

DEFAULT_PATH = Path("docs/performance.md")
_HEADER = ("# Performance\n\nMeasured by bnlab's benchmarks and written by them "
           "(`bnlab bench bn --write-docs`, `bnlab bench step --write-docs`); do not edit by "
           "hand. Each section names the machine and date it was measured on. Ratios are "
           "medians of interleaved runs; on a shared machine absolute times drift, ratios "
           "less.\n")


def write_section(key: str, title: str, command: str, body: str,
                  path: Path | str = DEFAULT_PATH) -> Path:
    """Replace (or add) the section ``key`` of the page at ``path``; atomic write."""
    path = Path(path)
    now = utc_now()
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    section = (f"{begin}\n## {title}\n\n`{command}`, {now}, on {machine_line()}.\n\n"
               f"{body.strip()}\n{end}")
    text = path.read_text() if path.exists() else _HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
