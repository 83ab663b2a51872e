"""Guided sample reweighting: shrink the samples the teacher is unsure of or wrong about."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def guided_weights(
    teacher_logits: Tensor, labels: Tensor, mode: Literal["soft", "hard", "none"], gamma: float
) -> Tensor:
    """Per-sample weights `[B]`, detached, with mean 1.

    `soft`: `w_i = p_T(y_i | x_i) ** gamma`; `gamma = 0` gives exactly 1 for every sample.
    `hard`: `w_i = 1[argmax T(x_i) = y_i]`; a batch the teacher gets all wrong is uniform.
    `none`: uniform. Then `w <- w / mean(w)`.
    teacher_logits `[B, classes]`, labels `[B]` int64.
    """
    if mode == "none":
        return torch.ones(len(labels), device=teacher_logits.device)
    if mode == "hard":
        weights = (teacher_logits.argmax(1) == labels).float()
        mean = weights.mean()
        # Chosen on the device: a branch on the host would wait for the device every step.
        return torch.where(mean > 0, weights / mean.clamp_min(1e-12), torch.ones_like(weights))
    log_p = F.log_softmax(teacher_logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    log_weights = gamma * log_p
    # Subtracting the max keeps the largest weight at 1 before normalising, so a batch of
    # tiny confidences cannot underflow to an all-zero (then NaN) weighting.
    weights = torch.exp(log_weights - log_weights.max())
    return weights / weights.mean()
