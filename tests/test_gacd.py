"""GACD's parts: reweighting, contrastive critic, memory bank, and where gradients go."""

import math

import pytest
import torch
import torch.nn.functional as F

from gacd.contrastive import (
    InBatchContrast,
    MemoryBankContrast,
    bank_similarities,
    info_nce_loss,
    nce_loss,
)
from gacd.data import batches
from gacd.memory_bank import MemoryBank
from gacd.methods import GACD
from gacd.models import build_classifier
from gacd.reweight import guided_weights
from gacd.teacher import load_teacher
from tests.conftest import digits_config


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


# --- reweighting ------------------------------------------------------------------------------


def test_gamma_zero_gives_exactly_uniform_weights():
    logits = torch.randn(37, 10) * 5
    labels = torch.randint(0, 10, (37,))
    assert torch.equal(guided_weights(logits, labels, "soft", 0.0), torch.ones(37))
    assert torch.equal(guided_weights(logits, labels, "none", 2.0), torch.ones(37))


@pytest.mark.parametrize("mode", ["soft", "hard", "none"])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0, 50.0])
def test_weights_average_to_one_and_are_detached(mode, gamma):
    logits = (torch.randn(64, 10) * 10).requires_grad_()
    labels = torch.randint(0, 10, (64,))
    weights = guided_weights(logits, labels, mode, gamma)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(weights).all() and not weights.requires_grad


def test_hard_weights_zero_the_samples_the_teacher_gets_wrong():
    logits = torch.eye(4) * 5
    labels = torch.tensor([0, 1, 3, 2])  # the teacher is wrong on the last two
    weights = guided_weights(logits, labels, "hard", 1.0)
    assert torch.equal(weights, torch.tensor([2.0, 2.0, 0.0, 0.0]))
    all_wrong = guided_weights(logits, torch.tensor([1, 0, 3, 2]), "hard", 1.0)
    assert torch.equal(all_wrong, torch.ones(4))


def test_soft_weights_shrink_what_the_teacher_is_unsure_of():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 4.0]])
    weights = guided_weights(logits, torch.tensor([0, 0, 0]), "soft", 2.0)
    assert weights[0] > weights[1] > weights[2]
    p = torch.softmax(logits, 1)[:, 0] ** 2
    assert torch.allclose(weights, p / p.mean())


# --- contrastive objective --------------------------------------------------------------------


def test_aligned_features_give_a_lower_loss_than_shuffled():
    teacher = unit(64, 32)
    aligned = F.normalize(teacher + 0.1 * torch.randn(64, 32), dim=1)
    shuffled = aligned[torch.randperm(64)]
    assert (
        info_nce_loss(teacher, aligned, 0.1).mean() < info_nce_loss(teacher, shuffled, 0.1).mean()
    )
    negatives = unit(64, 100, 32)
    log_z = torch.tensor(math.log(64.0))
    aligned_nce = nce_loss(teacher, aligned, negatives, 0.1, log_z, 1000).mean()
    shuffled_nce = nce_loss(teacher, shuffled, negatives, 0.1, log_z, 1000).mean()
    assert aligned_nce < shuffled_nce


def test_nce_loss_is_crds_critic_written_out():
    torch.manual_seed(0)
    anchor, positive, negatives = unit(8, 16), unit(8, 16), unit(8, 50, 16)
    log_z, tau, n = torch.tensor(2.0), 0.2, 1000

    def h(a, s):  # CRD: P / (P + K/N), P = exp(a.s / tau) / Z
        p = torch.exp((a * s).sum(-1).double() / tau) / log_z.double().exp()
        return p / (p + 50 / n)

    expected = -(
        torch.log(h(anchor, positive)) + torch.log(1 - h(anchor[:, None], negatives)).sum(1)
    )
    actual = nce_loss(anchor, positive, negatives, tau, log_z, n)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [4, 200])  # gathered rows / scores against the whole bank
def test_bank_similarities_are_the_dot_products_with_the_sampled_rows(count):
    anchor, bank = unit(8, 16), unit(300, 16)
    rows = torch.randint(0, 300, (8, count))
    expected = torch.einsum("bk,bnk->bn", anchor, bank[rows])
    torch.testing.assert_close(bank_similarities(anchor, bank, rows), expected)


