"""Bad study files and command lines: exit status 2, one line on stderr naming the file or
option and the dotted key, no traceback, and nothing written (no results folder, no MLflow
store, no Optuna storage). Nothing here starts Ray: each refusal comes before it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import yaml

from study.run import main

TEACHER = {"train": {"method": "pgd_at", "student": {"arch": "small_cnn", "width": 8}}}


def search(**changes) -> dict:
    spec = {
        "study": {"name": "refused", "mode": "search", "num_samples": 2},
        "teacher": {"checkpoint": "teacher.pt"},
        "base": {
            "method": "pgd_at",
            "data": {"name": "digits"},
            "optim": {"epochs": 2},
            "attack": {"epsilon": 0.1, "steps": 2},
        },
        "search": {"tau": {"distribution": "loguniform", "low": 0.02, "high": 0.5}},
    }
    del spec["teacher"]
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            spec.setdefault(section, {})
            target = spec[section]
            *parents, last = name.split(".")
            for parent in parents:
                target = target.setdefault(parent, {})
            target[last] = value
        else:
            spec[section] = value
    return spec


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ALIAS_BOMB = "\n".join(
    ["study: {name: bomb, mode: search, num_samples: 2}", "base:", "  a0: &a0 {x: 1, y: 1}"]
    + [f"  a{i}: &a{i} {{x: *a{i - 1}, y: *a{i - 1}, z: *a{i - 1}}}" for i in range(1, 40)]
)

CASES = {
    "an infinite learning rate": (search(**{"base.optim.lr": float("inf")}), [], "base.optim.lr"),
    "a student of width 0": (search(**{"base.student.width": 0}), [], "base.student.width"),
    "a teacher of width 0": (
        search(teacher={"train": {"method": "pgd_at", "student": {"width": 0}}}),
        [],
        "teacher.train.student.width",
    ),
    "a step larger than epsilon": (
        search(**{"base.attack.step_size": 0.5}),
        [],
        "base.attack.step_size",
    ),
    "a bad data set under base, inherited by the teacher": (
        search(teacher=TEACHER, **{"base.data.name": "digitz"}),
        [],
        "base.data.name",
    ),
    "a negative GPU count": (search(), ["--num-gpus", "-1"], "--num-gpus"),
    "an Optuna URL of no database": (search(), ["--optuna-storage", "foo://x"], "--optuna-storage"),
    "a cluster that is not there": (search(), ["--address", "CLOSED"], "no Ray cluster answers"),
    "an ablation of a search that never ran": (
        {
            "study": {"name": "ablate", "mode": "ablation", "metric": "test/pgd_acc"},
            "base": search()["base"],
            "ablation": {"from_study": "never_ran", "seeds": [0], "variants": {}},
        },
        [],
        "ablation.from_study",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_refused_start_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    spec, extra, fragment = CASES[case]
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(spec))
    extra = [str(closed_port()) if part == "CLOSED" else part for part in extra]
    extra = [f"127.0.0.1:{part}" if part.isdigit() and len(part) > 3 else part for part in extra]
    args = [str(study), "--storage", str(tmp_path / "results")]
    args += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's refusal of the command line
        code = exit_.code
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1, error
    assert fragment in error and "Traceback" not in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"], "nothing written"


def test_a_key_given_twice_is_refused_with_its_line(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(
        "study: {name: twice, mode: search, num_samples: 2}\n"
        "base:\n  method: pgd_at\n  optim: {epochs: 2}\n  optim: {epochs: 3}\n"
        "search: {optim.lr: {distribution: loguniform, low: 0.01, high: 0.1}}\n"
    )
    assert main([str(study), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert str(study) in error and "'optim' given twice" in error and "line 5" in error


def test_a_yaml_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path, capsys):
    """3^39 values once expanded: counted only up to the bound, refused in well under a
    second (it grew to 3 GiB in 17 s before)."""
    study = tmp_path / "bomb.yaml"
    study.write_text(ALIAS_BOMB)
    started = time.perf_counter()
    assert main([str(study), "--dry-run"]) == 2
    assert time.perf_counter() - started < 5
    error = capsys.readouterr().err
    assert str(study) in error and "more than 100,000 values" in error


def test_a_dry_run_says_a_local_machine_cannot_hold_the_trials(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(search(resources={"gpus_per_trial": 64})))
    assert main([str(study), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "resources.gpus_per_trial is 64 but this machine has" in out


def test_a_huge_file_is_not_read(tmp_path, capsys):
    study = tmp_path / "huge.yaml"
    study.write_text("# " + "x" * 2_000_000)
    assert main([str(study), "--dry-run"]) == 2
    assert "not a config" in capsys.readouterr().err
    assert Path(study).stat().st_size > 1_000_000


def test_a_searched_teacher_that_is_not_there_is_refused_at_the_start(
    tmp_path, capsys, robust_teacher_path
):
    """Each choice a search can draw is checked like the first trial: a missing teacher
    checkpoint among them refuses the start, naming the searched value."""
    spec = search(**{"base.method": "gacd"})
    missing = str(tmp_path / "missing.pt")
    spec["search"] = {
        "teacher.checkpoint": {
            "distribution": "choice",
            "values": [str(robust_teacher_path), missing],
        }
    }
    spec["base"]["teacher"] = {"checkpoint": str(robust_teacher_path)}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(spec))
    args = [str(study), "--storage", str(tmp_path / "results")]
    code = main([*args, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    error = capsys.readouterr().err
    assert code == 2 and "search.teacher.checkpoint=" in error and "no such file" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_searching_what_in_batch_negatives_never_read_is_refused(tmp_path, capsys):
    spec = search(**{"base.method": "gacd", "base.teacher": {"checkpoint": "teacher.pt"}})
    spec["search"] = {"negatives.count": {"distribution": "choice", "values": [256, 1024]}}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(spec))
    assert main([str(study), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "search.negatives.count" in error and "negatives.source: memory_bank" in error
    spec["base"]["negatives"] = {"source": "memory_bank"}
    study.write_text(yaml.safe_dump(spec))
    assert main([str(study), "--dry-run"]) == 0
