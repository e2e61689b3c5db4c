"""Wall time of every experiment's ``--quick``, each alone in a fresh folder, against a budget.

Why a script and not a test: a timed test fails on a loaded machine and passes on a fast one,
so it checks nothing. This is a benchmark: run it on an otherwise idle machine
(``make quick-times``). Each experiment runs as ``bnlab exp NAME --quick`` in its own empty
``--out``, so no run is shared with another experiment and the time is what a user who runs
that one smoke test waits (training, analysis and the process's start). It prints a table,
and exits 1 when any experiment took longer than ``--budget`` seconds (180: the README's
promise that a smoke test takes at most three minutes on 2 cores).

    python scripts/quick_times.py [NAME ...] [--budget 180] [--keep DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bnlab.experiments import EXPERIMENTS
from bnlab.util.provenance import machine_line, utc_now

BNLAB = "import sys; from bnlab.cli import main; sys.exit(main())"
"""The ``bnlab`` command, run by this interpreter (so by the venv it runs in)."""


def time_quick(name: str, out: Path) -> tuple[float, int]:
    """Seconds of ``bnlab exp NAME --quick --out OUT`` and its exit status."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BNLAB, "exp", name, "--quick", "--no-progress",
                           "--out", str(out)], stdout=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start, done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="experiments to time (default: all)")
    parser.add_argument("--budget", type=float, default=180.0,
                        help="seconds each --quick may take (default: 180)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the experiments' folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; expected some of "
                     f"{', '.join(EXPERIMENTS)}")
    names = args.names or list(EXPERIMENTS)
    print(f"`bnlab exp NAME --quick`, each alone in an empty --out; {utc_now()}, on "
          f"{machine_line()}.\n")
    print("| experiment | wall s | within budget |\n| --- | --- | --- |", flush=True)
    over = []
    with tempfile.TemporaryDirectory(prefix="bnlab-quick-") as scratch:
        root = args.keep or Path(scratch)
        for name in names:
            seconds, status = time_quick(name, root / name)
            fits = status == 0 and seconds <= args.budget
            if not fits:
                over.append(name)
            verdict = "yes" if fits else ("no" if status == 0 else f"failed (exit {status})")
            print(f"| {name} | {seconds:.0f} | {verdict} |", flush=True)
    if over:
        print(f"\nover the {args.budget:g} s budget or failed: {', '.join(over)}")
        return 1
    print(f"\nevery one within {args.budget:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
