"""One report over everything that has been run: the demo and every finished experiment.

Why: a teacher wants a single page with all the chapter's numbers and figures. Each
experiment and the demo already write their own ``report.md``; this gathers them, fixing
the relative figure links so they work from the combined report's folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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


def find_reports(roots: list[Path], order: tuple[str, ...] = ()) -> list[Path]:
    """Every ``report.md`` directly in a root or one folder below it: roots in the given
    order, and within a root the folders named in ``order`` first (in that order), then the
    rest alphabetically."""
    rank = {name: i for i, name in enumerate(order)}
    found = []
    for root in roots:
        below = sorted(root.glob("*/report.md"),
                       key=lambda p: (rank.get(p.parent.name, len(rank)), p.parent.name))
        for candidate in [root / "report.md", *below]:
            if candidate.is_file() and candidate not in found:
                found.append(candidate)
    return found


def build_report(roots: list[str | Path], out: str | Path,
                 order: tuple[str, ...] = ()) -> tuple[Path, list[Path]]:
    """Write the combined report to ``out``; return its path and the reports it gathered."""
    out = Path(out)
    reports = find_reports([Path(r) for r in roots], order)
    parts = ["# bnlab: the batch normalization chapter, measured", ""]
    if not reports:
        parts.append("Nothing has been run yet: try `bnlab demo` or `bnlab exp lr`.")
    parts += [f"- [{p.parent.name}](#{p.parent.name})" for p in reports]
    for path in reports:
        text = _relink(path.read_text(encoding="utf-8"), path.parent, out.parent)
        parts += ["", f'<a id="{path.parent.name}"></a>', "", _demote(text)]
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out, reports
