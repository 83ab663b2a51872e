"""Transfer across tasks: a frozen student's features and a linear probe for another data set.

The student is frozen three ways (a copy in `eval()`, `requires_grad_(False)`, features
extracted under `no_grad`); only the linear probe is fitted, seeded, on the features of the
target's training split (extracted once, without augmentation). The pipeline
`probe(f_S(x))` is then evaluated end to end on the target's test split with every attack of
`eval` at `eval.epsilon`: `transfer/clean_acc`, `transfer/pgd_acc`, `transfer/fgsm_acc`, ...

    python -m gacd.transfer runs/cifar100/checkpoint.pt \\
        --set transfer.data.name=stl10 --set transfer.data.image_size=32
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gacd import schema
from gacd.cli import add_override_argument, print_scores
from gacd.config import Config, ConfigError, TransferConfig, flatten
from gacd.data import Datasets, DatasetSpec, ImageSplit, batches, load_datasets
from gacd.evaluate import robustness_metrics
from gacd.models import ImageClassifier, build_classifier
from gacd.runtime import resolve_device, seeded


class LinearProbe(nn.Module):
    """`W (f - mean) / std + b`: features `[B, d]` -> logits `[B, k]`.

    `mean`, `std` `[d]` are fixed from the training features, so one learning rate suits every
    student; the probe is still a linear function of the features.
    """

    def __init__(self, features: Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("std", features.std(0).clamp_min(1e-6))
        self.linear = nn.Linear(features.shape[1], num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features - self.mean) / self.std)


class TransferredClassifier(nn.Module):
    """`probe(f_S(x))`: pixels `[B, C, H, W]` in [0, 1] -> logits `[B, k]`.

    The student stays in eval mode whatever mode the pipeline is put in, so attacks on the
    pipeline never touch its batch-norm statistics.
    """

    def __init__(self, student: ImageClassifier, probe: LinearProbe) -> None:
        super().__init__()
        self.student = student
        self.probe = probe

    def forward(self, x: Tensor) -> Tensor:
        return self.probe(self.student.forward_features(x))

    def train(self, mode: bool = True) -> TransferredClassifier:
        super().train(mode)
        self.student.eval()
        return self


def freeze(student: ImageClassifier) -> ImageClassifier:
    """A frozen copy: `eval()`, `requires_grad_(False)`; the trained student is left as it was."""
    return copy.deepcopy(student).eval().requires_grad_(False)


@torch.no_grad()
def extract_features(
    student: ImageClassifier, split: ImageSplit, batch_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Penultimate features `[N, d]` (eval mode, no gradient) and labels `[N]` of a split."""
    was_training = student.training
    student.eval()
    try:
        parts = [
            (student.forward_features(batch.x), batch.y)
            for batch in batches(split, batch_size, device)
        ]
    finally:
        student.train(was_training)
    return torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])


def fit_probe(
    student: ImageClassifier,
    split: ImageSplit,
    num_classes: int,
    transfer: TransferConfig,
    device: torch.device,
    seed: int = 0,
) -> LinearProbe:
    """SGD on `CE(probe(f_S(x)), y)` over the split, cosine schedule; gradients reach only the
    probe (the features are computed once, under `no_grad`)."""
    features, labels = extract_features(student, split, transfer.batch_size, device)
    with seeded(seed, device):
        probe = LinearProbe(features, num_classes).to(device)
        optimizer = torch.optim.SGD(
            probe.parameters(),
            lr=transfer.lr,
            momentum=transfer.momentum,
            weight_decay=transfer.weight_decay,
        )
        order = torch.Generator().manual_seed(seed)
        for epoch in range(transfer.epochs):
            for group in optimizer.param_groups:
                group["lr"] = transfer.lr * 0.5 * (1 + math.cos(math.pi * epoch / transfer.epochs))
            for rows in torch.randperm(len(labels), generator=order).split(transfer.batch_size):
                rows = rows.to(device)
                loss = F.cross_entropy(probe(features[rows]), labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return probe.eval()


def transfer_metrics(
    student: ImageClassifier, target: Datasets, config: Config, device: torch.device
) -> dict[str, float]:
    """Fit a probe on a frozen copy of `student` for `target` (loaded from `transfer.data`),
    and return the pipeline's `transfer/<attack>_acc` on the target's test split."""
    frozen = freeze(student)
    probe = fit_probe(
        frozen, target.train, target.spec.num_classes, config.transfer, device, config.seed
    )
    pipeline = TransferredClassifier(frozen, probe).to(device)
    evaluation = config.eval
    if config.transfer.autoattack is not None:
        evaluation = dataclasses.replace(evaluation, autoattack=config.transfer.autoattack)
    if config.transfer.max_samples is not None:
        evaluation = dataclasses.replace(evaluation, max_samples=config.transfer.max_samples)
    return robustness_metrics(
        pipeline,
        target.test,
        evaluation,
        config.transfer.data.eval_batch_size,
        device,
        prefix=schema.TRANSFER,
        seed=config.seed,
    )


def load_target(config: Config, source: DatasetSpec) -> Datasets | None:
    """The transfer target's splits (test included), or None without `transfer.data`; its
    images must have the channels of the `source` data set the student was trained on."""
    if config.transfer.data is None:
        return None
    target = load_datasets(config.transfer.data, config.seed, with_test=True)
    if target.spec.in_channels != source.in_channels:
        raise ConfigError(
            "transfer.data.name",
            f"a data set of {source.in_channels}-channel images, as the student's "
            f"'{config.data.name}' (this one has {target.spec.in_channels})",
            config.transfer.data.name,
        )
    return target


# --- command line -----------------------------------------------------------------------------


def checkpoint_config(state: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """The checkpoint's config with `overrides`; a `--set transfer.data.name=...` replaces the
    checkpoint's `transfer.data: null` instead of colliding with it."""
    values = flatten(state["config"])
    for key in overrides:
        parts = key.split(".")
        for end in range(1, len(parts)):
            prefix = ".".join(parts[:end])
            if prefix in values and values[prefix] is None:
                del values[prefix]
    config = Config.from_dict({**values, **overrides})
    if config.transfer.data is None:
        raise ConfigError(
            "transfer.data", "a target data set, e.g. --set transfer.data.name=digits", None
        )
    return config


def transfer_checkpoint(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> dict[str, float]:
    """`transfer/<attack>_acc` of the student of a project checkpoint."""
    from gacd.checkpoint import CheckpointError, is_project_checkpoint, load_checkpoint

    state = load_checkpoint(path)
    if not is_project_checkpoint(state):
        raise CheckpointError(f"checkpoint {str(path)!r}: not a checkpoint of this project")
    config = checkpoint_config(state, overrides or {})
    device = resolve_device(config.device)
    source = load_datasets(config.data, config.seed)
    student = build_classifier(config.student, source.spec)
    student.load_state_dict(state["student"])
    target = load_target(config, source.spec)
    return transfer_metrics(student.to(device), target, config, device)


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m gacd.transfer",
        description="Clean and robust accuracy of frozen students with a linear probe fitted "
        "for another data set (transfer.data).",
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoint.pt files of gacd.train")
    add_override_argument(
        parser, "e.g. --set transfer.data.name=stl10 --set transfer.data.image_size=32"
    )
    args = parser.parse_args(argv)
    return print_scores(args.checkpoints, transfer_checkpoint, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
