"""Training methods: each makes its adversarial inputs and returns its loss as named terms.

A method is an `nn.Module` that owns the student and whatever else it trains (embedding
heads) or keeps (memory bank); the frozen teacher stays outside its module tree. Calling it on
a batch returns a dict of per-batch scalar terms with the total under `"loss"`. GACD's
ablations are weights set to zero, not branches.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gacd import attacks
from gacd.config import Config
from gacd.contrastive import EmbeddingHead, InBatchContrast, MemoryBankContrast
from gacd.data import Batch
from gacd.losses import distillation_kl, self_kl
from gacd.models import ImageClassifier
from gacd.registry import Registry
from gacd.reweight import guided_weights
from gacd.teacher import FrozenTeacher

METHODS = Registry("method")


class Method(nn.Module):
    uses_teacher: ClassVar[bool] = False
    attacks: ClassVar[bool] = True
    default_objective: ClassVar[str] = "ce"
    default_start: ClassVar[str] = "uniform"

    def __init__(
        self,
        config: Config,
        student: ImageClassifier,
        teacher: FrozenTeacher | None,
        train_labels: Tensor,
    ) -> None:
        super().__init__()
        self.config = config
        self.student = student
        self.teacher = teacher
        attack = config.attack
        self.budget = attacks.Budget(attack.epsilon, attack.step_size, attack.steps, attack.start)

    def attack(self, x: Tensor, objective: attacks.Objective) -> Tensor:
        return attacks.pgd(
            self.student, x, self.budget, objective, mode=self.config.attack.student_mode
        )

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError


@METHODS.register("natural")
class Natural(Method):
    """`CE(S(x), y)` on clean inputs."""

    attacks = False

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        ce = F.cross_entropy(self.student(batch.x), batch.y)
        return {"loss": ce, "ce": ce}


@METHODS.register("pgd_at")
class PGDAdversarialTraining(Method):
    """Madry: `CE(S(x'), y)`, x' maximising `CE(S(x'), y)`."""

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x_adv = self.attack(batch.x, attacks.cross_entropy_objective(batch.y))
        ce = F.cross_entropy(self.student(x_adv), batch.y)
        return {"loss": ce, "ce": ce}


@METHODS.register("trades")
class TRADES(Method):
    """`CE(S(x), y) + beta KL(S(x) || S(x'))`, x' maximising that KL from x + 0.001 N(0, 1)."""

    default_objective = "trades"
    default_start = "gaussian"

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        target = eval_logits(self.student, batch.x)
        x_adv = self.attack(batch.x, attacks.kl_objective(target))
        clean_logits = self.student(batch.x)
        ce = F.cross_entropy(clean_logits, batch.y)
        robust = self_kl(clean_logits, self.student(x_adv)).mean()
        return {"loss": ce + self.config.trades_beta * robust, "ce": ce, "kl": robust}


@torch.no_grad()
def eval_logits(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


@METHODS.register("gacd")
class GACD(Method):
    """Guided adversarial contrastive distillation (`../shared/GACD-SPEC.md`).

    `L = alpha CE(S(x'), y) + beta mean_i(w_i l_i) + lambda_kd t^2 KL(T(x)/t || S(x')/t)`,
    with `l_i` the contrastive loss between the teacher's embedding of the anchor input and the
    student's embedding of x', and `w_i` the teacher-guided weights.
    """

    uses_teacher = True
    default_objective = "contrastive"

    def __init__(
        self,
        config: Config,
        student: ImageClassifier,
        teacher: FrozenTeacher | None,
        train_labels: Tensor,
    ) -> None:
        super().__init__(config, student, teacher, train_labels)
        self.teacher_head = EmbeddingHead(teacher.feature_dim, config.embed_dim)
        self.student_head = EmbeddingHead(student.feature_dim, config.embed_dim)
        negatives = config.negatives
        if negatives.source == "memory_bank":
            self.contrast = MemoryBankContrast(
                train_labels,
                config.embed_dim,
                negatives.count,
                config.tau,
                negatives.momentum,
                negatives.class_aware,
            )
        else:
            self.contrast = InBatchContrast(config.tau)

    def objective(
        self, batch: Batch, teacher_features: Tensor, teacher_logits: Tensor
    ) -> attacks.Objective:
        name = self.config.attack.objective
        if name == "contrastive":
            with torch.no_grad():
                anchor = self.teacher_head(teacher_features)
            return attacks.contrastive_objective(self.student_head, anchor)
        if name == "kl":
            return attacks.kl_objective(teacher_logits, self.config.attack.temperature)
        return attacks.cross_entropy_objective(batch.y)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        config = self.config
        teacher_features = self.teacher.features(batch.x)
        teacher_logits = self.teacher.head(teacher_features)
        x_adv = self.attack(batch.x, self.objective(batch, teacher_features, teacher_logits))
        if config.anchor == "adversarial":
            teacher_features = self.teacher.features(x_adv)
            teacher_logits = self.teacher.head(teacher_features)
        student_features = self.student.forward_features(x_adv)
        student_logits = self.student.forward_head(student_features)
        per_sample = self.contrast(
            self.teacher_head(teacher_features), self.student_head(student_features), batch.index
        )
        weights = guided_weights(
            teacher_logits, batch.y, config.reweight.mode, config.reweight.gamma
        )
        ce = F.cross_entropy(student_logits, batch.y)
        contrastive = (weights * per_sample).mean()
        kd = distillation_kl(student_logits, teacher_logits, config.kd_temperature).mean()
        loss = config.alpha * ce + config.beta * contrastive + config.lambda_kd * kd
        return {"loss": loss, "ce": ce, "contrastive": contrastive, "kd": kd}
