"""Tests of bnlab.data: IDX checks, search order, verification cache, fetch, Loader, CLI.

Why synthetic files: the checks must be exercised on every failure they exist for
(truncation, wrong magic, bad labels, ...), quickly and without the real 30 MB dataset.
One test uses the real files where installed and says why it skips where not.
No test reaches the network or apt: both are replaced by an autouse fixture.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.cli import main
from bnlab.data import dataset, fetch
from bnlab.data.loader import Loader, stratified_subset
from bnlab.util.errors import DatasetError

# Captured before any fixture replaces them: the real search path, hash table and apt step.
REAL_LOCATIONS = dataset.search_locations()
REAL_EXPECTED = dict(dataset.EXPECTED_FILES)
REAL_INSTALL_WITH_APT = fetch.install_with_apt

N_TRAIN, N_TEST = 50, 20


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


def write_file(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def synthetic_split(n: int, seed: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return (idx_bytes(dataset.IMAGES_MAGIC, (n, 28, 28), images.tobytes()),
            idx_bytes(dataset.LABELS_MAGIC, (n,), labels.tobytes()))


def synthetic_contents() -> dict[str, bytes]:
    train_images, train_labels = synthetic_split(N_TRAIN, seed=1)
    test_images, test_labels = synthetic_split(N_TEST, seed=2)
    return {dataset.TRAIN_IMAGES: train_images, dataset.TRAIN_LABELS: train_labels,
            dataset.TEST_IMAGES: test_images, dataset.TEST_LABELS: test_labels}


CONTENTS = synthetic_contents()
SYNTHETIC_EXPECTED = {name: (hashlib.sha256(raw).hexdigest(), len(raw))
                      for name, raw in CONTENTS.items()}


def make_dataset(directory: Path, gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in CONTENTS.items():
        write_file(directory / (f"{name}.gz" if gz else name), raw)
    return directory


def no_network(url, out):
    raise AssertionError(f"a test tried to download {url}")


def no_apt():
    raise AssertionError("a test tried to run apt-get")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Fresh cache, no $BNLAB_DATA, a private system dir, synthetic hashes, no network/apt."""
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setattr(dataset, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.setattr(dataset, "EXPECTED_FILES", SYNTHETIC_EXPECTED)
    monkeypatch.setattr(fetch, "download_url", no_network)
    monkeypatch.setattr(fetch, "install_with_apt", no_apt)


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def hash_calls(monkeypatch) -> list[int]:
    calls = []
    real = dataset.sha256_hex

    def counting(raw: bytes) -> str:
        calls.append(len(raw))
        return real(raw)

    monkeypatch.setattr(dataset, "sha256_hex", counting)
    return calls


# --------------------------------------------------------------------------- valid data


@pytest.mark.parametrize("gz", [True, False])
def test_loads_valid_synthetic_dataset(tmp_path, gz):
    ds = dataset.load_fashion_mnist(make_dataset(tmp_path / "d", gz=gz))
    assert ds.train_images.shape == (N_TRAIN, 28, 28) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (N_TEST, 28, 28)
    assert ds.train_labels.dtype == torch.int64 and ds.train_labels.shape == (N_TRAIN,)
    assert dataset.class_counts(ds.train_labels) == [5] * 10
    assert [f.sha256_check for f in ds.files] == ["hashed now"] * 4


def test_read_idx_returns_file_content(tmp_path):
    payload = bytes(range(24))
    path = write_file(tmp_path / "x.gz", idx_bytes(dataset.IMAGES_MAGIC, (2, 3, 4), payload))
    tensor = dataset.read_idx(path, magic=dataset.IMAGES_MAGIC)
    assert tensor.shape == (2, 3, 4)
    assert tensor.flatten().tolist() == list(payload)


def test_classes_are_the_ten_fashion_mnist_names():
    assert dataset.CLASSES[0] == "T-shirt/top" and dataset.CLASSES[9] == "Ankle boot"
    assert len(dataset.CLASSES) == 10


# --------------------------------------------------------------------------- broken files


def replace(directory: Path, name: str, raw: bytes) -> None:
    write_file(directory / f"{name}.gz", raw)


def test_truncated_labels(dataset_dir):
    replace(dataset_dir, dataset.TRAIN_LABELS, CONTENTS[dataset.TRAIN_LABELS][:-10])
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: truncated: header says "
                                           r"50 items of 1 bytes, file has 40"):
        dataset.load_fashion_mnist(dataset_dir)


