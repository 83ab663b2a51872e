"""Per-sample loss terms shared by GACD and the baselines."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """`t^2 KL(softmax(T / t) || softmax(S / t))` per sample `[B]` (summed over classes)."""
    target = F.softmax(teacher_logits.detach() / temperature, dim=1)
    log_probs = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * F.kl_div(log_probs, target, reduction="none").sum(1)


def self_kl(clean_logits: Tensor, adversarial_logits: Tensor) -> Tensor:
    """TRADES' `KL(softmax(S(x)) || softmax(S(x')))` per sample `[B]`, gradient through both."""
    log_adversarial = F.log_softmax(adversarial_logits, dim=1)
    return F.kl_div(log_adversarial, F.softmax(clean_logits, dim=1), reduction="none").sum(1)


def reduce_kl(per_sample: Tensor, num_classes: int, reduction: str) -> Tensor:
    """A per-sample KL `[B]` (summed over classes) as a scalar: one of two conventions.

    `batch_mean`: `sum_i KL_i / B`, the divergence itself (`F.kl_div(reduction="batchmean")`).
    `element_mean`: `sum_i KL_i / (B C)`, PyTorch's default `nn.KLDivLoss()` mean over batch
    and classes, which ARD's and RSLAD's code use: the same gradient direction, `1/C` the size.
    """
    if reduction == "batch_mean":
        return per_sample.mean()
    if reduction == "element_mean":
        return per_sample.mean() / num_classes
    raise ValueError(f"unknown KL reduction {reduction!r}: batch_mean or element_mean")
