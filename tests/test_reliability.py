"""Faults a long study meets, made real: a driver killed outright, a trial's worker killed, a
diverging trial, a request the cluster cannot hold. Each on a real Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from analysis.runs import load_runs
from gacd import schema
from study.run import main
from tests.conftest import free_port, ray_node, wait_for_port
from tests.test_study_run import ROOT, digits_base, ray_results, study_args, write_study

pytestmark = pytest.mark.slow


def search(name: str, teacher, epochs: int, **study) -> dict:
    return {
        "study": {"name": name, "num_samples": 2, "scheduler": {"name": "none"}, **study},
        "teacher": {"checkpoint": str(teacher)},
        "base": digits_base(epochs=epochs),
        "search": {"tau": {"distribution": "loguniform", "low": 0.05, "high": 0.5}},
    }


def start_driver(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def start_one_trial_search(
    tmp_path: Path, cluster: str, teacher: Path, name: str, epochs: int
) -> subprocess.Popen:
    """A one-trial search `name` run by `python -m study.run` in its own process."""
    path = write_study(tmp_path, search(name, teacher, epochs, num_samples=1))
    return start_driver([sys.executable, "-m", "study.run", path, *study_args(tmp_path, cluster)])


def read_until(driver: subprocess.Popen, text: str) -> str:
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never printed:\n" + "".join(seen)[-3000:])


def assert_every_epoch_logged_once(uri: str, name: str, epochs: int, trials: int) -> None:
    runs = load_runs(uri, name)
    assert len(runs) == trials and set(runs.status) == {"FINISHED"}, runs.status
    client = MlflowClient(uri)
    for run_id in runs.run_id:
        steps = [m.step for m in client.get_metric_history(run_id, schema.VAL_PGD_ACC)]
        assert sorted(steps) == list(range(1, epochs + 1)), steps


def test_a_driver_killed_outright_resumes_with_nothing_lost(
    tmp_path, ray_cluster, robust_teacher_path
):
    epochs = 10
    path = write_study(tmp_path, search("sigkill", robust_teacher_path, epochs))
    args = study_args(tmp_path, ray_cluster)
    driver = start_driver([sys.executable, "-m", "study.run", path, *args])
    read_until(driver, f"epoch 3/{epochs}")
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    time.sleep(3)  # the cluster notices its driver is gone and ends the job's trials

    assert main([path, "--resume", *args]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert_every_epoch_logged_once(uri, "sigkill", epochs, trials=2)
    assert load_runs(uri, "sigkill", role="study").status[0] == "FINISHED"
    study = optuna.load_study(study_name="sigkill", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [trial.state.name for trial in study.trials]
    assert states.count("COMPLETE") == 2 and "RUNNING" not in states, states
    results = ray_results(tmp_path / "results" / "sigkill")
    assert any(r.metrics["iterations_since_restore"] < epochs for r in results)


def trial_worker(experiment: Path) -> int:
    """The pid of the process running the study's trial, from the results Ray wrote."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Ray may not have flushed the file's first line yet
        for result_file in experiment.glob("*/result.json"):
            lines = result_file.read_text().strip().splitlines()
            if lines:
                return json.loads(lines[-1])["pid"]
        time.sleep(0.2)
    raise AssertionError(f"no result.json with a result under {experiment}")


def test_a_killed_trial_worker_is_retried_from_its_checkpoint(
    tmp_path, ray_cluster, robust_teacher_path
):
    epochs = 10
    driver = start_one_trial_search(tmp_path, ray_cluster, robust_teacher_path, "worker", epochs)
    read_until(driver, f"epoch 3/{epochs}")
    os.kill(trial_worker(tmp_path / "results" / "worker"), signal.SIGKILL)
    assert_continued_from_a_checkpoint(driver, tmp_path, "worker", epochs)


