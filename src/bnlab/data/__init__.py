"""Fashion-MNIST for bnlab, in four parts.

* ``bnlab.data.dataset``: locating, reading (IDX) and verifying (SHA-256) the four files;
  ``load_fashion_mnist`` and ``dataset_info``.
* ``bnlab.data.fetch``: getting them where they are missing (official mirrors, apt).
* ``bnlab.data.split``: the validation split held out of the training images.
* ``bnlab.data.loader``: batching them (``Loader``) and taking subsets (``stratified_subset``).
"""
