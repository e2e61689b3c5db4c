"""bnlab: a laboratory for batch normalization.

A from-scratch batch norm that is an exact drop-in for ``torch.nn.BatchNorm*``
(``bnlab.functional``, ``bnlab.nn``), the chapter's LeNet trained on real
Fashion-MNIST (``bnlab.training.models``, ``bnlab.training.train``), and the chapter's exercises and
claims as reproducible experiments (``bnlab.experiments``).
"""

__version__ = "0.1.0"
