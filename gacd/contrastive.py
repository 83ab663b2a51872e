"""The contrastive (mutual-information) objective between teacher and student embeddings.

Shapes: `B` batch, `k` embedding size, `K` negatives. Embeddings are unit-norm.
Both objectives return a per-sample loss `[B]`, so guided weights can scale each sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gacd import parallel
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
    return nce_from_similarities(
        (anchor * positive).sum(1),
        torch.einsum("bk,bnk->bn", anchor, negatives),
        temperature,
        log_normaliser,
        num_samples,
    )


def nce_from_similarities(
    positive: Tensor,
    negatives: Tensor,
    temperature: float,
    log_normaliser: Tensor,
    num_samples: int,
) -> Tensor:
    """`nce_loss` from the dot products: `a_i.s_i` `[B]` and `a_i.s_k` `[B, K]`.

    With `u = a.s / tau - log Z - log(K/N)`: `-log h = softplus(-u)` and
    `-log(1 - h) = softplus(u)`, one fused, stable operation each.
    """
    shift = log_normaliser + math.log(negatives.shape[1] / num_samples)
    positive_term = F.softplus(shift - positive / temperature)
    return positive_term + F.softplus(negatives / temperature - shift).sum(1)


# Score against the whole bank (one matrix multiply) rather than gather the sampled rows when
# the bank holds at most this many times the negatives drawn: `a @ bank.T` costs B N k
# multiply-adds from a bank read once, the gather moves B K k values through memory (and keeps
# them for the backward pass), which is slower on CPUs and GPUs alike unless N >> K.
FULL_BANK_FACTOR = 16


def bank_similarities(anchor: Tensor, bank: Tensor, rows: Tensor) -> Tensor:
    """`anchor_i . bank[rows_ik]`: anchor `[B, k]`, bank `[N, k]`, rows `[B, K]` -> `[B, K]`."""
    if bank.shape[0] <= FULL_BANK_FACTOR * rows.shape[1]:
        return (anchor @ bank.T).gather(1, rows)
    return torch.einsum("bk,bnk->bn", anchor, bank[rows])


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
    anchor against stored teacher embeddings. Each direction's positive is, with `positive`:

    - `current`: the other side's current embedding of the same sample (`t_i . s_i` in both
      directions, the spec's reading): both terms train both heads;
    - `memory`: the other side's stored row of the same sample, detached (RepDistiller's
      `ContrastMemory`, column 0 of `contrast_idx`): the teacher-anchored term trains only the
      teacher's head, the student-anchored term only the student.

    `log Z` of each direction is fixed on the first batch (over its positives and negatives).
    """

    def __init__(
        self,
        labels: Tensor,
        embed_dim: int,
        count: int,
        temperature: float,
        momentum: float,
        class_aware: bool,
        positive: str = "current",
    ) -> None:
        super().__init__()
        self.bank = MemoryBank(labels, embed_dim, momentum, class_aware)
        self.count = min(count, self.bank.max_negatives())
        self.temperature = temperature
        self.positive = positive
        self.register_buffer("log_normaliser", torch.full((2,), float("nan")))
        # Whether both `log Z` are set: known on the host, so that a training step does not wait
        # for the device to ask. Re-read after a state dict is loaded.
        self.normaliser_fixed = False
        self.register_load_state_dict_post_hook(lambda module, _: module.forget_normaliser())

    def forget_normaliser(self) -> None:
        self.normaliser_fixed = False

    def forward(self, teacher: Tensor, student: Tensor, index: Tensor) -> Tensor:
        # Data-parallel workers contrast the global batch (`gacd.parallel.gather`): the same
        # negatives, bank updates and normaliser as one process, then keep their own rows.
        group = parallel.current()
        teacher, student = parallel.gather(teacher, group), parallel.gather(student, group)
        index = parallel.gather(index, group)
        rows = self.bank.sample(index, self.count)
        # Teacher anchors against stored student embeddings, and the other way round.
        negatives = (
            bank_similarities(teacher, self.bank.student, rows),
            bank_similarities(student, self.bank.teacher, rows),
        )
        if self.positive == "memory":
            positives = (
                (teacher * self.bank.student[index]).sum(1),
                (student * self.bank.teacher[index]).sum(1),
            )
        else:
            shared = (teacher * student).sum(1)
            positives = (shared, shared)
        if not self.normaliser_fixed:
            self._fix_normaliser(positives, negatives)
        loss = torch.zeros(len(index), device=teacher.device)
        for direction, pair in enumerate(zip(positives, negatives, strict=True)):
            positive, similarities = pair
            loss = loss + nce_from_similarities(
                positive,
                similarities,
                self.temperature,
                self.log_normaliser[direction],
                self.bank.num_samples,
            )
        self.bank.update(index, teacher, student)
        return parallel.own_rows(loss, group)

    @torch.no_grad()
    def _fix_normaliser(
        self, positives: tuple[Tensor, Tensor], negatives: tuple[Tensor, Tensor]
    ) -> None:
        """CRD's `Z = N * mean(exp(a.s / tau))` over the first batch's pairs, then fixed."""
        unset = torch.isnan(self.log_normaliser).tolist()
        for direction, pair in enumerate(zip(positives, negatives, strict=True)):
            positive, similarities = pair
            if not unset[direction]:
                continue
            logits = torch.cat([positive[:, None], similarities], 1).float() / self.temperature
            mean_log = torch.logsumexp(logits.flatten(), 0) - math.log(logits.numel())
            self.log_normaliser[direction] = mean_log + math.log(self.bank.num_samples)
        self.normaliser_fixed = True


class InBatchContrast(nn.Module):
    """InfoNCE with the batch as negatives (`K = B - 1`); no memory."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, teacher: Tensor, student: Tensor, index: Tensor) -> Tensor:
        # Data-parallel workers: the global batch's negatives (`gacd.parallel.gather`).
        group = parallel.current()
        loss = info_nce_loss(
            parallel.gather(teacher, group), parallel.gather(student, group), self.temperature
        )
        return parallel.own_rows(loss, group)
