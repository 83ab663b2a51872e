"""Each baseline's loss and each evaluation attack against its official code's computation,
re-typed here from the authors' repositories (CUDA calls dropped): TRADES' `trades_loss`
(yaodongyu/TRADES, trades.py), ARD's `AttackPGD` and training step (goldblum/
AdversariallyRobustDistillation, main.py), RSLAD's `rslad_inner_loss` and CIFAR-100 training
step (zibojia/RSLAD, rslad_loss.py and resnet18_rslad_cifar100.py), RepDistiller's `DistillKL`
with its `train_distill` sum (HobbitLong/RepDistiller), and torchattacks' `PGD` and `FGSM`
(Harry24k/adversarial-attacks-pytorch). Both sides get the same student (a copy, batch-norm
statistics included), the same batch and the same random draws (the same seed before each),
and must agree in the loss, in every parameter's gradient and, for the attacks, in the
adversarial images. (CRD is checked the same way in test_gacd.py, CW-inf in test_attacks.py;
AutoAttack is the official package itself.)

One deliberate difference is kept out of the comparison: TRADES', ARD's and RSLAD's code take
the attack's first gradient at the random start before clamping it into [0, 1]; ours clamps it
first (the start is an image too). The batches here are squeezed into [margin, 1 - margin] so
that no start needs clamping, and from there on the two computations are the same.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gacd import attacks
from gacd.data import Batch
from gacd.methods import ARD, RSLAD, TRADES, KnowledgeDistillation
from tests.test_baselines import build, first_batch

TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def inside(batch: Batch, margin: float) -> Batch:
    """The batch's images squeezed into [margin, 1 - margin]."""
    return Batch(margin + (1 - 2 * margin) * batch.x, batch.y, batch.index)


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def assert_same_step(ours: torch.Tensor, ours_model, theirs: torch.Tensor, their_model) -> None:
    """Equal losses, and equal gradients on every parameter (and on the same parameters)."""
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours, theirs, **TOLERANCE), (ours.item(), theirs.item())
    mine, official = gradients(ours_model), gradients(their_model)
    assert len(mine) == len(official) == len(list(ours_model.parameters()))
    for a, b in zip(mine, official, strict=True):
        assert torch.allclose(a, b, **TOLERANCE), (a - b).abs().max()


# --- the official computations, re-typed -------------------------------------------------------


def official_trades_loss(model, x_natural, y, step_size, epsilon, perturb_steps, beta):
    """yaodongyu/TRADES trades.py `trades_loss` (L-inf), on the CPU."""
    criterion_kl = nn.KLDivLoss(reduction="sum")  # size_average=False
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(
                F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1)
            )
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(
        F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1)
    )
    return loss_natural + beta * loss_robust


def official_ard_loss(basic_net, teacher_net, inputs, targets, epsilon, step_size, num_steps,
                      alpha, temp):  # fmt: skip
    """goldblum/AdversariallyRobustDistillation main.py: `AttackPGD.forward` (the student in
    train mode, `net.train()`) and the loss of `train`."""
    basic_net.train()
    x = inputs.detach()
    x = x + torch.zeros_like(x).uniform_(-epsilon, epsilon)
    for _ in range(num_steps):
        x.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(basic_net(x), targets, reduction="sum")
        grad = torch.autograd.grad(loss, [x])[0]
        x = x.detach() + step_size * torch.sign(grad.detach())
        x = torch.min(torch.max(x, inputs - epsilon), inputs + epsilon)
        x = torch.clamp(x, 0.0, 1.0)
    outputs = basic_net(x)
    teacher_outputs = teacher_net(inputs)
    basic_outputs = basic_net(inputs)
    kl_loss, xent_loss = nn.KLDivLoss(), nn.CrossEntropyLoss()  # KLDivLoss(): the element mean
    return alpha * temp * temp * kl_loss(
        F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1)
    ) + (1.0 - alpha) * xent_loss(basic_outputs, targets)


