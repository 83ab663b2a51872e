"""Structural knowledge metrics: linear CKA's invariances and the class-correlation difference."""

import copy

import numpy as np
import pytest
import torch

from gacd import schema
from gacd.data import batches
from gacd.evaluate import robustness_metrics
from gacd.structure import (
    class_correlation,
    class_correlation_difference,
    linear_cka,
    structure_metrics,
)
from gacd.teacher import FrozenTeacher, load_teacher
from gacd.train import fit
from tests.conftest import digits_config


def random_features(samples=500, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, dim, generator=generator) @ torch.randn(
        dim, dim, generator=generator
    )


def test_cka_of_a_representation_with_itself_is_one():
    features = random_features()
    assert linear_cka(features, features).item() == pytest.approx(1.0, abs=1e-9)


def test_cka_of_independent_representations_is_near_zero():
    first = random_features(samples=4000, dim=8, seed=1)
    second = random_features(samples=4000, dim=12, seed=2)
    assert linear_cka(first, second).item() < 0.02


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    first = random_features(dim=16, seed=3)
    second = first[:, :10] + 0.5 * random_features(dim=10, seed=4)
    orthogonal, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    reference = linear_cka(first, second)
    assert 0.1 < reference.item() < 0.99
    transformed = linear_cka(first.double() @ orthogonal * 7.5, second * 0.01)
    assert transformed.item() == pytest.approx(reference.item(), rel=1e-9)
    assert linear_cka(second, first).item() == pytest.approx(reference.item(), rel=1e-9)


def test_class_correlation_difference_is_zero_for_identical_logits_only():
    logits = torch.randn(300, 10) @ torch.randn(10, 10)
    assert class_correlation_difference(logits, logits.clone()).item() == pytest.approx(
        0.0, abs=1e-12
    )
    assert class_correlation_difference(logits, torch.randn(300, 10)).item() > 0.05


def kornblith_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s reference code (google-research, representation_similarity/cka.py):
    `cka(gram_linear(x), gram_linear(y))`, the biased estimator, re-typed."""

    def gram_linear(values):
        return values.dot(values.T)

    def center_gram(gram):
        gram = gram.copy()
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
        return gram

    gram_x, gram_y = center_gram(gram_linear(x)), center_gram(gram_linear(y))
    scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
    return scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y))


@pytest.mark.parametrize("dims", [(16, 10), (8, 32)])
def test_cka_is_kornbliths_reference_linear_cka(dims):
    first = random_features(samples=300, dim=dims[0], seed=5)
    mixing = torch.randn(min(dims), dims[1], generator=torch.Generator().manual_seed(7))
    second = torch.tanh(first[:, : min(dims)] @ mixing) + 0.3 * (
        random_features(samples=300, dim=dims[1], seed=6)
    )
    reference = kornblith_linear_cka(first.double().numpy(), second.double().numpy())
    assert 0.05 < reference < 0.95
    assert linear_cka(first, second).item() == pytest.approx(reference, rel=1e-9)


def test_class_correlation_is_numpys_pearson_correlation():
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(200, 10, generator=generator) @ torch.randn(
        10, 10, generator=generator
    ) + torch.randn(10, generator=generator)
    other = logits + torch.randn(200, 10, generator=generator)
    ours = class_correlation(logits)
    assert torch.allclose(ours, torch.from_numpy(np.corrcoef(logits.double().numpy().T)))
    reference = np.abs(
        np.corrcoef(logits.double().numpy().T) - np.corrcoef(other.double().numpy().T)
    ).mean()
    assert class_correlation_difference(logits, other).item() == pytest.approx(reference)


def test_a_copy_of_the_teacher_shares_its_whole_structure(digits, robust_teacher_path):
    config = digits_config(method="natural", **{"eval.max_samples": 96})
    teacher = load_teacher(
        digits_config(**{"teacher.checkpoint": str(robust_teacher_path)}).teacher, digits.spec
    )
    twin = copy.deepcopy(teacher.model).requires_grad_(True).train()
    values = structure_metrics(twin, teacher, digits.test, config.eval, 64, torch.device("cpu"))
    assert values[schema.TEST_CKA_CLEAN] == pytest.approx(1.0, abs=1e-6)
    assert values[schema.TEST_CKA_ADVERSARIAL] == pytest.approx(1.0, abs=1e-6)
    assert values[schema.TEST_CLASS_CORR_DIFF] == pytest.approx(0.0, abs=1e-6)
    assert twin.training, "the student's mode is restored"
    assert isinstance(teacher, FrozenTeacher) and not teacher.model.training


def test_a_final_run_with_a_teacher_reports_structure_even_for_a_baseline(
    digits, robust_teacher_path
):
    config = digits_config(
        method="natural",
        final=True,
        **{
            "teacher.checkpoint": str(robust_teacher_path),
            "optim.epochs": 1,
            "eval.max_samples": 64,
            "eval.cw": False,
        },
    )
    last = fit(config, data=digits).metrics
    for name in (
        schema.TEST_CKA_CLEAN,
        schema.TEST_CKA_ADVERSARIAL,
        schema.TEST_CLASS_CORR_DIFF,
    ):
        assert name in last and 0.0 <= last[name] <= 2.0, name
    assert 0.0 < last[schema.TEST_CKA_CLEAN] < 1.0
    without_teacher = digits_config(method="natural", final=True, **{"optim.epochs": 1})
    assert schema.TEST_CKA_CLEAN not in fit(without_teacher, data=digits).metrics


def test_the_test_suites_pgd_inputs_give_the_structure_metrics_it_would_make(
    digits, robust_teacher_path
):
    """`final_metrics` hands the test suite's PGD inputs to the structure metrics instead of
    attacking again: the values must be those of the structure metrics' own attack, exactly;
    inputs of other batches are refused."""
    config = digits_config(method="natural", **{"eval.max_samples": 160, "optim.epochs": 1})
    teacher = load_teacher(
        digits_config(**{"teacher.checkpoint": str(robust_teacher_path)}).teacher, digits.spec
    )
    student = fit(config, data=digits).method.student
    device = torch.device("cpu")
    own = structure_metrics(student, teacher, digits.test, config.eval, 64, device, seed=3)
    kept = {"pgd": []}
    robustness_metrics(student, digits.test, config.eval, 64, device, seed=3, keep=kept)
    assert [len(x) for x in kept["pgd"]] == [64, 64, 32]
    shared = structure_metrics(
        student, teacher, digits.test, config.eval, 64, device, seed=3, adversarial=kept["pgd"]
    )
    assert shared == own
    clean = structure_metrics(
        student,
        teacher,
        digits.test,
        config.eval,
        64,
        device,
        seed=3,
        adversarial=[batch.x for batch in batches(digits.test, 64, device, limit=160)],
    )
    assert clean[schema.TEST_CKA_ADVERSARIAL] != own[schema.TEST_CKA_ADVERSARIAL]
    with pytest.raises(ValueError, match="adversarial batch 0 has shape"):
        structure_metrics(
            student, teacher, digits.test, config.eval, 32, device, adversarial=kept["pgd"]
        )
