"""CRD's memory bank: the latest teacher and student embedding of every training sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MemoryBank(nn.Module):
    """Two banks `[N, k]` of unit-norm embeddings, indexed by the training sample's row.

    Rows start as random unit vectors and are updated with momentum:
    `row <- normalise(momentum * row + (1 - momentum) * new)`.
    Negatives for a sample are drawn uniformly (with replacement) from the other samples,
    or, with `class_aware`, from the samples of other classes (as CRD).
    """

    def __init__(
        self, labels: Tensor, dim: int, momentum: float = 0.5, class_aware: bool = True
    ) -> None:
        super().__init__()
        num_samples = len(labels)
        self.momentum = momentum
        self.class_aware = class_aware
        self.register_buffer("teacher", F.normalize(torch.randn(num_samples, dim), dim=1))
        self.register_buffer("student", F.normalize(torch.randn(num_samples, dim), dim=1))
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        # Samples sorted by class, and where each class's run starts: a draw in
        # [0, N - n_c) skips class c's run to land on another class.
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("class_counts", counts, persistent=False)
        self.register_buffer("class_starts", torch.cumsum(counts, 0) - counts, persistent=False)

    @property
    def num_samples(self) -> int:
        return self.teacher.shape[0]

    def max_negatives(self) -> int:
        """How many distinct negatives the rarest draw can have: N minus the largest class."""
        if self.class_aware:
            return self.num_samples - int(self.class_counts.max())
        return self.num_samples - 1

    def sample(self, index: Tensor, count: int) -> Tensor:
        """Row indices `[B, count]` of negatives for the samples at rows `index` `[B]`."""
        uniform = torch.rand(len(index), count, device=self.teacher.device)
        if self.class_aware:
            label = self.labels[index]
            start = self.class_starts[label][:, None]
            draw = (uniform * (self.num_samples - self.class_counts[label])[:, None]).long()
            return self.order[draw + (draw >= start) * self.class_counts[label][:, None]]
        draw = (uniform * (self.num_samples - 1)).long()
        return draw + (draw >= index[:, None]).long()

    @torch.no_grad()
    def update(self, index: Tensor, teacher: Tensor, student: Tensor) -> None:
        """Blend the new embeddings `[B, k]` into rows `index` and re-normalise them.

        Out of place (a new bank tensor): this step's loss was scored against the old bank,
        which its backward pass still needs as it was.
        """
        for name, new in (("teacher", teacher), ("student", student)):
            bank = getattr(self, name)
            blended = self.momentum * bank[index] + (1 - self.momentum) * new.detach().float()
            setattr(self, name, bank.index_copy(0, index, F.normalize(blended, dim=1)))
