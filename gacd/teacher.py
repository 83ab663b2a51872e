"""The frozen teacher: loaded from a checkpoint of this project or a plain state dict."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gacd.checkpoint import CheckpointError, is_project_checkpoint, load_checkpoint
from gacd.config import ModelConfig, TeacherConfig
from gacd.data import DatasetSpec
from gacd.models import ImageClassifier, build_classifier


class FrozenTeacher:
    """A teacher frozen three ways: `eval()`, `requires_grad_(False)`, and calls under
    `torch.inference_mode` (no autograd bookkeeping at all; the outputs are returned as
    ordinary tensors, so trainable heads and attack objectives can take them).

    Deliberately not an `nn.Module`: it never joins a student's module tree, so it is not in
    the optimizer, not in the student's checkpoint, and `train()` never reaches it.
    """

    def __init__(self, model: ImageClassifier) -> None:
        self.model = model.eval().requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features `[B, d]` of `x` `[B, C, H, W]` in [0, 1]."""
        with torch.inference_mode():
            features = self.model.forward_features(x)
        return features.clone()

    def head(self, features: Tensor) -> Tensor:
        with torch.inference_mode():
            logits = self.model.forward_head(features)
        return logits.clone()

    def logits(self, x: Tensor) -> Tensor:
        """Logits `[B, num_classes]` of `x` `[B, C, H, W]` in [0, 1]."""
        with torch.inference_mode():
            logits = self.model(x)
        return logits.clone()

    def to(self, device: torch.device) -> FrozenTeacher:
        self.model.to(device)
        return self


def load_teacher(config: TeacherConfig, spec: DatasetSpec) -> FrozenTeacher:
    """Read `config.checkpoint`; a project checkpoint brings its own architecture."""
    path = Path(config.checkpoint)
    payload = load_checkpoint(path, what="teacher.checkpoint")
    if is_project_checkpoint(payload):
        try:
            stored = ModelConfig(**payload["config"]["student"])
        except (KeyError, TypeError) as error:
            raise CheckpointError(
                f"teacher.checkpoint {str(path)!r}: a checkpoint of this project without a "
                f"readable student config ({type(error).__name__}: {error})"
            ) from error
        if config.arch is not None and config.arch != stored.arch:
            raise CheckpointError(
                f"teacher.checkpoint {str(path)!r}: holds a '{stored.arch}' "
                f"model, but teacher.arch is '{config.arch}'"
            )
        model, state = build_classifier(stored, spec), payload["student"]
    else:
        if config.arch is None:
            raise CheckpointError(
                f"teacher.checkpoint {str(path)!r}: a plain state dict does "
                "not say its architecture; set teacher.arch (and depth, width)"
            )
        model, state = build_classifier(config, spec), plain_state_dict(payload, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        arch = model.__class__.__name__
        raise CheckpointError(
            f"teacher.checkpoint {str(path)!r}: its weights do not fit "
            f"the architecture ({arch}, {spec.num_classes} classes): "
            f"{str(error).splitlines()[0]} ..."
        ) from error
    return FrozenTeacher(model)


def plain_state_dict(payload: object, path: Path) -> dict[str, Tensor]:
    """A state dict, possibly under `state_dict`/`model`, possibly saved from DataParallel."""
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise CheckpointError(
            f"teacher.checkpoint {str(path)!r}: neither a checkpoint of this "
            "project nor a state dict of tensors"
        )
    return {key.removeprefix("module."): value for key, value in payload.items()}
