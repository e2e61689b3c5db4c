"""Measurements of a model, independent of how it was trained: gradient norms per layer
(``gradients``), internal covariate shift (``ics``), the loss landscape along the gradient
(``landscape``), accuracy under perturbations (``robustness``) and the branch/skip variances
of residual blocks (``residual``). They import the library
(``bnlab.nn``) and ``bnlab.util``, never the training lab or the experiments."""
