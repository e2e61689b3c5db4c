"""The training lab: models with a norm chosen by name (``models``, ``deep``, ``norms``), the
trainer (``train``) and the parameters it decays (``weight_decay``), its run folders
(``runs``), data-parallel training (``distributed``), TensorBoard logging (``tensorboard``)
and a trained run's norm layers looked at (``inspection``). It builds on the library
(``bnlab.nn``), ``bnlab.data`` and ``bnlab.probes``; the experiments build on it."""
