"""One report over everything that has been run: the demo and every finished experiment.

Why: a teacher wants a single page with all the chapter's numbers and figures. Each
experiment and the demo already write their own ``report.md``; this gathers them, fixing
the relative figure links so they work from the combined report's folder.

The folders gathered from may be shared or copied from elsewhere, and the combined report
is readable by whoever reads the output folder: so a ``report.md`` (or the folder holding
it) that is a symbolic link is skipped, said on stderr, never followed (it could copy a
file the link's owner could not read into the report), and a folder's name goes into the
report as text and as an anchor made of safe characters only, never as markup.
"""

from __future__ import annotations

import html
import os
import re
import stat
import sys
from pathlib import Path

from bnlab.util.errors import BnlabError
from bnlab.util.io import atomic_write_text

_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def _relink(markdown: str, source_dir: Path, target_dir: Path) -> str:
    """Rewrite relative links in ``markdown`` written in ``source_dir`` to work from ``target_dir``."""
    def fix(match: re.Match) -> str:
        link = match.group(2)
        if re.match(r"^[a-z]+://|^/|^#", link):
            return match.group(0)
        moved = os.path.relpath(source_dir / link, target_dir)
        return f"{match.group(1)}{moved}{match.group(3)}"

    return _LINK.sub(fix, markdown)


def _demote(markdown: str) -> str:
    """Push every heading one level down, so each gathered report becomes a section."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


class ReportError(BnlabError):
    """A report that cannot be gathered (not UTF-8, say); the message names it."""


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(path.lstat().st_mode)
    except OSError:
        return False


def find_reports(roots: list[Path], order: tuple[str, ...] = ()) -> list[Path]:
    """Every ``report.md`` directly in a root or one folder below it: roots in the given
    order, and within a root the folders named in ``order`` first (in that order), then the
    rest alphabetically. A report or folder below a root that is a symbolic link is left
    out, said on stderr."""
    rank = {name: i for i, name in enumerate(order)}
    found = []
    for root in roots:
        below = sorted(root.glob("*/report.md"),
                       key=lambda p: (rank.get(p.parent.name, len(rank)), p.parent.name))
        for candidate in [root / "report.md", *below]:
            if candidate in found or not (candidate.exists() or _is_link(candidate)):
                continue
            link = next((p for p in (candidate.parent, candidate)
                         if p != root and _is_link(p)), None)
            if link is not None:
                print(f"bnlab: note: {candidate} left out: {link} is a symbolic link, which "
                      "the report does not follow", file=sys.stderr)
            elif candidate.is_file():
                found.append(candidate)
    return found


def _read_report(path: Path) -> str:
    """``path``'s text, opened without following a link (one put there since it was found)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if _is_link(path):
            raise ReportError(f"{path}: became a symbolic link, which the report does not "
                              "follow") from None
        raise exc
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportError(f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                          f"{exc.start}); delete it, or run its experiment again to rewrite "
                          "it") from None


def _anchor(name: str, taken: set[str]) -> str:
    """An HTML id for folder ``name``: its letters, digits, ``.``, ``_`` and ``-`` (anything
    else becomes ``-``), made unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", name) or "report"
    anchor, n = base, 1
    while anchor in taken:
        n += 1
        anchor = f"{base}-{n}"
    taken.add(anchor)
    return anchor


def _as_text(name: str) -> str:
    """Folder ``name`` as literal text in a markdown list item's link: HTML escaped (no tags,
    no entities), and the characters that would end the link or start emphasis or code
    backslashed."""
    return re.sub(r"([\\`*\[\]|])", r"\\\1", html.escape(name))


def build_report(roots: list[str | Path], out: str | Path,
                 order: tuple[str, ...] = ()) -> tuple[Path, list[Path]]:
    """Write the combined report to ``out``; return its path and the reports it gathered.
    Every report is read before anything is written: one that cannot be read is a
    ``ReportError`` naming it, and ``out`` is left as it was."""
    out = Path(out)
    reports = find_reports([Path(r) for r in roots], order)
    texts = [_relink(_read_report(path), path.parent, out.parent) for path in reports]
    taken: set[str] = set()
    anchors = [_anchor(path.parent.name, taken) for path in reports]
    parts = ["# bnlab: the batch normalization chapter, measured", ""]
    if not reports:
        parts.append("Nothing has been run yet: try `bnlab demo` or `bnlab exp lr`.")
    parts += [f"- [{_as_text(p.parent.name)}](#{a})" for p, a in zip(reports, anchors)]
    for text, anchor in zip(texts, anchors):
        parts += ["", f'<a id="{anchor}"></a>', "", _demote(text)]
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out, reports
