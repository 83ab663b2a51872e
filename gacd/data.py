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
- `cifar10`, `cifar100`, `stl10`: torchvision's loaders on `data.data_dir`, with `download`.

`data.classes` keeps a subset of a data set's classes, relabelled 0..k-1 in the order given
(digits 0-4 for a student, 5-9 as the target of a transfer).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gacd.config import DataConfig
from gacd.registry import Registry

DATASETS = Registry("data set")

# Classes of each registered data set, known before loading it (config validation needs them).
CLASS_COUNTS = {"digits": 10, "cifar10": 10, "cifar100": 100, "stl10": 10}


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


@DATASETS.register("digits")
def load_digits(
    config: DataConfig, with_test: bool
) -> tuple[DatasetSpec, ImageSplit, ImageSplit | None]:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    # 0..16 grey levels -> 0..255, so every data set is stored the same way.
    images = torch.from_numpy(np.rint(digits.images * 255.0 / 16.0).astype(np.uint8))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=0
    )
    train = ImageSplit(images[train_idx].unsqueeze(1), labels[train_idx])
    test = ImageSplit(images[test_idx].unsqueeze(1), labels[test_idx]) if with_test else None
    mean, std = channel_stats(train.images)
    spec = DatasetSpec(
        num_classes=CLASS_COUNTS["digits"],
        in_channels=1,
        image_size=8,
        mean=mean,
        std=std,
        crop_padding=1,
        flip=False,
    )
    return spec, train, test


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
