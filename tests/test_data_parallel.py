"""The study's teacher trained data-parallel with Ray Train (`study.teacher`, `gacd.parallel`):
2 CPU workers on the gloo backend of a real local Ray instance, a killed worker, and the rule
that a 2-worker run is the 1-worker run of the same config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from gacd import parallel, schema
from gacd.checkpoint import load_checkpoint
from gacd.config import Config, ConfigError
from study.run import main as run_study
from study.spec import spec_from_dict
from tests.test_study_run import ROOT, digits_base, ray_results, study_args, write_study

TEACHER = {
    "method": "pgd_at",
    "student": {"arch": "small_cnn", "width": 8},
    "optim": {"epochs": 6, "lr": 0.05},
    "attack": {"epsilon": 0.1, "steps": 2},
}


def teacher_study(name: str, **resources) -> dict:
    """An ablation of one run whose teacher is trained first (6 epochs on digits)."""
    return {
        "study": {"name": name, "mode": "ablation", "metric": "test/pgd_acc", "max_concurrent": 2},
        "resources": {"cpus_per_trial": 1, **resources},
        "teacher": {"train": TEACHER},
        "base": digits_base(epochs=1),
        "ablation": {"seeds": [0]},
    }


def test_the_global_batch_must_divide_among_the_workers():
    group = parallel.Group(rank=1, size=3)
    with pytest.raises(ConfigError) as caught:
        parallel.worker_batch_size(64, group)
    assert caught.value.key == "data.batch_size" and "3 data-parallel workers" in str(caught.value)
    assert parallel.worker_batch_size(96, group) == 32
    assert [parallel.rows(100, parallel.Group(rank, 3)) for rank in range(3)] == [
        slice(0, 33),
        slice(33, 66),
        slice(66, 100),
    ]


def test_the_teacher_gets_a_worker_per_cpu_its_trials_share(ray_cluster):
    """On the 2-CPU head node: 2 single-CPU workers; capped at 1, one worker of 2 CPUs; a
    global batch 2 does not divide drops to 1 worker."""
    import ray

    from study.run import connect
    from study.teacher import Workers, teacher_workers

    def workers(max_concurrent: int | None, batch_size: int = 64, **resources) -> Workers:
        spec = spec_from_dict(teacher_study("w", **resources), teacher_cache=Path("t"))
        config = spec.teacher_training_config()
        config.data.batch_size = batch_size
        return teacher_workers(spec, config, max_concurrent)

    try:
        connect(ray_cluster, None, None)
        assert workers(2) == Workers(2, 1.0, 0.0)
        assert workers(None) == Workers(2, 1.0, 0.0)
        assert workers(1) == Workers(1, 1.0, 0.0)
        assert workers(2, teacher_workers=1) == Workers(1, 2.0, 0.0)
        assert workers(2, batch_size=63) == Workers(1, 2.0, 0.0)
    finally:
        ray.shutdown()


def test_ray_trains_placement_group_cleaner_runs_only_where_a_dashboard_answers_it(
    ray_cluster, tmp_path
):
    """Without a dashboard the cleaner's every question to the state API waits out its timeout
    (each Ray Train run ended 12 s late): the study's trainers leave it out there and keep Ray's
    other callbacks; on a cluster whose dashboard has registered its address (what a dashboard
    writes to the GCS on start, written here by hand and put back after) it stays."""
    import ray
    from ray._private import ray_constants
    from ray.experimental import internal_kv
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    from study.run import connect
    from study.trainable import LeanTorchTrainer, dashboard_running, torch_trainer

    def kinds(trainer: LeanTorchTrainer) -> list[type]:
        return [type(callback) for callback in trainer._create_default_callbacks()]

    namespace = ray_constants.KV_NAMESPACE_DASHBOARD
    try:
        connect(ray_cluster, None, None)
        trainer = torch_trainer(print, {}, 2, 1.0, 0.0, str(tmp_path), 0, 1)
        assert isinstance(trainer, LeanTorchTrainer) and not dashboard_running()
        lean = kinds(trainer)
        assert PlacementGroupCleanerCallback not in lean
        before = internal_kv._internal_kv_get("webui:url", namespace=namespace)  # b"": none
        internal_kv._internal_kv_put("webui:url", "127.0.0.1:8265", namespace=namespace)
        try:
            assert dashboard_running()
            full = kinds(trainer)
        finally:
            internal_kv._internal_kv_put("webui:url", before or b"", namespace=namespace)
        assert not dashboard_running()
        assert PlacementGroupCleanerCallback in full
        assert [kind for kind in full if kind is not PlacementGroupCleanerCallback] == lean
    finally:
        ray.shutdown()


def ray_train_workers() -> list[int]:
    """PIDs of Ray Train's worker processes on this machine."""
    listing = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True
    ).stdout
    return [
        int(line.split()[0])
        for line in listing.splitlines()
        if "RayTrainWorker" in line.split(None, 1)[-1]
    ]