def test_too_long_images(dataset_dir):
    replace(dataset_dir, dataset.TEST_IMAGES, CONTENTS[dataset.TEST_IMAGES] + b"\x00" * 5)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz: too long"):
        dataset.load_fashion_mnist(dataset_dir)


def test_wrong_magic(dataset_dir):
    replace(dataset_dir, dataset.TRAIN_LABELS, CONTENTS[dataset.TRAIN_IMAGES])
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: expected magic 2049 "
                                           r"\(labels\), got 2051 \(images\)"):
        dataset.load_fashion_mnist(dataset_dir)


def test_image_and_label_counts_differ(dataset_dir):
    labels = np.zeros(N_TRAIN - 1, dtype=np.uint8).tobytes()
    replace(dataset_dir, dataset.TRAIN_LABELS, idx_bytes(dataset.LABELS_MAGIC, (N_TRAIN - 1,), labels))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz has 50 images but "
                                           r"\S+/train-labels-idx1-ubyte\.gz has 49 labels"):
        dataset.load_fashion_mnist(dataset_dir, verify=False)


def test_label_outside_range(dataset_dir):
    labels = bytearray(CONTENTS[dataset.TEST_LABELS])
    labels[8 + 7] = 12  # header is 8 bytes; label of item 7
    replace(dataset_dir, dataset.TEST_LABELS, bytes(labels))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz: label 12 outside 0\.\.9 "
                                           r"\(at index 7\)"):
        dataset.load_fashion_mnist(dataset_dir, verify=False)


def test_images_not_28_by_28(dataset_dir):
    raw = idx_bytes(dataset.IMAGES_MAGIC, (N_TEST, 14, 56), bytes(N_TEST * 784))
    replace(dataset_dir, dataset.TEST_IMAGES, raw)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz: expected images of shape "
                                           r"\(N, 28, 28\), got \(20, 14, 56\)"):
        dataset.load_fashion_mnist(dataset_dir, verify=False)


def test_corrupt_gzip(dataset_dir):
    (dataset_dir / f"{dataset.TEST_IMAGES}.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz: corrupt gzip"):
        dataset.load_fashion_mnist(dataset_dir)


def test_hash_mismatch(dataset_dir):
    raw = bytearray(CONTENTS[dataset.TRAIN_IMAGES])
    raw[-1] ^= 0xFF  # same size and structure, different content
    replace(dataset_dir, dataset.TRAIN_IMAGES, bytes(raw))
    want = SYNTHETIC_EXPECTED[dataset.TRAIN_IMAGES][0]
    with pytest.raises(DatasetError, match=rf"train-images-idx3-ubyte\.gz: SHA-256 mismatch: "
                                           rf"expected {want}, got [0-9a-f]{{64}}; not the real"):
        dataset.load_fashion_mnist(dataset_dir)
    dataset.load_fashion_mnist(dataset_dir, verify=False)  # structure alone is fine


def test_size_mismatch_against_real_table(dataset_dir):
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: 39216 bytes "
                                           r"decompressed, expected 47040016"):
        dataset.load_fashion_mnist(dataset_dir, expected=REAL_EXPECTED)


# --------------------------------------------------------------------------- search order


def test_search_order(tmp_path, monkeypatch):
    explicit = make_dataset(tmp_path / "explicit")
    env = make_dataset(tmp_path / "env")
    cache = make_dataset(tmp_path / "cache" / "fashion-mnist")
    system = make_dataset(tmp_path / "system")
    monkeypatch.setenv("BNLAB_DATA", str(env))

    assert dataset.locate_fashion_mnist(explicit).path == explicit
    assert dataset.locate_fashion_mnist().path == env
    monkeypatch.delenv("BNLAB_DATA")
    assert dataset.locate_fashion_mnist().path == cache
    shutil.rmtree(cache)
    found = dataset.locate_fashion_mnist()
    assert found.path == system and "dataset-fashion-mnist" in found.why


