"""The baselines: each pinned by a property that defines it, and each one trains."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gacd.config import Config, ConfigError
from gacd.data import Batch, batches
from gacd.methods import ARD, CRD, RSLAD, TRADES, KnowledgeDistillation, Natural
from gacd.models import build_classifier
from gacd.teacher import load_teacher
from gacd.train import fit
from tests.conftest import digits_config

CPU = torch.device("cpu")


def first_batch(split, size=48) -> Batch:
    return next(batches(split, size, CPU))


def shuffled_labels(batch: Batch) -> Batch:
    labels = batch.y[torch.randperm(len(batch.y), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(labels, batch.y)
    return Batch(batch.x, labels, batch.index)


METHODS_BY_CLASS = {
    Natural: "natural",
    TRADES: "trades",
    KnowledgeDistillation: "kd",
    CRD: "crd",
    ARD: "ard",
    RSLAD: "rslad",
}


def build(method_class, digits, teacher_path=None, **overrides):
    """A method with a fresh student (seeded), and the robust digits teacher when given."""
    if teacher_path is not None:
        overrides["teacher.checkpoint"] = str(teacher_path)
    config = digits_config(method=METHODS_BY_CLASS[method_class], **overrides)
    teacher = load_teacher(config.teacher, digits.spec) if teacher_path is not None else None
    torch.manual_seed(0)
    student = build_classifier(config.student, digits.spec)
    return method_class(config, student, teacher, digits.train.labels)


def record_inputs(method):
    """Every input the student's first layer sees, with the student's mode at that moment."""
    seen = []
    method.student.normalize.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].detach().clone(), method.student.training))
    )
    return seen


# --- defaults -----------------------------------------------------------------------------------


def test_each_baseline_gets_its_papers_defaults_and_keeps_them_overridable():
    def config(method, **overrides):
        return Config.from_dict({"method": method, "teacher.checkpoint": "t.pt", **overrides})

    kd, crd, ard, rslad = (config(name) for name in ("kd", "crd", "ard", "rslad"))
    assert (kd.kd.temperature, kd.kd.gamma, kd.kd.alpha) == (4.0, 0.1, 0.9)
    assert (crd.crd.tau, crd.crd.count, crd.crd.momentum, crd.crd.beta) == (0.07, 16384, 0.5, 0.8)
    assert (ard.ard.temperature, ard.ard.alpha, ard.attack.objective) == (30.0, 1.0, "ce")
    assert ard.attack.student_mode == "train"
    assert rslad.attack.objective == "kl" and rslad.attack.start == "gaussian"
    assert rslad.attack.student_mode == "eval" and rslad.attack.temperature == 1.0
    assert rslad.rslad.adversarial_weight == pytest.approx(5 / 6)
    assert rslad.rslad.kl_reduction == ard.ard.kl_reduction == "element_mean"
    overridden = config("ard", **{"ard.temperature": 10, "attack.student_mode": "eval"})
    assert overridden.ard.temperature == 10.0 and overridden.attack.student_mode == "eval"
    assert config("gacd").attack.student_mode == "eval"
    assert not KnowledgeDistillation.adversarial and not CRD.adversarial
    assert config("kd", **{"attack.steps": 0}).method == "kd"  # no attack, no budget needed
    assert all(m.uses_teacher for m in (KnowledgeDistillation, CRD, ARD, RSLAD))
    assert Config.from_dict(overridden.to_dict()) == overridden


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"method": "kd"}, "teacher.checkpoint"),
        ({"method": "rslad"}, "teacher.checkpoint"),
        (
            {"method": "ard", "teacher.checkpoint": "t.pt", "attack.objective": "contrastive"},
            "attack.objective",
        ),
        ({"method": "ard", "teacher.checkpoint": "t.pt", "ard.alpha": 1.5}, "ard.alpha"),
        ({"method": "kd", "teacher.checkpoint": "t.pt", "kd.temperature": 0}, "kd.temperature"),
        ({"method": "rslad", "teacher.checkpoint": "t.pt", "rslad.scale": -1}, "rslad.scale"),
        (
            {"method": "rslad", "teacher.checkpoint": "t.pt", "rslad.kl_reduction": "sum"},
            "rslad.kl_reduction",
        ),
        ({"method": "crd", "teacher.checkpoint": "t.pt", "crd.count": 0}, "crd.count"),
    ],
)
def test_bad_baseline_settings_name_the_key(values, key):
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(values)
    assert caught.value.key == key


# --- defining properties ------------------------------------------------------------------------


def test_trades_with_beta_zero_is_natural_training(digits):
    batch = first_batch(digits.train)
    natural = build(Natural, digits)
    trades = build(TRADES, digits, trades_beta=0.0)
    trades.student.load_state_dict(natural.student.state_dict())
    assert torch.allclose(trades(batch)["loss"], natural(batch)["loss"])


def test_kd_with_alpha_zero_is_gamma_times_cross_entropy(digits, robust_teacher_path):
    batch = first_batch(digits.train)
    method = build(KnowledgeDistillation, digits, robust_teacher_path, **{"kd.alpha": 0.0})
    seen = record_inputs(method)
    terms = method(batch)
    assert terms["kd"] > 0
    ce = F.cross_entropy(method.student(batch.x), batch.y)
    assert torch.allclose(terms["loss"], 0.1 * ce)
    assert all(torch.equal(x, batch.x) for x, _ in seen), "KD trains on clean inputs only"


def test_crd_makes_no_attack_and_prefers_aligned_embeddings(digits, robust_teacher_path):
    batch = first_batch(digits.train)
    method = build(CRD, digits, robust_teacher_path)
    seen = record_inputs(method)
    terms = method(batch)
    assert set(terms) == {"loss", "ce", "contrastive"}
    assert seen and all(torch.equal(x, batch.x) for x, _ in seen), "CRD saw an attacked input"
    assert method.contrast.count == method.contrast.bank.max_negatives()  # 16384, capped
    teacher = F.normalize(torch.randn(48, 128), dim=1)
    aligned = F.normalize(teacher + 0.1 * torch.randn(48, 128), dim=1)
    losses = {}
    for name, student in (("aligned", aligned), ("shuffled", aligned[torch.randperm(48)])):
        contrast = copy.deepcopy(build(CRD, digits, robust_teacher_path).contrast)
        torch.manual_seed(0)
        losses[name] = contrast(teacher, student, batch.index).mean()
    assert losses["aligned"] < losses["shuffled"]


def test_ard_attacks_student_cross_entropy_in_train_mode(digits, robust_teacher_path):
    batch = first_batch(digits.train)
    method = build(ARD, digits, robust_teacher_path)
    method.eval()  # the attack itself must put the student in train mode
    seen = record_inputs(method)
    terms = method(batch)
    steps = method.config.attack.steps
    assert all(training for _, training in seen[:steps]), "ARD attacks in train mode"
    x_adv = seen[steps][0]  # the input of the KL term, right after the attack
    assert torch.equal(seen[steps + 1][0], batch.x)  # the CE term sees clean inputs
    assert 0 < (x_adv - batch.x).abs().max() <= method.config.attack.epsilon + 1e-6
    method.student.train()
    with torch.no_grad():
        clean = F.cross_entropy(method.student(batch.x), batch.y)
        adversarial = F.cross_entropy(method.student(x_adv), batch.y)
    assert adversarial > clean + 0.1
    assert torch.isfinite(terms["loss"]) and terms["kd"] > 0


def test_ard_with_alpha_one_uses_no_labels_beyond_its_attack(digits, robust_teacher_path):
    batch = first_batch(digits.train)
    method = build(ARD, digits, robust_teacher_path)
    teacher_logits = method.teacher.logits(batch.x)
    x_adv = batch.x.flip(0)
    loss = method.loss_terms(batch, x_adv, teacher_logits)["loss"]
    assert torch.allclose(
        loss, method.loss_terms(shuffled_labels(batch), x_adv, teacher_logits)["loss"]
    )
    method.config.ard.alpha = 0.5
    half = method.loss_terms(batch, x_adv, teacher_logits)["loss"]
    assert not torch.allclose(
        half, method.loss_terms(shuffled_labels(batch), x_adv, teacher_logits)["loss"]
    )


def test_rslad_uses_no_hard_labels_and_attacks_in_eval_mode(digits, robust_teacher_path):
    batch = first_batch(digits.train)
    method = build(RSLAD, digits, robust_teacher_path)
    losses = []
    for variant in (batch, shuffled_labels(batch)):
        fresh = copy.deepcopy(method)  # the same weights and batch-norm statistics each time
        seen = record_inputs(fresh)
        torch.manual_seed(0)
        losses.append(fresh(variant)["loss"])
    assert torch.equal(losses[0], losses[1])
    attack_calls = seen[: method.config.attack.steps]
    assert not any(training for _, training in attack_calls), "RSLAD attacks in eval mode"


def test_kl_reductions_differ_by_the_number_of_classes(digits, robust_teacher_path):
    batch = first_batch(digits.train)
    element = build(RSLAD, digits, robust_teacher_path)
    batch_mean = build(RSLAD, digits, robust_teacher_path, **{"rslad.kl_reduction": "batch_mean"})
    teacher_logits = element.teacher.logits(batch.x)
    terms = [m.loss_terms(batch.x, batch.x, teacher_logits) for m in (element, batch_mean)]
    assert torch.allclose(terms[0]["loss"] * 10, terms[1]["loss"])
    scaled = build(RSLAD, digits, robust_teacher_path, **{"rslad.scale": 10.0})
    assert torch.allclose(
        scaled.loss_terms(batch.x, batch.x, teacher_logits)["loss"], terms[0]["loss"] * 10
    )


# --- training -----------------------------------------------------------------------------------


@pytest.mark.slow
# ARD's and RSLAD's element-mean KL (their code's) gives small gradients: they learn slowly.
@pytest.mark.parametrize(("method", "epochs"), [("kd", 4), ("crd", 4), ("ard", 12), ("rslad", 8)])
def test_each_baseline_trains_and_its_loss_goes_down(digits, robust_teacher_path, method, epochs):
    config = digits_config(
        method=method,
        **{
            "teacher.checkpoint": str(robust_teacher_path),
            "optim.epochs": epochs,
            "optim.lr": 0.1,
            "eval.max_samples": 128,
        },
    )
    result = fit(config, data=digits)
    losses = [epoch["train/loss"] for epoch in result.history]
    assert losses[-1] < 0.95 * losses[0], losses
    assert result.metrics["val/clean_acc"] > 0.4, result.metrics  # chance: 0.1
