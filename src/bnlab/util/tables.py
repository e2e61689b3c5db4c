"""Markdown tables: one format for the terminal, ``report.md`` and ``summary.md``; and counts.

Why: every command that prints results (benchmarks, the demo, experiment reports,
``bnlab inspect``) shows a table; GitHub markdown reads well in a terminal and renders
in a report, so they all share this one function. The numbers around the tables are
counted in words that agree with them ("1 epoch", "3 seeds"): :func:`counted`.
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


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in agreement: ``counted(1, "epoch")`` is "1 epoch", ``counted(3,
    "epoch")`` "3 epochs"; ``plural`` for nouns that do not just add an s ("processes")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