@pytest.mark.parametrize("state", ["missing", "empty", "incomplete"])
def test_env_dir_that_fails_is_an_error_naming_it(tmp_path, monkeypatch, state):
    env = tmp_path / "env"
    if state != "missing":
        env.mkdir()
    if state == "incomplete":
        write_file(env / f"{dataset.TRAIN_IMAGES}.gz", CONTENTS[dataset.TRAIN_IMAGES])
    monkeypatch.setenv("BNLAB_DATA", str(env))
    make_dataset(tmp_path / "system")  # would be found, but an explicit location that fails wins
    with pytest.raises(DatasetError, match=rf"\$BNLAB_DATA={env}: .*(does not exist|lacks)"):
        dataset.load_fashion_mnist()


def test_explicit_root_without_files_is_an_error(tmp_path, dataset_dir, monkeypatch):
    monkeypatch.setenv("BNLAB_DATA", str(dataset_dir))  # would be found, must not be used
    partial = tmp_path / "partial"
    partial.mkdir()
    write_file(partial / f"{dataset.TRAIN_IMAGES}.gz", CONTENTS[dataset.TRAIN_IMAGES])
    with pytest.raises(DatasetError, match=rf"data directory {partial} lacks "
                                           r"t10k-images-idx3-ubyte\[\.gz\]"):
        dataset.load_fashion_mnist(partial)
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'absent'} does not exist"):
        dataset.load_fashion_mnist(tmp_path / "absent")


def test_nothing_found_lists_places_and_ways():
    with pytest.raises(DatasetError, match="looked in") as err:
        dataset.load_fashion_mnist()
    assert "BNLAB_DATA" in str(err.value) and "apt-get install dataset-fashion-mnist" in str(err.value)


# --------------------------------------------------------------------------- verification cache


def test_second_verification_uses_cache(dataset_dir, hash_calls):
    dataset.load_fashion_mnist(dataset_dir)
    assert len(hash_calls) == 4
    second = dataset.load_fashion_mnist(dataset_dir)
    assert len(hash_calls) == 4
    assert [f.sha256_check for f in second.files] == ["remembered"] * 4


def test_changed_file_is_hashed_again(dataset_dir, hash_calls):
    dataset.load_fashion_mnist(dataset_dir)
    touched = dataset_dir / f"{dataset.TEST_LABELS}.gz"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    dataset.load_fashion_mnist(dataset_dir)
    assert hash_calls[4:] == [SYNTHETIC_EXPECTED[dataset.TEST_LABELS][1]]


def altered_labels() -> bytes:
    raw = bytearray(CONTENTS[dataset.TRAIN_LABELS])
    raw[8], raw[9] = raw[9], raw[8]  # two labels swapped: same size, same structure
    assert raw != CONTENTS[dataset.TRAIN_LABELS]
    return bytes(raw)


def test_change_in_place_with_mtime_restored_is_hashed_again(dataset_dir, hash_calls):
    path = dataset_dir / dataset.TRAIN_LABELS  # raw (not gzipped): the size stays exact
    (dataset_dir / f"{dataset.TRAIN_LABELS}.gz").unlink()
    write_file(path, CONTENTS[dataset.TRAIN_LABELS])
    dataset.load_fashion_mnist(dataset_dir)
    stat = path.stat()
    path.write_bytes(altered_labels())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(DatasetError, match=rf"{dataset_dir}/train-labels-idx1-ubyte: SHA-256 mismatch"):
        dataset.load_fashion_mnist(dataset_dir)


