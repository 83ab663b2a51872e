"""The claim the platform studies, on the embedded data: distillation transfers robustness."""

import pytest
import torch

from gacd.evaluate import robustness_metrics
from gacd.train import fit
from tests.conftest import digits_config


@pytest.mark.slow
def test_gacd_student_is_more_robust_than_a_naturally_trained_one(digits, robust_teacher_path):
    epochs = {"optim.epochs": 12}
    natural = fit(digits_config(method="natural", **epochs), data=digits)
    gacd = fit(
        digits_config(**{"teacher.checkpoint": str(robust_teacher_path), **epochs}), data=digits
    )
    evaluation = digits_config(method="natural").eval
    device = torch.device("cpu")
    scores = {
        name: robustness_metrics(result.method.student, digits.test, evaluation, 512, device)
        for name, result in (("natural", natural), ("gacd", gacd))
    }
    message = f"test-split accuracy at epsilon 0.1: {scores}"
    print(message)
    assert scores["gacd"]["test/pgd_acc"] > scores["natural"]["test/pgd_acc"] + 0.15, message
    assert scores["gacd"]["test/cw_acc"] > scores["natural"]["test/cw_acc"] + 0.15, message
    assert scores["gacd"]["test/clean_acc"] > 0.85, message
