import pytest
import torch

from gacd import attacks
from gacd.evaluate import accuracy, attack_suite, robustness_metrics
from gacd.models import build_model
from tests.conftest import DIGITS_EPSILON, digits_config

EPSILON = DIGITS_EPSILON
BUDGET = attacks.Budget(EPSILON, EPSILON / 4, 10)


def first_batch(split, count=128):
    return split.images[:count].float() / 255, split.labels[:count]


def assert_in_budget(x_adv, x, epsilon):
    assert (x_adv - x).abs().max() <= epsilon + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def all_attacks(model, x, y):
    with torch.no_grad():
        logits = model(x)
    head = torch.nn.Linear(model.feature_dim, 8)
    anchor = torch.nn.functional.normalize(torch.randn(len(x), 8), dim=1)
    objectives = {
        "ce": attacks.cross_entropy_objective(y),
        "kl": attacks.kl_objective(logits + torch.randn_like(logits), temperature=4.0),
        "contrastive": attacks.contrastive_objective(head, anchor),
        "cw": attacks.cw_margin_objective(y),
    }
    results = {
        name: attacks.pgd(model, x, BUDGET, objective) for name, objective in objectives.items()
    }
    results["gaussian_start"] = attacks.pgd(
        model, x, attacks.Budget(EPSILON, EPSILON / 4, 3, "gaussian"), objectives["ce"]
    )
    results["fgsm"] = attacks.fgsm(model, x, y, EPSILON)
    results["cw_inf"] = attacks.cw_inf(model, x, y, EPSILON, EPSILON / 4, steps=5)
    return results


def test_every_attack_stays_in_its_ball_and_the_pixel_range(digits):
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=None, std=None, width=8)
    x, y = first_batch(digits.train)
    for name, x_adv in all_attacks(model, x, y).items():
        assert x_adv.shape == x.shape, name
        assert_in_budget(x_adv, x, EPSILON)
        assert not x_adv.requires_grad, name


@pytest.mark.parametrize("mode", [True, False])
def test_attacks_restore_the_mode_and_touch_no_parameter_gradient(digits, mode):
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=None, std=None, width=8)
    model.train(mode)
    x, y = first_batch(digits.train, 16)
    for attack_mode in ("eval", "train"):
        attacks.pgd(model, x, BUDGET, attacks.cross_entropy_objective(y), mode=attack_mode)
        assert model.training is mode
    attacks.fgsm(model, x, y, EPSILON)
    assert model.training is mode
    assert all(p.grad is None for p in model.parameters())


def test_mode_is_restored_when_the_objective_raises(digits):
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=None, std=None, width=8)
    model.train()

    def broken(model, x_adv):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        attacks.pgd(model, first_batch(digits.train, 4)[0], BUDGET, broken)
    assert model.training


def test_eval_mode_attack_leaves_batch_norm_statistics_alone(digits):
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=None, std=None, width=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x, y = first_batch(digits.train, 32)
    attacks.pgd(model, x, BUDGET, attacks.cross_entropy_objective(y), mode="eval")
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    attacks.pgd(model, x, BUDGET, attacks.cross_entropy_objective(y), mode="train")
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_attacks_lower_accuracy_and_pgd_is_stronger_than_fgsm(digits, natural_model):
    config = digits_config(method="natural")
    results = robustness_metrics(natural_model, digits.test, config.eval, 512, torch.device("cpu"))
    assert results["test/clean_acc"] > 0.9
    assert results["test/fgsm_acc"] < results["test/clean_acc"] - 0.1
    assert results["test/pgd_acc"] <= results["test/fgsm_acc"]
    assert results["test/cw_acc"] < results["test/clean_acc"] - 0.1


def test_budget_zero_changes_nothing(digits, natural_model):
    x, y = first_batch(digits.test, 64)
    x_adv = attacks.pgd(
        natural_model, x, attacks.Budget(0.0, 0.01, 5), attacks.cross_entropy_objective(y)
    )
    assert torch.equal(x_adv, x)


def reference_cw_loss(output, target, confidence=50.0, num_classes=10):
    """The robustness literature's CW-inf loss (RSLAD's and MART's `cwloss`), re-typed."""
    target_onehot = torch.zeros(target.size() + (num_classes,))
    target_onehot.scatter_(1, target.unsqueeze(1), 1.0)
    real = (target_onehot * output).sum(1)
    other = ((1.0 - target_onehot) * output - target_onehot * 10000.0).max(1)[0]
    loss = -torch.clamp(real - other + confidence, min=0.0)
    return loss.sum()


