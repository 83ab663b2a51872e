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
from gacd.reweight import guided_weights
from gacd.teacher import build_classifier, load_teacher
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
