"""Small CIFAR, STL-10 and (Fashion-)MNIST folders in their real on-disk formats.

torchvision checks each file's MD5 against the published archives; the tests register the
MD5s of the small files they write (`monkeypatch`), so the real loading code runs unchanged.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100, STL10
from torchvision.datasets.utils import calculate_md5


def write_cifar(root: Path, monkeypatch, hundred: bool = False, per_file: int = 20) -> None:
    dataset = CIFAR100 if hundred else CIFAR10
    label_key, classes = ("fine_labels", 100) if hundred else ("labels", 10)
    folder = root / dataset.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name: str, content: dict) -> list[str]:
        with open(folder / name, "wb") as file:
            pickle.dump(content, file)
        return [name, calculate_md5(folder / name)]

    def batch(name: str) -> list[str]:
        return dump(
            name,
            {
                "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                label_key: rng.integers(0, classes, per_file).tolist(),
            },
        )

    train = [batch(name) for name, _ in dataset.train_list]
    test = [batch(name) for name, _ in dataset.test_list]
    meta = dump(dataset.meta["filename"], {dataset.meta["key"]: [str(i) for i in range(classes)]})
    monkeypatch.setattr(dataset, "train_list", train)
    monkeypatch.setattr(dataset, "test_list", test)
    monkeypatch.setattr(dataset, "meta", {**dataset.meta, "md5": meta[1]})


def write_stl10(root: Path, monkeypatch, count: int = 12) -> None:
    folder = root / STL10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name: str, array: np.ndarray) -> list[str]:
        array.tofile(folder / name)
        return [name, calculate_md5(folder / name)]

    def images() -> np.ndarray:
        return rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)

    def labels() -> np.ndarray:
        return rng.integers(1, 11, count).astype(np.uint8)  # STL-10 labels are 1..10 on disk

    train = [
        write("train_X.bin", images()),
        write("train_y.bin", labels()),
        write("unlabeled_X.bin", images()),
    ]
    test = [write("test_X.bin", images()), write("test_y.bin", labels())]
    (folder / STL10.class_names_file).write_text("\n".join(str(i) for i in range(10)))
    monkeypatch.setattr(STL10, "train_list", train)
    monkeypatch.setattr(STL10, "test_list", test)


def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's idx format: 0, 0, 0x08 (unsigned bytes), the number of dimensions, each dimension
    as a big-endian int32, then the bytes; gzipped when `path` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as file:
        file.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_idx_dataset(
    folder: Path, train: int = 30, test: int = 12, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """The four files of MNIST / Fashion-MNIST with random 28x28 images; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(folder / (f"{stem}.gz" if gz else stem), array)
    return arrays
