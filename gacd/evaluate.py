"""Clean and robust accuracy of a model on a split, at the configured epsilon."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gacd import attacks, parallel, schema
from gacd.checkpoint import CheckpointError, is_project_checkpoint, load_checkpoint
from gacd.cli import add_override_argument, print_scores
from gacd.config import Config, EvalConfig, flatten
from gacd.data import ImageSplit, batches, load_datasets
from gacd.models import build_classifier
from gacd.runtime import resolve_device, seeded

# (model, x, y) -> x_adv
Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def attack_suite(evaluation: EvalConfig, seed: int = 0) -> dict[str, Attack | None]:
    """The final evaluation's attacks by name (`clean` is no attack), at `eval.epsilon`."""
    epsilon, step_size = evaluation.epsilon, evaluation.step_size
    pgd = attacks.Budget(epsilon, step_size, evaluation.pgd_steps)
    suite: dict[str, Attack | None] = {"clean": None}
    if evaluation.fgsm:
        suite["fgsm"] = lambda model, x, y: attacks.fgsm(model, x, y, epsilon)
    suite["pgd"] = lambda model, x, y: attacks.pgd(
        model, x, pgd, attacks.cross_entropy_objective(y)
    )
    if evaluation.cw:
        suite["cw"] = lambda model, x, y: attacks.cw_inf(
            model, x, y, epsilon, step_size, evaluation.cw_steps, evaluation.cw_kappa
        )
    if evaluation.autoattack:
        if attacks.autoattack_available():
            suite["autoattack"] = lambda model, x, y: attacks.autoattack(
                model, x, y, epsilon, seed=seed
            )
        else:
            warnings.warn(
                "eval.autoattack is on but pyautoattack is not installed "
                "(pip install 'gacd-study[autoattack]'); skipping AutoAttack",
                stacklevel=2,
            )
    return suite


def accuracy(
    model: nn.Module,
    split: ImageSplit,
    attack: Attack | None,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
    seed: int = 0,
    keep: list[Tensor] | None = None,
) -> float:
    """Fraction of the split's first `limit` samples classified right after `attack`; the
    attacked inputs of each batch are appended to `keep` when it is given. Among data-parallel
    workers (`gacd.parallel`) each attacks its share of the samples, and all get the total."""
    group = parallel.current()
    if group.parallel:
        part = parallel.rows(min(len(split), limit or len(split)), group)
        split, limit = ImageSplit(split.images[part], split.labels[part]), None
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, device=device)  # right, seen
    try:
        with seeded(seed + group.rank, device):
            for batch in batches(split, batch_size, device, limit=limit):
                x = batch.x if attack is None else attack(model, batch.x, batch.y)
                if keep is not None:
                    keep.append(x.detach())
                with torch.no_grad():
                    counts[0] += (model(x).argmax(1) == batch.y).sum()
                counts[1] += len(batch.y)
    finally:
        model.train(was_training)
    right, seen = parallel.total(counts, group).tolist()
    return right / max(seen, 1)


def validation_metrics(
    model: nn.Module,
    split: ImageSplit,
    evaluation: EvalConfig,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float]:
    """Clean and PGD-`val_steps` accuracy on the validation split (model selection, search),
    and the number of images they were measured on (`val/samples`)."""
    budget = attacks.Budget(evaluation.epsilon, evaluation.step_size, evaluation.val_steps)

    def pgd(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return attacks.pgd(model, x, budget, attacks.cross_entropy_objective(y))

    limit = evaluation.max_samples
    return {
        schema.VAL_CLEAN_ACC: accuracy(model, split, None, batch_size, device, limit, seed),
        schema.VAL_PGD_ACC: accuracy(model, split, pgd, batch_size, device, limit, seed),
        schema.VAL_SAMPLES: float(min(len(split), limit or len(split))),
    }


def robustness_metrics(
    model: nn.Module,
    split: ImageSplit,
    evaluation: EvalConfig,
    batch_size: int,
    device: torch.device,
    prefix: str = "test",
    seed: int = 0,
    keep: dict[str, list[Tensor]] | None = None,
) -> dict[str, float]:
    """Clean, FGSM, PGD-`pgd_steps`, CW-inf and AutoAttack accuracy: `test/<attack>_acc`
    (AutoAttack on the first `eval.autoattack_samples` of the samples the others see). The
    attacked inputs of each attack named in `keep` are appended to its list, batch by batch."""
    keep = keep or {}
    return {
        schema.accuracy(prefix, name): accuracy(
            model,
            split,
            attack,
            batch_size,
            device,
            samples(evaluation, name),
            seed,
            keep.get(name),
        )
        for name, attack in attack_suite(evaluation, seed).items()
    }


def samples(evaluation: EvalConfig, attack: str) -> int | None:
    """How many of a split's first samples `attack` is measured on (None: all)."""
    limits = [evaluation.max_samples]
    if attack == "autoattack":
        limits.append(evaluation.autoattack_samples)
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


# --- command line -----------------------------------------------------------------------------


def evaluate_checkpoint(
    path: str | Path, split: str = "test", overrides: dict[str, Any] | None = None
) -> dict[str, float]:
    """Every attack of `eval` against the student of a project checkpoint, on `split`."""

    state = load_checkpoint(path)
    if not is_project_checkpoint(state):
        raise CheckpointError(f"checkpoint {str(path)!r}: not a checkpoint of this project")
    config = Config.from_dict({**flatten(state["config"]), **(overrides or {})})
    device = resolve_device(config.device)
    data = load_datasets(config.data, config.seed, with_test=split == "test")
    model = build_classifier(config.student, data.spec)
    model.load_state_dict(state["student"])
    model.to(device)
    evaluated = data.test if split == "test" else data.val
    return robustness_metrics(
        model,
        evaluated,
        config.eval,
        config.data.eval_batch_size,
        device,
        prefix=split,
        seed=config.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gacd.evaluate",
        description="Clean, FGSM, PGD, CW-inf and AutoAttack accuracy of checkpoints.",
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoint.pt files of gacd.train")
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the split the attacks run on (default: %(default)s)",
    )
    add_override_argument(parser, "e.g. --set eval.autoattack=false --set device=cpu")
    args = parser.parse_args(argv)
    return print_scores(
        args.checkpoints,
        lambda path, overrides: evaluate_checkpoint(path, args.split, overrides),
        args.overrides,
    )


if __name__ == "__main__":
    sys.exit(main())
