"""Shared fixtures: real digits data and small real models trained once per session."""

from __future__ import annotations

import pytest
import torch

from gacd.checkpoint import save_checkpoint
from gacd.config import Config
from gacd.data import load_datasets
from gacd.train import fit

torch.set_num_threads(2)

# The digits budget used across the tests: 0.1 of the pixel range (1.6 of 16 grey levels).
DIGITS_EPSILON = 0.1


def digits_config(**overrides) -> Config:
    """A quick digits run: small CNN, no AutoAttack, CPU."""
    values = {
        "device": "cpu",
        "data.batch_size": 64,
        "attack.epsilon": DIGITS_EPSILON,
        "attack.steps": 5,
        "eval.autoattack": False,
        "eval.val_steps": 5,
        "optim.lr": 0.05,
        "optim.epochs": 2,
        "student.width": 16,
        "negatives.count": 256,
    }
    values.update(overrides)
    return Config.from_dict(values)


@pytest.fixture(scope="session")
def digits():
    return load_datasets(digits_config(method="natural").data, seed=0, with_test=True)


@pytest.fixture(scope="session")
def robust_teacher_path(tmp_path_factory, digits):
    """A small CNN adversarially trained (PGD-AT) on digits by this project's own loop."""
    config = digits_config(method="pgd_at", **{"optim.epochs": 12, "student.width": 32})
    result = fit(config, data=digits)
    return save_checkpoint(result.state, tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="session")
def natural_model(digits):
    """A naturally trained small CNN: accurate on clean digits, fragile under attack."""
    return fit(digits_config(method="natural", **{"optim.epochs": 12}), data=digits).method.student
