"""Markdown tables: one format for the terminal, ``report.md`` and ``summary.md``.

Why: every command that prints results (benchmarks, the demo, experiment reports,
``bnlab inspect``) shows a table; GitHub markdown reads well in a terminal and renders
in a report, so they all share this one function.
"""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table (readable in a terminal and in report.md)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])
