"""The study's MLflow side without Ray: experiments, run tags and the parameters a run logs,
on a real SQLite store."""

from __future__ import annotations

import dataclasses

import pytest
from mlflow.tracking import MlflowClient

from gacd.config import Config
from gacd.methods import COMMON_SETTINGS, METHODS, run_settings
from study.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracking

DISTILLERS = ("gacd", "kd", "crd", "ard", "rslad")


def method_config(method: str, **overrides) -> Config:
    teacher = {"teacher.checkpoint": "teacher.pt"} if method in DISTILLERS else {}
    return Config.from_dict({"method": method, **teacher, **overrides})


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_a_run_logs_its_own_method_s_settings_and_no_other_s(method):
    settings = run_settings(method_config(method))
    sections = {key.split(".")[0] for key in settings}
    own = set(METHODS.get(method).settings)
    others = {name for other in METHODS.names() for name in METHODS.get(other).settings} - own
    assert own <= sections and not (others & sections), sections
    assert set(COMMON_SETTINGS) <= sections and "device" not in sections
    assert ("attack" in sections) == METHODS.get(method).adversarial
    assert ("teacher" in sections) == (method in DISTILLERS)
    assert "transfer" not in sections
    transferred = method_config(method, **{"transfer.data.name": "digits"})
    assert run_settings(transferred)["transfer.data.name"] == "digits"


def test_every_config_key_is_logged_by_some_method():
    """A new top-level key must be claimed (common, or a method's own) or it is never logged."""
    claimed = set(COMMON_SETTINGS) | {"attack", "teacher", "transfer", "device"}
    claimed |= {name for method in METHODS.names() for name in METHODS.get(method).settings}
    assert {field.name for field in dataclasses.fields(Config)} == claimed


def test_experiments_open_on_the_runs_table_new_or_made_before(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking(uri)
    made = MlflowClient(uri).get_experiment(tracking.experiment_id("fresh"))
    assert made.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = MlflowClient(uri).create_experiment("unmarked")
    assert EXPERIMENT_KIND_TAG not in MlflowClient(uri).get_experiment(old).tags
    assert tracking.experiment_id("unmarked") == old
    assert MlflowClient(uri).get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_a_student_is_logged_as_an_mlflow_model_quietly_and_loads_back_with_the_same_logits(
    tmp_path, digits
):
    """`log_student_model`: MLflow warns of nothing (the predict input is typed, an input
    example is stored and validated against the signature), and the model MLflow loads back
    scores images as the checkpoint's student does."""
    import warnings

    import mlflow
    import numpy as np
    import torch

    from gacd.checkpoint import load_checkpoint, save_checkpoint
    from gacd.models import classifier_from_checkpoint
    from gacd.train import fit
    from study.tracking import log_student_model
    from tests.conftest import digits_config

    result = fit(digits_config(method="natural", **{"optim.epochs": 1}), data=digits)
    path = save_checkpoint(result.state, tmp_path / "student.pt")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("models")).info.run_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_student_model(uri, run_id, path, "student")
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not said, said
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/student")
    assert model.metadata.saved_input_example_info is not None
    images = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    expected = classifier_from_checkpoint(load_checkpoint(path))(torch.from_numpy(images))
    np.testing.assert_allclose(model.predict(images), expected.detach().numpy(), atol=1e-5)
