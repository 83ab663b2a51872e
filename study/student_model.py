"""A final trial's student as an MLflow model, logged "from code": this file is the model's
code and the project's weights-only checkpoint its one artifact, so nothing pickled is stored
and loading needs this project installed (`pip install gacd-study`).

    model = mlflow.pyfunc.load_model("runs:/<run_id>/student")   # or models:/<model_id>
    logits = model.predict(images)          # float32 [N, C, H, W] in [0, 1] -> [N, classes]
    student = model.unwrap_python_model().student                  # the torch module itself
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch


class Student(mlflow.pyfunc.PythonModel):
    """The student of `context.artifacts["checkpoint"]`, in eval mode on the CPU."""

    def load_context(self, context) -> None:
        from gacd.checkpoint import load_checkpoint
        from gacd.models import classifier_from_checkpoint

        state = load_checkpoint(context.artifacts["checkpoint"])
        self.student = classifier_from_checkpoint(state)
        self.epoch = state["epoch"]

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.student(images).numpy()


mlflow.models.set_model(Student())