class Scaled(torch.nn.Module):
    """A model made overconfident: its logits times `factor` (same predictions)."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


@pytest.mark.parametrize("factor", [1.0, 200.0])
def test_cw_objective_matches_the_literatures_cw_loss_in_value_and_gradient(
    digits, natural_model, factor
):
    x, y = first_batch(digits.test, 64)
    model = Scaled(natural_model.eval(), factor)
    kappa = 50.0
    x_ours = x.clone().requires_grad_(True)
    ours = attacks.cw_margin_objective(y, kappa)(model, x_ours).sum()
    (grad_ours,) = torch.autograd.grad(ours, x_ours)
    x_ref = x.clone().requires_grad_(True)
    reference = reference_cw_loss(model(x_ref), y, kappa)
    (grad_ref,) = torch.autograd.grad(reference, x_ref)
    # Ours is min(margin, kappa); theirs min(margin, kappa) - kappa: the same up to a constant.
    assert torch.allclose(ours - len(y) * kappa, reference, rtol=1e-5, atol=1e-3)
    assert torch.allclose(grad_ours, grad_ref, rtol=1e-5, atol=1e-6)
    assert grad_ours.abs().sum() > 0


def test_cw_inf_is_as_strong_on_an_overconfident_model(digits, natural_model):
    """Scaling the logits changes no prediction, so it must not change CW-inf's accuracy; a
    margin clamped from below at -kappa has no gradient where the true class leads by more."""
    config = digits_config(method="natural", **{"eval.fgsm": False}).eval
    device = torch.device("cpu")
    cw = attack_suite(config)["cw"]
    plain = accuracy(natural_model, digits.test, cw, 512, device)
    confident = accuracy(Scaled(natural_model, 200.0), digits.test, cw, 512, device)
    clean = accuracy(natural_model, digits.test, None, 512, device)
    assert confident <= plain + 0.02, (plain, confident)
    assert confident < clean - 0.3, (clean, confident)


def test_autoattack_names_the_targets_of_a_model_with_fewer_than_ten_classes():
    assert attacks.autoattack_version(10) == "standard"
    assert attacks.autoattack_version(100) == "standard"
    assert attacks.autoattack_version(5) == "standard with 4 target classes (5-class model)"
    assert "APGD-T left out" in attacks.autoattack_version(3)


@pytest.mark.slow
def test_autoattack_runs_on_a_five_class_model_and_is_at_least_as_strong_as_pgd20():
    """APGD-T with the standard 9 targets fails with an IndexError on a 5-class model as soon
    as one point survives APGD-CE: a robust model makes sure some do."""
    pytest.importorskip("pyautoattack")
    from gacd.data import load_datasets
    from gacd.schema import TAG_AUTOATTACK
    from gacd.train import fit
    from study.tracking import evaluation_tags

    overrides = {"data.classes": [0, 1, 2, 3, 4], "optim.epochs": 8, "eval.max_samples": 96}
    config = digits_config(method="pgd_at", **overrides, **{"eval.autoattack": True})
    data = load_datasets(config.data, config.seed, with_test=True)
    model = fit(config, data=data).method.student
    suite = attack_suite(config.eval)
    device = torch.device("cpu")
    auto = accuracy(model, data.test, suite["autoattack"], 96, device, limit=96)
    pgd = accuracy(model, data.test, suite["pgd"], 96, device, limit=96)
    assert 0 < auto <= pgd + 1e-9, (auto, pgd)
    final = digits_config(method="pgd_at", final=True, **overrides, **{"eval.autoattack": True})
    assert evaluation_tags(final) == {TAG_AUTOATTACK: attacks.autoattack_version(5)}


@pytest.mark.slow
def test_autoattack_is_at_least_as_strong_as_pgd(digits, natural_model):
    pytest.importorskip("pyautoattack")
    config = digits_config(method="natural", **{"eval.max_samples": 64, "eval.autoattack": True})
    suite = attack_suite(config.eval)
    assert "autoattack" in suite
    x, _ = first_batch(digits.test, 64)
    device = torch.device("cpu")
    attacked: list[torch.Tensor] = []  # one AutoAttack run (minutes on CPU) serves both checks
    auto = accuracy(natural_model, digits.test, suite["autoattack"], 64, device, 64, keep=attacked)
    assert_in_budget(torch.cat(attacked), x, EPSILON)
    pgd = accuracy(natural_model, digits.test, suite["pgd"], 64, device, limit=64)
    assert auto <= pgd + 1e-9
    # eval.autoattack_samples: AutoAttack on the first 24 of the 64 the other attacks see
    config.eval.autoattack_samples = 24
    metrics = robustness_metrics(natural_model, digits.test, config.eval, 64, device)
    first = accuracy(natural_model, digits.test, suite["autoattack"], 64, device, limit=24)
    assert metrics["test/autoattack_acc"] == first
    assert metrics["test/pgd_acc"] == pgd and metrics["test/clean_acc"] > first


def test_evaluation_is_reproducible_and_leaves_the_random_state_alone(digits, natural_model):
    config = digits_config(method="natural", **{"eval.fgsm": False, "eval.cw": False})
    device = torch.device("cpu")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = robustness_metrics(natural_model, digits.test, config.eval, 64, device, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert robustness_metrics(natural_model, digits.test, config.eval, 64, device, seed=1) == first
