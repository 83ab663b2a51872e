"""The speed switches change how the arithmetic runs, never what it computes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gacd.contrastive import MemoryBankContrast
from gacd.data import load_datasets
from gacd.models import build_classifier
from gacd.teacher import load_teacher
from gacd.train import fit
from tests.conftest import digits_config


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_memory_bank_normaliser_is_fixed_by_the_first_batch_and_kept_through_a_state_dict():
    torch.manual_seed(0)
    labels = torch.arange(200) % 10
    contrast = MemoryBankContrast(labels, 16, 64, 0.1, 0.5, True)
    index = torch.arange(32)
    contrast(unit(32, 16), unit(32, 16), index)
    first = contrast.log_normaliser.clone()
    assert torch.isfinite(first).all()
    contrast(unit(32, 16) * 0 + unit(1, 16), unit(32, 16), index)  # a very different batch
    assert torch.equal(contrast.log_normaliser, first)

    restored = MemoryBankContrast(labels, 16, 64, 0.1, 0.5, True)
    restored.load_state_dict(contrast.state_dict())
    assert not restored.normaliser_fixed  # re-read from the loaded buffer, not assumed
    restored(unit(32, 16), unit(32, 16), index)
    assert torch.equal(restored.log_normaliser, first)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_channels_last_computes_the_same_logits_and_gradients(arch):
    torch.manual_seed(0)
    spec = load_datasets(digits_config(method="natural").data, seed=0).spec
    contiguous = build_classifier(
        digits_config(method="natural", **{"student.arch": arch}).student, spec
    )
    channels_last = copy.deepcopy(contiguous).set_memory_format(torch.channels_last)
    weights = [p for p in channels_last.parameters() if p.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    x = torch.rand(16, 1, 8, 8)
    results = []
    for model in (contiguous, channels_last):
        x_in = x.clone().requires_grad_(True)
        logits = model(x_in)
        (input_grad,) = torch.autograd.grad(logits.logsumexp(1).sum(), x_in, retain_graph=True)
        logits.sum().backward()
        results.append((logits, input_grad, [p.grad for p in model.parameters()]))
    (logits_a, input_a, grads_a), (logits_b, input_b, grads_b) = results
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
    # Summation order differs between the layouts: equal up to float32 rounding of the sums.
    for grad_a, grad_b in zip([input_a, *grads_a], [input_b, *grads_b], strict=True):
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-3, atol=1e-4 * grad_a.abs().max())


def test_a_channels_last_run_trains_like_a_contiguous_one(digits, robust_teacher_path):
    def run(layout):
        config = digits_config(
            **{
                "teacher.checkpoint": str(robust_teacher_path),
                "memory_format": layout,
                "optim.epochs": 1,
                "data.train_subset": 512,
                "eval.max_samples": 64,
            }
        )
        return fit(config, data=digits).history[0]

    contiguous, channels_last = run("contiguous"), run("channels_last")
    # PGD's sign steps turn last-bit differences into a few flipped pixels: close, not equal.
    assert channels_last["train/loss"] == pytest.approx(contiguous["train/loss"], rel=1e-2)


def test_the_teacher_runs_without_autograd_and_hands_out_ordinary_tensors(
    digits, robust_teacher_path
):
    config = digits_config(**{"teacher.checkpoint": str(robust_teacher_path)})
    teacher = load_teacher(config.teacher, digits.spec)
    x = torch.rand(4, 1, 8, 8)
    features = teacher.features(x)
    assert not features.is_inference() and not features.requires_grad
    head = torch.nn.Linear(teacher.feature_dim, 3)
    head(features).sum().backward()  # a trainable head can take them
    assert head.weight.grad is not None
    assert all(p.grad is None for p in teacher.model.parameters())
    torch.testing.assert_close(teacher.head(features), teacher.logits(x))


@pytest.mark.slow
def test_compiled_features_match_eager_and_a_deep_copy_runs_its_own_weights():
    torch.manual_seed(0)
    spec = load_datasets(digits_config(method="natural").data, seed=0).spec
    model = build_classifier(digits_config(method="natural").student, spec).eval()
    x = torch.rand(16, 1, 8, 8)
    eager = model(x)
    model.compile_features()
    torch.testing.assert_close(model(x), eager, rtol=1e-4, atol=1e-5)

    copied = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.add_(0.1)
    expected = copied.forward_head(copied.eager_features(x))
    torch.testing.assert_close(copied(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x), eager, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_features_give_the_attack_its_input_gradients_in_train_mode():
    torch.manual_seed(0)
    spec = load_datasets(digits_config(method="natural").data, seed=0).spec
    eager = build_classifier(digits_config(method="natural").student, spec).train()
    compiled = copy.deepcopy(eager).compile_features()
    x = torch.rand(16, 1, 8, 8)
    grads = []
    for model in (eager, compiled):
        x_in = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x_in).logsumexp(1).sum(), x_in)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4 * grads[0].abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_step_never_makes_the_host_wait_for_the_gpu():
    from dataclasses import replace

    from bench.step import CASES, build
    from gacd.data import augment

    setup = build(replace(CASES["digits_cnn_cpu"], device="cuda"), torch.device("cuda"))
    setup.step()  # the first step fixes the memory bank's normaliser (one read, once)
    generator = torch.Generator().manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            setup.batch.x = augment(setup.batch.x, setup.data.spec, generator)
            setup.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_path_trains_like_the_cpu_path_with_every_speed_switch(
    digits, robust_teacher_path
):
    def history(**values):
        values = {"teacher.checkpoint": str(robust_teacher_path), "optim.epochs": 3, **values}
        return fit(digits_config(**values), data=digits).history

    cpu = history(device="cpu")
    cuda = history(device="cuda")
    fast = history(device="cuda", precision="bf16", compile=True)
    assert cuda[-1]["train/loss"] == pytest.approx(cpu[-1]["train/loss"], rel=0.05)
    assert fast[-1]["train/loss"] == pytest.approx(cpu[-1]["train/loss"], rel=0.1)
    assert abs(fast[-1]["val/clean_acc"] - cpu[-1]["val/clean_acc"]) < 0.1