def test_memory_bank_contrast_prefers_aligned_pairs():
    labels = torch.arange(500) % 10
    index = torch.arange(64)
    teacher = unit(64, 16)
    aligned = F.normalize(teacher + 0.1 * torch.randn(64, 16), dim=1)
    losses = {}
    for name, student in (("aligned", aligned), ("shuffled", aligned[torch.randperm(64)])):
        torch.manual_seed(0)
        contrast = MemoryBankContrast(
            labels, 16, count=100, temperature=0.1, momentum=0.5, class_aware=True
        )
        losses[name] = contrast(teacher, student, index).mean()
    assert losses["aligned"] < losses["shuffled"]


class RepDistillerCRD:
    """RepDistiller's `ContrastMemory.forward` (crd/memory.py) and `ContrastLoss`
    (crd/criterion.py), re-typed for the CPU; `v1` the student's embeddings, `v2` the
    teacher's, `contrast_idx[:, 0]` the sample itself (the memory positive)."""

    def __init__(self, memory_student, memory_teacher, temperature, momentum):
        self.memory_v1, self.memory_v2 = memory_student.clone(), memory_teacher.clone()
        self.T, self.momentum = temperature, momentum
        self.Z_v1 = self.Z_v2 = -1.0

    def memory_forward(self, v1, v2, y, idx):
        batch, k_plus_1 = idx.shape
        size, dim = self.memory_v1.shape
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
        weight_v1 = weight_v1.view(batch, k_plus_1, dim)
        out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(batch, dim, 1)), self.T))
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
        weight_v2 = weight_v2.view(batch, k_plus_1, dim)
        out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(batch, dim, 1)), self.T))
        if self.Z_v1 < 0:
            self.Z_v1 = (out_v1.mean() * size).item()
        if self.Z_v2 < 0:
            self.Z_v2 = (out_v2.mean() * size).item()
        out_v1, out_v2 = out_v1 / self.Z_v1, out_v2 / self.Z_v2
        with torch.no_grad():
            for name, v in (("memory_v1", v1), ("memory_v2", v2)):
                memory = getattr(self, name)
                l_pos = torch.index_select(memory, 0, y.view(-1))
                l_pos.mul_(self.momentum)
                l_pos.add_(torch.mul(v, 1 - self.momentum))
                l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
                memory.index_copy_(0, y, l_pos.div(l_norm))
        return out_v1, out_v2

    @staticmethod
    def contrast_loss(x, n_data, eps=1e-7):
        bsz, m = x.shape[0], x.size(1) - 1
        Pn = 1 / float(n_data)
        P_pos = x.select(1, 0)
        log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
        P_neg = x.narrow(1, 1, m)
        log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
        return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz

    def loss(self, student, teacher, index, contrast_idx):
        out_s, out_t = self.memory_forward(student, teacher, index, contrast_idx)
        n_data = self.memory_v1.shape[0]
        return self.contrast_loss(out_s, n_data) + self.contrast_loss(out_t, n_data)


def test_memory_positive_is_repdistillers_crd_in_value_gradient_and_memory():
    """Two steps (the second with `Z` fixed by the first and the banks updated) against
    RepDistiller's code on the same embeddings, banks and negative indices."""
    torch.manual_seed(0)
    labels, count, tau, momentum = torch.arange(400) % 10, 64, 0.07, 0.5
    ours = MemoryBankContrast(labels, 16, count, tau, momentum, True, positive="memory")
    reference = RepDistillerCRD(ours.bank.student, ours.bank.teacher, tau, momentum)
    for step in range(2):
        index = torch.randperm(400)[:32]
        teacher, student = unit(32, 16).requires_grad_(), unit(32, 16).requires_grad_()
        state = torch.get_rng_state()
        rows = ours.bank.sample(index, count)
        torch.set_rng_state(state)  # ours draws the same rows again
        loss = ours(teacher, student, index).mean()
        grads = torch.autograd.grad(loss, (teacher, student))
        teacher_ref = teacher.detach().clone().requires_grad_()
        student_ref = student.detach().clone().requires_grad_()
        contrast_idx = torch.cat([index[:, None], rows], 1)
        expected = reference.loss(student_ref, teacher_ref, index, contrast_idx)
        expected_grads = torch.autograd.grad(expected.sum(), (teacher_ref, student_ref))
        torch.testing.assert_close(loss, expected.squeeze(), rtol=1e-5, atol=1e-5)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.bank.student, reference.memory_v1)
        torch.testing.assert_close(ours.bank.teacher, reference.memory_v2)
        assert step == 1 or math.isclose(
            ours.log_normaliser[0].exp().item(), reference.Z_v2, rel_tol=1e-5
        )