def official_rslad_loss(student, teacher_logits, x_natural, step_size, epsilon, perturb_steps):
    """zibojia/RSLAD: `rslad_inner_loss` (rslad_loss.py), then the step of
    resnet18_rslad_cifar100.py (its `kl_loss`, each KL times 10 for CIFAR-100's 100 classes)."""
    criterion_kl = nn.KLDivLoss(reduction="none")
    student.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(
                F.log_softmax(student(x_adv), dim=1), F.softmax(teacher_logits, dim=1)
            )
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    student.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    adv_logits = student(x_adv)

    def kl_loss(a, b):
        return -a * b + torch.log(b + 1e-5) * b

    student.train()
    nat_logits = student(x_natural)
    target = F.softmax(teacher_logits.detach(), dim=1)
    kl_loss1 = 10 * torch.mean(kl_loss(torch.log(F.softmax(adv_logits, dim=1)), target))
    kl_loss2 = 10 * torch.mean(kl_loss(torch.log(F.softmax(nat_logits, dim=1)), target))
    return 5.0 / 6.0 * kl_loss1 + 1.0 / 6.0 * kl_loss2


def official_kd_loss(logit_s, logit_t, target, temperature, gamma, alpha):
    """RepDistiller: `DistillKL(T)(logit_s, logit_t)` (distiller_zoo/KD.py) in
    `train_distill`'s `gamma * loss_cls + alpha * loss_div` (KD's `beta` term is 0)."""
    p_s = F.log_softmax(logit_s / temperature, dim=1)
    p_t = F.softmax(logit_t / temperature, dim=1)
    loss_div = F.kl_div(p_s, p_t, reduction="sum") * (temperature**2) / logit_s.shape[0]
    loss_cls = nn.CrossEntropyLoss()(logit_s, target)
    return gamma * loss_cls + alpha * loss_div


def torchattacks_pgd(model, images, labels, eps, alpha, steps, random_start=True):
    """torchattacks `PGD.forward` (untargeted); `Attack.__call__` puts the model in eval mode."""
    images = images.clone().detach()
    labels = labels.clone().detach()
    loss = nn.CrossEntropyLoss()
    adv_images = images.clone().detach()
    if random_start:
        adv_images = adv_images + torch.empty_like(adv_images).uniform_(-eps, eps)
        adv_images = torch.clamp(adv_images, min=0, max=1).detach()
    for _ in range(steps):
        adv_images.requires_grad = True
        cost = loss(model(adv_images), labels)
        grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
        adv_images = adv_images.detach() + alpha * grad.sign()
        delta = torch.clamp(adv_images - images, min=-eps, max=eps)
        adv_images = torch.clamp(images + delta, min=0, max=1).detach()
    return adv_images


def torchattacks_fgsm(model, images, labels, eps):
    """torchattacks `FGSM.forward` (untargeted)."""
    images = images.clone().detach()
    images.requires_grad = True
    cost = nn.CrossEntropyLoss()(model(images), labels)
    grad = torch.autograd.grad(cost, images, retain_graph=False, create_graph=False)[0]
    return torch.clamp(images + eps * grad.sign(), min=0, max=1).detach()


# --- the comparisons ---------------------------------------------------------------------------


def test_trades_is_the_official_trades_loss_in_value_and_gradient(digits):
    ours = build(TRADES, digits, trades_beta=6.0)
    theirs = copy.deepcopy(ours.student)
    batch = inside(first_batch(digits.train), margin=0.01)
    budget = ours.budget
    assert budget.start == "gaussian" and ours.config.attack.student_mode == "eval"
    torch.manual_seed(3)
    mine = ours(batch)["loss"]
    torch.manual_seed(3)
    official = official_trades_loss(
        theirs, batch.x, batch.y, budget.step_size, budget.epsilon, budget.steps, beta=6.0
    )
    assert_same_step(mine, ours.student, official, theirs)


