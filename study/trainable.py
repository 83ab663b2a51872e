"""What runs inside a Ray worker: one trial (`train_trial`) and the teacher (`train_teacher`).

Both are `gacd.train.fit` with a report callback; neither touches MLflow (the driver logs).
A trial checkpoints every epoch through `tune.report` and continues from
`tune.get_checkpoint()` after a retry or a resumed study, so epochs continue, not restart.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from gacd import schema
from gacd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gacd.config import Config, ConfigError
from gacd.data import DatasetNotFoundError, describe_splits, load_datasets
from gacd.runtime import resolve_device
from gacd.train import BEST_CHECKPOINT_FILE, NonFiniteLossError, State, best_checkpoint, fit
from study.spec import EPOCHS_TOTAL, RESULT_DATASETS, RESULT_DEVICE, StudySpec

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"


def limit_gpu_memory(gpus: float) -> float | None:
    """Cap this process's CUDA caching allocator at a fractional GPU's share of the device, so
    trials packed onto one card fail with a CUDA out-of-memory error in their own process
    instead of starving their neighbours. Returns the fraction applied, or None (no CUDA, or
    `gpus` not in (0, 1)). Ray's `CUDA_VISIBLE_DEVICES` makes the current device the one held."""
    if not 0 < gpus < 1 or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(gpus, torch.cuda.current_device())
    return gpus


def set_up_worker(cpus: float, gpus: float) -> None:
    """As many intra-op threads as CPUs the trial holds, so packed trials do not oversubscribe;
    a fractional GPU's memory capped at its share; Ray's per-checkpoint info lines silenced
    (the driver prints one line per epoch)."""
    torch.set_num_threads(max(1, int(cpus)))
    limit_gpu_memory(gpus)
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def restored_state() -> State | None:
    """The state of the checkpoint Ray restores the trial from. If that one is unreadable (a
    truncated or corrupted file), the newest older one Ray kept beside it that reads (its
    later epochs run again: the state holds the RNG, so they reproduce what was logged); if
    none reads, None: the trial starts over rather than fail on the same file at every retry."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        try:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        except CheckpointError as error:
            print(f"warning: {error}; trying the checkpoint before it", flush=True)
    for older in older_checkpoints(checkpoint):
        try:
            return load_checkpoint(older / CHECKPOINT_FILE)
        except CheckpointError as error:
            print(f"warning: {error}; trying the checkpoint before it", flush=True)
    print("warning: no checkpoint of this trial reads: it starts over", flush=True)
    return None


def older_checkpoints(checkpoint: tune.Checkpoint) -> list[Path]:
    """The checkpoints Ray kept before `checkpoint` in the trial's folder, newest first
    (`--storage` is a filesystem path, so they are folders on this node's disk)."""
    latest = Path(checkpoint.path)
    kept = (folder for folder in latest.parent.glob("checkpoint_*") if folder.is_dir())
    return sorted((folder for folder in kept if folder.name < latest.name), reverse=True)


# A failure that would happen again from the same checkpoint: retrying it only spends
# another attempt's epochs. Its message is kept beside the trial, and a retry fails at once.
DETERMINISTIC_FAILURES = (NonFiniteLossError, ConfigError, CheckpointError, DatasetNotFoundError)
FAILURE_MARKER = "deterministic_failure.txt"


class RepeatedFailure(RuntimeError):
    """A retry of a trial whose last attempt failed deterministically (not run again)."""


def failure_marker() -> Path:
    """Beside the trial's checkpoints in `--storage` (one folder every node of a cluster sees),
    not in the node's own trial folder: a retry Ray places on another node sees it too."""
    return Path(tune.get_context().get_storage().trial_fs_path) / FAILURE_MARKER


def train_trial(ray_config: dict[str, Any], spec: StudySpec) -> None:
    """A Ray Tune function trainable: fit the trial's config, one report per epoch (the last
    checkpoint of a final run also holds `best.pt`, its best epoch's student). A diverging
    loss, a bad config or an unreadable file fails the trial once: Ray's retries of it end at
    once with the same reason instead of training again."""
    marker = failure_marker()
    if marker.is_file():
        raise RepeatedFailure(f"{marker.read_text().strip()} (not retried: it failed so before)")
    try:
        run_trial(ray_config, spec)
    except DETERMINISTIC_FAILURES as error:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{type(error).__name__}: {error}")
        raise


def run_trial(ray_config: dict[str, Any], spec: StudySpec) -> None:
    config = spec.trial_config(ray_config)
    set_up_worker(spec.resources.cpus_per_trial, spec.resources.gpus_per_trial)
    device = str(resolve_device(config.device))
    data = load_datasets(config.data, config.seed, with_test=config.final)
    splits = json.dumps(describe_splits(config.data, data))

    def report(epoch_metrics: dict[str, float], state: State) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, Path(folder) / CHECKPOINT_FILE)
            (Path(folder) / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
            # A final run's last checkpoint also holds its best epoch's student on its own.
            if state["epoch"] == config.optim.epochs and (best := best_checkpoint(state)):
                save_checkpoint(best, Path(folder) / BEST_CHECKPOINT_FILE)
            tune.report(
                {
                    **epoch_metrics,
                    EPOCHS_TOTAL: config.optim.epochs,
                    RESULT_DEVICE: device,
                    RESULT_DATASETS: splits,
                },
                checkpoint=tune.Checkpoint.from_directory(folder),
            )

    fit(config, report=report, resume=restored_state(), data=data)


def train_teacher(config_values: dict[str, Any], checkpoint: str, cpus: float, gpus: float) -> str:
    """Train a teacher into `checkpoint` (a Ray task); continues a partial one if present."""
    config = Config.from_dict(config_values)
    set_up_worker(cpus, gpus)
    path = Path(checkpoint)
    resume = load_checkpoint(path) if path.is_file() else None

    def report(epoch_metrics: dict[str, float], state: State) -> None:
        save_checkpoint(state, path)
        # Ray forwards a task's output to the driver: the teacher is not hours of silence.
        print(teacher_line(epoch_metrics, config.optim.epochs), flush=True)

    fit(config, report=report, resume=resume)
    return str(path)


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