def kill_a_worker_after(checkpoint: Path, epoch: int, killed: list[int]) -> threading.Thread:
    """SIGKILL one of the teacher's Ray Train workers once `checkpoint` holds `epoch`."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                reached = checkpoint.is_file() and load_checkpoint(checkpoint)["epoch"] >= epoch
            except Exception:  # noqa: BLE001 - a file being replaced
                reached = False
            if reached and (pids := ray_train_workers()):
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_two_worker_teacher_survives_a_killed_worker_and_is_logged(tmp_path, ray_cluster):
    """`study.run` trains the teacher over 2 gloo workers; one is SIGKILLed after epoch 2:
    Ray Train restarts the group from the last checkpoint, the teacher ends with every epoch
    once (the same values as an uninterrupted 2-worker run), and MLflow holds its run."""
    path = write_study(tmp_path, teacher_study("ddp"))
    teachers = tmp_path / "results" / "teachers"
    killed: list[int] = []
    command = [sys.executable, "-m", "study.run", path, *study_args(tmp_path, ray_cluster)]
    driver = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # the cache folder is named by the config's hash: watch whichever appears
    while driver.poll() is None and not list(teachers.glob("*/")):
        time.sleep(0.2)
    (folder,) = teachers.glob("*/")
    watcher = kill_a_worker_after(folder / "checkpoint.pt", 2, killed)
    output, _ = driver.communicate(timeout=600)
    watcher.join(timeout=5)
    assert driver.returncode == 0, output[-3000:]
    assert killed, "no Ray Train worker was killed"
    assert "on 2 data-parallel workers (1 CPU each)" in output
    state = load_checkpoint(folder / "checkpoint.pt")
    assert state["epoch"] == 6 and state["workers"] == 2
    assert [entry[schema.EPOCH] for entry in state["history"]] == [1, 2, 3, 4, 5, 6]
    assert list((folder / "ray_train").glob("checkpoint_*")), "Ray Train's checkpoints"

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    teachers_experiment = client.get_experiment_by_name("gacd-teachers")
    (run,) = client.search_runs([teachers_experiment.experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, schema.VAL_PGD_ACC)]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert (
        run.data.metrics[schema.accuracy("test", "pgd")]
        == state["history"][-1][schema.accuracy("test", "pgd")]
    )

    # an uninterrupted 2-worker run of the same config: the same epochs, value for value
    import ray

    from study.run import connect
    from study.teacher import Workers, train_teacher

    config = Config.from_dict(state["config"])
    try:
        connect(ray_cluster, None, None)
        train_teacher(config, tmp_path / "again" / "checkpoint.pt", Workers(2, 1.0, 0.0), 0)
    finally:
        ray.shutdown()
    again = load_checkpoint(tmp_path / "again" / "checkpoint.pt")
    drop = (schema.EPOCH_SECONDS,)
    for resumed, straight in zip(state["history"], again["history"], strict=True):
        assert {k: v for k, v in resumed.items() if k not in drop} == {
            k: v for k, v in straight.items() if k not in drop
        }
    for name, value in state["student"].items():
        assert torch.equal(value, again["student"][name]), name


@pytest.mark.slow
def test_one_and_two_worker_teachers_of_one_config_reach_comparable_accuracy(tmp_path, ray_cluster):
    """The rule: `data.batch_size` is the global batch, so 2 workers train the same config
    as 1 (only batch-norm statistics, and the sharded evaluation's random starts, are per
    worker): the same accuracy within noise. Noise here is an 8-epoch width-8 teacher on 360
    test digits: measured 0.706 / 0.669 clean and 0.386 / 0.325 PGD for 1 / 2 workers; the
    exact form of the rule (no batch norm: the same weights) is `tests/test_parallel.py`."""
    import ray

    from study.run import connect
    from study.teacher import Workers, train_teacher

    spec = spec_from_dict(teacher_study("rule"), teacher_cache=tmp_path / "teachers")
    config = spec.teacher_training_config()
    config.optim.epochs = 8
    results = {}
    try:
        connect(ray_cluster, None, None)
        for count in (1, 2):
            path = tmp_path / f"{count}" / "checkpoint.pt"
            train_teacher(config, path, Workers(count, 2.0 / count, 0.0), 0)
            state = load_checkpoint(path)
            assert state["workers"] == count
            results[count] = state["history"][-1]
    finally:
        ray.shutdown()
    for attack in ("clean", "pgd"):
        key = schema.accuracy("test", attack)
        assert abs(results[1][key] - results[2][key]) <= 0.08, (key, results)
    assert results[2][schema.accuracy("test", "clean")] > 0.6, results  # it learned (chance: 0.1)


@pytest.mark.slow
def test_a_two_worker_trial_trains_data_parallel_and_is_retried_when_a_worker_dies(
    tmp_path, ray_cluster, robust_teacher_path
):
    """`workers_per_trial: 2` (what `gpus_per_trial: 2` gives on GPUs): the trial drives a Ray
    Train run of 2 gloo workers, as the teacher does. One worker is SIGKILLed after epoch 2: the
    run fails, Tune retries the trial from its checkpoint, and every epoch is logged once."""
    from tests.test_reliability import assert_continued_from_a_checkpoint

    epochs = 20  # 0.5 s each: time to find and kill a worker after epoch 2
    study = {
        "study": {"name": "ddp_trial", "mode": "ablation", "metric": "test/pgd_acc"},
        "resources": {"cpus_per_trial": 2, "workers_per_trial": 2},
        "teacher": {"checkpoint": str(robust_teacher_path)},
        "base": {**digits_base(epochs=epochs), "negatives": {"source": "in_batch"}},
        "ablation": {"seeds": [0]},
    }
    path = write_study(tmp_path, study)
    command = [sys.executable, "-m", "study.run", path, *study_args(tmp_path, ray_cluster)]
    driver = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # Once a checkpoint of the trial is in storage (Tune persists it on report; the
    # driver's piped output comes in blocks, too late to watch), kill one of its workers.
    trial_folder = tmp_path / "results" / "ddp_trial"
    deadline, workers = time.monotonic() + 300, []
    while driver.poll() is None and time.monotonic() < deadline:
        if list(trial_folder.glob("*/checkpoint_*")) and len(workers := ray_train_workers()) == 2:
            break
        time.sleep(0.1)
    assert len(workers) == 2, (workers, driver.poll())
    os.kill(workers[-1], signal.SIGKILL)
    result = assert_continued_from_a_checkpoint(driver, tmp_path, "ddp_trial", epochs)
    with result.checkpoint.as_directory() as folder:
        state = load_checkpoint(Path(folder) / "checkpoint.pt")
    assert state["workers"] == 2 and state["epoch"] == epochs
    assert result.metrics[schema.accuracy("test", "clean")] > 0.5
    # the Ray Train run it drove, in its folder of --storage
    assert (trial_folder / result.path.split("/")[-1] / "ray_train").is_dir()


@pytest.mark.slow
def test_a_two_worker_trial_over_two_trial_seeds_trains_both_on_both_workers(
    tmp_path, ray_cluster, robust_teacher_path
):
    """`workers_per_trial: 2` with `study.trial_seeds`: every worker interleaves the seeds
    alike (their collectives pair up), rank 0 reports their mean and keeps both states."""
    study = {
        "study": {"name": "ddp_seeds", "num_samples": 1, "trial_seeds": [0, 1]},
        "resources": {"cpus_per_trial": 2, "workers_per_trial": 2},
        "teacher": {"checkpoint": str(robust_teacher_path)},
        "base": {**digits_base(epochs=2), "negatives": {"source": "in_batch"}},
        "search": {"tau": {"distribution": "loguniform", "low": 0.05, "high": 0.5}},
    }
    path = write_study(tmp_path, study)
    assert run_study([path, *study_args(tmp_path, ray_cluster)]) == 0
    [result] = ray_results(tmp_path / "results" / "ddp_seeds")
    metrics = result.metrics
    seeds = [metrics[schema.per_seed(seed, schema.VAL_PGD_ACC)] for seed in (0, 1)]
    assert metrics[schema.VAL_PGD_ACC] == pytest.approx(sum(seeds) / 2, abs=1e-12)
    with result.checkpoint.as_directory() as folder:
        states = [load_checkpoint(Path(folder) / f"checkpoint.seed{s}.pt") for s in (0, 1)]
    assert [state["workers"] for state in states] == [2, 2]
    assert [state["epoch"] for state in states] == [2, 2]
    assert [state["config"]["seed"] for state in states] == [0, 1]


def test_a_teacher_that_fails_on_every_worker_names_the_workers_error(tmp_path, ray_cluster):
    """A global batch 2 workers cannot share: every retry fails alike, and the one line says
    which rank failed with what, not Ray's 'Training failed due to worker errors'."""
    import ray

    from study.run import connect
    from study.teacher import TeacherTrainingError, Workers, train_teacher

    spec = spec_from_dict(teacher_study("bad"), teacher_cache=tmp_path / "teachers")
    config = spec.teacher_training_config()
    config.data.batch_size = 63
    checkpoint = tmp_path / "t" / "checkpoint.pt"
    try:
        connect(ray_cluster, None, None)
        with pytest.raises(TeacherTrainingError) as caught:
            train_teacher(config, checkpoint, Workers(2, 1.0, 0.0), max_failures=0)
    finally:
        ray.shutdown()
    message = str(caught.value)
    assert "\n" not in message and "after 0 retries (study.max_failures)" in message, message
    assert "rank " in message and "data.batch_size" in message, message
    assert "multiple of the 2 data-parallel workers" in message, message
    assert not checkpoint.exists()