def test_current_positive_is_not_crds_loss():
    """The spec's reading (`current`) scores `t_i . s_i` in both directions: another loss."""
    torch.manual_seed(0)
    labels, index = torch.arange(400) % 10, torch.arange(32)
    teacher, student = unit(32, 16), unit(32, 16)
    losses = {}
    for positive in ("current", "memory"):
        torch.manual_seed(1)
        contrast = MemoryBankContrast(labels, 16, 64, 0.07, 0.5, True, positive=positive)
        losses[positive] = contrast(teacher, student, index).mean().item()
    assert abs(losses["current"] - losses["memory"]) > 0.1, losses


def test_memory_bank_rows_stay_unit_norm_and_update_at_the_given_rows():
    bank = MemoryBank(torch.arange(200) % 10, dim=16, momentum=0.5)
    assert torch.allclose(bank.teacher.norm(dim=1), torch.ones(200), atol=1e-5)
    before_teacher, before_student = bank.teacher.clone(), bank.student.clone()
    index = torch.tensor([3, 17, 150])
    new_teacher, new_student = unit(3, 16), unit(3, 16)
    bank.update(index, new_teacher, new_student)
    for bank_rows, before, new in (
        (bank.teacher, before_teacher, new_teacher),
        (bank.student, before_student, new_student),
    ):
        others = torch.ones(200, dtype=torch.bool)
        others[index] = False
        assert torch.equal(bank_rows[others], before[others])
        expected = F.normalize(0.5 * before[index] + 0.5 * new, dim=1)
        assert torch.allclose(bank_rows[index], expected, atol=1e-6)
        assert torch.allclose(bank_rows.norm(dim=1), torch.ones(200), atol=1e-5)


def test_class_aware_negatives_come_from_other_classes_and_cover_them():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    bank = MemoryBank(labels, dim=4, class_aware=True)
    index = torch.tensor([0, 60, 90])
    rows = bank.sample(index, 2000)
    for anchor, drawn in zip(index, rows, strict=True):
        assert (labels[drawn] != labels[anchor]).all()
        assert len(drawn.unique()) == 100 - (labels == labels[anchor]).sum()
    plain = MemoryBank(labels, dim=4, class_aware=False).sample(index, 2000)
    assert all((drawn != anchor).all() for anchor, drawn in zip(index, plain, strict=True))


def test_negative_count_never_exceeds_the_samples_available():
    contrast = MemoryBankContrast(
        torch.arange(100) % 10, 8, count=4096, temperature=0.1, momentum=0.5, class_aware=True
    )
    assert contrast.count == 90


def test_in_batch_contrast_is_symmetric():
    teacher, student = unit(16, 8), unit(16, 8)
    forward = InBatchContrast(0.2)(teacher, student, torch.arange(16))
    backward = InBatchContrast(0.2)(student, teacher, torch.arange(16))
    assert torch.allclose(forward, backward, atol=1e-5)


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["memory_bank", "in_batch"])
@pytest.mark.parametrize("anchor", ["clean", "adversarial"])
def test_teacher_gets_no_gradient_and_every_student_and_head_parameter_does(
    digits, robust_teacher_path, source, anchor
):
    config = digits_config(
        **{
            "teacher.checkpoint": str(robust_teacher_path),
            "negatives.source": source,
            "anchor": anchor,
            "lambda_kd": 1.0,
        }
    )
    teacher = load_teacher(config.teacher, digits.spec)
    student = build_classifier(config.student, digits.spec)
    method = GACD(config, student, teacher, digits.train.labels)
    batch = next(batches(digits.train, 32, torch.device("cpu")))
    terms = method(batch)
    assert set(terms) == {"loss", "ce", "contrastive", "kd"}
    terms["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training
    trained = dict(method.named_parameters())
    assert not any(name.startswith("teacher.") for name in trained)
    for name, parameter in trained.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_a_zero_weight_turns_its_term_off(digits, robust_teacher_path):
    config = digits_config(
        **{"teacher.checkpoint": str(robust_teacher_path), "beta": 0.0, "lambda_kd": 0.0}
    )
    teacher = load_teacher(config.teacher, digits.spec)
    method = GACD(
        config, build_classifier(config.student, digits.spec), teacher, digits.train.labels
    )
    terms = method(next(batches(digits.train, 32, torch.device("cpu"))))
    assert terms["contrastive"] > 0
    assert torch.equal(terms["loss"], terms["ce"])