def test_file_replaced_by_a_copy_with_its_stamp_is_hashed_again(dataset_dir, tmp_path):
    """cp -p / rsync -t / tar: a new inode with the old size and mtime."""
    path = dataset_dir / dataset.TRAIN_LABELS
    (dataset_dir / f"{dataset.TRAIN_LABELS}.gz").unlink()
    write_file(path, CONTENTS[dataset.TRAIN_LABELS])
    dataset.load_fashion_mnist(dataset_dir)
    other = write_file(tmp_path / "altered", altered_labels())
    shutil.copystat(path, other)
    os.replace(other, path)
    with pytest.raises(DatasetError, match="SHA-256 mismatch"):
        dataset.load_fashion_mnist(dataset_dir)


def test_cache_key_holds_inode_device_and_ctime(dataset_dir):
    dataset.load_fashion_mnist(dataset_dir)
    entries = dataset.VerificationCache(dataset.verification_cache_path()).entries
    path = dataset_dir / f"{dataset.TRAIN_LABELS}.gz"
    entry, stat = entries[str(path.resolve())], path.stat()
    assert (entry["inode"], entry["device"], entry["ctime_ns"]) == (stat.st_ino, stat.st_dev,
                                                                   stat.st_ctime_ns)


def test_remembered_hash_is_still_compared(dataset_dir):
    dataset.load_fashion_mnist(dataset_dir)
    with pytest.raises(DatasetError, match="SHA-256 mismatch"):
        dataset.load_fashion_mnist(dataset_dir, expected={
            **SYNTHETIC_EXPECTED, dataset.TRAIN_LABELS: ("0" * 64, len(CONTENTS[dataset.TRAIN_LABELS]))})


def test_unreadable_cache_file_is_ignored(dataset_dir, tmp_path):
    (tmp_path / "cache").mkdir()
    dataset.verification_cache_path().write_text("{not json")
    assert dataset.load_fashion_mnist(dataset_dir).files[0].sha256_check == "hashed now"


# --------------------------------------------------------------------------- fetch


def fake_mirror(url, out):
    name = url.rsplit("/", 1)[-1].removesuffix(".gz")
    out.write(gzip.compress(CONTENTS[name]))


def test_fetch_returns_found_data_without_downloading(dataset_dir):
    assert fetch.fetch_fashion_mnist(dataset_dir, download=no_network, install=no_apt) == dataset_dir


def test_fetch_downloads_into_default_dir(tmp_path, hash_calls):
    root = fetch.fetch_fashion_mnist(download=fake_mirror, install=no_apt)
    assert root == tmp_path / "cache" / "fashion-mnist"
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{n}.gz" for n in dataset.FILE_NAMES)
    assert len(hash_calls) == 4  # checked before writing, then remembered
    assert dataset.load_fashion_mnist(root).train_images.shape == (N_TRAIN, 28, 28)
    assert len(hash_calls) == 4


def test_fetch_downloads_only_missing_files(tmp_path):
    root = tmp_path / "partial"
    root.mkdir()
    write_file(root / dataset.TRAIN_IMAGES, CONTENTS[dataset.TRAIN_IMAGES])
    urls = []

    def recording(url, out):
        urls.append(url)
        fake_mirror(url, out)

    assert fetch.fetch_fashion_mnist(root, download=recording, install=no_apt) == root
    assert len(urls) == 3 and not any(dataset.TRAIN_IMAGES in u for u in urls)


def test_fetch_failing_midway_leaves_no_partial_file(tmp_path):
    def dies_halfway(url, out):
        out.write(gzip.compress(CONTENTS[dataset.TRAIN_IMAGES])[:1000])
        raise ConnectionResetError("connection reset by peer")

    root = tmp_path / "dest"
    with pytest.raises(DatasetError, match="could not be downloaded"):
        fetch.fetch_fashion_mnist(root, download=dies_halfway, install=lambda: False)
    assert not root.exists() or list(root.iterdir()) == []


def test_fetch_rejects_wrong_content_from_every_mirror(tmp_path):
    def wrong(url, out):
        out.write(gzip.compress(CONTENTS[dataset.TEST_IMAGES]))

    root = tmp_path / "dest"
    with pytest.raises(DatasetError, match=r"no mirror served a valid train-images-idx3-ubyte\.gz"):
        fetch.fetch_fashion_mnist(root, download=wrong, install=no_apt)
    assert not root.exists() or list(root.iterdir()) == []


