"""bnlab: a laboratory for batch normalization.

A from-scratch batch norm that is an exact drop-in for ``torch.nn.BatchNorm*``
(``bnlab.functional``, ``bnlab.nn``; importing them loads nothing else), the chapter's
LeNet trained on real Fashion-MNIST (``bnlab.training``), and the chapter's exercises and
claims as reproducible experiments (``bnlab.experiments``). The README's "Architecture"
section says which package may import which.
"""

__version__ = "0.1.0"
