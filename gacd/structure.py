"""Structural knowledge: how much of the teacher's representation a student shares.

- Linear CKA (Kornblith et al. 2019) between the teacher's and the student's penultimate
  features of the same inputs, clean and PGD-adversarial (made against the student).
- The mean absolute difference between the teacher's and the student's class-correlation
  matrices of logits (CRD's analysis, Tian et al. 2020).

Shapes: `N` samples, `d1`, `d2` feature sizes, `C` classes. Computed in float64 on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from gacd import attacks, schema
from gacd.config import EvalConfig
from gacd.data import ImageSplit, batches
from gacd.models import ImageClassifier
from gacd.runtime import seeded
from gacd.teacher import FrozenTeacher


def center(values: Tensor) -> Tensor:
    """Subtract the mean over samples: `[N, d] -> [N, d]`, float64."""
    values = values.double()
    return values - values.mean(0, keepdim=True)


def linear_cka(first: Tensor, second: Tensor) -> Tensor:
    """Linear CKA, `||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)` with X, Y centred over samples.

    first `[N, d1]`, second `[N, d2]`, rows the same samples; a scalar in [0, 1], invariant to
    orthogonal transforms and isotropic scaling of either side (0 if either is constant).
    """
    x, y = center(first), center(second)
    similarity = (y.T @ x).square().sum()
    normaliser = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return similarity / normaliser.clamp_min(torch.finfo(torch.float64).tiny)


def class_correlation(logits: Tensor) -> Tensor:
    """Pearson correlation between classes' logits over samples: `[N, C] -> [C, C]`."""
    centred = center(logits)
    unit = centred / centred.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return unit.T @ unit


def class_correlation_difference(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """`mean_{j,k} |corr_T[j, k] - corr_S[j, k]|` of logits `[N, C]` each; a scalar in [0, 2]."""
    difference = class_correlation(teacher_logits) - class_correlation(student_logits)
    return difference.abs().mean()


@dataclass
class Representations:
    """Features `[N, d]` and logits `[N, C]` of teacher and student on one split, on the CPU."""

    student_clean: Tensor
    teacher_clean: Tensor
    student_adversarial: Tensor
    teacher_adversarial: Tensor
    student_logits: Tensor
    teacher_logits: Tensor


def collect_representations(
    student: ImageClassifier,
    teacher: FrozenTeacher,
    split: ImageSplit,
    evaluation: EvalConfig,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    adversarial: list[Tensor] | None = None,
) -> Representations:
    """Both models' features on clean inputs and on PGD-`pgd_steps` inputs against the student
    (at `eval.epsilon`), and their clean logits, for the split's first `eval.max_samples`.
    `adversarial`: those PGD inputs already made, batch by batch (the test suite's own PGD
    inputs: `robustness_metrics(..., keep={"pgd": []})`, the same batches and random starts),
    so that they are not made twice."""
    budget = attacks.Budget(evaluation.epsilon, evaluation.step_size, evaluation.pgd_steps)
    parts: dict[str, list[Tensor]] = {field.name: [] for field in fields(Representations)}
    was_training = student.training
    student.eval()
    try:
        with seeded(seed, device):
            for index, batch in enumerate(
                batches(split, batch_size, device, limit=evaluation.max_samples)
            ):
                if adversarial is not None:
                    x_adv = adversarial[index]
                    if x_adv.shape != batch.x.shape:
                        raise ValueError(
                            f"adversarial batch {index} has shape {tuple(x_adv.shape)}, "
                            f"the split's batch {tuple(batch.x.shape)}"
                        )
                else:
                    x_adv = attacks.pgd(
                        student, batch.x, budget, attacks.cross_entropy_objective(batch.y)
                    )
                with torch.no_grad():
                    features = student.forward_features(batch.x)
                    teacher_features = teacher.features(batch.x)
                    values = {
                        "student_clean": features,
                        "teacher_clean": teacher_features,
                        "student_adversarial": student.forward_features(x_adv),
                        "teacher_adversarial": teacher.features(x_adv),
                        "student_logits": student.forward_head(features),
                        "teacher_logits": teacher.head(teacher_features),
                    }
                for name, value in values.items():
                    parts[name].append(value.cpu())
    finally:
        student.train(was_training)
    return Representations(**{name: torch.cat(values) for name, values in parts.items()})


def structure_metrics(
    student: ImageClassifier,
    teacher: FrozenTeacher,
    split: ImageSplit,
    evaluation: EvalConfig,
    batch_size: int,
    device: torch.device,
    prefix: str = "test",
    seed: int = 0,
    adversarial: list[Tensor] | None = None,
) -> dict[str, float]:
    """`test/cka_clean`, `test/cka_adversarial` (both models on the student's PGD inputs,
    `adversarial` when already made: `collect_representations`) and `test/class_corr_diff` of
    a student against a frozen teacher."""
    found = collect_representations(
        student, teacher, split, evaluation, batch_size, device, seed, adversarial
    )
    return {
        schema.structure(prefix, schema.CKA_CLEAN): linear_cka(
            found.teacher_clean, found.student_clean
        ).item(),
        schema.structure(prefix, schema.CKA_ADVERSARIAL): linear_cka(
            found.teacher_adversarial, found.student_adversarial
        ).item(),
        schema.structure(prefix, schema.CLASS_CORR_DIFF): class_correlation_difference(
            found.teacher_logits, found.student_logits
        ).item(),
    }