def test_fetch_uses_second_mirror_when_first_fails(tmp_path):
    def first_down(url, out):
        if url.startswith(dataset.MIRRORS[0]):
            raise TimeoutError("timed out")
        fake_mirror(url, out)

    assert fetch.fetch_fashion_mnist(tmp_path / "d", download=first_down, install=no_apt) \
        == tmp_path / "d"


def offline(url, out):
    raise OSError("Name or service not known")


def test_fetch_offline_without_apt_names_both_ways():
    with pytest.raises(DatasetError) as err:
        fetch.fetch_fashion_mnist(download=offline, install=lambda: False)
    message = str(err.value)
    assert "bnlab data fetch" in message and dataset.MIRRORS[0] in message and dataset.MIRRORS[1] in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "BNLAB_DATA" in message
    assert "\n" not in message


def test_fetch_offline_installs_system_package(tmp_path):
    system = tmp_path / "system"

    def fake_apt() -> bool:
        make_dataset(system)
        return True

    assert fetch.fetch_fashion_mnist(download=offline, install=fake_apt) == system


def test_fetch_offline_into_data_dir_fills_it_from_the_system_package(tmp_path):
    system, wanted = tmp_path / "system", tmp_path / "mine"

    def fake_apt() -> bool:
        make_dataset(system)
        return True

    assert fetch.fetch_fashion_mnist(wanted, download=offline, install=fake_apt) == wanted
    assert dataset.load_fashion_mnist(wanted).root == wanted
    assert sorted(p.name for p in wanted.iterdir()) == sorted(p.name for p in system.iterdir())


def test_fetch_with_env_dir_downloads_there(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    assert fetch.fetch_fashion_mnist(download=fake_mirror, install=no_apt) == tmp_path / "env"
    assert dataset.load_fashion_mnist().root == tmp_path / "env"


def test_install_with_apt_declines_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(fetch.subprocess, "run", no_apt)
    assert REAL_INSTALL_WITH_APT() is False


# --------------------------------------------------------------------------- Loader


def make_loader(n: int = 50, batch_size: int = 8, **kwargs) -> Loader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 28, 28)
    labels = torch.arange(n) % 10
    return Loader(images, labels, batch_size, **kwargs)


def epoch_ids(loader: Loader) -> list[int]:
    # each image is filled with its own index, so pixel (0, 0) identifies the sample
    return [round(v * 255) for x, _ in loader for v in x[:, 0, 0, 0].tolist()]


def test_loader_shapes_dtypes_range():
    loader = make_loader(50, 8)
    batches = list(loader)
    assert len(loader) == len(batches) == 7
    x, y = batches[0]
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    assert batches[-1][0].shape == (2, 1, 28, 28)


def test_loader_scales_pixels_to_unit_range():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1).expand(2, 28, 28)
    (x, _), = Loader(images, torch.tensor([0, 1]), 2, shuffle=False)
    assert x[0].max() == 0.0 and x[1].min() == 1.0


def test_loader_labels_follow_images():
    for x, y in make_loader(50, 8):
        assert torch.equal(y, (x[:, 0, 0, 0] * 255).round().long() % 10)


def test_loader_every_sample_once_per_epoch():
    loader = make_loader(50, 8)
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert sorted(epoch_ids(loader)) == list(range(50))


def test_loader_order_is_a_function_of_seed_and_epoch():
    first, second = make_loader(seed=3), make_loader(seed=3)
    first.set_epoch(5)
    second.set_epoch(5)
    assert epoch_ids(first) == epoch_ids(second)
    assert epoch_ids(first) == epoch_ids(first)  # iterating does not advance the epoch
    second.set_epoch(6)
    assert epoch_ids(first) != epoch_ids(second)
    assert epoch_ids(make_loader(seed=4)) != epoch_ids(make_loader(seed=3))


