"""The contrastive (mutual-information) objective between teacher and student embeddings.

Shapes: `B` batch, `k` embedding size, `K` negatives. Embeddings are unit-norm.
Both objectives return a per-sample loss `[B]`, so guided weights can scale each sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gacd.memory_bank import MemoryBank


class EmbeddingHead(nn.Module):
    """`g(f) = normalise(W f + b)`: features `[B, d]` -> unit-norm embeddings `[B, k]`."""

    def __init__(self, feature_dim: int, embed_dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(feature_dim, embed_dim)

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.linear(features), dim=1)


def nce_loss(
    anchor: Tensor,
    positive: Tensor,
    negatives: Tensor,
    temperature: float,
    log_normaliser: Tensor,
    num_samples: int,
) -> Tensor:
    """CRD's NCE loss with critic `h(a, s) = P / (P + K/N)`, `P = exp(a.s / tau) / Z`.

    `l_i = -[log h(a_i, s_i) + sum_k log(1 - h(a_i, s_k))]`, in log space for stability.
    anchor, positive `[B, k]`; negatives `[B, K, k]`; `log_normaliser` is `log Z` (scalar).
    """
    count = negatives.shape[1]
    log_noise = math.log(count / num_samples)
    positive_logit = (anchor * positive).sum(1) / temperature - log_normaliser
    negative_logit = torch.einsum("bk,bnk->bn", anchor, negatives) / temperature - log_normaliser
    log_h_positive = positive_logit - torch.logaddexp(
        positive_logit, _full(positive_logit, log_noise)
    )
    log_1m_h_negative = log_noise - torch.logaddexp(
        negative_logit, _full(negative_logit, log_noise)
    )
    return -(log_h_positive + log_1m_h_negative.sum(1))


def _full(like: Tensor, value: float) -> Tensor:
    return torch.full_like(like, value)


def info_nce_loss(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """Symmetric in-batch InfoNCE: `-log softmax_j(t_i . s_j / tau)[i]` plus the transpose.

    teacher, student `[B, k]`; the other `B - 1` samples of the batch are the negatives.
    """
    logits = teacher @ student.T / temperature
    targets = torch.arange(len(teacher), device=teacher.device)
    return F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(
        logits.T, targets, reduction="none"
    )


class MemoryBankContrast(nn.Module):
    """NCE against memory-bank negatives, summed over both directions (as CRD).

    Teacher embedding as anchor against stored student embeddings, and student embedding as
    anchor against stored teacher embeddings; the positive is the other side's current
    embedding of the same sample. `log Z` of each direction is fixed on the first batch.
    """

    def __init__(
        self,
        labels: Tensor,
        embed_dim: int,
        count: int,
        temperature: float,
        momentum: float,
        class_aware: bool,
    ) -> None:
        super().__init__()
        self.bank = MemoryBank(labels, embed_dim, momentum, class_aware)
        self.count = min(count, self.bank.max_negatives())
        self.temperature = temperature
        self.register_buffer("log_normaliser", torch.full((2,), float("nan")))

    def forward(self, teacher: Tensor, student: Tensor, index: Tensor) -> Tensor:
        negative_rows = self.bank.sample(index, self.count)
        directions = (
            (teacher, student, self.bank.student[negative_rows]),
            (student, teacher, self.bank.teacher[negative_rows]),
        )
        loss = torch.zeros(len(index), device=teacher.device)
        for direction, (anchor, positive, negatives) in enumerate(directions):
            log_z = self._normaliser(direction, anchor, positive, negatives)
            loss = loss + nce_loss(
                anchor, positive, negatives, self.temperature, log_z, self.bank.num_samples
            )
        self.bank.update(index, teacher, student)
        return loss

    @torch.no_grad()
    def _normaliser(
        self, direction: int, anchor: Tensor, positive: Tensor, negatives: Tensor
    ) -> Tensor:
        """CRD's `Z = N * mean(exp(a.s / tau))` over the first batch's pairs, then fixed."""
        if torch.isnan(self.log_normaliser[direction]):
            logits = torch.cat(
                [
                    (anchor * positive).sum(1, keepdim=True),
                    torch.einsum("bk,bnk->bn", anchor, negatives),
                ],
                1,
            )
            logits = logits / self.temperature
            mean_log = torch.logsumexp(logits.flatten(), 0) - math.log(logits.numel())
            self.log_normaliser[direction] = mean_log + math.log(self.bank.num_samples)
        return self.log_normaliser[direction]


class InBatchContrast(nn.Module):
    """InfoNCE with the batch as negatives (`K = B - 1`); no memory."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, teacher: Tensor, student: Tensor, index: Tensor) -> Tensor:
        return info_nce_loss(teacher, student, self.temperature)
