"""The training loop: resuming, failing loudly, checkpoints and teachers."""

import json
import math
import pickle

import pytest
import torch

from gacd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gacd.config import Config
from gacd.teacher import load_teacher
from gacd.train import NonFiniteLossError, fit, main
from tests.conftest import digits_config


def small_gacd(teacher_path, **overrides):
    return digits_config(
        **{
            "teacher.checkpoint": str(teacher_path),
            "optim.epochs": 4,
            "data.train_subset": 512,
            "eval.max_samples": 64,
            **overrides,
        }
    )


@pytest.mark.parametrize("source", ["memory_bank", "in_batch"])
def test_resuming_mid_run_gives_the_same_weights_as_an_uninterrupted_run(
    digits, robust_teacher_path, source
):
    config = small_gacd(robust_teacher_path, **{"negatives.source": source})
    states = []
    uninterrupted = fit(
        config,
        data=digits,
        report=lambda metrics, state: states.append(pickle.loads(pickle.dumps(state))),
    )
    resumed = fit(config, data=digits, resume=states[1])
    for name, value in uninterrupted.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[name]), name
    assert resumed.history == uninterrupted.history[:2] + resumed.history[2:]
    assert [h["train/loss"] for h in resumed.history] == [
        h["train/loss"] for h in uninterrupted.history
    ]


def test_checkpoint_holds_what_a_resume_needs(digits, robust_teacher_path, tmp_path):
    config = small_gacd(
        robust_teacher_path, **{"optim.epochs": 1, "negatives.source": "memory_bank"}
    )
    result = fit(config, data=digits)
    path = save_checkpoint(result.state, tmp_path / "checkpoint.pt")
    state = load_checkpoint(path)
    assert {
        "student",
        "task",
        "optimizer",
        "scheduler",
        "rng",
        "epoch",
        "config",
        "history",
        "data_spec",
    } <= set(state)
    assert (
        "contrast.bank.teacher" in state["task"] and "student_head.linear.weight" in state["task"]
    )
    assert Config.from_dict(state["config"]) == config
    assert state["epoch"] == 1
    assert not any(path.parent.glob("*.tmp")), "temporary file left behind"


def test_resume_refuses_a_checkpoint_of_another_config(digits, robust_teacher_path):
    state = fit(small_gacd(robust_teacher_path, **{"optim.epochs": 1}), data=digits).state
    other = small_gacd(robust_teacher_path, **{"optim.epochs": 1, "tau": 0.5})
    with pytest.raises(CheckpointError, match="tau"):
        fit(other, data=digits, resume=state)


def test_a_non_finite_loss_stops_the_run_naming_epoch_and_step(digits):
    config = digits_config(method="natural", **{"optim.lr": 1e6, "optim.epochs": 3})
    with pytest.raises(NonFiniteLossError, match=r"epoch \d+, step \d+"):
        fit(config, data=digits)


def test_training_lowers_the_loss(digits):
    result = fit(digits_config(method="pgd_at", **{"optim.epochs": 3}), data=digits)
    losses = [epoch["train/loss"] for epoch in result.history]
    assert losses[-1] < losses[0]


def test_trades_trains(digits):
    result = fit(digits_config(method="trades", **{"optim.epochs": 2}), data=digits)
    assert {"train/loss/ce", "train/loss/kl"} <= set(result.metrics)
    assert result.metrics["val/clean_acc"] > 0.2


# --- teachers ------------------------------------------------------------------------------------


def test_teacher_loads_from_a_plain_data_parallel_state_dict(digits, robust_teacher_path, tmp_path):
    project = load_teacher(
        Config.from_dict(
            {"method": "natural", "teacher.checkpoint": str(robust_teacher_path)}
        ).teacher,
        digits.spec,
    )
    plain = {f"module.{k}": v for k, v in project.model.state_dict().items()}
    torch.save({"state_dict": plain}, tmp_path / "plain.pt")
    config = Config.from_dict(
        {
            "method": "natural",
            "teacher.checkpoint": str(tmp_path / "plain.pt"),
            "teacher.arch": "small_cnn",
            "teacher.width": 32,
        }
    )
    teacher = load_teacher(config.teacher, digits.spec)
    x = digits.test.images[:8].float() / 255
    assert torch.equal(teacher.head(teacher.features(x)), project.head(project.features(x)))
    assert not teacher.model.training