def test_loader_without_shuffle_keeps_order():
    assert epoch_ids(make_loader(shuffle=False)) == list(range(50))


def test_loader_drop_last():
    loader = make_loader(50, 8, drop_last=True)
    assert len(loader) == 6
    assert [len(y) for _, y in loader] == [8] * 6


def test_stratified_subset():
    labels = torch.arange(100) % 10
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1).expand(100, 28, 28)
    sub_images, sub_labels = stratified_subset(images, labels, 23)
    assert dataset.class_counts(sub_labels) == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert sub_images[:, 0, 0].tolist() == sorted(sub_images[:, 0, 0].tolist())
    assert torch.equal(stratified_subset(images, labels, 23)[1], sub_labels)
    with pytest.raises(DatasetError, match="subset size must be in 1..100, got 101"):
        stratified_subset(images, labels, 101)


# --------------------------------------------------------------------------- real data


def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(dataset, "search_locations", lambda root=None: REAL_LOCATIONS)
    try:
        location = dataset.locate_fashion_mnist()
    except DatasetError:
        pytest.skip("real Fashion-MNIST not installed (run `bnlab data fetch` or "
                    "`apt-get install dataset-fashion-mnist`)")
    ds = dataset.load_fashion_mnist(location.path, expected=REAL_EXPECTED)
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert [f.sha256_check for f in ds.files] == ["hashed now"] * 4  # fresh cache: really hashed
    assert dataset.class_counts(ds.train_labels) == [6000] * 10
    assert dataset.class_counts(ds.test_labels) == [1000] * 10


# --------------------------------------------------------------------------- CLI


def test_cli_data_info(dataset_dir, capsys):
    assert main(["data", "info", "--data-dir", str(dataset_dir)]) == 0
    out = capsys.readouterr().out
    assert f"found at {dataset_dir}" in out and "4 hashed now" in out
    assert "(50, 28, 28)" in out and "(20, 28, 28)" in out
    assert "Ankle boot" in out and "train-labels-idx1-ubyte.gz" in out


def test_cli_data_fetch_found(dataset_dir, monkeypatch, capsys):
    monkeypatch.setenv("BNLAB_DATA", str(dataset_dir))
    assert main(["data", "fetch"]) == 0
    assert f"ready at {dataset_dir}" in capsys.readouterr().out


def test_cli_data_fetch_downloads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "download_url", fake_mirror)
    assert main(["data", "fetch", "--data-dir", str(tmp_path / "new")]) == 0
    assert f"ready at {tmp_path / 'new'}" in capsys.readouterr().out


def test_cli_data_fetch_offline_into_data_dir_leaves_it_usable(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "download_url", offline)
    monkeypatch.setattr(fetch, "install_with_apt", lambda: bool(make_dataset(tmp_path / "system")))
    assert main(["data", "fetch", "--data-dir", str(tmp_path / "x")]) == 0
    assert f"ready at {tmp_path / 'x'}" in capsys.readouterr().out
    assert main(["data", "info", "--data-dir", str(tmp_path / "x")]) == 0


def test_data_errors_name_the_folder(dataset_dir):
    replace(dataset_dir, dataset.TRAIN_LABELS, CONTENTS[dataset.TRAIN_LABELS][:-10])
    with pytest.raises(DatasetError, match=rf"^{dataset_dir}/train-labels-idx1-ubyte\.gz: truncated"):
        dataset.load_fashion_mnist(dataset_dir)


def test_cli_train_says_where_its_data_came_from(dataset_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BNLAB_DATA", str(dataset_dir))
    assert main(["train", "--model", "lenet", "--epochs", "1", "--batch-size", "25", "--device",
                 "cpu", "--val-size", "0", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert f"data: Fashion-MNIST from {dataset_dir} (via $BNLAB_DATA)" in capsys.readouterr().out


def test_cli_error_exits_2_with_message(tmp_path, capsys):
    assert main(["data", "info", "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error: ") and "nowhere does not exist" in err
    assert err.count("\n") == 1
