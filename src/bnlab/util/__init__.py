"""Utilities every layer of bnlab may use: configuration dataclasses, atomic writes, errors,
tables, figures, scoped model changes and denormal flushing. Nothing here imports the rest
of bnlab; importing this package loads none of its modules (``plots`` loads matplotlib only
when imported)."""