def test_ard_is_the_official_ard_loss_in_value_and_gradient(digits, robust_teacher_path):
    # alpha 0.5, so that both terms (the KL on x' and the CE on x) are compared
    ours = build(ARD, digits, robust_teacher_path, **{"ard.alpha": 0.5})
    theirs = copy.deepcopy(ours.student)
    budget = ours.budget
    batch = inside(first_batch(digits.train), margin=budget.epsilon + 0.01)
    assert budget.start == "uniform" and ours.config.ard.kl_reduction == "element_mean"
    torch.manual_seed(4)
    mine = ours(batch)["loss"]
    torch.manual_seed(4)
    official = official_ard_loss(
        theirs, ours.teacher.model, batch.x, batch.y, budget.epsilon, budget.step_size,
        budget.steps, alpha=0.5, temp=ours.config.ard.temperature,
    )  # fmt: skip
    assert_same_step(mine, ours.student, official, theirs)


def test_rslad_is_the_official_rslad_loss_in_gradient_and_in_value_but_its_epsilon(
    digits, robust_teacher_path
):
    """RSLAD's `kl_loss` adds 1e-5 inside the teacher's log: a constant of the student, so the
    gradients are the same and the values differ by less than 10 (its factor) x 1e-5."""
    ours = build(RSLAD, digits, robust_teacher_path, **{"rslad.scale": 10.0})
    theirs = copy.deepcopy(ours.student)
    budget = ours.budget
    batch = inside(first_batch(digits.train), margin=0.01)
    assert budget.start == "gaussian" and ours.config.rslad.kl_reduction == "element_mean"
    teacher_logits = ours.teacher.logits(batch.x)
    torch.manual_seed(5)
    mine = ours(batch)["loss"]
    torch.manual_seed(5)
    official = official_rslad_loss(
        theirs, teacher_logits, batch.x, budget.step_size, budget.epsilon, budget.steps
    )
    mine.backward()
    official.backward()
    assert 0 <= (official - mine).item() <= 10 * 1e-5
    for a, b in zip(gradients(ours.student), gradients(theirs), strict=True):
        assert torch.allclose(a, b, **TOLERANCE), (a - b).abs().max()


def test_kd_is_repdistillers_distill_kl_in_value_and_gradient(digits, robust_teacher_path):
    ours = build(KnowledgeDistillation, digits, robust_teacher_path)
    theirs = copy.deepcopy(ours.student)
    batch = first_batch(digits.train)
    kd = ours.config.kd
    mine = ours(batch)["loss"]
    with torch.no_grad():
        logit_t = ours.teacher.model(batch.x)
    official = official_kd_loss(
        theirs(batch.x), logit_t, batch.y, kd.temperature, kd.gamma, kd.alpha
    )
    assert_same_step(mine, ours.student, official, theirs)


@pytest.mark.parametrize("start", ["uniform", "none"])
def test_pgd_is_torchattacks_pgd(digits, natural_model, start):
    """The evaluation's PGD (CE, eval mode) against torchattacks' on the same random start;
    real digits, pixels at 0 and 1 included (both clamp the start)."""
    batch = first_batch(digits.test, size=64)
    epsilon, step_size, steps = 0.1, 0.025, 20
    budget = attacks.Budget(epsilon, step_size, steps, start)
    model = copy.deepcopy(natural_model).train()  # the attack must put it in eval mode
    torch.manual_seed(6)
    ours = attacks.pgd(model, batch.x, budget, attacks.cross_entropy_objective(batch.y))
    assert model.training
    reference = copy.deepcopy(natural_model).eval()
    torch.manual_seed(6)
    theirs = torchattacks_pgd(
        reference, batch.x, batch.y, epsilon, step_size, steps, random_start=start != "none"
    )
    assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()
    with torch.no_grad():
        fooled = (reference(theirs).argmax(1) != batch.y).float().mean()
    assert fooled > 0.5  # a real attack on a fragile model, not two no-ops agreeing


def test_fgsm_is_torchattacks_fgsm(digits, natural_model):
    batch = first_batch(digits.test, size=64)
    model = copy.deepcopy(natural_model).eval()
    ours = attacks.fgsm(model, batch.x, batch.y, 0.1)
    theirs = torchattacks_fgsm(model, batch.x, batch.y, 0.1)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()
    assert (ours - batch.x).abs().max() > 0.09
