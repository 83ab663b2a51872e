"""L-inf attacks on models that take pixels in [0, 1].

An attack is a function of `(model, x, budget, objective)`: it maximises the objective inside
the epsilon-ball around `x` (`[B, C, H, W]`, values in [0, 1]), returns `x_adv` detached, in
the ball and in [0, 1], and sets and restores the model's mode in a `finally`. Gradients are
taken with `torch.autograd.grad`, so no parameter's `.grad` is touched.

An objective is a callable `(model, x_adv) -> [B]` per-sample loss to maximise; the factories
below build the ones the spec names (`ce`, `kl`, `contrastive`, `trades`, CW margin).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Objective = Callable[[nn.Module, Tensor], Tensor]
Start = Literal["uniform", "gaussian", "none"]
Mode = Literal["eval", "train"]


@dataclass(frozen=True)
class Budget:
    epsilon: float
    step_size: float
    steps: int
    start: Start = "uniform"


# --- objectives: (model, x_adv) -> [B] loss to maximise -----------------------------------


def cross_entropy_objective(y: Tensor) -> Objective:
    """`CE(model(x'), y)` per sample."""
    return lambda model, x_adv: F.cross_entropy(model(x_adv), y, reduction="none")


def kl_objective(target_logits: Tensor, temperature: float = 1.0) -> Objective:
    """`KL(softmax(target / t) || softmax(model(x') / t))` per sample; target is detached."""
    target = F.softmax(target_logits.detach() / temperature, dim=1)

    def objective(model: nn.Module, x_adv: Tensor) -> Tensor:
        log_probs = F.log_softmax(model(x_adv) / temperature, dim=1)
        return F.kl_div(log_probs, target, reduction="none").sum(1)

    return objective


def contrastive_objective(embed: Callable[[Tensor], Tensor], anchor: Tensor) -> Objective:
    """`-cos(embed(f_S(x')), anchor)`: push the student's embedding away from the teacher's.

    `embed` maps the student's features `[B, d]` to embeddings `[B, k]`; `anchor` is `[B, k]`.
    """
    anchor = anchor.detach()

    def objective(model: nn.Module, x_adv: Tensor) -> Tensor:
        return -F.cosine_similarity(embed(model.forward_features(x_adv)), anchor, dim=1)

    return objective


def cw_margin_objective(y: Tensor, kappa: float = 50.0) -> Objective:
    """`min(max_{j != y} z_j - z_y, kappa)`: minus Carlini-Wagner's `f`, logits `[B, C]`.

    Clamped from above: once another class leads the true one by `kappa` the sample is
    misclassified with margin to spare and its gradient stops; wherever the true class still
    leads (however far, as on an overconfident model) the gradient flows.
    """

    def objective(model: nn.Module, x_adv: Tensor) -> Tensor:
        logits = model(x_adv)
        true_logit = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        return (others.amax(1) - true_logit).clamp(max=kappa)

    return objective


# --- attacks ------------------------------------------------------------------------------


def pgd(
    model: nn.Module, x: Tensor, budget: Budget, objective: Objective, mode: Mode = "eval"
) -> Tensor:
    """Projected gradient ascent (L-inf, sign steps) of `objective` around `x`.

    `x` `[B, C, H, W]` in [0, 1]; returns `x_adv` with `|x_adv - x| <= epsilon`, in [0, 1].
    `mode` is the model's mode during the attack (`eval` freezes batch-norm statistics).
    """
    was_training = model.training
    model.train(mode == "train")
    try:
        x = x.detach()
        x_adv = random_start(x, budget)
        for _ in range(budget.steps):
            x_adv.requires_grad_(True)
            loss = objective(model, x_adv).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + budget.step_size * grad.sign()
            x_adv = project(x_adv, x, budget.epsilon)
        return x_adv.detach()
    finally:
        model.train(was_training)


def random_start(x: Tensor, budget: Budget) -> Tensor:
    if budget.start == "uniform":
        noise = torch.empty_like(x).uniform_(-budget.epsilon, budget.epsilon)
    elif budget.start == "gaussian":  # TRADES: x + 0.001 N(0, 1)
        noise = 0.001 * torch.randn_like(x)
    else:
        return x.clone()
    return project(x + noise, x, budget.epsilon)


def project(x_adv: Tensor, x: Tensor, epsilon: float) -> Tensor:
    """Into the L-inf ball of radius epsilon around x, then into [0, 1]."""
    return torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp_(0.0, 1.0)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, epsilon: float) -> Tensor:
    """One signed step of size epsilon on CE, from x."""
    budget = Budget(epsilon=epsilon, step_size=epsilon, steps=1, start="none")
    return pgd(model, x, budget, cross_entropy_objective(y))


def cw_inf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    step_size: float,
    steps: int = 30,
    kappa: float = 50.0,
) -> Tensor:
    """CW-inf: PGD on the CW margin loss (not the L2 Carlini-Wagner attack)."""
    budget = Budget(epsilon=epsilon, step_size=step_size, steps=steps)
    return pgd(model, x, budget, cw_margin_objective(y, kappa))


def autoattack_available() -> bool:
    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        return False
    return True


# The standard version's targeted attacks (APGD-T, FAB-T) aim at the 9 classes ranked after
# the true one; a model with fewer classes has only `classes - 1` to aim at.
STANDARD_TARGETS = 9
# APGD-T's targeted DLR loss reads the 3rd and 4th largest logits.
APGD_T_MIN_CLASSES = 4


def autoattack_targets(num_classes: int) -> int:
    return min(STANDARD_TARGETS, num_classes - 1)


def autoattack_version(num_classes: int) -> str:
    """What the standard version runs on a model with `num_classes` outputs, in words."""
    targets = autoattack_targets(num_classes)
    if targets == STANDARD_TARGETS:
        return "standard"
    without = "; APGD-T left out" if num_classes < APGD_T_MIN_CLASSES else ""
    return f"standard with {targets} target classes ({num_classes}-class model){without}"


def autoattack(
    model: nn.Module, x: Tensor, y: Tensor, epsilon: float, batch_size: int = 256, seed: int = 0
) -> Tensor:
    """AutoAttack, standard version, with the authors' code (`pyautoattack`); on a model with
    fewer than 10 classes its targeted attacks aim at every other class (`autoattack_version`).
    """
    from pyautoattack import AutoAttack

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        adversary = AutoAttack(
            model, norm="Linf", eps=epsilon, version="standard", device=x.device, seed=seed
        )
        adversary.apgd_targeted.n_target_classes = autoattack_targets(num_classes)
        adversary.fab.n_target_classes = autoattack_targets(num_classes)
        if num_classes < APGD_T_MIN_CLASSES:
            adversary.attacks_to_run = [a for a in adversary.attacks_to_run if a != "apgd-t"]
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        return x_adv.detach()
    finally:
        model.train(was_training)