@pytest.mark.parametrize(
    ("write", "teacher", "fragment"),
    [
        (None, {}, "no such file"),
        (lambda p: p.write_bytes(b"not a torch file"), {}, "not a readable"),
        (
            lambda p: torch.save({"w": torch.ones(2), "obj": object()}, p),
            {"arch": "small_cnn"},
            "refused",
        ),
        (lambda p: torch.save({"w": torch.ones(2)}, p), {}, "set teacher.arch"),
        (
            lambda p: torch.save({"conv.weight": torch.ones(2)}, p),
            {"arch": "small_cnn"},
            "do not fit",
        ),
    ],
)
def test_bad_teacher_checkpoints_get_a_clear_error(digits, tmp_path, write, teacher, fragment):
    path = tmp_path / "teacher.pt"
    if write is not None:
        write(path)
    config = Config.from_dict(
        {
            "method": "natural",
            "teacher.checkpoint": str(path),
            **{f"teacher.{k}": v for k, v in teacher.items()},
        }
    )
    with pytest.raises(CheckpointError, match=fragment) as caught:
        load_teacher(config.teacher, digits.spec)
    assert str(path) in str(caught.value)


def test_project_teacher_of_another_architecture_is_refused(digits, robust_teacher_path):
    config = Config.from_dict(
        {
            "method": "natural",
            "teacher.checkpoint": str(robust_teacher_path),
            "teacher.arch": "resnet18",
        }
    )
    with pytest.raises(CheckpointError, match="holds a 'small_cnn' model"):
        load_teacher(config.teacher, digits.spec)


# --- command line ---------------------------------------------------------------------------------