def test_data_parallel_trials_are_counted_against_the_cluster_since_tune_holds_nothing_for_them():
    """A data-parallel trial's process holds no CPU or GPU (its Ray Train workers do), so
    Tune alone would start every trial at once: `concurrency` caps them at what the cluster
    holds. A one-process trial is left to Tune's own accounting."""
    from study.run import DRIVER_MEMORY, concurrency, trainable

    def spec(**resources):
        study = {"study": {"name": "cap", "mode": "ablation", "metric": "test/pgd_acc"}}
        base, ablation = {**digits_base(epochs=1), "method": "natural"}, {"seeds": [0]}
        return spec_from_dict({**study, "resources": resources, "base": base, "ablation": ablation})

    cluster = {"CPU": 16.0, "GPU": 8.0}
    assert concurrency(spec(cpus_per_trial=4, gpus_per_trial=2), cluster, None, None) == 4
    assert concurrency(spec(cpus_per_trial=2, workers_per_trial=2), cluster, None, None) == 8
    assert concurrency(spec(cpus_per_trial=2, gpus_per_trial=2), cluster, None, 4) == 2
    assert concurrency(spec(cpus_per_trial=2, gpus_per_trial=1), cluster, None, None) is None
    data_parallel = trainable(spec(cpus_per_trial=4, gpus_per_trial=2))
    (bundle,) = data_parallel._resources.bundles  # noqa: SLF001 - what Tune will reserve
    assert bundle == {"memory": DRIVER_MEMORY}
    (bundle,) = trainable(spec(cpus_per_trial=2, gpus_per_trial=0.5))._resources.bundles  # noqa: SLF001
    assert bundle == {"CPU": 2, "GPU": 0.5}