def assert_continued_from_a_checkpoint(
    driver: subprocess.Popen, tmp_path: Path, name: str, epochs: int, seen: str = ""
):
    """The one-trial study `name` ended well after a fault, its trial continued from a
    checkpoint (not restarted), every epoch logged once; returns Ray's result of it."""
    output = seen + driver.stdout.read()
    assert driver.wait(timeout=600) == 0, output[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert_every_epoch_logged_once(uri, name, epochs, trials=1)
    (result,) = ray_results(tmp_path / "results" / name)
    assert result.metrics["training_iteration"] == epochs
    assert result.metrics["iterations_since_restore"] < epochs  # continued, not restarted
    return result


def test_a_diverging_trial_fails_alone_with_its_reason(
    tmp_path, ray_cluster, robust_teacher_path, capsys
):
    spec = search("diverge", robust_teacher_path, epochs=2, max_failures=1)
    spec["search"] = {"optim.lr": {"distribution": "choice", "values": [0.05, 1.0e8]}}
    spec["study"] |= {"num_samples": 4, "sampler": {"name": "random", "seed": 0}}
    assert main([write_study(tmp_path, spec), *study_args(tmp_path, ray_cluster)]) == 0
    runs = load_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "diverge")
    failed = runs[runs.status == "FAILED"]
    finished = runs[runs.status == "FINISHED"]
    assert len(runs) == 4 and len(failed) >= 1 and len(finished) >= 1
    assert set(failed["params.optim.lr"]) == {"100000000.0"}
    assert set(finished["params.optim.lr"]) == {"0.05"}
    assert failed["tags.failure"].str.contains("loss is nan at epoch 1").all()
    # a divergence fails the trial once: Ray's retry (max_failures 1) ends at once, untrained
    for trial_id in failed["tags.ray_trial_id"]:
        (error_file,) = (tmp_path / "results" / "diverge").glob(f"*{trial_id}*/error.txt")
        errors = error_file.read_text()
        assert errors.count("Failure #") == 2, errors
        assert "RepeatedFailure: NonFiniteLossError: loss is nan" in errors
        assert "not retried" in errors
        # remembered in --storage, beside the checkpoints, where a retry on any node looks
        marker = error_file.with_name("deterministic_failure.txt")
        assert "NonFiniteLossError" in marker.read_text()
    study = optuna.load_study(study_name="diverge", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    told = {t.user_attrs["ray_trial_id"]: t.state.name for t in study.trials}
    assert {told[trial_id] for trial_id in failed["tags.ray_trial_id"]} == {"FAIL"}
    assert "FAILED: " in capsys.readouterr().out


def test_more_gpus_per_trial_than_the_cluster_has_is_refused(
    tmp_path, ray_cluster, robust_teacher_path, capsys
):
    spec = search("greedy", robust_teacher_path, epochs=1)
    spec["resources"] = {"gpus_per_trial": 1}
    assert main([write_study(tmp_path, spec), *study_args(tmp_path, ray_cluster)]) == 2
    error = capsys.readouterr().err
    assert "resources.gpus_per_trial is 1 but the cluster has 0 GPUs" in error
    assert not (tmp_path / "results" / "greedy").exists()


def stop_node(node: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if node.poll() is None:
        os.killpg(node.pid, sig)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def test_a_lost_worker_node_moves_its_trial_and_the_study_finishes(tmp_path, robust_teacher_path):
    """A cluster of a head and a worker node, both on 127.0.0.1, each with one CPU: one trial
    on each. The worker node is killed mid-study; its trial continues on the head."""
    port, epochs = free_port(), 10
    head = ray_node(
        ["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
        tmp_path / "head.log",
    )
    worker = None
    try:
        wait_for_port(port, head, timeout=90)
        worker = ray_node([f"--address=127.0.0.1:{port}", "--num-cpus=1"], tmp_path / "worker.log")
        time.sleep(8)  # the worker node registers with the head
        spec = search("node", robust_teacher_path, epochs, max_concurrent=2)
        path = write_study(tmp_path, spec)
        args = study_args(tmp_path, f"127.0.0.1:{port}")
        driver = start_driver([sys.executable, "-m", "study.run", path, *args])
        output = read_until(driver, f"epoch 2/{epochs}")
        output += read_until(driver, f"epoch 2/{epochs}")  # both trials are running
        stop_node(worker, signal.SIGKILL)
        output += driver.stdout.read()
        assert driver.wait(timeout=420) == 0, output[-3000:]
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        assert_every_epoch_logged_once(uri, "node", epochs, trials=2)
        results = ray_results(tmp_path / "results" / "node")
        assert all(r.metrics["training_iteration"] == epochs for r in results)
    finally:
        if worker is not None:
            stop_node(worker)
        stop_node(head)


def test_a_search_whose_every_trial_fails_ends_cleanly_and_names_each_reason(
    tmp_path, ray_cluster, robust_teacher_path, capsys
):
    spec = search("all_fail", robust_teacher_path, epochs=2, max_failures=0)
    spec["search"] = {"optim.lr": {"distribution": "choice", "values": [1.0e8, 1.0e9]}}
    code = main([write_study(tmp_path, spec), *study_args(tmp_path, ray_cluster)])
    captured = capsys.readouterr()
    assert code == 1, captured.out[-2000:] + captured.err[-2000:]
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "all_fail: every trial failed (2 of 2)" in errors[0], errors
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (parent,) = load_runs(uri, "all_fail", role="study").itertuples()
    assert parent.status == "FAILED"
    runs = load_runs(uri, "all_fail")
    assert set(runs.status) == {"FAILED"} and len(runs) == 2
    for reason in runs["tags.failure"]:
        assert "loss is nan" in reason and reason in captured.out


def descendants_of(root: int) -> dict[int, str]:
    """Every process below `root` now, `pid -> command line`, read from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, stack = {}, [root]
    while stack:
        pid = stack.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                try:
                    found[child] = (Path(f"/proc/{child}/cmdline").read_bytes()).decode(
                        errors="replace"
                    )
                except OSError:
                    continue
                stack.append(child)
    return found


def test_a_driver_killed_outright_leaves_no_ray_process_behind(tmp_path, robust_teacher_path):
    """A study that started its own local Ray instance, SIGKILLed mid-trial: every process of
    that instance (GCS, raylet, dashboard, agents, workers) ends within seconds."""
    path = write_study(tmp_path, search("orphans", robust_teacher_path, epochs=10, num_samples=1))
    storage = ["--storage", str(tmp_path / "results")]
    uri = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--num-cpus", "1"]
    driver = start_driver([sys.executable, "-m", "study.run", path, *storage, *uri])
    read_until(driver, "epoch 2/10")
    seen = descendants_of(driver.pid)
    ray_processes = {pid: line for pid, line in seen.items() if "ray" in line}
    assert len(ray_processes) >= 4, seen  # gcs, raylet, agents, the trial's worker
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    deadline = time.monotonic() + 30
    left = ray_processes
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = {pid: line for pid, line in left.items() if Path(f"/proc/{pid}").exists()}
    assert not left, f"left behind: {left}"


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(
    tmp_path, ray_cluster, robust_teacher_path
):
    """The checkpoint Ray would restore from is truncated, then the trial's worker killed: the
    retry reads the checkpoint before it instead of failing on the broken one, re-runs the
    epochs after it, and MLflow holds exactly what the trial reports (each epoch once)."""
    epochs = 10
    driver = start_one_trial_search(tmp_path, ray_cluster, robust_teacher_path, "corrupt", epochs)
    read_until(driver, f"epoch 4/{epochs}")
    experiment = tmp_path / "results" / "corrupt"
    worker = trial_worker(experiment)
    os.kill(worker, signal.SIGSTOP)  # no checkpoint is written while the newest is broken
    time.sleep(3)  # the driver registers the last checkpoint the worker reported
    kept = sorted(experiment.glob("*/checkpoint_*"), key=lambda folder: folder.name)
    assert len(kept) >= 2, kept
    for folder in kept[1:]:  # every one but the oldest: whichever Ray restores is unreadable
        checkpoint = folder / "checkpoint.pt"
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    os.kill(worker, signal.SIGKILL)
    output = driver.stdout.read()
    assert driver.wait(timeout=300) == 0, output[-3000:]
    assert "not a readable PyTorch file" in output and "trying the checkpoint before it" in output
    (result,) = ray_results(experiment)
    assert result.metrics["epoch"] == epochs and result.error is None
    reported = [json.loads(line) for line in next(experiment.glob("*/result.json")).open()]
    restarts = [r["epoch"] for r in reported if r["iterations_since_restore"] == 1]
    oldest_epoch = int(kept[0].name.split("_")[1]) + 1  # checkpoint_000003 holds epoch 4
    assert restarts == [1, oldest_epoch + 1], (restarts, [k.name for k in kept])
    # The re-run epochs reproduce what was logged before the fault (the state holds the RNG),
    # and MLflow has each epoch once, with the values the trial reports last.
    last = {r["epoch"]: r[schema.VAL_PGD_ACC] for r in reported}
    first = {r["epoch"]: r[schema.VAL_PGD_ACC] for r in reversed(reported)}
    assert last == first
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert_every_epoch_logged_once(uri, "corrupt", epochs, 1)
    (run_id,) = load_runs(uri, "corrupt").run_id
    history = MlflowClient(uri).get_metric_history(run_id, schema.VAL_PGD_ACC)
    assert {m.step: m.value for m in history} == last
