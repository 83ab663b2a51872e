import pytest
import torch

from gacd.config import DataConfig
from gacd.data import DatasetNotFoundError, IndexedDataset, augment, batches, load_datasets
from tests.torchvision_files import write_cifar, write_stl10


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