@pytest.mark.slow
def test_a_diverging_data_parallel_trial_fails_once_with_its_workers_reason(
    tmp_path, ray_cluster, robust_teacher_path
):
    """A loss that diverges on the Ray Train workers fails the trial with that error (not Ray
    Train's wrapper), so the deterministic-failure rule holds: Tune's retry ends at once."""
    from study.run import main

    study = {
        "study": {"name": "ddp_nan", "mode": "ablation", "metric": "test/pgd_acc"},
        "resources": {"cpus_per_trial": 2, "workers_per_trial": 2},
        "teacher": {"checkpoint": str(robust_teacher_path)},
        "base": {**digits_base(epochs=2), "optim": {"epochs": 2, "lr": 1.0e8}},
        "ablation": {"seeds": [0]},
    }
    study["study"]["max_failures"] = 1
    assert main([write_study(tmp_path, study), *study_args(tmp_path, ray_cluster)]) == 1
    (error_file,) = (tmp_path / "results" / "ddp_nan").glob("*/error.txt")
    errors = error_file.read_text()
    assert errors.count("Failure #") == 2, errors
    assert "gacd.train.NonFiniteLossError: loss is nan at epoch 1" in errors
    assert "RepeatedFailure: NonFiniteLossError: loss is nan" in errors


@pytest.mark.slow
def test_data_parallel_trials_that_tune_stops_free_their_workers_for_the_next(
    tmp_path, ray_cluster, robust_teacher_path
):
    """ASHA stops a trial at its last epoch (and poor ones earlier): Tune ends the trial's
    process at once, leaving its Ray Train workers' placement group to this job. Only one
    2-worker trial fits the 2-CPU cluster at a time, so without the driver freeing that group
    the second trial would wait for CPUs forever; here all three end, in minutes."""
    study = {
        "study": {
            "name": "ddp_asha",
            "mode": "search",
            "metric": "val/pgd_acc",
            "num_samples": 3,
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "sampler": {"name": "random", "seed": 0},
        },
        "resources": {"cpus_per_trial": 2, "workers_per_trial": 2},
        "teacher": {"checkpoint": str(robust_teacher_path)},
        "base": {**digits_base(epochs=3), "negatives": {"source": "in_batch"}},
        "search": {"optim.lr": {"distribution": "loguniform", "low": 0.001, "high": 0.1}},
    }
    command = [
        sys.executable, "-m", "study.run", write_study(tmp_path, study),
        *study_args(tmp_path, ray_cluster),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3/3 trials done (" in done.stdout and "0 failed), 0 running" in done.stdout
