"""Measurements of a model, independent of how it was trained: gradient norms per layer
(``gradients``), internal covariate shift (``ics``), the loss landscape along the gradient
(``landscape``), accuracy under perturbations (``robustness``) and under test-time adaptation
through batch norm (``adaptation``: source, BN-adapt, TENT), the branch/skip variances of
residual blocks (``residual``), and the norms and angular updates of scale-invariant weights
(``spherical``). They import the library (``bnlab.nn``, ``bnlab.kernels``) and ``bnlab.util``,
never the training lab or the experiments."""