def test_command_line_trains_resumes_and_reports(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "method: natural\ndevice: cpu\nstudent: {width: 8}\n"
        "data: {train_subset: 256}\noptim: {epochs: 1}\n"
        "eval: {max_samples: 64, val_steps: 2}\nattack: {epsilon: 0.1}\n"
    )
    out = tmp_path / "out"
    assert main([str(config_file), "--out", str(out)]) == 0
    assert (
        main(
            [
                str(config_file),
                "--out",
                str(out),
                "--set",
                "optim.epochs=2",
                "--resume",
                str(out / "checkpoint.pt"),
            ]
        )
        == 2
    )  # another config: refused
    assert (
        main(
            [str(config_file), "--out", str(out), "--set", "optim.epochs=1", "--set", "final=true"]
        )
        == 0
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "test/pgd_acc" in lines[-1] and "val/pgd_acc" in lines[0]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


BEST_VS_LAST = (  # natural training at a constant, high rate: its robust accuracy peaks early
    "method: natural\ndevice: cpu\nfinal: true\nstudent: {width: 8}\n"
    "data: {batch_size: 64, train_subset: 512}\n"
    "optim: {epochs: 4, lr: 0.2, schedule: constant}\nattack: {epsilon: 0.1, steps: 5}\n"
    "eval: {max_samples: 96, val_steps: 5, fgsm: false, cw: false, autoattack: false}\n"
)


def test_a_final_run_reports_its_last_and_its_best_validation_epoch(tmp_path):
    """`test/...` is the last epoch's student, `test_best/...` the student of the epoch with
    the best `val/pgd_acc` (never chosen on test), kept as `best.pt` beside the checkpoint."""
    from gacd import schema
    from gacd.evaluate import evaluate_checkpoint

    config_file = tmp_path / "run.yaml"
    config_file.write_text(BEST_VS_LAST)
    out = tmp_path / "out"
    assert main([str(config_file), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validation = [line[schema.VAL_PGD_ACC] for line in lines]
    best_epoch = 1 + validation.index(max(validation))
    last = lines[-1]
    assert last[schema.BEST_EPOCH] == best_epoch < 4, validation
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == best_epoch and best["selected_by"] == schema.VAL_PGD_ACC
    final = load_checkpoint(out / "checkpoint.pt")
    assert any(not torch.equal(best["student"][k], v) for k, v in final["student"].items())
    for path, name in (("checkpoint.pt", lambda key: key), ("best.pt", schema.best)):
        for key, value in evaluate_checkpoint(out / path).items():
            assert last[name(key)] == pytest.approx(value), (path, key)
    with pytest.raises(CheckpointError, match="best-epoch checkpoint"):
        fit(Config.from_dict(best["config"]), resume=best)


def test_a_resumed_final_run_keeps_its_best_epoch(tmp_path):
    import yaml

    config = Config.from_dict(yaml.safe_load(BEST_VS_LAST))
    states = []
    uninterrupted = fit(
        config, report=lambda _, state: states.append(pickle.loads(pickle.dumps(state)))
    )
    resumed = fit(config, resume=states[2])  # after epoch 3, the best: it must be remembered

    def untimed(epoch_metrics):
        return {k: v for k, v in epoch_metrics.items() if k != "time/epoch_s"}

    assert untimed(resumed.metrics) == untimed(uninterrupted.metrics)
    assert resumed.metrics["test_best/epoch"] == 3
    for key, value in uninterrupted.state["best"]["student"].items():
        assert torch.equal(value, resumed.state["best"]["student"][key]), key


def test_command_line_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("attack: {epsilon: -1}\n")
    assert main([str(bad)]) == 2
    assert "attack.epsilon" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad.write_text("attack: {epsilon: [\n")
    assert main([str(bad)]) == 2
    assert "line" in capsys.readouterr().err


def test_evaluate_command_scores_checkpoints(tmp_path, robust_teacher_path, capsys):
    from gacd.evaluate import main as evaluate

    assert evaluate([str(robust_teacher_path), "--set", "eval.max_samples=100"]) == 0
    table = capsys.readouterr().out
    assert "test/pgd_acc" in table and "test/cw_acc" in table and str(robust_teacher_path) in table
    assert evaluate([str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_robustbench_style_wide_resnet_loads_as_a_raw_pixel_teacher(digits, tmp_path):
    from gacd.models import build_model

    reference = build_model(
        "wide_resnet", num_classes=10, in_channels=1, mean=None, std=None, depth=10, width=2
    )
    torch.save(reference.state_dict(), tmp_path / "Carmon2019Unlabeled.pt")
    config = Config.from_dict(
        {
            "method": "natural",
            "teacher.checkpoint": str(tmp_path / "Carmon2019Unlabeled.pt"),
            "teacher.arch": "wide_resnet",
            "teacher.depth": 10,
            "teacher.width": 2,
            "teacher.normalize": False,
        }
    )
    teacher = load_teacher(config.teacher, digits.spec)
    x = digits.test.images[:4].float() / 255
    reference.eval()
    with torch.no_grad():
        assert torch.equal(teacher.head(teacher.features(x)), reference(x))
    assert torch.equal(teacher.model.normalize.std, torch.ones(1, 1, 1, 1))


def test_resuming_a_finished_run_trains_nothing_and_returns_its_state(digits):
    config = digits_config(method="natural", **{"optim.epochs": 1, "data.train_subset": 256})
    finished = fit(config, data=digits)
    again = fit(config, data=digits, resume=finished.state)
    assert again.history == finished.history and again.state["epoch"] == 1


def test_the_deferred_finite_check_names_the_same_step_as_a_check_every_step(digits, monkeypatch):
    """Non-finite losses are looked for every few steps (one GPU sync for many); the error must
    still name the first step that went wrong."""
    import gacd.train

    config = digits_config(method="natural", **{"optim.lr": 1e6, "optim.epochs": 3})
    with pytest.raises(NonFiniteLossError) as deferred:
        fit(config, data=digits)
    monkeypatch.setattr(gacd.train, "FINITE_CHECK_STEPS", 1)
    with pytest.raises(NonFiniteLossError) as every_step:
        fit(config, data=digits)
    assert str(deferred.value) == str(every_step.value)


def test_bf16_training_runs_and_learns_while_evaluation_stays_float32(digits, robust_teacher_path):
    def history(precision):
        values = {"teacher.checkpoint": str(robust_teacher_path), "optim.epochs": 4}
        return fit(digits_config(precision=precision, **values), data=digits).history

    bf16, fp32 = history("bf16"), history("fp32")
    assert bf16[-1]["train/loss"] < bf16[0]["train/loss"]
    assert all(math.isfinite(value) for value in bf16[-1].values())
    assert bf16[-1]["train/loss"] == pytest.approx(fp32[-1]["train/loss"], rel=0.05)
    assert bf16[-1]["val/clean_acc"] > 0.4
    assert abs(bf16[-1]["val/clean_acc"] - fp32[-1]["val/clean_acc"]) < 0.1


def test_measuring_structure_against_a_teacher_does_not_change_what_a_baseline_trains(
    digits, robust_teacher_path
):
    values = {"method": "natural", "final": True, "eval.cw": False, "eval.fgsm": False}
    alone = fit(digits_config(**values), data=digits)
    measured = fit(
        digits_config(**values, **{"teacher.checkpoint": str(robust_teacher_path)}), data=digits
    )
    assert "test/cka_clean" in measured.metrics and "test/cka_clean" not in alone.metrics
    for name, weight in alone.state["student"].items():
        assert torch.equal(weight, measured.state["student"][name]), name
