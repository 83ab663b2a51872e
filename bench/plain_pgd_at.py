"""A plain PyTorch PGD-AT loop beside the platform's `pgd_at`, at the same budget:
`python -m bench.plain_pgd_at [--train 12000] [--epochs 8] [--test 2000]`.

The reference a user would write in an afternoon (Madry et al.'s PGD-AT with a one-cycle SGD
schedule, as Wong et al.'s fast adversarial training): the same data, the same small CNN, PGD-5
at epsilon 0.1 with uniform random start, the model in train mode throughout, the learning
rate stepped every batch. Nothing of the platform's training code is used (only its data
loading and model constructor, so the data and architecture are the same); the platform's row
comes from `gacd.train.fit` with the benchmark's config. Both are evaluated by the same
PGD-20 (epsilon 0.1, step epsilon/4, uniform start) on the first `--test` test images, written
out here, so each evaluates the other's way too.

Prints one JSON line per run (clean and PGD-20 accuracy, wall seconds) and a ratio of the
platform's time to the plain loop's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gacd.config import Config, DataConfig, set_dotted
from gacd.data import load_datasets, to_float
from gacd.models import build_model
from gacd.runtime import seed_everything


def pgd(model: nn.Module, x: Tensor, y: Tensor, epsilon: float, step: float, steps: int) -> Tensor:
    delta = torch.empty_like(x).uniform_(-epsilon, epsilon)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta + step * grad.sign()).clamp(-epsilon, epsilon)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, epsilon: float) -> dict:
    model.eval()
    clean = robust = 0
    for start in range(0, len(labels), 500):
        x, y = to_float(images[start : start + 500]), labels[start : start + 500]
        with torch.no_grad():
            clean += int((model(x).argmax(1) == y).sum())
        x_adv = pgd(model, x, y, epsilon, epsilon / 4, 20)
        with torch.no_grad():
            robust += int((model(x_adv).argmax(1) == y).sum())
    return {"clean_acc": clean / len(labels), "pgd20_acc": robust / len(labels)}


def plain_pgd_at(config: Config, epsilon: float, batch_size: int, lr: float) -> nn.Module:
    seed_everything(config.seed)
    data = load_datasets(config.data, config.seed, with_test=False)
    model = build_model(
        "small_cnn",
        num_classes=data.spec.num_classes,
        in_channels=1,
        mean=data.spec.mean,
        std=data.spec.std,
        width=config.student.width,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(data.train) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=config.optim.epochs * steps_per_epoch
    )
    for _ in range(config.optim.epochs):
        model.train()
        order = torch.randperm(len(data.train))
        for index in order[: steps_per_epoch * batch_size].split(batch_size):
            x, y = to_float(data.train.images[index]), data.train.labels[index]
            x_adv = pgd(model, x, y, epsilon, 2.5 * epsilon / 5, 5)
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=12_000, help="training images")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--test", type=int, default=2_000, help="test images evaluated")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override of the platform's run (e.g. optim.schedule=step)",
    )
    parser.add_argument("--skip-plain", action="store_true", help="only the platform's run")
    args = parser.parse_args(argv)
    epsilon = 0.1
    from gacd.cli import parse_overrides
    from gacd.train import fit

    values = {
        "method": "pgd_at",
        "data": {
            "name": "fashion_mnist",
            "train_subset": args.train,
            "batch_size": args.batch_size,
        },
        "student": {"arch": "small_cnn", "width": 32},
        "optim": {"epochs": args.epochs, "lr": args.lr},
        "attack": {"epsilon": epsilon, "steps": 5},
        "eval": {"epsilon": epsilon, "val_steps": 5, "max_samples": 1000},
    }
    for key, value in parse_overrides(args.set).items():
        set_dotted(values, key, value)
    config = Config.from_dict(values)
    test = load_datasets(DataConfig(name="fashion_mnist"), 0, with_test=True).test
    assert test is not None
    images, labels = test.images[: args.test], test.labels[: args.test]
    rows = []
    if not args.skip_plain:
        started = time.perf_counter()
        model = plain_pgd_at(config, epsilon, args.batch_size, args.lr)
        seconds = time.perf_counter() - started
        rows.append(
            {"run": "plain", "seconds": seconds, **evaluate(model, images, labels, epsilon)}
        )
        print(json.dumps(rows[-1]), flush=True)
    seed_everything(config.seed)
    started = time.perf_counter()
    result = fit(config)
    seconds = time.perf_counter() - started
    student = result.method.student
    rows.append(
        {"run": "platform", "seconds": seconds, **evaluate(student, images, labels, epsilon)}
    )
    rows[-1]["overrides"] = args.set
    print(json.dumps(rows[-1]), flush=True)
    if len(rows) == 2:
        print(json.dumps({"platform_over_plain_seconds": rows[1]["seconds"] / rows[0]["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
