"""Test streams: i.i.d. is a seeded permutation, class-sorted is sorted, imbalanced keeps a
long tail; batches are the Loader's tensors."""

from __future__ import annotations

import pytest
import torch

from bnlab.data.streams import batches, stream_order

LABELS = torch.arange(200) % 10  # 20 per class


def test_iid_is_a_permutation_fixed_by_the_seed() -> None:
    order = stream_order(LABELS, "iid", seed=1)
    assert sorted(order.tolist()) == list(range(200))
    assert torch.equal(order, stream_order(LABELS, "iid", seed=1))
    assert not torch.equal(order, stream_order(LABELS, "iid", seed=2))


def test_class_sorted_holds_every_image_in_class_order() -> None:
    order = stream_order(LABELS, "class-sorted", seed=0)
    assert sorted(order.tolist()) == list(range(200))
    sorted_labels = LABELS[order]
    assert torch.all(sorted_labels[1:] >= sorted_labels[:-1])
    assert not torch.equal(order, stream_order(LABELS, "class-sorted", seed=1))  # shuffled within


def test_imbalanced_keeps_a_geometric_long_tail() -> None:
    order = stream_order(LABELS, "imbalanced", seed=0, imbalance=0.1)
    counts = torch.bincount(LABELS[order], minlength=10).tolist()
    assert counts == [max(1, round(20 * 0.1 ** (k / 9))) for k in range(10)]
    assert counts[0] == 20 and counts[-1] == 2
    assert len(set(order.tolist())) == len(order)


def test_batches_are_float_images_in_unit_range_with_their_labels() -> None:
    images = (torch.arange(30 * 28 * 28) % 256).to(torch.uint8).reshape(30, 28, 28)
    labels = torch.arange(30) % 10
    out = batches(images, labels, 8, order="class-sorted")
    assert [len(y) for _, y in out] == [8, 8, 8, 6]
    x, y = out[0]
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    order = stream_order(labels, "class-sorted")
    torch.testing.assert_close(x, images[order[:8]].unsqueeze(1).float() / 255)
    assert torch.equal(y, labels[order[:8]])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="order"):
        stream_order(LABELS, "shuffled")
    with pytest.raises(ValueError, match="imbalance"):
        stream_order(LABELS, "imbalanced", imbalance=0)
    with pytest.raises(ValueError, match="batch_size"):
        batches(torch.zeros(2, 28, 28, dtype=torch.uint8), LABELS[:2], 0)
