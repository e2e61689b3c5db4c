"""Fashion-MNIST for bnlab.

* ``bnlab.data.dataset``: locating, reading (IDX) and verifying (SHA-256) the four files;
  ``load_fashion_mnist`` and ``dataset_info``.
* ``bnlab.data.fetch``: getting them where they are missing (official mirrors, apt).
* ``bnlab.data.split``: the validation split held out of the training images.
* ``bnlab.data.loader``: batching them (``Loader``) and taking subsets (``stratified_subset``).
* ``bnlab.data.corruptions`` and ``bnlab.data.fashion_c``: Fashion-MNIST-C, the test set under
  Hendrycks & Dietterich's common corruptions at severities 1-5, built from a seed and cached.
* ``bnlab.data.streams``: orders of a test set for test-time adaptation (i.i.d.,
  class-sorted, class-imbalanced), as batches.
"""
