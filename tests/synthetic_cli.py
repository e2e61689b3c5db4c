"""``python -m tests.synthetic_cli ARGS``: the ``bnlab`` command in a process of its own, reading
the synthetic Fashion-MNIST of ``tests.helpers`` instead of the real one.

For tests that signal, kill or race whole processes (``tests.helpers.bnlab_process`` starts it).
Spawned workers receive the dataset from this process, so they need no patch of their own.
"""

from __future__ import annotations

import sys

from bnlab import cli
from bnlab.data import dataset
from tests.helpers import make_synthetic_fashion

if __name__ == "__main__":
    data = make_synthetic_fashion()
    dataset.load_fashion_mnist = lambda root=None, **kw: data
    sys.exit(cli.main(sys.argv[1:]))
