"""The study's teacher: trained once before the trials, data-parallel with Ray Train.

`train_teacher` runs a `TorchTrainer` over every GPU the study may use (on a CPU cluster, one
worker per CPU its trials will share), capped by `resources.teacher_workers`. Each worker runs
`gacd.train.fit`, which sees the process group and trains data-parallel (`gacd.parallel`: the
global batch split among the workers, gradients averaged, evaluation sharded). Rank 0 writes
the state to the teacher cache (`teachers/<config hash>/checkpoint.pt`) and reports it as Ray
Train's checkpoint every epoch; a worker that dies restarts the group from the latest one
(`FailureConfig`), and a study run again after a crash continues the partial cache.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gacd import schema
from gacd.checkpoint import load_checkpoint, save_checkpoint
from gacd.config import Config
from gacd.train import State, fit
from study.spec import StudySpec
from study.trainable import (
    CHECKPOINT_FILE,
    later,
    ray_train_state,
    readable,
    set_up_train_worker,
    torch_trainer,
)

# Batch norm normalises each worker's rows: no more workers than leave it this many.
MIN_ROWS_PER_WORKER = 16


class TeacherTrainingError(RuntimeError):
    """The teacher's training failed for good (its retries spent); one line."""


@dataclass(frozen=True)
class Workers:
    """The teacher's data-parallel workers and what each holds."""

    count: int
    cpus: float
    gpus: float

    def describe(self) -> str:
        device = f"{self.gpus:g} GPU" if self.gpus else f"{self.cpus:g} CPU"
        return f"{self.count} data-parallel worker{'s' * (self.count != 1)} ({device} each)"


def teacher_cpus(spec: StudySpec, max_concurrent: int | None) -> float:
    """CPUs for the teacher: those the concurrent trials will share once it is done (nothing
    else runs meanwhile), at most the cluster's, at least a trial's."""
    import ray

    per_trial = spec.resources.cpus_per_trial
    cluster = ray.cluster_resources().get("CPU", per_trial)
    wanted = per_trial * max_concurrent if max_concurrent else cluster
    return max(per_trial, float(math.floor(min(wanted, cluster))))


def teacher_workers(
    spec: StudySpec, config: Config, max_concurrent: int | None, num_gpus: float | None = None
) -> Workers:
    """One worker per GPU the study may use (`--num-gpus`, else the cluster's) when its trials
    use GPUs, each with a trial's CPUs; else one per CPU the concurrent trials will share. At
    most `resources.teacher_workers` and one per `MIN_ROWS_PER_WORKER` rows of the global
    batch, and a count that divides it."""
    import ray

    per_trial, cap = spec.resources, spec.resources.teacher_workers
    if per_trial.gpus_per_trial > 0:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        gpus = gpus if num_gpus is None else min(gpus, num_gpus)
        if gpus < 1:  # a fraction of a card: the teacher takes what a trial takes
            return Workers(1, per_trial.cpus_per_trial, per_trial.gpus_per_trial)
        available, total_cpus = math.floor(gpus), None
    else:
        total_cpus = teacher_cpus(spec, max_concurrent)
        available = max(1, math.floor(total_cpus))
    count = min(available, cap or available, max(1, config.data.batch_size // MIN_ROWS_PER_WORKER))
    while config.data.batch_size % count:
        count -= 1
    if total_cpus is None:
        return Workers(count, per_trial.cpus_per_trial, 1.0)
    return Workers(count, total_cpus / count, 0.0)


def train_teacher(config: Config, checkpoint: Path, workers: Workers, max_failures: int) -> None:
    """Train `config` into `checkpoint` with a `TorchTrainer` of `workers` (continues a
    partial checkpoint there); raises `TeacherTrainingError` when its retries are spent."""
    trainer = torch_trainer(
        train_teacher_worker,
        {"config": config.to_dict(), "checkpoint": str(checkpoint)},
        workers.count,
        workers.cpus,
        workers.gpus,
        storage=str(checkpoint.parent),
        max_failures=max_failures,
        keep=2,
    )
    try:
        trainer.fit()
    except Exception as error:  # noqa: BLE001 - Ray's TrainingFailedError wraps the cause
        raise TeacherTrainingError(
            f"the teacher's training ({checkpoint}) failed after {max_failures} "
            f"retr{'y' if max_failures == 1 else 'ies'} (study.max_failures): {reason(error)}"
        ) from error
    if not teacher_is_trained(checkpoint):
        raise TeacherTrainingError(f"the teacher's training ended without {checkpoint}")


def reason(error: Exception) -> str:
    """One line for a failed `trainer.fit()`: the first failed rank's own error (the last line
    of its traceback, `RuntimeError: ...`), not Ray's 'Training failed due to worker errors'."""
    failures = getattr(error, "worker_failures", None) or {}
    cause = getattr(error, "controller_failure", None)
    for rank, failure in sorted(failures.items()):
        return f"rank {rank}: {last_line(failure)}"
    return last_line(cause if cause is not None else error)


def last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    if not re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line):  # a bare message
        line = f"{type(error).__name__}: {line}".rstrip(": ")
    return line


def train_teacher_worker(loop: dict[str, Any]) -> None:
    """Ray Train's loop on each of the teacher's workers."""
    import ray.train

    config = Config.from_dict(loop["config"])
    set_up_train_worker(loop)
    rank = ray.train.get_context().get_world_rank()
    path = Path(loop["checkpoint"])

    def report(epoch_metrics: dict[str, float], state: State) -> None:
        if rank != 0:
            ray.train.report(epoch_metrics)  # every worker reports; rank 0 checkpoints
            return
        save_checkpoint(state, path)
        # Ray forwards a worker's output to the driver: the teacher is not hours of silence.
        print(teacher_line(epoch_metrics, config.optim.epochs), flush=True)
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(epoch_metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    fit(config, report=report, resume=resume_state(path, config.seed))


def resume_state(path: Path, seed: int) -> State | None:
    """Where the teacher continues: the later of Ray Train's latest checkpoint (a restarted
    worker group) and the cache file (a study run again after its driver died); an unreadable
    one is passed over."""
    cached = readable(path)
    found = later(ray_train_state([seed]), None if cached is None else [cached])
    return None if found is None else found[0]


def teacher_line(epoch_metrics: dict[str, float], epochs: int) -> str:
    """`teacher: epoch 3/8  val/clean_acc=0.712 val/pgd_acc=0.584  (61.2 s)`."""
    shown = " ".join(
        f"{key}={epoch_metrics[key]:.3f}"
        for key in (schema.VAL_CLEAN_ACC, schema.VAL_PGD_ACC)
        if key in epoch_metrics
    )
    seconds = epoch_metrics.get(schema.EPOCH_SECONDS, 0.0)
    return f"teacher: epoch {int(epoch_metrics[schema.EPOCH])}/{epochs}  {shown}  ({seconds:.1f} s)"


def teacher_is_trained(checkpoint: Path) -> bool:
    if not checkpoint.is_file():
        return False
    state = load_checkpoint(checkpoint)
    return state["epoch"] == state["config"]["optim"]["epochs"]
